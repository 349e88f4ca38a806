//! The `restaurant` command. Thin: parsing and printing; the system lives in
//! the library.
#![forbid(unsafe_code)]

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use restaurant::{Launcher, System, Timer, UpConfig};
use restaurant_platform::{
    bus::{Bus, EventLog},
    shutdown::Shutdown,
};

/// mimalloc instead of glibc's malloc. Under load glibc's allocator took
/// 17-24% of the embedded process's profile samples (malloc_consolidate,
/// _int_malloc, _int_free, called from every layer); with mimalloc,
/// alternating 20 s runs of `restaurant bench` at 64 clients went from
/// 2,842-2,921 to 3,616-3,648 completed orders/s and from 0.54 to 0.44 ms
/// of CPU per order. Version 2 without transparent huge pages: version 3,
/// and either version with huge pages, put the service processes of the
/// distributed shape far over their 30 MB (mypage 84.8 MiB with v3's
/// defaults); v2 with the setting the supervisor gives its children keeps
/// them near where glibc had them (supervisor.rs, SERVICE_ALLOCATOR).
/// SQLite still allocates with libc's malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "restaurant",
    version,
    about = "Event-driven restaurant ordering system"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags that shape how the services behave, shared by `up` and `serve`.
#[derive(Args, Clone)]
struct Tuning {
    /// Where the databases and the event log live.
    #[arg(long, env = "RESTAURANT_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Cooking completes by itself after this long (`off`: only by
    /// POST /cooks/{id}/complete).
    #[arg(long, default_value = "3s")]
    cook_time: Timer,
    /// Delivery completes by itself after this long (`off`: only by
    /// POST /deliveries/{id}/complete).
    #[arg(long, default_value = "5s")]
    delivery_time: Timer,
    /// Skip fsync on commit: survives a process crash, not power loss.
    #[arg(long)]
    no_fsync: bool,
    /// Deadline of the synchronous cancel call to the kitchen.
    #[arg(long, default_value = "1s")]
    cancel_timeout: Timer,
    /// Consecutive failures of that call that open its circuit breaker.
    #[arg(long, default_value_t = 5)]
    breaker_failures: u32,
    /// How long the breaker stays open before a probe (doubles per failed probe).
    #[arg(long, default_value = "5s")]
    breaker_open: Timer,
    /// Requests the gateway proxies at once; beyond that it sheds with 503.
    #[arg(long, default_value_t = 2048)]
    max_in_flight: usize,
    /// Browser origins the gateway allows (CORS), comma-separated; `*` for
    /// any. None by default: no CORS headers.
    #[arg(long, value_delimiter = ',')]
    cors_origin: Vec<String>,
    /// On SIGTERM the gateway reports not ready and keeps serving this long
    /// before it stops accepting (let a load balancer notice; 5s under
    /// Kubernetes), then finishes what is in flight.
    #[arg(long, default_value = "0s")]
    drain: Timer,
    /// New orders get 503 while a consumer trails the bus by more than
    /// this many entries (events on the embedded log, messages on
    /// JetStream): `auto` is the bus's retention bound (1,000,000 events,
    /// 250,000 messages), `off` never refuses.
    #[arg(long, default_value = "auto")]
    max_backlog: restaurant::Limit,
}

