//! The cook service: the kitchen. It owns menus with stock per restaurant
//! and cook tickets, and runs the kitchen side of the saga:
//!
//! - on `OrderPlaced` it reserves stock for every line of the order or for
//!   none, and answers with `StockChecked` (+ `CookStarted`)
//!   ([`kitchen::take_orders`]);
//! - a ticket completes by `POST /cooks/{id}/complete` or by its durable
//!   timer, publishing `CookCompleted` for the delivery service;
//! - the order service cancels synchronously through
//!   `POST /internal/cancellations`, or durably by `OrderCancelRequested`
//!   ([`kitchen::cancel_order`]): stock goes back, or the answer is "too late".
#![forbid(unsafe_code)]

pub mod domain;
pub mod events;
pub mod http;
pub mod kitchen;
pub mod store;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    routing::{get, post, put},
};
use restaurant_platform::{
    db::{Db, Migrations},
    service::{RunningService, ServiceContext, ServiceHost},
};
use tokio::{net::TcpListener, sync::Notify};

pub const NAME: &str = "cook";

/// The service's schema: portable SQL, the same for SQLite and PostgreSQL.
pub fn migrations() -> Migrations {
    Migrations::portable(sqlx::migrate!())
}

#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Cooking completes by itself this long after it starts; `None` means
    /// only `POST /cooks/{id}/complete` completes it.
    pub cook_time: Option<Duration>,
}

#[derive(Clone)]
pub struct App {
    pub ctx: ServiceContext,
    pub cook_time: Option<Duration>,
    /// Wakes the completion timer when a ticket with a due time is written.
    pub timer_wake: Arc<Notify>,
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/menus", get(http::list_menus))
        .route("/menus/{restaurant_id}/{menu_id}", put(http::put_menu))
        .route("/cooks", get(http::list_cooks))
        .route("/cooks/{id}", get(http::get_cook))
        .route("/cooks/{id}/complete", post(http::complete_cook))
        .route("/internal/cancellations", post(http::cancel))
        .with_state(app)
}

pub async fn start(
    ctx: ServiceContext,
    listener: TcpListener,
    config: Config,
) -> std::io::Result<RunningService> {
    let app = App {
        ctx: ctx.clone(),
        cook_time: config.cook_time,
        timer_wake: Arc::new(Notify::new()),
    };
    let mut host = ServiceHost::new(ctx.clone());
    host.consume(Arc::new(events::KitchenEvents(app.clone())));
    let timer_app = app.clone();
    host.spawn_timer("cook-complete", app.timer_wake.clone(), move || {
        let app = timer_app.clone();
        async move { kitchen::complete_due(&app).await }
    });
    host.serve(listener, router(app))
}

/// The demo menu a fresh data directory starts with.
pub const DEMO_RESTAURANT: &str = "seoul-kitchen";
const DEMO_MENU: &[(&str, &str, i64, i64)] = &[
    ("bibimbap", "Bibimbap", 12_000, 100),
    ("bulgogi", "Bulgogi", 15_000, 100),
    ("kimchi-jjigae", "Kimchi jjigae", 9_000, 100),
    ("tteokbokki", "Tteokbokki", 7_000, 100),
];

/// Seeds the demo menu if the kitchen has no menu at all.
pub async fn seed_demo_menu(db: &Db) -> Result<bool, sqlx::Error> {
    if store::menu_count(db).await? > 0 {
        return Ok(false);
    }
    for (id, name, price, stock) in DEMO_MENU {
        let item = domain::MenuItem::parse(name, *price, *stock).expect("demo menu is valid");
        store::put_menu(db, DEMO_RESTAURANT, id, &item).await?;
    }
    Ok(true)
}
