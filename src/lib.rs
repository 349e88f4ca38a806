//! `restaurant`: the binary that composes the services.
//!
//! [`System`] is the whole system on one machine, as `restaurant up` runs it:
//! four services and the gateway in one process, each service with its own
//! SQLite database in the data directory, all sharing one embedded durable
//! event log (`events.db`). Services talk to each other only through the log
//! and over HTTP on loopback, exactly as they do when deployed apart.
#![forbid(unsafe_code)]

pub mod bench;
pub mod supervisor;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
pub use restaurant_platform::backlog::Limit;
use restaurant_platform::{
    breaker::BreakerConfig,
    bus::{Bus, EventLog, NatsBus},
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
    /// A database URL (PostgreSQL) instead of SQLite files in `data_dir`.
    pub database_url: Option<String>,
    /// NATS JetStream instead of the embedded event log.
    pub nats_url: Option<String>,
    /// The JetStream stream's name (a fresh one isolates a test run).
    pub stream: String,
    /// Replicas of each service (process mode with NATS only).
    pub replicas: usize,
    /// Automatic completion of cooking / delivery; `None` = only by endpoint.
    pub cook_time: Option<Duration>,
    pub delivery_time: Option<Duration>,
    /// fsync every commit (survives power loss, not only process crashes).
    pub fsync: bool,
    /// Deadline of the order service's synchronous cancel call to the kitchen.
    pub cancel_timeout: Duration,
    /// The circuit breaker on that call.
    pub cancel_breaker: BreakerConfig,
    /// Seed the demo menu if the kitchen has none.
    pub seed_demo_menu: bool,
    /// Requests the gateway proxies at once before it sheds with 503.
    pub max_in_flight: usize,
    /// Origins the gateway allows for browsers (CORS); empty: none.
    pub cors_origins: Vec<String>,
    /// How long the gateway stays up, unready, after being told to stop.
    pub gateway_drain: Duration,
    /// How far a consumer may trail the bus before new orders are refused
    /// (`restaurant_platform::backlog`).
    pub max_backlog: Limit,
}

/// The gateway's configuration for `cfg`.
pub fn gateway_config(
    cfg: &UpConfig,
    upstreams: restaurant_gateway::Upstreams,
) -> restaurant_gateway::Config {
    restaurant_gateway::Config {
        max_in_flight: cfg.max_in_flight,
        cors_origins: cfg.cors_origins.clone(),
        drain: cfg.gateway_drain,
        ..restaurant_gateway::Config::new(upstreams)
    }
}

impl UpConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        UpConfig {
            port: 8080,
            data_dir: data_dir.into(),
            database_url: None,
            nats_url: None,
            stream: "restaurant".into(),
            replicas: 1,
            cook_time: Some(Duration::from_secs(3)),
            delivery_time: Some(Duration::from_secs(5)),
            fsync: true,
            cancel_timeout: Duration::from_secs(1),
            cancel_breaker: BreakerConfig::default(),
            seed_demo_menu: true,
            max_in_flight: 2048,
            cors_origins: Vec::new(),
            gateway_drain: Duration::ZERO,
            max_backlog: Limit::Auto,
        }
    }
}

/// The running system.
pub struct System {
    pub gateway_url: String,
    gateway: restaurant_gateway::RunningGateway,
    services: Vec<Slot>,
    launcher: Launcher,
    /// The embedded log, when the bus is not NATS.
    log: Option<EventLog>,
}

/// One service's place in the system: its address stays fixed across
/// restarts, so its peers and the gateway keep reaching it.
struct Slot {
    name: &'static str,
    addr: SocketAddr,
    running: Option<RunningService>,
}

/// Everything needed to (re)start a service: `restaurant up` keeps one to
/// restart services in place, `restaurant serve` uses one to run one.
pub struct Launcher {
    cfg: UpConfig,
    bus: Bus,
    cook_url: String,
}

/// The services `restaurant up` runs, in start order.
pub const SERVICES: [&str; 4] = ["cook", "order", "delivery", "mypage"];

/// The service's database: `database_url` if set, else its own SQLite file
/// in the data directory.
async fn open_db(cfg: &UpConfig, name: &str, m: Migrations) -> anyhow::Result<Db> {
    let url = match &cfg.database_url {
        Some(url) => url.clone(),
        None => format!(
            "sqlite://{}",
            cfg.data_dir.join(format!("{name}.db")).display()
        ),
    };
    let opts = DbOptions {
        fsync: cfg.fsync,
        ..DbOptions::default()
    };
    Db::connect_service(&url, name, &m, opts)
        .await
        .with_context(|| format!("opening the {name} database"))
}

impl Launcher {
    pub fn new(cfg: UpConfig, bus: Bus, cook_url: String) -> Self {
        Launcher { cfg, bus, cook_url }
    }

