//! The order service. It owns orders and runs the order side of the saga:
//!
//! - `POST /orders` stores the order and an `OrderPlaced` event in one
//!   transaction ([`http::place`]); the kitchen takes it from there.
//! - The kitchen's `StockChecked` accepts or rejects it; delivery events move
//!   it on ([`events`], rules in [`domain`]).
//! - `POST /orders/{id}/cancel` asks the kitchen synchronously
//!   ([`kitchen`]); if the kitchen cannot answer, the cancel is stored as an
//!   `OrderCancelRequested` event and the order waits in `CANCEL_PENDING`.
#![forbid(unsafe_code)]

pub mod domain;
pub mod events;
pub mod http;
pub mod kitchen;
pub mod store;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    routing::{get, post},
};
use restaurant_platform::{
    backlog::Backlog,
    breaker::BreakerConfig,
    db::Migrations,
    service::{RunningService, ServiceContext, ServiceHost},
};
use tokio::net::TcpListener;

pub const NAME: &str = "order";

/// The service's schema: portable SQL, the same for SQLite and PostgreSQL,
/// and a storage setting for PostgreSQL alone (`migrations/postgres`).
pub fn migrations() -> Migrations {
    Migrations::portable_and_postgres(sqlx::migrate!(), sqlx::migrate!("migrations/postgres"))
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Base URL of the cook service, for the synchronous cancel call.
    pub cook_url: String,
    /// Deadline of that call; past it the cancel is deferred.
    pub cancel_timeout: Duration,
    /// The circuit breaker on that call.
    pub breaker: BreakerConfig,
    /// New orders are refused while a consumer trails the bus by more
    /// than this many entries ([`restaurant_platform::backlog`]); `None`:
    /// never.
    pub max_backlog: Option<u64>,
}

#[derive(Clone)]
pub struct App {
    pub ctx: ServiceContext,
    pub kitchen: kitchen::Kitchen,
    pub placer: http::Placer,
    pub backlog: Backlog,
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/orders", post(http::place).get(http::list))
        .route("/orders/{id}", get(http::get).delete(http::cancel))
        .route("/orders/{id}/cancel", post(http::cancel))
        .with_state(app)
}

pub async fn start(
    ctx: ServiceContext,
    listener: TcpListener,
    config: Config,
) -> std::io::Result<RunningService> {
    let (placer, placing) = http::placer(ctx.db.clone(), ctx.outbox.clone());
    let backlog = Backlog::new(config.max_backlog);
    let app = App {
        kitchen: kitchen::Kitchen::new(config.cook_url, config.cancel_timeout, config.breaker),
        ctx: ctx.clone(),
        placer,
        backlog: backlog.clone(),
    };
    let mut host = ServiceHost::new(ctx);
    host.spawn(placing);
    host.spawn(backlog.watch(app.ctx.bus.clone(), app.ctx.shutdown.clone()));
    host.consume(Arc::new(events::OrderEvents(app.clone())));
    host.serve(listener, router(app))
}
