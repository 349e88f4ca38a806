//! MyPage: the CQRS read side. One view per order, built only from the
//! events of the other services (never by calling them), so reading the
//! whole state of an order — order, kitchen, delivery — is one primary-key
//! lookup. The projection rules are in [`projection`]; this file stores
//! views and serves them.
#![forbid(unsafe_code)]

pub mod projection;

use std::sync::Arc;

use axum::{Router, extract::State, routing::get};
use projection::View;
use restaurant_contract::{Envelope, Event, OrderLine};
use restaurant_platform::{
    consumer::{HandleError, Handler},
    db::{Db, Migrations, Tx},
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

/// Applies one event to its order's view inside the consumer's transaction.
async fn project(db: &Db, tx: &mut Tx, env: &Envelope, event: &Event) -> Result<(), sqlx::Error> {
    // Make sure the row exists so it can be locked: two replicas applying
    // events of one order must not lose each other's update.
    sqlx::query(
        "INSERT INTO views (order_id, facts, updated_at, projected_at) VALUES ($1, 0, 0, 0) \
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(&env.order_id)
    .execute(&mut **tx)
    .await?;
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM views WHERE order_id = $1{}",
        db.lock_suffix()
    )))
    .bind(&env.order_id)
    .fetch_one(&mut **tx)
    .await?;
    let mut view = from_row(&row)?.view;
    let before = view.clone();
    let now = restaurant_contract::now_ms();
    view.apply(event, env.occurred_at);
    if view == before {
        return Ok(());
    }
    sqlx::query(
        "UPDATE views SET customer_id = $2, restaurant_id = $3, items = $4, facts = $5, \
         cook_id = $6, delivery_id = $7, reject_reason = $8, cancel_reason = $9, \
         refuse_reason = $10, updated_at = $11, projected_at = $12 WHERE order_id = $1",
    )
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
    .bind(now)
    .execute(&mut **tx)
    .await?;
    // How far the view trails the event: the CQRS staleness.
    let lag = (now - env.occurred_at).max(0) as f64 / 1000.0;
    metrics::histogram!("mypage_staleness_seconds").record(lag);
    Ok(())
}

pub struct MyPageEvents(pub Db);

impl Handler for MyPageEvents {
    const TYPES: &'static [&'static str] = Event::TYPES;

    async fn handle(&self, tx: &mut Tx, env: &Envelope, event: Event) -> Result<(), HandleError> {
        project(&self.0, tx, env, &event).await?;
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
        .with_state(ctx.db.clone());
    let mut host = ServiceHost::new(ctx.clone());
    host.consume(Arc::new(MyPageEvents(ctx.db.clone())));
    host.serve(listener, router)
}
