//! The order service's SQL. Every write runs inside a transaction the
//! caller owns, so the state change and its outbox event commit together,
//! except [`insert_all_emitting`], one write of both.

use restaurant_contract::{Envelope, OrderLine};
use restaurant_platform::{
    db::{
        Backend, Db, Params, Planned, Query, Tx, backend_of, json_rows, rows_per_statement,
        rows_per_statement_on, select_for_update, select_planned,
    },
    outbox,
};
use sqlx::{AssertSqlSafe, Row, any::AnyRow};

use crate::domain::{Order, OrderStatus};

const COLUMNS: &str = "id, customer_id, restaurant_id, items, address, status, reason, \
                       cook_id, delivery_id, created_at, updated_at";
const COLUMN_COUNT: usize = 11;

/// A row read the usual way goes through the same mapping as a packed one.
fn from_row(r: &AnyRow) -> Result<Order, sqlx::Error> {
    from_packed((
        r.try_get(0)?,
        r.try_get(1)?,
        r.try_get(2)?,
        r.try_get(3)?,
        r.try_get(4)?,
        r.try_get(5)?,
        r.try_get(6)?,
        r.try_get(7)?,
        r.try_get(8)?,
        r.try_get(9)?,
        r.try_get(10)?,
    ))
}

/// Inserts new orders, many per statement.
pub async fn insert_all(tx: &mut Tx, orders: &[&Order]) -> Result<(), sqlx::Error> {
    write_all(tx, orders, "").await
}

/// What saving an order that exists changes.
const SAVE: &str = " ON CONFLICT (id) DO UPDATE SET status = excluded.status, \
                    reason = excluded.reason, cook_id = excluded.cook_id, \
                    delivery_id = excluded.delivery_id, updated_at = excluded.updated_at";

/// Saves changed orders (which exist), many per statement.
pub async fn save_all(tx: &mut Tx, orders: &[&Order]) -> Result<(), sqlx::Error> {
    write_all(tx, orders, SAVE).await
}

/// [`save_all`], and `events` appended to the outbox, sent with the
/// planned transaction's `COMMIT`.
pub async fn save_all_emitting_planned(
    tx: &mut Planned,
    orders: &[&Order],
    events: &[Envelope],
) -> Result<(), sqlx::Error> {
    let mut params = tx.params();
    let mut writes: Vec<String> = orders
        .chunks(rows_per_statement_on(Backend::Sqlite, COLUMN_COUNT))
        .map(|chunk| {
            let values = params.rows(chunk.len(), COLUMN_COUNT);
            format!("INSERT INTO orders ({COLUMNS}) VALUES {values}{SAVE}")
        })
        .collect();
    if !events.is_empty() {
        writes.push(outbox::insert_sql(&mut params));
    }
    tx.commit(&writes.join("; "), |q| {
        let q = bind_all(q, orders);
        if events.is_empty() {
            q
        } else {
            outbox::bind_row(q, events)
        }
    })
    .await
}

async fn write_all(tx: &mut Tx, orders: &[&Order], on_conflict: &str) -> Result<(), sqlx::Error> {
    if backend_of(tx) == Backend::Postgres {
        let rows = from_json(&Params::of(tx).one());
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO orders ({COLUMNS}) {rows}{on_conflict}"
        )))
        .bind(stored(orders))
        .execute(&mut **tx)
        .await?;
        return Ok(());
    }
    for chunk in orders.chunks(rows_per_statement(tx, COLUMN_COUNT)) {
        let values = Params::of(tx).rows(chunk.len(), COLUMN_COUNT);
        let q = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO orders ({COLUMNS}) VALUES {values}{on_conflict}"
        )))
        .persistent(false);
        bind_all(q, chunk).execute(&mut **tx).await?;
    }
    Ok(())
}

/// On PostgreSQL the orders a statement writes are one JSON parameter,
/// `param` ([`json_rows`]).
fn from_json(param: &str) -> String {
    json_rows("orders", COLUMNS, param)
}

/// An order as one JSON object of the table's columns, for [`from_json`].
#[derive(serde::Serialize)]
struct StoredOrder<'a> {
    id: &'a str,
    customer_id: &'a str,
    restaurant_id: &'a str,
    /// As stored: the lines' JSON text.
    items: String,
    address: &'a str,
    status: &'static str,
    reason: Option<&'a str>,
    cook_id: Option<&'a str>,
    delivery_id: Option<&'a str>,
    created_at: i64,
    updated_at: i64,
}

/// `orders` as [`from_json`]'s parameter.
fn stored(orders: &[&Order]) -> String {
    let rows: Vec<StoredOrder> = orders
        .iter()
        .map(|o| StoredOrder {
            id: &o.id,
            customer_id: &o.customer_id,
            restaurant_id: &o.restaurant_id,
            items: serde_json::to_string(&o.items).expect("serializes"),
            address: &o.address,
            status: o.status.as_str(),
            reason: o.reason.as_deref(),
            cook_id: o.cook_id.as_deref(),
            delivery_id: o.delivery_id.as_deref(),
            created_at: o.created_at,
            updated_at: o.updated_at,
        })
        .collect();
    serde_json::to_string(&rows).expect("serializes")
}

