//! The `restaurant` command. Thin: parsing and printing; the system lives in
//! the library.
#![forbid(unsafe_code)]

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use restaurant::{System, Timer, UpConfig};

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

#[derive(Subcommand)]
enum Command {
    /// Run the whole system on this machine: embedded storage and event log,
    /// no external server.
    Up {
        /// Gateway port (0 picks a free one).
        #[arg(long, env = "RESTAURANT_PORT", default_value_t = 8080)]
        port: u16,
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    restaurant_platform::telemetry::init_tracing("info,sqlx=warn");
    match cli.command {
        Command::Up {
            port,
            data_dir,
            cook_time,
            delivery_time,
            no_fsync,
            cancel_timeout,
            breaker_failures,
            breaker_open,
            max_in_flight,
        } => {
            let mut cfg = UpConfig::new(data_dir);
            cfg.port = port;
            cfg.cook_time = cook_time.0;
            cfg.delivery_time = delivery_time.0;
            cfg.fsync = !no_fsync;
            cfg.cancel_timeout = cancel_timeout.0.unwrap_or(Duration::from_secs(1));
            cfg.cancel_breaker.failure_threshold = breaker_failures.max(1);
            if let Some(open) = breaker_open.0 {
                cfg.cancel_breaker.open_for = open;
            }
            cfg.max_in_flight = max_in_flight;
            let system = System::start(cfg).await?;
            let url = &system.gateway_url;
            println!("restaurant is up at {url}");
            println!("  try: curl -s {url}/menus?restaurantId=seoul-kitchen");
            println!(
                "       curl -s -X POST {url}/orders -H 'content-type: application/json' \\\n         \
                 -d '{{\"customerId\":\"alice\",\"restaurantId\":\"seoul-kitchen\",\
                 \"items\":[{{\"menuId\":\"bibimbap\",\"qty\":1}}],\"address\":\"1 Jongno, Seoul\"}}'"
            );
            println!("  stop with Ctrl-C");
            restaurant_platform::shutdown::os_signal().await;
            eprintln!("shutting down: draining in-flight work…");
            system.stop().await;
            eprintln!("stopped cleanly");
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
    }
}
