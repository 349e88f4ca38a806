//! The kitchen's API: menus (public), cook tickets (public), and the
//! synchronous cancel endpoint the order service calls (internal).

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use restaurant_contract::OrderLine;
use restaurant_platform::{
    http::{Json, Path, Problem, Query, RequestContext, required},
    rfc3339,
};
use serde::{Deserialize, Serialize};

use crate::{
    App,
    domain::{CancelOutcome, CompleteOutcome, CookStatus, MenuItem, Ticket, check_id},
    kitchen,
    store::{self, Menu, TicketKey},
};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MenuQuery {
    restaurant_id: Option<String>,
}

pub async fn list_menus(
    State(app): State<App>,
    Query(q): Query<MenuQuery>,
) -> Result<Json<Vec<Menu>>, Problem> {
    let r = required(q.restaurant_id, "restaurantId")?;
    Ok(Json(store::menus(&app.ctx.db, &r).await?))
}

#[derive(Deserialize)]
pub struct PutMenu {
    name: String,
    price: i64,
    stock: i64,
}

pub async fn put_menu(
    State(app): State<App>,
    Path((restaurant_id, menu_id)): Path<(String, String)>,
    Json(req): Json<PutMenu>,
) -> Result<Response, Problem> {
    check_id("restaurantId", &restaurant_id).map_err(Problem::validation)?;
    check_id("menuId", &menu_id).map_err(Problem::validation)?;
    let item = MenuItem::parse(&req.name, req.price, req.stock).map_err(Problem::validation)?;
    let created = store::put_menu(&app.ctx.db, &restaurant_id, &menu_id, &item).await?;
    let body = Menu {
        restaurant_id,
        menu_id,
        name: item.name,
        price: item.price,
        stock: item.stock,
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(body)).into_response())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TicketView {
    id: String,
    cook_id: String,
    order_id: String,
    restaurant_id: String,
    items: Vec<OrderLine>,
    status: CookStatus,
    reason: Option<String>,
    complete_at: Option<String>,
    created_at: String,
    updated_at: String,
}

impl From<Ticket> for TicketView {
    fn from(t: Ticket) -> Self {
        TicketView {
            cook_id: t.id.clone(),
            id: t.id,
            order_id: t.order_id,
            restaurant_id: t.restaurant_id,
            items: t.items,
            status: t.status,
            reason: t.reason,
            complete_at: t.complete_at.map(rfc3339),
            created_at: rfc3339(t.created_at),
            updated_at: rfc3339(t.updated_at),
        }
    }
}

pub async fn get_cook(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<TicketView>, Problem> {
    store::ticket(&app.ctx.db, TicketKey::Id, &id)
        .await?
        .map(|t| Json(t.into()))
        .ok_or_else(|| Problem::not_found(format!("no cook ticket {id}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CookQuery {
    order_id: Option<String>,
}

pub async fn list_cooks(
    State(app): State<App>,
    Query(q): Query<CookQuery>,
) -> Result<Json<Vec<TicketView>>, Problem> {
    let order_id = required(q.order_id, "orderId")?;
    let ticket = store::ticket(&app.ctx.db, TicketKey::OrderId, &order_id).await?;
    Ok(Json(ticket.into_iter().map(Into::into).collect()))
}

pub async fn complete_cook(
    State(app): State<App>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<Json<TicketView>, Problem> {
    let (ticket, outcome) = kitchen::complete(&app, &id, &ctx.cause())
        .await?
        .ok_or_else(|| Problem::not_found(format!("no cook ticket {id}")))?;
    app.timer_wake.notify_one();
    match outcome {
        CompleteOutcome::Complete | CompleteOutcome::AlreadyCooked => Ok(Json(ticket.into())),
        CompleteOutcome::NotCooking => Err(Problem::conflict(format!(
            "cook ticket {id} is {} and cannot be completed",
            ticket.status.as_str()
        ))
        .with("cookStatus", ticket.status)),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequest {
    order_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CancelAnswer {
    outcome: &'static str,
    cook_id: Option<String>,
    reason: String,
}

/// `POST /internal/cancellations`: the order service's synchronous cancel.
pub async fn cancel(
    State(app): State<App>,
    ctx: RequestContext,
    Json(req): Json<CancelRequest>,
) -> Result<Response, Problem> {
    check_id("orderId", &req.order_id).map_err(Problem::validation)?;
    let mut tx = app.ctx.db.begin().await?;
    let c = kitchen::cancel_order(&app, &mut tx, &req.order_id, &ctx.cause()).await?;
    tx.commit().await?;
    app.ctx.outbox.notify();
    let outcome = match c.outcome {
        CancelOutcome::Cancel | CancelOutcome::AlreadyCancelled => "CANCELLED",
        CancelOutcome::NothingReserved => "NOTHING_RESERVED",
        CancelOutcome::TooLate => {
            return Err(
                Problem::conflict("too late to cancel: the dish is already cooked")
                    .with("reason", c.reason)
                    .with("cookId", c.cook_id),
            );
        }
    };
    Ok(Json(CancelAnswer {
        outcome,
        cook_id: c.cook_id,
        reason: c.reason,
    })
    .into_response())
}
