//! MyPage: the CQRS read side. One view per order, built only from the
//! events of the other services (never by calling them), so reading the
//! whole state of an order — order, kitchen, delivery — is one primary-key
//! lookup. The projection rules are in [`projection`]; this file stores
//! views and serves them.
#![forbid(unsafe_code)]

pub mod projection;

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    routing::{get, post},
};
use projection::View;
use restaurant_contract::{Envelope, Event, OrderLine};
use restaurant_platform::{
    bus::Bus,
    consumer::{HandleError, Handler},
    db::{Db, Migrations, Params, Tx, rows_per_statement},
    http::{Json, Path, Problem, Query, required},
    rfc3339,
    service::{RunningService, ServiceContext, ServiceHost},
};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Row, any::AnyRow};
use tokio::net::TcpListener;

pub const NAME: &str = "mypage";

/// The service's schema: portable SQL, the same for SQLite and PostgreSQL.
pub fn migrations() -> Migrations {
    Migrations::portable(sqlx::migrate!())
}

const COLUMNS: &str = "order_id, customer_id, restaurant_id, items, facts, cook_id, delivery_id, \
                       reject_reason, cancel_reason, refuse_reason, updated_at, projected_at";

/// A view as stored: the projection plus when it was last written.
struct Stored {
    view: View,
    projected_at: i64,
}

fn from_row(r: &AnyRow) -> Result<Stored, sqlx::Error> {
    let items: Option<String> = r.try_get(3)?;
    let view = View {
        order_id: r.try_get(0)?,
        customer_id: r.try_get(1)?,
        restaurant_id: r.try_get(2)?,
        items: items
            .map(|i| serde_json::from_str::<Vec<OrderLine>>(&i))
            .transpose()
            .map_err(|e| sqlx::Error::Decode(e.into()))?,
        facts: r.try_get(4)?,
        cook_id: r.try_get(5)?,
        delivery_id: r.try_get(6)?,
        reject_reason: r.try_get(7)?,
        cancel_reason: r.try_get(8)?,
        refuse_reason: r.try_get(9)?,
        updated_at: r.try_get(10)?,
    };
    Ok(Stored {
        view,
        projected_at: r.try_get(11)?,
    })
}

/// Applies a batch of events (in log order) to their orders' views in
/// `table` with a fixed number of statements, whatever the batch's size:
/// create the missing rows, read (and on PostgreSQL lock) every row the
/// batch touches, fold the events in memory, write back the changed views.
async fn project_batch(
    db: &Db,
    tx: &mut Tx,
    table: &str,
    batch: &[(Envelope, Event)],
) -> Result<(), sqlx::Error> {
    // Sorted, so replicas lock rows in one order and cannot deadlock.
    let ids: Vec<&str> = batch
        .iter()
        .map(|(env, _)| env.order_id.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut views = std::collections::HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(rows_per_statement(tx, 1)) {
        // Make sure the rows exist so they can be locked: two replicas
        // applying events of one order must not lose each other's update.
        let values = Params::of(tx).rows_of(chunk.len(), |p| format!("({}, 0, 0, 0)", p.one()));
        let mut insert = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {table} (order_id, facts, updated_at, projected_at) VALUES {values} \
             ON CONFLICT (order_id) DO NOTHING"
        )));
        for id in chunk {
            insert = insert.bind(*id);
        }
        insert.execute(&mut **tx).await?;
        let mut select = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM {table} WHERE order_id IN ({}) ORDER BY order_id{}",
            Params::of(tx).list(chunk.len()),
            db.lock_suffix()
        )));
        for id in chunk {
            select = select.bind(*id);
        }
        for row in select.fetch_all(&mut **tx).await? {
            let stored = from_row(&row)?;
            views.insert(
                stored.view.order_id.clone(),
                (stored.view.clone(), stored.view),
            );
        }
    }
    let now = restaurant_contract::now_ms();
    for (env, event) in batch {
        if let Some((view, _)) = views.get_mut(&env.order_id) {
            view.apply(event, env.occurred_at);
        }
        // How far the view trails the event: the CQRS staleness.
        let lag = (now - env.occurred_at).max(0) as f64 / 1000.0;
        metrics::histogram!("mypage_staleness_seconds").record(lag);
    }
    let changed: Vec<&View> = views
        .values()
        .filter(|(view, before)| view != before)
        .map(|(view, _)| view)
        .collect();
    for chunk in changed.chunks(rows_per_statement(tx, 12)) {
        let values = Params::of(tx).rows(chunk.len(), 12);
        let mut upsert = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {table} ({COLUMNS}) VALUES {values} ON CONFLICT (order_id) DO UPDATE SET \
             customer_id = excluded.customer_id, restaurant_id = excluded.restaurant_id, \
             items = excluded.items, facts = excluded.facts, cook_id = excluded.cook_id, \
             delivery_id = excluded.delivery_id, reject_reason = excluded.reject_reason, \
             cancel_reason = excluded.cancel_reason, refuse_reason = excluded.refuse_reason, \
             updated_at = excluded.updated_at, projected_at = excluded.projected_at"
        )));
        for view in chunk {
            upsert = upsert
                .bind(&view.order_id)
                .bind(&view.customer_id)
                .bind(&view.restaurant_id)
                .bind(
                    view.items
                        .as_ref()
                        .map(|i| serde_json::to_string(i).expect("serializes")),
                )
                .bind(view.facts)
                .bind(&view.cook_id)
                .bind(&view.delivery_id)
                .bind(&view.reject_reason)
                .bind(&view.cancel_reason)
                .bind(&view.refuse_reason)
                .bind(view.updated_at)
                .bind(now);
        }
        upsert.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The view table's shape, for a rebuild's fresh table; the same as