/// Binds `orders`' columns in `COLUMNS` order.
fn bind_all<'q>(mut q: Query<'q>, orders: &[&'q Order]) -> Query<'q> {
    for o in orders {
        q = q
            .bind(&o.id)
            .bind(&o.customer_id)
            .bind(&o.restaurant_id)
            .bind(serde_json::to_string(&o.items).expect("serializes"))
            .bind(&o.address)
            .bind(o.status.as_str())
            .bind(&o.reason)
            .bind(&o.cook_id)
            .bind(&o.delivery_id)
            .bind(o.created_at)
            .bind(o.updated_at);
    }
    q
}

/// The most new orders [`insert_all_emitting`] takes in one statement (a
/// row fewer than an insert of orders alone: the outbox row's values).
pub fn emitting_max(db: &Db) -> usize {
    rows_per_statement_on(db.backend(), COLUMN_COUNT)
        .saturating_sub(1)
        .max(1)
}

/// Inserts new orders (at most [`emitting_max`]) and appends their events
/// as one write ([`Db::write_as_one`]): on PostgreSQL one statement, a
/// data-modifying `WITH`, which commits by itself; on SQLite the two
/// inserts between `BEGIN IMMEDIATE` and `COMMIT`, sent as one text. A
/// transaction of the same two inserts is four round trips to the server
/// or to SQLite's thread (`BEGIN`, two statements, `COMMIT`), each waiting
/// for a core on a busy machine; this is one.
pub async fn insert_all_emitting<'e>(
    db: &Db,
    orders: &[&Order],
    events: impl IntoIterator<Item = &'e Envelope>,
) -> Result<(), sqlx::Error> {
    let mut params = Params::for_db(db);
    if db.backend() == Backend::Postgres {
        // The orders as one JSON parameter (see `from_json`): one text for
        // every batch, kept prepared.
        let rows = from_json(&params.one());
        let emit = outbox::insert_sql(&mut params);
        let q = sqlx::query(AssertSqlSafe(format!(
            "WITH placed AS (INSERT INTO orders ({COLUMNS}) {rows}) {emit}"
        )))
        .bind(stored(orders));
        db.execute(outbox::bind_row(q, events)).await?;
        return Ok(());
    }
    let values = params.rows(orders.len(), COLUMN_COUNT);
    let emit = outbox::insert_sql(&mut params);
    let insert = format!("INSERT INTO orders ({COLUMNS}) VALUES {values}");
    let writes = match db.backend() {
        Backend::Postgres => format!("WITH placed AS ({insert}) {emit}"),
        Backend::Sqlite => format!("{insert}; {emit}"),
    };
    db.write_as_one(&writes, |q| outbox::bind_row(bind_all(q, orders), events))
        .await
}

/// Saves a changed order.
pub async fn update(tx: &mut Tx, o: &Order) -> Result<(), sqlx::Error> {
    save_all(tx, &[o]).await
}

/// Loads (and on PostgreSQL locks, in id order so replicas cannot
/// deadlock) every order in `ids`.
pub async fn load_many_for_update(tx: &mut Tx, ids: &[&str]) -> Result<Vec<Order>, sqlx::Error> {
    // Packed into one row (see `db::packed`): the order consumer reads a
    // few hundred orders a batch while it holds the order database's one
    // SQLite writer, which placements wait for.
    select_for_update::<Packed>(tx, "orders", COLUMNS, "", ids)
        .await?
        .into_iter()
        .map(from_packed)
        .collect()
}

/// [`load_many_for_update`] over a planned transaction (SQLite).
pub async fn load_many_planned(tx: &mut Planned, ids: &[&str]) -> Result<Vec<Order>, sqlx::Error> {
    select_planned::<Packed>(tx, "orders", COLUMNS, ids)
        .await?
        .into_iter()
        .map(from_packed)
        .collect()
}

/// An order's columns as `db::packed` returns them.
type Packed = (
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
);

fn from_packed(r: Packed) -> Result<Order, sqlx::Error> {
    let (
        id,
        customer_id,
        restaurant_id,
        items,
        address,
        status,
        reason,
        cook_id,
        delivery_id,
        created_at,
        updated_at,
    ) = r;
    Ok(Order {
        id,
        customer_id,
        restaurant_id,
        items: serde_json::from_str::<Vec<OrderLine>>(&items)
            .map_err(|e| sqlx::Error::Decode(e.into()))?,
        address,
        status: OrderStatus::parse(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown status {status}").into()))?,
        reason,
        cook_id,
        delivery_id,
        created_at,
        updated_at,
    })
}

/// Loads an order to change it, locking its row until commit.
pub async fn load_for_update(tx: &mut Tx, id: &str) -> Result<Option<Order>, sqlx::Error> {
    Ok(load_many_for_update(tx, &[id]).await?.pop())
}

pub async fn get(db: &Db, id: &str) -> Result<Option<Order>, sqlx::Error> {
    db.read_with(async |c| {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM orders WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(c)
        .await
    })
    .await?
    .map(|r| from_row(&r))
    .transpose()
}

pub async fn list_by_customer(
    db: &Db,
    customer_id: &str,
    limit: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    db.read_with(async |c| {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM orders WHERE customer_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        )))
        .bind(customer_id)
        .bind(limit)
        .fetch_all(c)
        .await
    })
    .await?
    .iter()
    .map(from_row)
    .collect()
}

/// Claims an idempotency key for a new order. `Ok(None)` means the key was
/// free and is now bound to `order_id`; `Ok(Some((fingerprint, order)))` is
/// the earlier binding.
pub async fn claim_key(
    tx: &mut Tx,
    key: &str,
    fingerprint: &str,
    order_id: &str,
    now: i64,
) -> Result<Option<(String, String)>, sqlx::Error> {
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (idem_key, fingerprint, order_id, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (idem_key) DO NOTHING",
    )
    .bind(key)
    .bind(fingerprint)
    .bind(order_id)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if claimed {
        return Ok(None);
    }
    let row = sqlx::query("SELECT fingerprint, order_id FROM idempotency_keys WHERE idem_key = $1")
        .bind(key)
        .fetch_one(&mut **tx)
        .await?;
    Ok(Some((row.try_get(0)?, row.try_get(1)?)))
}
