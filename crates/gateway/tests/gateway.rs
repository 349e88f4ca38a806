//! The gateway in front of upstreams that answer, hang or are gone.

use std::time::{Duration, Instant};

use axum::{Router, routing::get};
use restaurant_gateway::{Config, Upstreams};
use restaurant_platform::shutdown::Shutdown;
use tokio::net::TcpListener;

/// An upstream that echoes what it was asked, with the request id it got.
async fn echo() -> String {
    let app = Router::new().fallback(get(
        |uri: axum::http::Uri, headers: axum::http::HeaderMap| async move {
            let rid = headers
                .get("x-request-id")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let tp = headers.contains_key("traceparent");
            format!("{uri} rid={rid} traceparent={tp}")
        },
    ));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    url
}

/// An upstream that accepts connections and never answers.
async fn hung() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = l.accept().await {
            held.push(sock);
        }
    });
    url
}

async fn gone() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

async fn gateway(upstreams: Upstreams, timeout: Duration, max_in_flight: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = restaurant_gateway::start(
        l,
        Config {
            timeout,
            max_in_flight,
            ..Config::new(upstreams)
        },
        Shutdown::new(),
    )
    .unwrap();
    let url = gw.url();
    std::mem::forget(gw); // runs for the rest of the test
    url
}

#[tokio::test]
async fn routes_by_prefix_and_propagates_request_ids() {
    let (order, cook) = (echo().await, echo().await);
    let gw = gateway(
        Upstreams::single(order, cook.clone(), gone().await, gone().await),
        Duration::from_secs(5),
        16,
    )
    .await;
    let c = reqwest::Client::new();
    let body = c
        .get(format!("{gw}/orders/42?x=1"))
        .header("x-request-id", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(body.headers()["x-request-id"], "abc");
    assert_eq!(
        body.text().await.unwrap(),
        "/orders/42?x=1 rid=abc traceparent=true"
    );
    let res = c.get(format!("{gw}/cooks")).send().await.unwrap();
    assert!(
        !res.headers()["x-request-id"].is_empty(),
        "minted when absent"
    );
    assert!(res.text().await.unwrap().starts_with("/cooks rid="));
    // Admin routes are rewritten to the service's /admin.
    let res = c
        .get(format!("{gw}/admin/cook/dead-letters"))
        .send()
        .await
        .unwrap();
    assert!(res.text().await.unwrap().starts_with("/admin/dead-letters"));
    // Prefixes match whole segments only.
    let res = c.get(format!("{gw}/ordersx")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_and_a_hung_one_a_504() {
    let gw = gateway(
        Upstreams::single(gone().await, hung().await, gone().await, gone().await),
        Duration::from_millis(300),
        16,
    )
    .await;
    let c = reqwest::Client::new();
    let res = c.get(format!("{gw}/orders/1")).send().await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["retry-after"], "1");
    let started = Instant::now();
    let res = c.get(format!("{gw}/menus")).send().await.unwrap();
    assert_eq!(res.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(res.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn at_capacity_it_sheds_fast_with_retry_after() {
    let gw = gateway(
        Upstreams::single(hung().await, echo().await, gone().await, gone().await),
        Duration::from_secs(2),
        2,
    )
    .await;
    let c = reqwest::Client::new();
    // Two requests occupy both slots, waiting on the hung upstream.
    let hold: Vec<_> = (0..2)
        .map(|_| tokio::spawn(c.get(format!("{gw}/orders/1")).send()))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let res = c.get(format!("{gw}/menus")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "shed at once"
    );
    assert_eq!(res.headers()["retry-after"], "1");
    for h in hold {
        assert_eq!(h.await.unwrap().unwrap().status(), 504);
    }
    // Capacity is back.
    let res = c.get(format!("{gw}/menus")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_dead_replica_is_skipped_and_traffic_keeps_succeeding() {
    let (live, dead) = (echo().await, gone().await);
    let gw = gateway(
        Upstreams {
            order: vec![dead, live],
            cook: vec![gone().await],
            delivery: vec![gone().await],
            mypage: vec![gone().await],
        },
        Duration::from_secs(5),
        16,
    )
    .await;
    let c = reqwest::Client::new();
    for i in 0..20 {
        // A refused connection means nothing was sent, so even a POST is
        // safe to send to the other replica.
        let res = if i % 2 == 0 {
            c.get(format!("{gw}/orders/{i}")).send().await.unwrap()
        } else {
            c.post(format!("{gw}/orders")).send().await.unwrap()
        };
        assert_ne!(res.status(), 502, "request {i} failed over");
    }
    let metrics = c
        .get(format!("{gw}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("gateway_ejections_total"),
        "the dead replica was ejected"
    );
}
