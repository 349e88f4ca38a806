//! The delivery service. On `CookCompleted` it starts a delivery
//! (`DeliveryStarted`); `POST /deliveries/{id}/complete` or the durable
//! timer completes it (`DeliveryCompleted`). Small enough for one file:
//! status rules, SQL, handlers and wiring, in that order.
#![forbid(unsafe_code)]

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    routing::{get, post},
};
use restaurant_contract::{
    Cause, CookCompleted, DeliveryRef, DeliveryStarted, Envelope, Event, new_id, now_ms,
};
use restaurant_platform::{
    consumer::{HandleError, Handler},
    db::{Db, Migrations, Params, Tx, inserted, rows_per_statement, select_for_update},
    http::{Json, Path, Problem, Query, RequestContext, required},
    outbox, rfc3339,
    service::{RunningService, ServiceContext, ServiceHost},
    timer,
};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Row, any::AnyRow};
use tokio::{net::TcpListener, sync::Notify};

pub const NAME: &str = "delivery";

/// The service's schema: portable SQL, the same for SQLite and PostgreSQL.
pub fn migrations() -> Migrations {
    Migrations::portable(sqlx::migrate!())
}

// ---- domain ---------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeliveryStatus {
    Delivering,
    Delivered,
}

impl DeliveryStatus {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "DELIVERING" => Some(DeliveryStatus::Delivering),
            "DELIVERED" => Some(DeliveryStatus::Delivered),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub id: String,
    pub delivery_id: String,
    pub order_id: String,
    pub cook_id: String,
    pub address: String,
    pub status: DeliveryStatus,
    #[serde(serialize_with = "ser_opt_time")]
    pub complete_at: Option<i64>,
    #[serde(serialize_with = "ser_time")]
    pub created_at: i64,
    #[serde(serialize_with = "ser_time")]
    pub updated_at: i64,
}

fn ser_time<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*ms))
}

fn ser_opt_time<S: serde::Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&rfc3339(*ms)),
        None => s.serialize_none(),
    }
}

// ---- store ----------------------------------------------------------------

const COLUMNS: &str = "id, order_id, cook_id, address, status, complete_at, created_at, updated_at";

fn from_row(r: &AnyRow) -> Result<Delivery, sqlx::Error> {
    let status: String = r.try_get(4)?;
    let id: String = r.try_get(0)?;
    Ok(Delivery {
        delivery_id: id.clone(),
        id,
        order_id: r.try_get(1)?,
        cook_id: r.try_get(2)?,
        address: r.try_get(3)?,
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown status {status}").into()))?,
        complete_at: r.try_get(5)?,
        created_at: r.try_get(6)?,
        updated_at: r.try_get(7)?,
    })
}

async fn find(db: &Db, column: &'static str, value: &str) -> Result<Option<Delivery>, sqlx::Error> {
    db.read_with(async |c| {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM deliveries WHERE {column} = $1"
        )))
        .bind(value)
        .fetch_optional(c)
        .await
    })
    .await?
    .map(|r| from_row(&r))
    .transpose()
}

// ---- operations -------------------------------------------------------------

#[derive(Clone)]
pub struct App {
    pub ctx: ServiceContext,
    pub delivery_time: Option<Duration>,
    pub timer_wake: Arc<Notify>,
}

/// Cooking is done: start the deliveries (once per order), a batch of
/// orders with one insert and one outbox append.
async fn start_deliveries(
    app: &App,
    tx: &mut Tx,
    cooked: &[(&Envelope, &CookCompleted)],
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let complete_at = app.delivery_time.map(|d| now + d.as_millis() as i64);
    let mut events = Vec::with_capacity(cooked.len());
    for chunk in cooked.chunks(rows_per_statement(tx, 7)) {
        let values = Params::of(tx).rows_of(chunk.len(), |p| {
            format!("({}, 'DELIVERING', {})", p.list(4), p.list(3))
        });
        let mut q = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO deliveries (id, order_id, cook_id, address, status, complete_at, \
             created_at, updated_at) VALUES {values} ON CONFLICT (order_id) DO NOTHING"
        )))
        .persistent(false);
        let ids: Vec<String> = chunk.iter().map(|_| new_id()).collect();
        for (id, (env, c)) in ids.iter().zip(chunk) {
            q = q
                .bind(id)
                .bind(&env.order_id)
                .bind(&c.cook_id)
                .bind(&c.address)
                .bind(complete_at)
                .bind(now)
                .bind(now);
        }
        let count = q.execute(&mut **tx).await?.rows_affected();
        let went_in = {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            inserted(tx, "deliveries", &ids, count).await?
        };
        let mut started: HashMap<&str, String> = HashMap::with_capacity(chunk.len());
        for (id, (env, _)) in ids.into_iter().zip(chunk) {
            if went_in.contains(&id) {
                started.insert(&env.order_id, id);
            }
        }
        // An order already delivering (a second CookCompleted) starts nothing.
        for (env, c) in chunk {
            if let Some(id) = started.remove(env.order_id.as_str()) {
                let ev = Event::DeliveryStarted(DeliveryStarted {
                    delivery_id: id,
                    cook_id: c.cook_id.clone(),
                    address: c.address.clone(),
                });
                events.push(Envelope::new(NAME, &env.order_id, &ev, &env.as_cause()));
            }
        }
    }
    outbox::append_all(tx, &events).await
}

