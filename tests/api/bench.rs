//! The load generator against the real system: what it reports must be what
//! happened, in both its ways of loading.

use std::time::Duration;

use restaurant::bench::{BenchArgs, Report, run};

use crate::helpers::TestApp;

async fn automatic_system() -> TestApp {
    TestApp::spawn_with(|c| {
        c.cook_time = Some(Duration::ZERO);
        c.delivery_time = Some(Duration::ZERO);
    })
    .await
}

fn args(app: &TestApp, rate: Option<f64>) -> BenchArgs {
    BenchArgs {
        url: app.url.clone(),
        duration: Duration::from_secs(2),
        concurrency: 8,
        max_orders: 10_000_000,
        rate,
        drain: Duration::from_secs(30),
        progress: false,
    }
}

fn assert_consistent(r: &Report) {
    assert!(r.errors.is_empty(), "{r:?}");
    assert!(r.orders_placed > 0, "{r:?}");
    assert_eq!(
        r.orders_completed, r.orders_placed,
        "every order followed to DELIVERED: {r:?}"
    );
    for p in [
        &r.place_latency_ms,
        &r.end_to_end_latency_ms,
        &r.mypage_lag_ms,
    ] {
        assert!(p.p50 <= p.p95 && p.p95 <= p.p99 && p.p99 <= p.max, "{r:?}");
    }
    assert!(r.place_latency_ms.p50 > 0.0, "{r:?}");
    // The order service showed the last orders final too (an order it did
    // not would be the error order_service_not_final).
    assert!(
        r.order_service_behind_ms.is_some_and(|ms| ms >= 0.0),
        "{r:?}"
    );
    assert!(r.completed_per_sec > 0.0, "{r:?}");
    // The slowest second holds the slowest placement (the histogram keeps
    // 3 significant digits of it).
    let slowest = r.place_max_ms_by_second.iter().copied().fold(0.0, f64::max);
    assert!(
        (slowest - r.place_latency_ms.max).abs() <= slowest / 500.0 + 0.01,
        "{r:?}"
    );
    assert!(
        r.place_max_ms_by_second.len() as f64 <= r.duration_secs.ceil() + 1.0,
        "{r:?}"
    );
    // The machine's load while placing: on Linux it is read, and the run
    // itself kept at least some of it busy.
    if cfg!(target_os = "linux") {
        let host = r.host.as_ref().expect("read from /proc/stat");
        assert!(host.cores >= 1, "{r:?}");
        assert!(
            host.busy_percent > 0.0 && host.busy_percent <= 100.0,
            "{r:?}"
        );
        assert!(
            (0.0..=host.busy_percent).contains(&host.steal_percent),
            "{r:?}"
        );
        // Each second's reading is a share of that second, and there is
        // none for a second the run did not reach.
        assert!(
            r.host_by_second.len() as f64 <= r.duration_secs.ceil(),
            "{r:?}"
        );
        for h in r.host_by_second.iter().chain([host]) {
            assert!((0.0..=100.0).contains(&h.busy_percent), "{r:?}");
            assert!((0.0..=100.0).contains(&h.io_wait_percent), "{r:?}");
            assert!(h.busy_percent + h.io_wait_percent <= 100.1, "{r:?}");
        }
    }
}

#[tokio::test]
async fn a_closed_loop_bench_follows_every_order_it_placed_to_delivered() {
    let app = automatic_system().await;
    let mut a = args(&app, None);
    // The budget ends the run, not the clock (ample on a slow machine).
    a.duration = Duration::from_secs(30);
    a.max_orders = 150;
    let report = run(a).await.unwrap();
    assert_consistent(&report);
    assert_eq!(report.orders_placed, 150, "the order budget bounds the run");
    assert_eq!(report.offered_per_sec, None);
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "ordersPlaced",
        "ordersCompleted",
        "completedPerSec",
        "placeLatencyMs",
        "endToEndLatencyMs",
        "mypageLagMs",
        "errors",
        "orderServiceBehindMs",
    ] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    app.stop().await;
}

#[tokio::test]
async fn an_open_loop_bench_offers_its_rate_and_no_more() {
    let app = automatic_system().await;
    let report = run(args(&app, Some(100.0))).await.unwrap();
    assert_consistent(&report);
    // 2 s at 100/s: 200 orders due. A slow machine may leave the last few
    // unclaimed at the deadline, never place more.
    assert!((150..=200).contains(&report.orders_placed), "{report:?}");
    // Orders were due in both seconds, each of which had a slowest one.
    assert_eq!(report.place_max_ms_by_second.len(), 2, "{report:?}");
    assert!(
        report.place_max_ms_by_second.iter().all(|&ms| ms > 0.0),
        "{report:?}"
    );
    assert_eq!(report.offered_per_sec, Some(100.0));
    // The machine's load was read for each of those seconds too.
    if cfg!(target_os = "linux") {
        assert_eq!(report.host_by_second.len(), 2, "{report:?}");
        let json = serde_json::to_value(&report).unwrap();
        assert!(
            json["hostBySecond"][1]["ioWaitPercent"].is_number(),
            "{json}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_rate_that_is_not_a_positive_number_is_refused() {
    let app = automatic_system().await;
    for rate in [0.0, -5.0, f64::NAN] {
        let err = run(args(&app, Some(rate))).await.unwrap_err();
        assert!(err.to_string().contains("positive"), "{err}");
    }
    app.stop().await;
}

/// Turned away with 503 + `Retry-After`, a closed-loop client waits as told
/// before its next order instead of asking again at once: refusals are then
/// at most one per client per second, where a client that asked again at
/// once made thousands a second and took the CPU the system needed to
/// catch up (a fast host's 60 s closed loop: 972,446 refusals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_loop_client_waits_as_a_refusal_tells_it() {
    let mut app = TestApp::spawn_with(|c| {
        c.cook_time = Some(Duration::ZERO);
        c.delivery_time = Some(Duration::ZERO);
        c.max_backlog = restaurant::Limit::Entries(20);
    })
    .await;
    // MyPage has saved a position before it stops, so the bus knows it
    // trails (as in backlog.rs); then every new order is soon refused.
    let r = crate::helpers::restaurant();
    app.set_menu(&r, "naengmyeon", 10_000).await;
    let first = app.place_ok("first", &r, &[("naengmyeon", 1)]).await;
    app.wait_mypage(&first, |v| v["orderStatus"] == "DELIVERED")
        .await;
    app.system_mut().stop_service("mypage").await.unwrap();

    let mut a = args(&app, None);
    a.duration = Duration::from_millis(2_500);
    a.drain = Duration::from_millis(500);
    let report = run(a).await.unwrap();
    let refused = report.errors.get("http_503").copied().unwrap_or(0);
    assert!(refused > 0, "the bound never refused: {report:?}");
    // Each of the 8 clients is refused at most once a second, plus once at
    // the start: 2.5 s allows 3 refusals each.
    assert!(refused <= 8 * 3, "clients asked again at once: {report:?}");
    // With MyPage stopped, what was accepted is never seen final; nothing
    // else went wrong.
    assert_eq!(
        report.errors.keys().collect::<Vec<_>>(),
        ["http_503", "not_final"],
        "{report:?}"
    );
    assert_eq!(report.errors["not_final"], report.orders_placed);
    app.stop().await;
}
