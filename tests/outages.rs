//! The distributed shape rides out its servers restarting: NATS and
//! PostgreSQL are each stopped abruptly mid-load and started again. While
//! a server is down the services say they are not ready; afterwards they
//! recover by themselves and nothing is lost.
//!
//! Each test runs its own private server (a nats-server on a free port with
//! its own store; a PostgreSQL cluster made with initdb in a temp dir), so
//! killing it disturbs no other test. Needs `nats-server` and PostgreSQL's
//! binaries (scripts/services.sh installs them); fails if they are missing.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use restaurant::{System, UpConfig};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A nats-server of our own.
struct Nats {
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl Nats {
    fn start() -> Nats {
        let mut n = Nats {
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            child: None,
        };
        n.up();
        n
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed: run scripts/services.sh");
        self.child = Some(child);
        wait_port(self.port);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {port}");
}

/// A PostgreSQL cluster of our own, run as the postgres user.
struct Postgres {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

fn as_postgres(cmd: String) {
    let status = Command::new("su")
        .args(["postgres", "-s", "/bin/sh", "-c", &cmd])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{cmd}");
}

impl Postgres {
    fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL must be installed: run scripts/services.sh")
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .find(|b| b.join("initdb").exists())
            .expect("initdb");
        let dir = std::env::temp_dir().join(format!("rt-pg-{}", free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        let pg = Postgres {
            port: free_port(),
            dir,
            bin,
        };
        as_postgres(format!(
            "{}/initdb -D {}/data -A trust -U postgres",
            pg.bin.display(),
            pg.dir.display()
        ));
        pg.up();
        pg
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn ctl(&self, action: &str) {
        as_postgres(format!(
            "{}/pg_ctl -D {d}/data -l {d}/log -w -o '-p {} -k {d} -c listen_addresses=127.0.0.1' {action}",
            self.bin.display(),
            self.port,
            d = self.dir.display()
        ));
    }

    fn up(&self) {
        self.ctl("start");
        wait_port(self.port);
    }

    /// As a crash: no checkpoint, no goodbye to clients.
    fn kill(&self) {
        self.ctl("stop -m immediate");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("su")
            .args(["postgres", "-s", "/bin/sh", "-c"])
            .arg(format!(
                "{}/pg_ctl -D {}/data stop -m immediate",
                self.bin.display(),
                self.dir.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn shared_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn shared_nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn fresh_database(admin: &str) -> String {
    use sqlx::{Connection, Executor};
    sqlx::any::install_default_drivers();
    let name = format!("rt_{}", restaurant_contract::new_id().replace('-', ""));
    let mut c = sqlx::AnyConnection::connect(admin).await.unwrap();
    c.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap();
    format!("{}/{name}", admin.rsplit_once('/').unwrap().0)
}

/// Orders each of [`load`]'s four clients places at most.
const LOAD_ORDERS: usize = 5_000;
/// Orders a customer of [`load`] places: fewer than a listing of a
/// customer's orders returns (1,000), so that counting them by customer
/// misses none (with one customer per client, a fast host placed more).
const PER_CUSTOMER: usize = 500;

/// The customer of client `w`'s `i`th order.
fn load_customer(w: usize, i: usize) -> String {
    format!("out-{w}-{}", i / PER_CUSTOMER)
}

/// Places orders until `stop`; returns the acknowledged ids.
fn load(
    url: String,
    restaurant: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for w in 0..4 {
            let (client, url, r, stop, acked) = (
                client.clone(),
                url.clone(),
                restaurant.clone(),
                stop.clone(),
                acked.clone(),
            );
            tasks.push(tokio::spawn(async move {
                for i in 0..LOAD_ORDERS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let res = client
                        .post(format!("{url}/orders"))
                        .json(
                            &json!({"customerId": load_customer(w, i), "restaurantId": r,
                                      "items": [{"menuId": "dish", "qty": 1}], "address": "a"}),
                        )
                        .send()
                        .await;
                    match res {
                        Ok(res) if res.status() == 201 => {
                            if let Ok(v) = res.json::<Value>().await {
                                acked
                                    .lock()
                                    .unwrap()
                                    .push(v["id"].as_str().unwrap().to_owned());
                            }
                        }
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(acked).unwrap().into_inner().unwrap()
    })
}

async fn get(url: &str) -> Option<(u16, Value)> {
    let res = reqwest::get(url).await.ok()?;
    let status = res.status().as_u16();
    Some((status, res.json().await.unwrap_or(Value::Null)))
}

/// Every acknowledged order reaches DELIVERED and stock balances.
async fn assert_all_delivered(url: &str, restaurant: &str, acked: &[String], stock: i64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut pending: Vec<&String> = acked.iter().collect();
    while !pending.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} acknowledged orders never finished, e.g. {:?}",
            pending.len(),
            get(&format!("{url}/orders/{}", pending[0])).await
        );
        let mut still = Vec::new();
        for id in pending {
            match get(&format!("{url}/orders/{id}")).await {
                Some((200, o)) if o["status"] == "DELIVERED" => {}
                Some((200, o)) if o["status"] == "REJECTED" || o["status"] == "CANCELLED" => {
                    panic!("order {id} ended {}", o["status"])
                }
                Some((404, _)) => panic!("acknowledged order {id} was lost"),
                _ => still.push(id),
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Orders placed but never acknowledged may exist too; count every one.
    let mut delivered = 0;
    let customers = (0..4).flat_map(|w| {
        (0..LOAD_ORDERS)
            .step_by(PER_CUSTOMER)
            .map(move |i| load_customer(w, i))
    });
    for customer in customers {
        let (_, list) = get(&format!("{url}/orders?customerId={customer}&limit=1000"))
            .await
            .unwrap();
        let list = list.as_array().unwrap();
        assert!(
            list.len() < 1000,
            "{customer}'s orders fit in one listing, so none goes uncounted"
        );
        for o in list {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            let mut status = o["status"].as_str().unwrap().to_owned();
            while status != "DELIVERED" {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "order {} stuck at {status}",
                    o["id"]
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                status = get(&format!("{url}/orders/{}", o["id"].as_str().unwrap()))
                    .await
                    .unwrap()
                    .1["status"]
                    .as_str()
                    .unwrap()
                    .to_owned();
            }
            delivered += 1;
        }
    }
    let (_, menus) = get(&format!("{url}/menus?restaurantId={restaurant}"))
        .await
        .unwrap();
    assert_eq!(
        menus[0]["stock"].as_i64().unwrap(),
        stock - delivered,
        "stock balances"
    );
}

async fn start_system(
    database_url: String,
    nats_url: String,
) -> (System, tempfile::TempDir, UpConfig) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = UpConfig::new(dir.path());
    cfg.port = 0;
    cfg.cook_time = Some(Duration::from_millis(20));
    cfg.delivery_time = Some(Duration::from_millis(20));
    cfg.seed_demo_menu = false;
    cfg.database_url = Some(database_url);
    cfg.nats_url = Some(nats_url);
    cfg.stream = format!("rt_{}", restaurant_contract::new_id().replace('-', ""));
    let system = System::start(cfg.clone()).await.unwrap();
    (system, dir, cfg)
}

async fn wait_ready(url: &str, want: bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let ready = matches!(get(&format!("{url}/readyz")).await, Some((200, _)));
        if ready == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_load_loses_nothing() {
    let mut nats = Nats::start();
    let database_url = fresh_database(&shared_database_url()).await;
    let (system, _dir, _) = start_system(database_url.clone(), nats.url()).await;
    let url = system.gateway_url.clone();
    let r = "outage-nats";
    let stock = 1_000_000;
    reqwest::Client::new()
        .put(format!("{url}/menus/{r}/dish"))
        .json(&json!({"name": "dish", "price": 1, "stock": stock}))
        .send()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(url.clone(), r.into(), stop.clone());
    tokio::time::sleep(Duration::from_millis(700)).await;

    nats.kill();
    wait_ready(&url, false).await;
    // Orders are still taken: they wait in the services' outboxes.
    tokio::time::sleep(Duration::from_millis(700)).await;
    nats.up();
    wait_ready(&url, true).await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    stop.store(true, Ordering::Relaxed);
    let acked = running.await.unwrap();
    assert!(acked.len() > 10, "the load ran ({} orders)", acked.len());
    assert_all_delivered(&url, r, &acked, stock).await;
    system.stop().await;
    drop_database(&database_url).await;
}

async fn drop_database(url: &str) {
    use sqlx::{Connection, Executor};
    let name = url.rsplit_once('/').unwrap().1;
    let mut c = sqlx::AnyConnection::connect(&shared_database_url())
        .await
        .unwrap();
    let _ = c
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_and_restart_mid_load_loses_nothing() {
    let pg = Postgres::start();
    let database_url = fresh_database(&pg.url()).await;
    let (system, _dir, cfg) = start_system(database_url, shared_nats_url()).await;
    let url = system.gateway_url.clone();
    let r = "outage-pg";
    let stock = 1_000_000;
    reqwest::Client::new()
        .put(format!("{url}/menus/{r}/dish"))
        .json(&json!({"name": "dish", "price": 1, "stock": stock}))
        .send()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(url.clone(), r.into(), stop.clone());
    tokio::time::sleep(Duration::from_millis(700)).await;

    pg.kill();
    wait_ready(&url, false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.up();
    wait_ready(&url, true).await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    stop.store(true, Ordering::Relaxed);
    let acked = running.await.unwrap();
    assert!(acked.len() > 10, "the load ran ({} orders)", acked.len());
    assert_all_delivered(&url, r, &acked, stock).await;
    system.stop().await;
    let _ = restaurant_platform::bus::delete_nats_stream(&shared_nats_url(), &cfg.stream).await;
}
