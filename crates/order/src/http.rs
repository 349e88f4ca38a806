//! The order API: place, read, list, cancel.

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use std::future::Future;

use restaurant_contract::{Cause, Envelope, Event, OrderLine, new_id, now_ms};
use restaurant_platform::{
    batch::Batcher,
    db::{Backend, Db, Tx},
    http::{Json, Path, Problem, Query, RequestContext, required},
    outbox::{self, OutboxSignal},
    rfc3339,
};
use serde::{Deserialize, Serialize};

use crate::{
    App,
    domain::{CancelDecision, NewOrder, Order, OrderStatus, decide_cancel},
    kitchen::KitchenAnswer,
    store,
};

pub const CANCELLED_BY_CUSTOMER: &str = "cancelled by customer";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaceOrder {
    customer_id: String,
    restaurant_id: String,
    items: Vec<OrderLine>,
    address: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    id: String,
    order_id: String,
    customer_id: String,
    restaurant_id: String,
    items: Vec<OrderLine>,
    address: String,
    status: OrderStatus,
    reason: Option<String>,
    cook_id: Option<String>,
    delivery_id: Option<String>,
    created_at: String,
    updated_at: String,
}

impl From<Order> for OrderView {
    fn from(o: Order) -> Self {
        OrderView {
            order_id: o.id.clone(),
            id: o.id,
            customer_id: o.customer_id,
            restaurant_id: o.restaurant_id,
            items: o.items,
            address: o.address,
            status: o.status,
            reason: o.reason,
            cook_id: o.cook_id,
            delivery_id: o.delivery_id,
            created_at: rfc3339(o.created_at),
            updated_at: rfc3339(o.updated_at),
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            Problem::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters")
        })?;
    Ok(Some(key.to_owned()))
}

