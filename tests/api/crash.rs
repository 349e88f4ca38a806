//! Crash safety: stop the system abruptly mid-flow, start it again on the
//! same data directory, and check that every acknowledged order reaches a
//! final state, no stock unit is taken twice, and stock arithmetic balances.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::helpers::*;

const CUSTOMER: &str = "load";
/// Plenty of one dish, few of another, so the run has rejections too.
const MENU: &[(&str, i64)] = &[("plenty", 100_000), ("scarce", 25)];

/// Places orders from `workers` concurrent clients until `stop`; returns the
/// ids that were acknowledged with 201.
fn start_load(
    url: String,
    restaurant: String,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (client, url, r, stop, acked) = (
                client.clone(),
                url.clone(),
                restaurant.clone(),
                stop.clone(),
                acked.clone(),
            );
            tasks.push(tokio::spawn(async move {
                for i in 0..10_000usize {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let items = if (w + i) % 3 == 0 {
                        json!([{"menuId": "plenty", "qty": 1}, {"menuId": "scarce", "qty": 1}])
                    } else {
                        json!([{"menuId": "plenty", "qty": 2}])
                    };
                    let res = client
                        .post(format!("{url}/orders"))
                        .json(&json!({"customerId": load_customer(w), "restaurantId": r,
                                      "items": items, "address": "a"}))
                        .send()
                        .await;
                    match res {
                        Ok(res) if res.status() == 201 => {
                            let v: Value = match res.json().await {
                                Ok(v) => v,
                                Err(_) => break, // killed mid-body: not acknowledged
                            };
                            acked
                                .lock()
                                .unwrap()
                                .push(v["id"].as_str().unwrap().to_owned());
                        }
                        // Anything else is not an acknowledgement: the system
                        // is going down under us (a handler whose database
                        // was just closed answers 500), or it is gone.
                        Ok(_) | Err(_) => break,
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

/// The customer worker `w` of [`start_load`] orders for: one each, so that
/// no customer's listing outgrows one page however fast the system is.
fn load_customer(w: usize) -> String {
    format!("{CUSTOMER}-{w}")
}

/// Every order in the system (acknowledged or not) is final, every
/// acknowledged one is among them, and stock balances against the orders
/// that were served.
async fn assert_nothing_lost_nothing_doubled(
    app: &TestApp,
    restaurant: &str,
    workers: usize,
    acked: &[String],
) {
    let mut orders = Vec::new();
    for w in 0..workers {
        let listing = app
            .wait_until(
                &format!("/orders?customerId={}&limit=1000", load_customer(w)),
                |os| {
                    os.as_array()
                        .unwrap()
                        .iter()
                        .all(|o| is_final(o["status"].as_str().unwrap()))
                },
            )
            .await;
        let listing = listing.as_array().unwrap().clone();
        assert!(listing.len() < 1000, "the listing must hold every order");
        orders.extend(listing);
    }
    let orders = &orders;
    let by_id: HashMap<&str, &Value> = orders
        .iter()
        .map(|o| (o["id"].as_str().unwrap(), o))
        .collect();
    for id in acked {
        assert!(
            by_id.contains_key(id.as_str()),
            "acknowledged order {id} was lost"
        );
    }
    let mut served: HashMap<String, i64> = HashMap::new();
    let mut delivered = 0;
    for o in orders {
        match o["status"].as_str().unwrap() {
            "DELIVERED" => {
                delivered += 1;
                for line in o["items"].as_array().unwrap() {
                    *served
                        .entry(line["menuId"].as_str().unwrap().to_owned())
                        .or_default() += line["qty"].as_i64().unwrap();
                }
            }
            "REJECTED" => {}
            s => panic!("order {} ended {s}", o["id"]),
        }
    }
    for (menu, initial) in MENU {
        let left = app.stock(restaurant, menu).await;
        let taken = served.get(*menu).copied().unwrap_or(0);
        assert_eq!(left, initial - taken, "stock of {menu} must balance");
    }
    // The read model agrees, once it has caught up.
    for o in orders.iter().take(50) {
        let id = o["id"].as_str().unwrap();
        let status = o["status"].clone();
        app.wait_mypage(id, |v| v["orderStatus"] == status).await;
    }
    eprintln!(
        "crash test: {} orders ({} acknowledged), {delivered} delivered",
        orders.len(),
        acked.len()
    );
    assert!(!acked.is_empty(), "the load must have placed orders");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_system_mid_flow_loses_and_doubles_nothing() {
    let mut app = TestApp::spawn_with(|c| {
        c.cook_time = Some(Duration::from_millis(20));
        c.delivery_time = Some(Duration::from_millis(20));
    })
    .await;
    let r = restaurant();
    for (m, s) in MENU {
        app.set_menu(&r, m, *s).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(app.url.clone(), r.clone(), 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Killed with requests, consumers, relays and timers all mid-flight.
    app.restart(true).await;
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.unwrap();
    assert_nothing_lost_nothing_doubled(&app, &r, 8, &acked).await;
    app.stop().await;
}

async fn spawn_binary(dir: &std::path::Path, extra: &[&str]) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_restaurant"))
        .args([
            "up",
            "--port",
            "0",
            "--cook-time",
            "20ms",
            "--delivery-time",
            "20ms",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn restaurant");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("restaurant is up at ") {
                return url.trim().to_owned();
            }
        }
        panic!("restaurant exited before it was up");
    })
    .await
    .expect("restaurant up within 30 s");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_of_the_real_process_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = spawn_binary(dir.path(), &[]).await;
    let app = TestApp::attach(&url);
    let r = restaurant();
    for (m, s) in MENU {
        app.set_menu(&r, m, *s).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(url.clone(), r.clone(), 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.unwrap();

    let (mut child, url) = spawn_binary(dir.path(), &[]).await;
    let app = TestApp::attach(&url);
    assert_nothing_lost_nothing_doubled(&app, &r, 8, &acked).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_keeps_due_timers_and_pending_work() {
    // Cooking takes long enough that the restart happens before it is due.
    let mut app = TestApp::spawn_with(|c| {
        c.cook_time = Some(Duration::from_millis(700));
        c.delivery_time = Some(Duration::from_millis(100));
    })
    .await;
    let r = restaurant();
    app.set_menu(&r, "plenty", 10).await;
    let id = app.place_ok(CUSTOMER, &r, &[("plenty", 1)]).await;
    app.wait_status(&id, "ACCEPTED").await;
    app.restart(false).await;
    // The durable timer fires after the restart.
    app.wait_status(&id, "DELIVERED").await;
    assert_eq!(app.stock(&r, "plenty").await, 9);
    app.stop().await;
}

fn pid_of(dir: &std::path::Path, name: &str) -> Option<u32> {
    let file: Value =
        serde_json::from_slice(&std::fs::read(dir.join("processes.json")).ok()?).ok()?;
    file["processes"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?["pid"]
        .as_u64()
        .map(|p| p as u32)
}

fn restarts_of(dir: &std::path::Path, name: &str) -> u64 {
    let file: Value =
        serde_json::from_slice(&std::fs::read(dir.join("processes.json")).unwrap()).unwrap();
    file["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()["restarts"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_process_killed_in_turn_under_load_is_restarted_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (mut supervisor, url) = spawn_binary(dir.path(), &["--processes"]).await;
    let app = TestApp::attach(&url);
    let r = restaurant();
    for (m, s) in MENU {
        app.set_menu(&r, m, *s).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(url.clone(), r.clone(), 6, stop.clone());
    for name in ["cook", "order", "delivery", "mypage"] {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let pid = pid_of(dir.path(), name).expect("running");
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        // The supervisor notices and starts it again.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while pid_of(dir.path(), name).is_none_or(|p| p == pid) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} was not restarted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(restarts_of(dir.path(), name) >= 1);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.unwrap();
    assert_nothing_lost_nothing_doubled(&app, &r, 6, &acked).await;
    // A graceful stop takes every child down with it.
    let pids: Vec<u32> = ["cook", "order", "delivery", "mypage", "gateway"]
        .iter()
        .filter_map(|n| pid_of(dir.path(), n))
        .collect();
    let sup = supervisor.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &sup])
        .status()
        .unwrap();
    let status = tokio::time::timeout(PATIENCE, supervisor.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} still runs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_of_a_killed_supervisor_stop_by_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let (mut supervisor, _url) = spawn_binary(dir.path(), &["--processes"]).await;
    let pids: Vec<u32> = ["cook", "order", "delivery", "mypage", "gateway"]
        .iter()
        .map(|n| pid_of(dir.path(), n).unwrap())
        .collect();
    // Each child got the allocator setting that keeps it under 30 MB, and
    // its share of the cores as tokio workers (one each on two cores).
    use restaurant::supervisor::{SERVICE_ALLOCATOR, WORKER_THREADS_ENV, worker_threads_per_child};
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = worker_threads_per_child(cores, pids.len()).to_string();
    let expected: Vec<String> = [SERVICE_ALLOCATOR, (WORKER_THREADS_ENV, threads.as_str())]
        .iter()
        .map(|(key, value)| format!("{key}={}", std::env::var(key).as_deref().unwrap_or(value)))
        .collect();
    for pid in &pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        for expected in &expected {
            assert!(
                environ
                    .split(|b| *b == 0)
                    .any(|kv| kv == expected.as_bytes()),
                "child {pid} lacks {expected}"
            );
        }
    }
    supervisor.start_kill().unwrap(); // SIGKILL: no chance to stop them
    supervisor.wait().await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for pid in pids {
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "orphan {pid} still runs"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_each_on_postgres_and_nats_survive_kill_dash_nine_of_one_replica_each() {
    let dir = tempfile::tempdir().unwrap();
    let (database_url, stream) = fresh_backends().await;
    let nats = nats_url();
    let args = [
        "--replicas",
        "2",
        "--database-url",
        &database_url,
        "--nats-url",
        &nats,
        "--stream",
        &stream,
    ];
    let (mut supervisor, url) = spawn_binary(dir.path(), &args).await;
    let app = TestApp::attach(&url);
    let r = restaurant();
    for (m, s) in MENU {
        app.set_menu(&r, m, *s).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(url.clone(), r.clone(), 6, stop.clone());
    for name in ["cook", "order", "delivery", "mypage"] {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pid = pid_of(dir.path(), name).expect("running");
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while pid_of(dir.path(), name).is_none_or(|p| p == pid) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} was not restarted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.unwrap();
    assert_nothing_lost_nothing_doubled(&app, &r, 6, &acked).await;
    let sup = supervisor.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &sup])
        .status()
        .unwrap();
    tokio::time::timeout(PATIENCE, supervisor.wait())
        .await
        .unwrap()
        .unwrap();
    let mut cfg = restaurant::UpConfig::new(dir.path());
    cfg.nats_url = Some(nats);
    cfg.stream = stream;
    drop_distributed_backends(&cfg).await;
}
