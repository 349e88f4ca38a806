//! The kitchen's SQL: menus with stock, cook tickets, cancel tombstones.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use restaurant_contract::{CookCompleted, OrderLine, now_ms};
use restaurant_platform::{
    db::{Db, Params, Tx, inserted, rows_per_statement, select_for_update},
    timer::{due, finish},
};
use sqlx::{AssertSqlSafe, Row, any::AnyRow};

use crate::domain::{CookStatus, MenuItem, Ticket};

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Menu {
    pub restaurant_id: String,
    pub menu_id: String,
    pub name: String,
    pub price: i64,
    pub stock: i64,
}

/// Creates or replaces a menu item; `true` if it was created.
pub async fn put_menu(
    db: &Db,
    restaurant_id: &str,
    menu_id: &str,
    item: &MenuItem,
) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin().await?;
    let existed = sqlx::query("SELECT 1 FROM menus WHERE restaurant_id = $1 AND menu_id = $2")
        .bind(restaurant_id)
        .bind(menu_id)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
    sqlx::query(
        "INSERT INTO menus (restaurant_id, menu_id, name, price, stock, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (restaurant_id, menu_id) DO UPDATE SET \
         name = excluded.name, price = excluded.price, stock = excluded.stock, \
         updated_at = excluded.updated_at",
    )
    .bind(restaurant_id)
    .bind(menu_id)
    .bind(&item.name)
    .bind(item.price)
    .bind(item.stock)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(!existed)
}

fn menu_from_row(r: &AnyRow) -> Result<Menu, sqlx::Error> {
    Ok(Menu {
        restaurant_id: r.try_get(0)?,
        menu_id: r.try_get(1)?,
        name: r.try_get(2)?,
        price: r.try_get(3)?,
        stock: r.try_get(4)?,
    })
}

pub async fn menus(db: &Db, restaurant_id: &str) -> Result<Vec<Menu>, sqlx::Error> {
    db.read_with(async |c| {
        sqlx::query(
            "SELECT restaurant_id, menu_id, name, price, stock FROM menus \
             WHERE restaurant_id = $1 ORDER BY menu_id",
        )
        .bind(restaurant_id)
        .fetch_all(c)
        .await
    })
    .await?
    .iter()
    .map(menu_from_row)
    .collect()
}

pub async fn menu_count(db: &Db) -> Result<i64, sqlx::Error> {
    db.read_with(async |c| {
        sqlx::query_scalar("SELECT COUNT(*) FROM menus")
            .fetch_one(c)
            .await
    })
    .await
}

