//! An idle embedded system does not poll itself. In one process every
//! writer can wake the reader it feeds (a commit its relay, an append its
//! subscribers, a new timer its loop), so once an order has gone through,
//! nothing reads a database until something happens; only the gateway's
//! rare check of each sole replica and a timer's 5 s safety sleep remain;
//! the order service's backlog check stops once every consumer has caught
//! up.
//! Before, in 3 idle seconds, the consumers read the log's table ~24
//! times, the timers ran ~12 passes and the gateway asked `/readyz` ~24
//! times. Runs the embedded shape only: the counters are this process's.

use std::time::Duration;

use restaurant::{System, UpConfig};

// The API suite's client (its system is started here: the embedded shape
// whatever RESTAURANT_TEST_SHAPE says, since the counters are this
// process's); most of the helpers go unused.
#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

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
    let app = helpers::TestApp::attach(&system.gateway_url);
    let metrics = || async {
        let res = app.get("/metrics").await;
        assert!(res.status().is_success());
        res.text().await.unwrap()
    };
    // The process-wide recorder exists from the first scrape on.
    metrics().await;

    app.set_menu("r1", "bibimbap", 5).await;
    let id = app.place_ok("idle", "r1", &[("bibimbap", 1)]).await;
    app.wait_mypage(&id, |v| v["orderStatus"] == "DELIVERED")
        .await;
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
    assert!(
        counter(&before, "backlog_checks_total", &[]) > 0.0,
        "the backlog was checked while the order went through"
    );
    assert_eq!(
        grew("backlog_checks_total", &[]),
        0.0,
        "the backlog is checked at rest"
    );
    let checks = grew("http_requests_total", &["route=\"/readyz\""]);
    assert!(
        checks <= 4.0,
        "{checks} readiness checks in 3 s (four sole replicas, every 5 s)"
    );
    system.stop().await;
}