    /// Starts service `name` on `listener`.
    pub async fn launch(
        &self,
        name: &str,
        listener: TcpListener,
    ) -> anyhow::Result<RunningService> {
        let cfg = &self.cfg;
        let ctx = |name, db| ServiceContext::new(name, db, self.bus.clone(), Shutdown::new());
        let running = match name {
            restaurant_order::NAME => {
                let db = open_db(cfg, name, restaurant_order::migrations()).await?;
                let config = restaurant_order::Config {
                    cook_url: self.cook_url.clone(),
                    cancel_timeout: self.cfg.cancel_timeout,
                    breaker: self.cfg.cancel_breaker,
                    max_backlog: self.cfg.max_backlog.on(&self.bus),
                };
                restaurant_order::start(ctx(restaurant_order::NAME, db), listener, config).await?
            }
            restaurant_cook::NAME => {
                let db = open_db(cfg, name, restaurant_cook::migrations()).await?;
                if self.cfg.seed_demo_menu && restaurant_cook::seed_demo_menu(&db).await? {
                    let r = restaurant_cook::DEMO_RESTAURANT;
                    tracing::info!(restaurant = r, "seeded the demo menu");
                }
                let config = restaurant_cook::Config {
                    cook_time: self.cfg.cook_time,
                };
                restaurant_cook::start(ctx(restaurant_cook::NAME, db), listener, config).await?
            }
            restaurant_delivery::NAME => {
                let db = open_db(cfg, name, restaurant_delivery::migrations()).await?;
                let config = restaurant_delivery::Config {
                    delivery_time: self.cfg.delivery_time,
                };
                restaurant_delivery::start(ctx(restaurant_delivery::NAME, db), listener, config)
                    .await?
            }
            restaurant_mypage::NAME => {
                let db = open_db(cfg, name, restaurant_mypage::migrations()).await?;
                restaurant_mypage::start(ctx(restaurant_mypage::NAME, db), listener).await?
            }
            other => anyhow::bail!("no service named {other:?}"),
        };
        Ok(running)
    }
}

/// The bus `cfg` asks for: NATS JetStream if it names a server, else the
/// embedded log in the data directory (returned too, to close it).
pub async fn open_bus(cfg: &UpConfig) -> anyhow::Result<(Bus, Option<EventLog>)> {
    match &cfg.nats_url {
        Some(url) => {
            let nats = std::sync::Arc::new(NatsBus::connect(url, &cfg.stream).await?);
            nats.spawn_pruner();
            Ok((Bus::Nats(nats), None))
        }
        None => {
            let log = EventLog::open(&cfg.data_dir.join("events.db"), cfg.fsync)
                .await
                .context("opening the event log")?;
            Ok((Bus::Embedded(log.clone()), Some(log)))
        }
    }
}

impl System {
    pub async fn start(cfg: UpConfig) -> anyhow::Result<System> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let (bus, log) = open_bus(&cfg).await?;
        // Every service gets its loopback port first, so each knows where
        // its peers are before any of them starts.
        let mut listeners = Vec::new();
        for name in SERVICES {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", l.local_addr()?);
            listeners.push((name, l, url));
        }
        let url_of = |n: &str| {
            listeners
                .iter()
                .find(|(name, ..)| *name == n)
                .map(|(.., url)| url.clone())
                .expect("every service has a listener")
        };
        let upstreams = restaurant_gateway::Upstreams::single(
            url_of("order"),
            url_of("cook"),
            url_of("delivery"),
            url_of("mypage"),
        );
        let launcher = Launcher {
            cook_url: url_of("cook"),
            bus,
            cfg: cfg.clone(),
        };
        let mut services = Vec::new();
        for (name, listener, _) in listeners {
            let addr = listener.local_addr()?;
            let running = launcher.launch(name, listener).await?;
            services.push(Slot {
                name: running.name,
                addr,
                running: Some(running),
            });
        }
        let listener = TcpListener::bind(("127.0.0.1", cfg.port))
            .await
            .with_context(|| format!("binding the gateway to port {}", cfg.port))?;
        let gateway =
            restaurant_gateway::start(listener, gateway_config(&cfg, upstreams), Shutdown::new())?;
        Ok(System {
            gateway_url: gateway.url(),
            gateway,
            services,
            launcher,
            log,
        })
    }

    fn slot(&mut self, name: &str) -> anyhow::Result<&mut Slot> {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .with_context(|| format!("no service named {name:?}"))
    }

    /// Stops one service gracefully, as an operator (or an outage) would;
    /// the rest of the system keeps running without it.
    pub async fn stop_service(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(s) = self.slot(name)?.running.take() {
            s.stop().await;
        }
        Ok(())
    }

    /// Starts a stopped service again on its old address.
    pub async fn start_service(&mut self, name: &str) -> anyhow::Result<()> {
        let slot = self.slot(name)?;
        if slot.running.is_some() {
            return Ok(());
        }
        let addr = slot.addr;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("rebinding {name} to {addr}"))?;
        let running = self.launcher.launch(name, listener).await?;
        self.slot(name)?.running = Some(running);
        Ok(())
    }

    /// Graceful stop: the gateway stops taking requests and finishes the ones
    /// in flight, then each service does the same, its consumer finishes its
    /// batch and its relay drains committed outbox rows to the log; then the
    /// databases close.
    pub async fn stop(self) {
        self.gateway.stop().await;
        for s in self.services.into_iter().filter_map(|s| s.running) {
            s.stop().await;
        }
        if let Some(log) = self.log {
            log.close().await;
        }
    }

    /// As if the process died: every task is cancelled wherever it is.
    pub async fn kill(self) {
        self.gateway.kill();
        for s in self.services.into_iter().filter_map(|s| s.running) {
            s.kill().await;
        }
        if let Some(log) = self.log {
            log.close().await;
        }
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