pub async fn restore(
    tx: &mut Tx,
    restaurant_id: &str,
    plan: &[(String, i64)],
) -> Result<(), sqlx::Error> {
    for (menu_id, qty) in plan {
        sqlx::query(
            "UPDATE menus SET stock = stock + $3 WHERE restaurant_id = $1 AND menu_id = $2",
        )
        .bind(restaurant_id)
        .bind(menu_id)
        .bind(*qty)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

const TICKET_COLUMNS: &str = "id, order_id, restaurant_id, items, address, status, reason, \
                              complete_at, created_at, updated_at";

fn ticket_from_row(r: &AnyRow) -> Result<Ticket, sqlx::Error> {
    let items: String = r.try_get(3)?;
    let status: String = r.try_get(5)?;
    Ok(Ticket {
        id: r.try_get(0)?,
        order_id: r.try_get(1)?,
        restaurant_id: r.try_get(2)?,
        items: serde_json::from_str::<Vec<OrderLine>>(&items)
            .map_err(|e| sqlx::Error::Decode(e.into()))?,
        address: r.try_get(4)?,
        status: CookStatus::parse(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown status {status}").into()))?,
        reason: r.try_get(6)?,
        complete_at: r.try_get(7)?,
        created_at: r.try_get(8)?,
        updated_at: r.try_get(9)?,
    })
}

/// Inserts a ticket unless the order already has one; `true` if inserted.
/// Concurrent inserts for one order wait for each other (unique index), so
/// exactly one wins whatever the interleaving.
pub async fn insert_ticket(tx: &mut Tx, t: &Ticket) -> Result<bool, sqlx::Error> {
    Ok(insert_tickets(tx, std::slice::from_ref(t))
        .await?
        .contains(&t.order_id))
}

/// Inserts tickets for orders that have none and returns the order ids
/// that got one (a batch may name an order twice; one row wins).
pub async fn insert_tickets(
    tx: &mut Tx,
    tickets: &[Ticket],
) -> Result<HashSet<String>, sqlx::Error> {
    let mut claimed = HashSet::with_capacity(tickets.len());
    for chunk in tickets.chunks(rows_per_statement(tx, 10)) {
        let values = Params::of(tx).rows(chunk.len(), 10);
        let mut q = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO cooks ({TICKET_COLUMNS}) VALUES {values} \
             ON CONFLICT (order_id) DO NOTHING"
        )))
        .persistent(false);
        for t in chunk {
            q = q
                .bind(&t.id)
                .bind(&t.order_id)
                .bind(&t.restaurant_id)
                .bind(serde_json::to_string(&t.items).expect("serializes"))
                .bind(&t.address)
                .bind(t.status.as_str())
                .bind(&t.reason)
                .bind(t.complete_at)
                .bind(t.created_at)
                .bind(t.updated_at);
        }
        let count = q.execute(&mut **tx).await?.rows_affected();
        let ids: Vec<&str> = chunk.iter().map(|t| t.id.as_str()).collect();
        let went_in = inserted(tx, "cooks", &ids, count).await?;
        claimed.extend(
            chunk
                .iter()
                .filter(|t| went_in.contains(&t.id))
                .map(|t| t.order_id.clone()),
        );
    }
    Ok(claimed)
}

/// Restaurant → menu id → stock, for every menu item of `restaurants`.
/// On SQLite the transaction holds the single writer; on PostgreSQL the rows
/// are locked (in key order, so cook replicas cannot deadlock). Either way
/// nobody else changes this stock until the batch commits, so reserving in
/// memory and writing the result back can never oversell.
pub type Stock = BTreeMap<String, BTreeMap<String, i64>>;

pub async fn stock_for_update(
    db: &Db,
    tx: &mut Tx,
    restaurants: &BTreeSet<&str>,
) -> Result<Stock, sqlx::Error> {
    let mut q = sqlx::query(AssertSqlSafe(format!(
        "SELECT restaurant_id, menu_id, stock FROM menus WHERE restaurant_id IN ({}) \
         ORDER BY restaurant_id, menu_id{}",
        Params::of(tx).list(restaurants.len()),
        db.lock_suffix()
    )));
    for r in restaurants {
        q = q.bind(*r);
    }
    let mut stock = Stock::new();
    for row in q.fetch_all(&mut **tx).await? {
        stock
            .entry(row.try_get(0)?)
            .or_default()
            .insert(row.try_get(1)?, row.try_get(2)?);
    }
    Ok(stock)
}