/// Completes a delivery; `None` if there is no such delivery. Completing a
/// delivered one again changes nothing.
async fn complete(app: &App, id: &str, cause: &Cause) -> Result<Option<Delivery>, sqlx::Error> {
    let mut tx = app.ctx.db.begin().await?;
    complete_in(&mut tx, &[id.to_owned()], cause).await?;
    tx.commit().await?;
    app.ctx.outbox.notify();
    find(&app.ctx.db, "id", id).await
}

/// Marks the deliveries among `ids` that are on their way as delivered and
/// publishes their events (a guarded transition: completing twice
/// publishes once).
async fn complete_in(tx: &mut Tx, ids: &[String], cause: &Cause) -> Result<(), sqlx::Error> {
    // Read (locked on PostgreSQL) and then updated, instead of one
    // `UPDATE … RETURNING`, so the rows come back as one (see `db::packed`).
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let delivering: Vec<(String, String)> = select_for_update(
        tx,
        "deliveries",
        "id, order_id",
        "status = 'DELIVERING'",
        &ids,
    )
    .await?;
    let delivered: Vec<&str> = delivering.iter().map(|(id, _)| id.as_str()).collect();
    timer::finish(tx, "deliveries", "DELIVERED", &delivered, now_ms()).await?;
    let events: Vec<Envelope> = delivering
        .into_iter()
        .map(|(delivery_id, order_id)| {
            let ev = Event::DeliveryCompleted(DeliveryRef { delivery_id });
            Envelope::new(NAME, &order_id, &ev, cause)
        })
        .collect();
    metrics::counter!("deliveries_completed_total").increment(events.len() as u64);
    outbox::append_all(tx, &events).await
}

async fn complete_due(app: &App) -> anyhow::Result<Option<i64>> {
    const BATCH: i64 = 256;
    let db = &app.ctx.db;
    let due = timer::due(db, "deliveries", "DELIVERING", now_ms(), BATCH).await?;
    if !due.is_empty() {
        // Every due delivery in one transaction: one commit for many.
        let mut tx = db.begin().await?;
        complete_in(&mut tx, &due, &Cause::default()).await?;
        tx.commit().await?;
        app.ctx.outbox.notify();
    }
    if due.len() as i64 == BATCH {
        return Ok(Some(now_ms()));
    }
    // Unbounded on purpose: see the cook service's `store::next_due`.
    Ok(db
        .read_with(async |c| {
            sqlx::query_scalar(
                "SELECT MIN(complete_at) FROM deliveries WHERE status = 'DELIVERING' \
                 AND complete_at IS NOT NULL",
            )
            .fetch_one(c)
            .await
        })
        .await?)
}

// ---- handlers -----------------------------------------------------------------

pub struct DeliveryEvents(pub App);

impl Handler for DeliveryEvents {
    const TYPES: &'static [&'static str] = &["CookCompleted"];
    /// One delivery per order (UNIQUE order_id): a second CookCompleted
    /// inserts nothing and so publishes nothing.
    const IDEMPOTENT_TYPES: &'static [&'static str] = Self::TYPES;

    async fn handle(&self, tx: &mut Tx, env: &Envelope, event: Event) -> Result<(), HandleError> {
        self.handle_batch(tx, vec![(env.clone(), event)]).await
    }

    async fn handle_batch(
        &self,
        tx: &mut Tx,
        batch: Vec<(Envelope, Event)>,
    ) -> Result<(), HandleError> {
        let cooked: Vec<_> = batch
            .iter()
            .filter_map(|(env, event)| match event {
                Event::CookCompleted(c) => Some((env, c)),
                _ => None,
            })
            .collect();
        start_deliveries(&self.0, tx, &cooked).await?;
        Ok(())
    }

    fn after_commit(&self) {
        self.0.timer_wake.notify_one();
    }
}

async fn get_delivery(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Delivery>, Problem> {
    find(&app.ctx.db, "id", &id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no delivery {id}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ByOrder {
    order_id: Option<String>,
}

async fn list_deliveries(
    State(app): State<App>,
    Query(q): Query<ByOrder>,
) -> Result<Json<Vec<Delivery>>, Problem> {
    let order_id = required(q.order_id, "orderId")?;
    let d = find(&app.ctx.db, "order_id", &order_id).await?;
    Ok(Json(d.into_iter().collect()))
}

async fn complete_delivery(
    State(app): State<App>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<Json<Delivery>, Problem> {
    complete(&app, &id, &ctx.cause())
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no delivery {id}")))
}

#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Deliveries complete by themselves this long after they start.
    pub delivery_time: Option<Duration>,
}

pub async fn start(
    ctx: ServiceContext,
    listener: TcpListener,
    config: Config,
) -> std::io::Result<RunningService> {
    let app = App {
        ctx: ctx.clone(),
        delivery_time: config.delivery_time,
        timer_wake: Arc::new(Notify::new()),
    };
    let router = Router::new()
        .route("/deliveries", get(list_deliveries))
        .route("/deliveries/{id}", get(get_delivery))
        .route("/deliveries/{id}/complete", post(complete_delivery))
        .with_state(app.clone());
    let mut host = ServiceHost::new(ctx.clone());
    host.consume(Arc::new(DeliveryEvents(app.clone())));
    let timer_app = app.clone();
    host.spawn_timer("delivery-complete", app.timer_wake.clone(), move || {
        let app = timer_app.clone();
        async move { complete_due(&app).await }
    });
    host.serve(listener, router)
}