/// `migrations/0100_views.sql` (the rebuild test reads rebuilt views through
/// the ordinary queries).
fn create_view_table(table: &str, index: &str) -> [String; 2] {
    [
        format!(
            "CREATE TABLE {table} (order_id TEXT PRIMARY KEY, customer_id TEXT, \
             restaurant_id TEXT, items TEXT, facts BIGINT NOT NULL, cook_id TEXT, \
             delivery_id TEXT, reject_reason TEXT, cancel_reason TEXT, refuse_reason TEXT, \
             updated_at BIGINT NOT NULL, projected_at BIGINT NOT NULL)"
        ),
        format!("CREATE INDEX {index} ON {table} (customer_id, order_id)"),
    ]
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rebuilt {
    pub events: u64,
    pub views: i64,
}

async fn replay_into(
    db: &Db,
    bus: &Bus,
    table: &str,
    after: i64,
    events: &mut u64,
) -> anyhow::Result<i64> {
    let mut replay = bus.replay(after).await?;
    let mut last = after;
    loop {
        let batch = replay.next_batch(500).await?;
        let Some(end) = batch.last().map(|d| d.position) else {
            return Ok(last);
        };
        // What does not decode was parked by the live consumer; a rebuild
        // skips it the same way.
        let items: Vec<(Envelope, Event)> = batch
            .iter()
            .filter_map(|d| {
                let env = Envelope::from_json(d.payload.as_bytes()).ok()?;
                let event = env.event().ok()??;
                Some((env, event))
            })
            .collect();
        let mut tx = db.begin().await?;
        project_batch(db, &mut tx, table, &items).await?;
        tx.commit().await?;
        *events += items.len() as u64;
        last = end;
    }
}

/// Rebuilds every view from the retained event history into a fresh table,
/// then switches to it. The live consumer keeps projecting into the old
/// table meanwhile; after the switch the history since the rebuild's end is
/// applied again to the new table. Applying an event twice is harmless (the
/// projection is idempotent and order-independent), so nothing is missed
/// and nothing is doubled.
pub async fn rebuild(db: &Db, bus: &Bus) -> anyhow::Result<Rebuilt> {
    let index = format!("views_by_customer_{}", restaurant_contract::now_ms());
    let mut tx = db.begin().await?;
    sqlx::query("DROP TABLE IF EXISTS views_rebuild")
        .execute(&mut *tx)
        .await?;
    for ddl in create_view_table("views_rebuild", &index) {
        sqlx::query(AssertSqlSafe(ddl)).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    let mut events = 0;
    let end = replay_into(db, bus, "views_rebuild", 0, &mut events).await?;
    let mut tx = db.begin().await?;
    sqlx::query("DROP TABLE views").execute(&mut *tx).await?;
    sqlx::query("ALTER TABLE views_rebuild RENAME TO views")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    replay_into(db, bus, "views", end, &mut events).await?;
    let views: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM views")
        .fetch_one(db.reader())
        .await?;
    tracing::info!(events, views, "MyPage rebuilt from the event history");
    Ok(Rebuilt { events, views })
}

async fn rebuild_endpoint(State(s): State<(Db, Bus)>) -> Result<Json<Rebuilt>, Problem> {
    Ok(Json(rebuild(&s.0, &s.1).await?))
}

pub struct MyPageEvents(pub Db);

impl Handler for MyPageEvents {
    const TYPES: &'static [&'static str] = Event::TYPES;
    /// A view is a join of facts: an event applied again, in any order,
    /// changes nothing (`projection::tests`, permutations and duplicates).
    const IDEMPOTENT: bool = true;

    async fn handle(&self, tx: &mut Tx, env: &Envelope, event: Event) -> Result<(), HandleError> {
        project_batch(&self.0, tx, "views", &[(env.clone(), event)]).await?;
        Ok(())
    }

    async fn handle_batch(
        &self,
        tx: &mut Tx,
        batch: Vec<(Envelope, Event)>,
    ) -> Result<(), HandleError> {
        project_batch(&self.0, tx, "views", &batch).await?;
        Ok(())
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MyPage {
    order_id: String,
    customer_id: Option<String>,
    restaurant_id: Option<String>,
    items: Option<Vec<OrderLine>>,
    order_status: &'static str,
    cook_status: Option<&'static str>,
    delivery_status: Option<&'static str>,
    cook_id: Option<String>,
    delivery_id: Option<String>,
    reason: Option<String>,
    /// When the latest event this view reflects happened.
    updated_at: String,
    /// When the view last changed; minus `updatedAt`, its staleness.
    projected_at: String,
}

impl From<Stored> for MyPage {
    fn from(
        Stored {
            view: v,
            projected_at,
        }: Stored,
    ) -> Self {
        MyPage {
            projected_at: rfc3339(projected_at),
            order_status: v.order_status(),
            cook_status: v.cook_status(),
            delivery_status: v.delivery_status(),
            reason: v.reason().map(str::to_owned),
            updated_at: rfc3339(v.updated_at),
            order_id: v.order_id,
            customer_id: v.customer_id,
            restaurant_id: v.restaurant_id,
            items: v.items,
            cook_id: v.cook_id,
            delivery_id: v.delivery_id,
        }
    }
}

async fn get_view(State(db): State<Db>, Path(id): Path<String>) -> Result<Json<MyPage>, Problem> {
    sqlx::query(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM views WHERE order_id = $1"
    )))
    .bind(&id)
    .fetch_optional(db.reader())
    .await?
    .map(|r| from_row(&r))
    .transpose()?
    .map(|v| Json(v.into()))
    .ok_or_else(|| {
        Problem::not_found(format!(
            "no view of order {id} (yet: a new order shows up once its first event is projected)"
        ))
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ByCustomer {
    customer_id: Option<String>,
}

async fn list_views(
    State(db): State<Db>,
    Query(q): Query<ByCustomer>,
) -> Result<Json<Vec<MyPage>>, Problem> {
    let customer = required(q.customer_id, "customerId")?;
    let views = sqlx::query(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM views WHERE customer_id = $1 ORDER BY order_id DESC LIMIT 1000"
    )))
    .bind(&customer)
    .fetch_all(db.reader())
    .await?
    .iter()
    .map(from_row)
    .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(views.into_iter().map(Into::into).collect()))
}

pub async fn start(ctx: ServiceContext, listener: TcpListener) -> std::io::Result<RunningService> {
    let router = Router::new()
        .route("/mypages", get(list_views))
        .route("/mypages/{order_id}", get(get_view))
        .with_state(ctx.db.clone())
        .merge(
            Router::new()
                .route("/admin/rebuild", post(rebuild_endpoint))
                .with_state((ctx.db.clone(), ctx.bus.clone())),
        );
    let mut host = ServiceHost::new(ctx.clone());
    host.consume(Arc::new(MyPageEvents(ctx.db.clone())));
    host.serve(listener, router)
}
