//! The bus's hard bound: a consumer that stops holds every event after it,
//! so past `--max-backlog` new orders are turned away instead of piling up
//! on the bus (restaurant_platform::backlog).

use std::time::Duration;

use restaurant::Limit;
use serde_json::Value;

use crate::helpers::*;

/// With MyPage stopped, orders are taken until the bus holds more than the
/// limit for it; then a new order gets 503 with `Retry-After`, naming the
/// consumer, and nothing is placed. Reads and the sagas in flight go on.
/// Once MyPage is back and has caught up, orders are taken again, and
/// MyPage shows every order that was accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_orders_are_refused_while_a_stopped_consumer_trails_past_the_limit() {
    const LIMIT: u64 = 20;
    let mut app = TestApp::spawn_with(|c| c.max_backlog = Limit::Entries(LIMIT)).await;
    let r = restaurant();
    app.set_menu(&r, "naengmyeon", 10_000).await;
    // MyPage has read something before it stops, and saves its place as
    // it stops: a consumer is known to the bus once it has saved one.
    let first = app.place_ok("first", &r, &[("naengmyeon", 1)]).await;
    app.wait_mypage(&first, |v| v["orderStatus"] == "ACCEPTED")
        .await;
    app.system_mut().stop_service("mypage").await.unwrap();

    let mut accepted = vec![first];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let refused = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} orders were all accepted with MyPage stopped",
            accepted.len()
        );
        let res = app
            .place(&format!("c{}", accepted.len()), &r, &[("naengmyeon", 1)])
            .await;
        match res.status().as_u16() {
            201 => {
                let body: Value = res.json().await.unwrap();
                accepted.push(body["id"].as_str().unwrap().to_owned());
            }
            503 => break res,
            other => panic!("placing answered {other}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        accepted.len() as u64 > LIMIT / 7,
        "refused after {} orders: the bound holds at least {LIMIT} entries",
        accepted.len()
    );
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["status"], 503);
    assert!(
        problem["consumer"].as_str().unwrap().starts_with("mypage"),
        "{problem}"
    );
    assert!(problem["behind"].as_u64().unwrap() > LIMIT, "{problem}");

    // Refused as long as it stays stopped; everything else goes on.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        app.place("later", &r, &[("naengmyeon", 1)]).await.status(),
        503
    );
    for id in &accepted {
        app.wait_status(id, "ACCEPTED").await;
    }
    let placed = accepted.len() as i64;
    assert_eq!(app.stock(&r, "naengmyeon").await, 10_000 - placed);

    app.system_mut().start_service("mypage").await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let again = loop {
        let res = app.place("again", &r, &[("naengmyeon", 1)]).await;
        if res.status() == 201 {
            let body: Value = res.json().await.unwrap();
            break body["id"].as_str().unwrap().to_owned();
        }
        assert_eq!(res.status(), 503);
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused after MyPage came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for id in accepted.iter().chain([&again]) {
        app.wait_mypage(id, |v| v["orderStatus"] == "ACCEPTED")
            .await;
    }
    assert_eq!(app.stock(&r, "naengmyeon").await, 10_000 - placed - 1);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("orders_refused_total{reason=\"backlog\"}")),
        "the refusals are counted"
    );
    app.stop().await;
}
