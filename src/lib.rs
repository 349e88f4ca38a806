//! `restaurant`: the binary that composes the services.
//!
//! [`System`] is the whole system on one machine, as `restaurant up` runs it:
//! four services and the gateway in one process, each service with its own
//! SQLite database in the data directory, all sharing one embedded durable
//! event log (`events.db`). Services talk to each other only through the log
//! and over HTTP on loopback, exactly as they do when deployed apart.
#![forbid(unsafe_code)]

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use restaurant_platform::{
    bus::{Bus, EventLog},
    db::{Db, DbOptions, Migrations},
    service::{RunningService, ServiceContext},
    shutdown::Shutdown,
};
use tokio::net::TcpListener;

/// How `restaurant up` runs the system.
#[derive(Clone, Debug)]
pub struct UpConfig {
    /// Gateway port; 0 picks a free one.
    pub port: u16,
    pub data_dir: PathBuf,
    /// Automatic completion of cooking / delivery; `None` = only by endpoint.
    pub cook_time: Option<Duration>,
    pub delivery_time: Option<Duration>,
    /// fsync every commit (survives power loss, not only process crashes).
    pub fsync: bool,
    /// Deadline of the order service's synchronous cancel call to the kitchen.
    pub cancel_timeout: Duration,
    /// Seed the demo menu if the kitchen has none.
    pub seed_demo_menu: bool,
}

impl UpConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        UpConfig {
            port: 8080,
            data_dir: data_dir.into(),
            cook_time: Some(Duration::from_secs(3)),
            delivery_time: Some(Duration::from_secs(5)),
            fsync: true,
            cancel_timeout: Duration::from_secs(1),
            seed_demo_menu: true,
        }
    }
}

/// The running system.
pub struct System {
    pub gateway_url: String,
    gateway: restaurant_gateway::RunningGateway,
    services: Vec<RunningService>,
    log: EventLog,
    shutdown: Shutdown,
}

async fn open_db(
    dir: &std::path::Path,
    name: &str,
    m: Migrations,
    fsync: bool,
) -> anyhow::Result<Db> {
    let path = dir.join(format!("{name}.db"));
    Db::connect(
        &format!("sqlite://{}", path.display()),
        &m,
        DbOptions {
            fsync,
            ..DbOptions::default()
        },
    )
    .await
    .with_context(|| format!("opening {}", path.display()))
}

async fn loopback() -> std::io::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0").await
}

impl System {
    pub async fn start(cfg: UpConfig) -> anyhow::Result<System> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let dir = cfg.data_dir.as_path();
        let log = EventLog::open(&dir.join("events.db"), cfg.fsync)
            .await
            .context("opening the event log")?;
        let bus = Bus::Embedded(log.clone());
        let shutdown = Shutdown::new();
        let ctx = |name, db| ServiceContext::new(name, db, bus.clone(), shutdown.clone());

        let cook_db = open_db(dir, "cook", restaurant_cook::migrations(), cfg.fsync).await?;
        if cfg.seed_demo_menu && restaurant_cook::seed_demo_menu(&cook_db).await? {
            tracing::info!(
                restaurant = restaurant_cook::DEMO_RESTAURANT,
                "seeded the demo menu"
            );
        }
        let cook = restaurant_cook::start(
            ctx(restaurant_cook::NAME, cook_db),
            loopback().await?,
            restaurant_cook::Config {
                cook_time: cfg.cook_time,
            },
        )
        .await?;
        let order_db = open_db(dir, "order", restaurant_order::migrations(), cfg.fsync).await?;
        let order = restaurant_order::start(
            ctx(restaurant_order::NAME, order_db),
            loopback().await?,
            restaurant_order::Config {
                cook_url: cook.url(),
                cancel_timeout: cfg.cancel_timeout,
            },
        )
        .await?;
        let delivery_db = open_db(
            dir,
            "delivery",
            restaurant_delivery::migrations(),
            cfg.fsync,
        )
        .await?;
        let delivery = restaurant_delivery::start(
            ctx(restaurant_delivery::NAME, delivery_db),
            loopback().await?,
            restaurant_delivery::Config {
                delivery_time: cfg.delivery_time,
            },
        )
        .await?;
        let mypage_db = open_db(dir, "mypage", restaurant_mypage::migrations(), cfg.fsync).await?;
        let mypage =
            restaurant_mypage::start(ctx(restaurant_mypage::NAME, mypage_db), loopback().await?)
                .await?;

        let listener = TcpListener::bind(("127.0.0.1", cfg.port))
            .await
            .with_context(|| format!("binding the gateway to port {}", cfg.port))?;
        let gateway = restaurant_gateway::start(
            listener,
            restaurant_gateway::Config {
                upstreams: restaurant_gateway::Upstreams {
                    order: order.url(),
                    cook: cook.url(),
                    delivery: delivery.url(),
                    mypage: mypage.url(),
                },
                timeout: Duration::from_secs(10),
            },
            shutdown.clone(),
        )?;
        Ok(System {
            gateway_url: gateway.url(),
            gateway,
            services: vec![order, cook, delivery, mypage],
            log,
            shutdown,
        })
    }

    /// Resolves when the system has been asked to stop.
    pub async fn stopping(&self) {
        self.shutdown.wait().await;
    }

    /// Graceful stop: the gateway and services stop taking requests,
    /// in-flight requests finish, consumers finish their batch, relays drain
    /// committed outbox rows to the log, then the databases close.
    pub async fn stop(self) {
        self.shutdown.trigger();
        self.gateway.stop().await;
        for s in self.services {
            s.stop().await;
        }
        self.log.close().await;
    }

    /// As if the process died: every task is cancelled wherever it is.
    pub async fn kill(self) {
        self.gateway.kill();
        for s in self.services {
            s.kill().await;
        }
        self.log.close().await;
    }
}

/// A timer flag's value: a duration, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timer(pub Option<Duration>);

impl std::str::FromStr for Timer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_timer(s).map(Timer)
    }
}

/// Parses `500ms`, `3s`, `2m`, a bare number of seconds, or `off`.
pub fn parse_timer(s: &str) -> Result<Option<Duration>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 500ms, 3s, 1m or off)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use ms, s or m)")),
    };
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_timer_flags() {
        assert_eq!(parse_timer("off"), Ok(None));
        assert_eq!(parse_timer("0"), Ok(Some(Duration::ZERO)));
        assert_eq!(parse_timer("250ms"), Ok(Some(Duration::from_millis(250))));
        assert_eq!(parse_timer("3s"), Ok(Some(Duration::from_secs(3))));
        assert_eq!(parse_timer("2m"), Ok(Some(Duration::from_secs(120))));
        assert!(parse_timer("3h").is_err());
        assert!(parse_timer("soon").is_err());
    }
}