impl Tuning {
    fn config(&self, port: u16) -> UpConfig {
        let mut cfg = UpConfig::new(&self.data_dir);
        cfg.port = port;
        cfg.cook_time = self.cook_time.0;
        cfg.delivery_time = self.delivery_time.0;
        cfg.fsync = !self.no_fsync;
        cfg.cancel_timeout = self.cancel_timeout.0.unwrap_or(Duration::from_secs(1));
        cfg.cancel_breaker.failure_threshold = self.breaker_failures.max(1);
        if let Some(open) = self.breaker_open.0 {
            cfg.cancel_breaker.open_for = open;
        }
        cfg.max_in_flight = self.max_in_flight;
        cfg.cors_origins = self.cors_origin.clone();
        cfg.gateway_drain = self.drain.0.unwrap_or_default();
        cfg.max_backlog = self.max_backlog;
        cfg
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole system on this machine: embedded storage and event log,
    /// no external server.
    Up {
        /// Gateway port (0 picks a free one).
        #[arg(long, env = "RESTAURANT_PORT", default_value_t = 8080)]
        port: u16,
        /// Run every service and the gateway as its own supervised OS
        /// process (restarted if it dies); pids in <data-dir>/processes.json.
        #[arg(long)]
        processes: bool,
        /// PostgreSQL for storage (a schema per service) instead of SQLite files.
        #[arg(long)]
        database_url: Option<String>,
        /// NATS JetStream as the event bus instead of the embedded log.
        #[arg(long)]
        nats_url: Option<String>,
        /// The JetStream stream's name.
        #[arg(long, default_value = "restaurant")]
        stream: String,
        /// Replicas of each service (implies --processes; needs --nats-url,
        /// whose consumers the replicas share).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Run one service (order, cook, delivery, mypage) or the gateway as
    /// this process.
    Serve {
        /// order, cook, delivery, mypage or gateway.
        service: String,
        /// Port to listen on (0 picks a free one; printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// The kitchen (for order) or upstreams (for the gateway); a
        /// comma-separated list for several replicas.
        #[arg(long, value_delimiter = ',')]
        cook_url: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        order_url: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        delivery_url: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        mypage_url: Vec<String>,
        /// Seed the demo menu if the kitchen has none (cook).
        #[arg(long)]
        seed_demo_menu: bool,
        /// PostgreSQL for storage (a schema per service) instead of a
        /// SQLite file in the data directory.
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// NATS JetStream as the event bus instead of the shared embedded log.
        #[arg(long, env = "NATS_URL")]
        nats_url: Option<String>,
        /// The JetStream stream's name.
        #[arg(long, default_value = "restaurant")]
        stream: String,
        /// The gateway's configuration file (TOML: upstreams, routes,
        /// timeouts, health checks, CORS, drain); `--*-url` flags given
        /// as well replace that upstream's replicas.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Load the system through the gateway and report completed orders/s,
    /// latencies and MyPage staleness (loopback only).
    Bench {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value = "30s")]
        duration: Timer,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Stop placing after this many orders even if time is left.
        #[arg(long, default_value_t = 10_000_000)]
        max_orders: u64,
        /// Offer this many orders per second whatever the system does (open
        /// loop), with `--concurrency` placements in flight at most, and
        /// measure placement latency from when each order was due. Without
        /// it every client places its next order when the last is answered.
        #[arg(long)]
        rate: Option<f64>,
        /// Write the report as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Rebuild MyPage's read model from the retained event history and
    /// switch to it (the running system keeps serving meanwhile).
    MypageRebuild {
        /// The gateway URL.
        #[arg(long, env = "RESTAURANT_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// List or replay events a service parked as dead letters.
    DeadLetters {
        /// The gateway URL.
        #[arg(long, env = "RESTAURANT_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// order, cook, delivery or mypage.
        #[arg(long)]
        service: String,
        /// Replay this dead letter instead of listing.
        #[arg(long)]
        replay: Option<i64>,
    },
    /// Delete a JetStream stream with every event in it: for the throwaway
    /// streams of benchmark and test runs, never for a live system's.
    DropStream {
        #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        #[arg(long)]
        stream: String,
    },
}

fn print_banner(url: &str) {
    println!("restaurant is up at {url}");
    println!("  try: curl -s {url}/menus?restaurantId=seoul-kitchen");
    println!(
        "       curl -s -X POST {url}/orders -H 'content-type: application/json' \\\n         \
         -d '{{\"customerId\":\"alice\",\"restaurantId\":\"seoul-kitchen\",\
         \"items\":[{{\"menuId\":\"bibimbap\",\"qty\":1}}],\"address\":\"1 Jongno, Seoul\"}}'"
    );
    println!("  stop with Ctrl-C");
}

fn required(v: Vec<String>, flag: &str) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(!v.is_empty(), "--{flag} is required");
    Ok(v)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One worker (TOKIO_WORKER_THREADS=1, as in the gateway benchmark) runs
    // on tokio's current-thread scheduler: the same single thread, without
    // the work-stealing scheduler's bookkeeping.
    // (`up --processes` sets it for its children: supervisor.rs.)
    // The load generator always runs on one: it shares the two cores with
    // the system it measures, and a second worker only made it dearer (at
    // 3,000 orders/s offered for 60 s, embedded: 11.8-12.3 s of CPU on two
    // workers against 10.3-10.8 s on one, docs/benchmarks.md).
    let one = matches!(cli.command, Command::Bench { .. })
        || std::env::var(restaurant::supervisor::WORKER_THREADS_ENV).is_ok_and(|n| n.trim() == "1");
    let runtime = if one {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    restaurant_platform::telemetry::init_tracing("info,sqlx=warn");
    match cli.command {
        Command::Up {
            port,
            processes,
            database_url,
            nats_url,
            stream,
            replicas,
            tuning,
        } => {
            let mut cfg = tuning.config(port);
            cfg.database_url = database_url;
            cfg.nats_url = nats_url;
            cfg.stream = stream;
            cfg.replicas = replicas.max(1);
            if cfg.replicas > 1 && cfg.nats_url.is_none() {
                anyhow::bail!(
                    "--replicas needs --nats-url: replicas share the bus's consumers; \
                     the embedded log serves one process per service"
                );
            }
            if processes || cfg.replicas > 1 {
                let shutdown = Shutdown::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    restaurant_platform::shutdown::os_signal().await;
                    eprintln!("shutting down: stopping every process…");
                    signal.trigger();
                });
                restaurant::supervisor::run(cfg, shutdown, |url, file| {
                    print_banner(url);
                    println!("  processes: {}", file.display());
                })
                .await?;
            } else {
                let system = System::start(cfg).await?;
                print_banner(&system.gateway_url);
                restaurant_platform::shutdown::os_signal().await;
                eprintln!("shutting down: draining in-flight work…");
                system.stop().await;
            }
            eprintln!("stopped cleanly");
            Ok(())
        }
        Command::Serve {
            service,
            port,
            cook_url,
            order_url,
            delivery_url,
            mypage_url,
            seed_demo_menu,
            database_url,
            nats_url,
            stream,
            config,
            tuning,
        } => {
            let mut cfg = tuning.config(port);
            cfg.seed_demo_menu = seed_demo_menu;
            cfg.database_url = database_url;
            cfg.nats_url = nats_url;
            cfg.stream = stream;
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .with_context(|| format!("binding port {port}"))?;
            let addr = listener.local_addr()?;
            if service == "gateway" {
                let config = match config {
                    Some(path) => {
                        let text = std::fs::read_to_string(&path)
                            .with_context(|| format!("reading {}", path.display()))?;
                        let mut config = restaurant_gateway::Config::from_toml(&text)
                            .with_context(|| format!("in {}", path.display()))?;
                        for (name, urls) in [
                            ("order", order_url),
                            ("cook", cook_url),
                            ("delivery", delivery_url),
                            ("mypage", mypage_url),
                        ] {
                            if !urls.is_empty() {
                                config.upstreams.insert(name.to_owned(), urls);
                            }
                        }
                        config
                    }
                    None => {
                        let upstreams = restaurant_gateway::Upstreams {
                            order: required(order_url, "order-url")?,
                            cook: required(cook_url, "cook-url")?,
                            delivery: required(delivery_url, "delivery-url")?,
                            mypage: required(mypage_url, "mypage-url")?,
                        };
                        restaurant::gateway_config(&cfg, upstreams)
                    }
                };
                let gateway = restaurant_gateway::start(listener, config, Shutdown::new())?;
                println!("gateway listening on http://{addr}");
                restaurant::supervisor::stop_requested().await;
                gateway.stop().await;
                return Ok(());
            }
            std::fs::create_dir_all(&cfg.data_dir)?;
            let (bus, log) = match &cfg.nats_url {
                Some(_) => restaurant::open_bus(&cfg).await?,
                None => {
                    // Services run apart share the event log file; they look
                    // for each other's appends often, since none can wake
                    // another.
                    let log = EventLog::open_shared(&cfg.data_dir.join("events.db"), cfg.fsync)
                        .await
                        .context("opening the event log")?;
                    (Bus::Embedded(log.clone()), Some(log))
                }
            };
            let cook_url = cook_url.join(",");
            if service == "order" && cook_url.is_empty() {
                anyhow::bail!("--cook-url is required for the order service");
            }
            let launcher = Launcher::new(cfg, bus, cook_url);
            let running = launcher.launch(&service, listener).await?;
            println!("{service} listening on http://{addr}");
            restaurant::supervisor::stop_requested().await;
            running.stop().await;
            if let Some(log) = log {
                log.close().await;
            }
            Ok(())
        }
        Command::Bench {
            url,
            duration,
            concurrency,
            max_orders,
            rate,
            json,
        } => {
            let report = restaurant::bench::run(restaurant::bench::BenchArgs {
                url,
                duration: duration.0.unwrap_or(Duration::from_secs(30)),
                concurrency: concurrency.max(1),
                max_orders,
                rate,
                drain: Duration::from_secs(30),
                progress: true,
            })
            .await?;
            println!("{}", report.human());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::MypageRebuild { url } => {
            let client = restaurant_platform::client::JsonClient::new();
            let u = format!("{}/admin/mypage/rebuild", url.trim_end_matches('/'));
            let (status, body) = client
                .post_json(&u, &serde_json::json!({}), &[], Duration::from_secs(600))
                .await?;
            println!("{}", String::from_utf8_lossy(&body));
            anyhow::ensure!(status.is_success(), "the service answered {status}");
            Ok(())
        }
        Command::DeadLetters {
            url,
            service,
            replay,
        } => {
            let client = restaurant_platform::client::JsonClient::new();
            let base = format!("{}/admin/{service}/dead-letters", url.trim_end_matches('/'));
            let timeout = Duration::from_secs(10);
            let (status, body) = match replay {
                Some(id) => {
                    let u = format!("{base}/{id}/replay");
                    client
                        .post_json(&u, &serde_json::json!({}), &[], timeout)
                        .await?
                }
                None => client.get(&base, timeout).await?,
            };
            println!("{}", String::from_utf8_lossy(&body));
            anyhow::ensure!(status.is_success(), "the service answered {status}");
            Ok(())
        }
        Command::DropStream { nats_url, stream } => {
            restaurant_platform::bus::delete_nats_stream(&nats_url, &stream).await
        }
    }
}