/// Writes back the stock levels that differ from `before`.
pub async fn save_stock(tx: &mut Tx, before: &Stock, after: &Stock) -> Result<(), sqlx::Error> {
    for (restaurant_id, menu) in after {
        for (menu_id, stock) in menu {
            if before.get(restaurant_id).and_then(|m| m.get(menu_id)) == Some(stock) {
                continue;
            }
            sqlx::query("UPDATE menus SET stock = $3 WHERE restaurant_id = $1 AND menu_id = $2")
                .bind(restaurant_id)
                .bind(menu_id)
                .bind(*stock)
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(())
}

/// Completes a ticket written by a cancel that came before the order: the
/// order's lines go in, for the record.
pub async fn fill_placeholder(tx: &mut Tx, t: &Ticket) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE cooks SET restaurant_id = $2, items = $3, address = $4 \
         WHERE order_id = $1 AND items = '[]'",
    )
    .bind(&t.order_id)
    .bind(&t.restaurant_id)
    .bind(serde_json::to_string(&t.items).expect("serializes"))
    .bind(&t.address)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn update_ticket(tx: &mut Tx, t: &Ticket) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE cooks SET status = $2, reason = $3, complete_at = $4, updated_at = $5 WHERE id = $1",
    )
    .bind(&t.id)
    .bind(t.status.as_str())
    .bind(&t.reason)
    .bind(t.complete_at)
    .bind(t.updated_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Loads a ticket (by id or by order id) to change it, locking its row.
pub async fn ticket_for_update(
    db: &Db,
    tx: &mut Tx,
    column: TicketKey,
    value: &str,
) -> Result<Option<Ticket>, sqlx::Error> {
    let col = match column {
        TicketKey::Id => "id",
        TicketKey::OrderId => "order_id",
    };
    sqlx::query(AssertSqlSafe(format!(
        "SELECT {TICKET_COLUMNS} FROM cooks WHERE {col} = $1{}",
        db.lock_suffix()
    )))
    .bind(value)
    .fetch_optional(&mut **tx)
    .await?
    .map(|r| ticket_from_row(&r))
    .transpose()
}

#[derive(Clone, Copy)]
pub enum TicketKey {
    Id,
    OrderId,
}

pub async fn ticket(db: &Db, key: TicketKey, value: &str) -> Result<Option<Ticket>, sqlx::Error> {
    let col = match key {
        TicketKey::Id => "id",
        TicketKey::OrderId => "order_id",
    };
    db.read_with(async |c| {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT {TICKET_COLUMNS} FROM cooks WHERE {col} = $1"
        )))
        .bind(value)
        .fetch_optional(c)
        .await
    })
    .await?
    .map(|r| ticket_from_row(&r))
    .transpose()
}

/// Marks the tickets among `ids` that are still cooking as cooked, and
/// returns what each one's `CookCompleted` says, with its order id. The
/// tickets are read (locked on PostgreSQL) and then updated, instead of
/// one `UPDATE … RETURNING`, so that they come back as one row (see
/// `db::packed`).
pub async fn mark_cooked(
    tx: &mut Tx,
    ids: &[String],
    now: i64,
) -> Result<Vec<(String, CookCompleted)>, sqlx::Error> {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let cooking: Vec<(String, String, String, String)> = select_for_update(
        tx,
        "cooks",
        "id, order_id, restaurant_id, address",
        "status = 'COOKING'",
        &ids,
    )
    .await?;
    let cooked: Vec<&str> = cooking.iter().map(|(id, ..)| id.as_str()).collect();
    finish(tx, "cooks", "COOKED", &cooked, now).await?;
    Ok(cooking
        .into_iter()
        .map(|(cook_id, order_id, restaurant_id, address)| {
            (
                order_id,
                CookCompleted {
                    cook_id,
                    restaurant_id,
                    address,
                },
            )
        })
        .collect())
}

/// Tickets whose automatic completion is due at `now`.
pub async fn due_tickets(db: &Db, now: i64, limit: i64) -> Result<Vec<String>, sqlx::Error> {
    due(db, "cooks", "COOKING", now, limit).await
}

/// The due time of the earliest ticket still cooking. Deliberately not
/// bounded to the future (nor folded into [`due_tickets`]' statement): this
/// index scan walks the entries completed tickets left in the timer's
/// index and marks them dead as it goes, which keeps `due_tickets`, a
/// bitmap scan that marks nothing, from visiting every completed ticket's
/// page until a vacuum. Folded in and bounded to `> now`, a timer pass
/// took 2.4 ms of PostgreSQL's time instead of 0.08 at 1,500 orders/s.
pub async fn next_due(db: &Db) -> Result<Option<i64>, sqlx::Error> {
    db.read_with(async |c| {
        sqlx::query_scalar(
            "SELECT MIN(complete_at) FROM cooks WHERE status = 'COOKING' \
             AND complete_at IS NOT NULL",
        )
        .fetch_one(c)
        .await
    })
    .await
}