fn created(order: Order, replayed: bool) -> Response {
    let location = format!("/orders/{}", order.id);
    let mut res = (StatusCode::CREATED, Json(OrderView::from(order))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    if replayed {
        res.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    res
}

pub async fn place(
    State(app): State<App>,
    ctx: RequestContext,
    headers: HeaderMap,
    Json(req): Json<PlaceOrder>,
) -> Result<Response, Problem> {
    let key = idempotency_key(&headers)?;
    let new = NewOrder::parse(
        &req.customer_id,
        &req.restaurant_id,
        &req.items,
        &req.address,
    )
    .map_err(Problem::validation)?;
    // After validation: a request that could never be placed hears why,
    // whatever the backlog.
    app.backlog.admit()?;
    let fingerprint = new.fingerprint();
    let (order, event) = new.place(new_id());
    let mut env = Envelope::new(crate::NAME, &order.id, &event, &ctx.cause());
    // The event happened when the order was made, to the millisecond:
    // MyPage's placedAt is the order's createdAt.
    env.occurred_at = order.created_at;
    let placement = Placement {
        env,
        key,
        fingerprint,
        order,
    };
    let placed = app
        .placer
        .submit(placement)
        .await
        .ok_or_else(|| Problem::unavailable("the order service is shutting down"))?
        .map_err(|e| Problem::internal(format!("placing the order failed: {e}")))?;
    match placed {
        Placed::Created(order) => {
            tracing::info!(order_id = %order.id, request_id = %ctx.request_id, "order placed");
            Ok(created(order, false))
        }
        Placed::Earlier {
            same_request: false,
            order_id,
        } => Err(Problem::validation(
            "this Idempotency-Key was already used for a different request",
        )
        .with("orderId", order_id)),
        Placed::Earlier { order_id, .. } => {
            let existing = store::get(&app.ctx.db, &order_id)
                .await?
                .ok_or_else(|| Problem::internal("idempotency key points to a missing order"))?;
            Ok(created(existing, true))
        }
    }
}

/// One order to place, validated and built, waiting for its batch.
pub struct Placement {
    key: Option<String>,
    fingerprint: String,
    order: Order,
    env: Envelope,
}

pub enum Placed {
    Created(Order),
    /// The Idempotency-Key was already bound to `order_id`, by the same
    /// request or by a different one.
    Earlier {
        order_id: String,
        same_request: bool,
    },
}

/// The placement queue: concurrent placements commit together (see
/// [`restaurant_platform::batch`]).
pub type Placer = Batcher<Placement, Result<Placed, String>>;

/// Up to this many placements share one transaction.
const PLACE_BATCH: usize = 256;
/// Placement batches committing at once on PostgreSQL.
const PLACE_BATCHES_IN_FLIGHT: usize = 2;

pub fn placer(db: Db, outbox: OutboxSignal) -> (Placer, impl Future<Output = ()> + Send + 'static) {
    // PostgreSQL commits concurrent transactions together, so a placement
    // arriving while a batch commits starts the next batch at once; SQLite
    // has one writer, which a second batch would only queue for.
    let in_flight = match db.backend() {
        Backend::Postgres => PLACE_BATCHES_IN_FLIGHT,
        Backend::Sqlite => 1,
    };
    Batcher::overlapping(
        "order_placement",
        PLACE_BATCH,
        in_flight,
        move |reqs: Vec<Placement>| {
            let (db, outbox) = (db.clone(), outbox.clone());
            async move {
                let answers = match place_all(&db, &reqs).await {
                    Ok(placed) => placed.into_iter().map(Ok).collect(),
                    // One bad placement must not fail its neighbours: retry
                    // each alone so only the one at fault gets the error.
                    Err(e) if reqs.len() > 1 => {
                        tracing::warn!(error = %e, n = reqs.len(), "placement batch failed; one by one");
                        let mut answers = Vec::with_capacity(reqs.len());
                        for r in &reqs {
                            answers.push(match place_all(&db, std::slice::from_ref(r)).await {
                                Ok(mut placed) => Ok(placed.remove(0)),
                                Err(e) => Err(e.to_string()),
                            });
                        }
                        answers
                    }
                    Err(e) => vec![Err(e.to_string())],
                };
                outbox.notify();
                answers
            }
        },
    )
}

/// Places a batch in one transaction: claims each Idempotency-Key, then
/// inserts the new orders and their `OrderPlaced` events set-wise.
async fn place_all(db: &Db, reqs: &[Placement]) -> Result<Vec<Placed>, sqlx::Error> {
    // Without keys to claim there is nothing to read first: the orders and
    // their events go in as one write (`store::insert_all_emitting`).
    if reqs.len() <= store::emitting_max(db) && reqs.iter().all(|r| r.key.is_none()) {
        let orders: Vec<&Order> = reqs.iter().map(|r| &r.order).collect();
        store::insert_all_emitting(db, &orders, reqs.iter().map(|r| &r.env)).await?;
        metrics::counter!("orders_placed_total").increment(reqs.len() as u64);
        return Ok(reqs
            .iter()
            .map(|r| Placed::Created(r.order.clone()))
            .collect());
    }
    let mut tx = db.begin().await?;
    // Keys are claimed in key order: two batches in flight at once (on
    // PostgreSQL) that hold the same two keys then wait for each other in
    // one order and cannot deadlock.
    let mut claims: Vec<(&str, usize)> = reqs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((r.key.as_deref()?, i)))
        .collect();
    claims.sort_unstable();
    let mut earlier: Vec<Option<Placed>> = reqs.iter().map(|_| None).collect();
    for (key, i) in claims {
        let r = &reqs[i];
        // A key claimed earlier in this batch is seen here too (same
        // transaction), so a key sent twice at once still makes one order.
        if let Some((first, order_id)) = store::claim_key(
            &mut tx,
            key,
            &r.fingerprint,
            &r.order.id,
            r.order.created_at,
        )
        .await?
        {
            earlier[i] = Some(Placed::Earlier {
                same_request: first == r.fingerprint,
                order_id,
            });
        }
    }
    let mut placed = Vec::with_capacity(reqs.len());
    let mut fresh = Vec::with_capacity(reqs.len());
    for (r, earlier) in reqs.iter().zip(earlier) {
        placed.push(earlier.unwrap_or_else(|| {
            fresh.push(r);
            Placed::Created(r.order.clone())
        }));
    }
    let orders: Vec<&Order> = fresh.iter().map(|r| &r.order).collect();
    store::insert_all(&mut tx, &orders).await?;
    let envs: Vec<Envelope> = fresh.iter().map(|r| r.env.clone()).collect();
    outbox::append_all(&mut tx, &envs).await?;
    tx.commit().await?;
    metrics::counter!("orders_placed_total").increment(fresh.len() as u64);
    Ok(placed)
}

pub async fn get(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, Problem> {
    store::get(&app.ctx.db, &id)
        .await?
        .map(|o| Json(o.into()))
        .ok_or_else(|| Problem::not_found(format!("no order {id}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    customer_id: Option<String>,
    limit: Option<i64>,
}

pub async fn list(
    State(app): State<App>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<OrderView>>, Problem> {
    let customer = required(q.customer_id, "customerId")?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::bad_request("limit must be between 1 and 1000"));
    }
    let orders = store::list_by_customer(&app.ctx.db, &customer, limit).await?;
    Ok(Json(orders.into_iter().map(Into::into).collect()))
}

/// Loads an order for change, applies `change`, saves it and the event it
/// returns in the caller's transaction.
async fn change_in(
    tx: &mut Tx,
    id: &str,
    cause: &Cause,
    change: impl FnOnce(&mut Order) -> Option<Event>,
) -> Result<Option<Order>, sqlx::Error> {
    let Some(mut order) = store::load_for_update(tx, id).await? else {
        return Ok(None);
    };
    let before = order.clone();
    let event = change(&mut order);
    if order != before {
        order.updated_at = now_ms();
        store::update(tx, &order).await?;
    }
    if let Some(event) = event {
        outbox::emit(tx, crate::NAME, id, &event, cause).await?;
    }
    Ok(Some(order))
}

async fn change(
    app: &App,
    id: &str,
    cause: &Cause,
    f: impl FnOnce(&mut Order) -> Option<Event>,
) -> Result<Order, Problem> {
    let mut tx = app.ctx.db.begin().await?;
    let order = change_in(&mut tx, id, cause, f)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no order {id}")))?;
    tx.commit().await?;
    app.ctx.outbox.notify();
    Ok(order)
}

/// Answers a cancel request from where the order now stands.
fn cancel_response(order: Order, kitchen_said: Option<&str>) -> Response {
    match order.status {
        OrderStatus::Cancelled => (StatusCode::OK, Json(OrderView::from(order))).into_response(),
        OrderStatus::CancelPending => {
            (StatusCode::ACCEPTED, Json(OrderView::from(order))).into_response()
        }
        status => {
            let detail = match (status, kitchen_said) {
                (_, Some(why)) if !why.is_empty() => {
                    format!("too late to cancel: the kitchen refused ({why})")
                }
                (OrderStatus::Rejected, _) => "the order was rejected; nothing to cancel".into(),
                (OrderStatus::Delivered, _) => "the order was already delivered".into(),
                (OrderStatus::Delivering, _) => "the order is out for delivery".into(),
                _ => "too late to cancel: the order was already cooked".into(),
            };
            Problem::conflict(detail)
                .with("orderId", &order.id)
                .with("orderStatus", status)
                .into_response()
        }
    }
}

pub async fn cancel(
    State(app): State<App>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let order = store::get(&app.ctx.db, &id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no order {id}")))?;
    if decide_cancel(order.status) != CancelDecision::AskKitchen {
        return Ok(cancel_response(order, None));
    }
    // No transaction is open while we wait for the kitchen: a slow kitchen
    // must not hold the order database's writer.
    let answer = app
        .kitchen
        .cancel(&id, &ctx.request_id, &ctx.trace.to_string())
        .await;
    let cause = ctx.cause();
    match answer {
        KitchenAnswer::Cancelled { .. } => {
            let order = change(&app, &id, &cause, |o| o.cancelled(CANCELLED_BY_CUSTOMER)).await?;
            Ok(cancel_response(order, None))
        }
        KitchenAnswer::TooLate { reason } => {
            let order = store::get(&app.ctx.db, &id).await?.unwrap_or(order);
            Ok(cancel_response(order, Some(&reason)))
        }
        KitchenAnswer::Unavailable { why } => {
            tracing::warn!(order_id = %id, why, "kitchen unavailable; cancel deferred");
            let request_id = ctx.request_id.clone();
            let order = change(&app, &id, &cause, |o| o.cancel_deferred(&request_id)).await?;
            Ok(cancel_response(order, None))
        }
    }
}
