//! An idle embedded system does not poll itself. In one process every
//! writer can wake the reader it feeds (a commit its relay, an append its
//! subscribers, a new timer its loop), so once an order has gone through,
//! nothing reads a database until something happens; only the gateway's
//! rare check of each sole replica and a timer's 5 s safety sleep remain.
//! Before, in 3 idle seconds, the consumers read the log's table ~24
//! times, the timers ran ~12 passes and the gateway asked `/readyz` ~24
//! times. Runs the embedded shape only: the counters are this process's.

use std::time::Duration;

use restaurant::{System, UpConfig};
use serde_json::{Value, json};

/// The sum of every series of `name` whose labels contain all of `labels`.
fn counter(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            series.split('{').next() == Some(name) && labels.iter().all(|x| series.contains(x))
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_system_reads_nothing_and_checks_rarely() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = UpConfig::new(dir.path());
    cfg.port = 0;
    cfg.cook_time = Some(Duration::ZERO);
    cfg.delivery_time = Some(Duration::ZERO);
    cfg.seed_demo_menu = false;
    let system = System::start(cfg).await.unwrap();
    let url = system.gateway_url.clone();
    let http = reqwest::Client::new();
    let metrics = || async {
        let res = http.get(format!("{url}/metrics")).send().await.unwrap();
        assert!(res.status().is_success());
        res.text().await.unwrap()
    };
    // The process-wide recorder exists from the first scrape on.
    metrics().await;

    let res = http
        .put(format!("{url}/menus/r1/bibimbap"))
        .json(&json!({"name": "bibimbap", "price": 9000, "stock": 5}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    let res = http
        .post(format!("{url}/orders"))
        .json(&json!({"customerId": "idle", "restaurantId": "r1",
            "items": [{"menuId": "bibimbap", "qty": 1}], "address": "1 Jongno, Seoul"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let views: Value = http
            .get(format!("{url}/mypages?customerId=idle"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let delivered = views.as_array().is_some_and(|v| {
            v.iter()
                .any(|o| o["orderId"] == id.as_str() && o["orderStatus"] == "DELIVERED")
        });
        if delivered {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered: {views}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Relays delete what they published within 200 ms; let them.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let before = metrics().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = metrics().await;
    let grew = |name: &str, labels: &[&str]| {
        counter(&after, name, labels) - counter(&before, name, labels)
    };
    assert!(
        counter(&before, "timer_passes_total", &[]) > 0.0,
        "the counters are live:\n{before}"
    );
    assert_eq!(
        grew("eventlog_reads_total", &["from=\"table\""]),
        0.0,
        "idle consumers read the log's table"
    );
    let passes = grew("timer_passes_total", &[]);
    assert!(
        passes <= 2.0,
        "{passes} timer passes in 3 s (two timers, 5 s sleeps)"
    );
    let checks = grew("http_requests_total", &["route=\"/readyz\""]);
    assert!(
        checks <= 4.0,
        "{checks} readiness checks in 3 s (four sole replicas, every 5 s)"
    );
    system.stop().await;
}
