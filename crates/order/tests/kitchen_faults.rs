//! The order service against a kitchen that misbehaves: down, hung
//! (accepts connections, never answers), and recovered. The circuit breaker
//! must turn a hung kitchen from "every cancel waits out the timeout" into
//! "cancels fail fast into the durable fallback", and close again once a
//! probe gets through.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use restaurant_platform::{
    breaker::BreakerConfig,
    service::{RunningService, ServiceContext},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const TIMEOUT: Duration = Duration::from_millis(300);

/// A kitchen on a raw socket: it counts requests and either never answers
/// (`hung`) or answers "cancelled".
struct FakeKitchen {
    url: String,
    hung: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
}

async fn fake_kitchen() -> FakeKitchen {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hung = Arc::new(AtomicBool::new(true));
    let requests = Arc::new(AtomicUsize::new(0));
    let (h, r) = (hung.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let (h, r) = (h.clone(), r.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    // One read per request is enough for these small bodies.
                    let n = match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if !String::from_utf8_lossy(&buf[..n]).contains("POST /internal/cancellations")
                    {
                        continue;
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    if h.load(Ordering::SeqCst) {
                        // Hold the connection open and say nothing.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                    let body =
                        r#"{"outcome":"CANCELLED","cookId":null,"reason":"cancelled by customer"}"#;
                    let res = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if sock.write_all(res.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    FakeKitchen {
        url,
        hung,
        requests,
    }
}

struct OrderService {
    url: String,
    client: reqwest::Client,
    service: RunningService,
    _dir: tempfile::TempDir,
}

async fn order_service(cook_url: &str) -> OrderService {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ServiceContext::scratch("order", dir.path(), &restaurant_order::migrations())
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = restaurant_order::start(
        ctx,
        listener,
        restaurant_order::Config {
            cook_url: cook_url.to_owned(),
            cancel_timeout: TIMEOUT,
            breaker: BreakerConfig {
                failure_threshold: 3,
                open_for: Duration::from_millis(800),
                max_open_for: Duration::from_secs(10),
            },
            max_backlog: None,
        },
    )
    .await
    .unwrap();
    OrderService {
        url: service.url(),
        client: reqwest::Client::new(),
        service,
        _dir: dir,
    }
}

impl OrderService {
    async fn place(&self) -> String {
        let res = self
            .client
            .post(format!("{}/orders", self.url))
            .json(&json!({"customerId": "c", "restaurantId": "r",
                          "items": [{"menuId": "m", "qty": 1}], "address": "a"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        res.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Cancels; returns the status code and how long the answer took.
    async fn cancel(&self, id: &str) -> (u16, Duration) {
        let started = Instant::now();
        let res = self
            .client
            .post(format!("{}/orders/{id}/cancel", self.url))
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), started.elapsed())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_kitchen_trips_the_breaker_and_a_probe_closes_it_after_recovery() {
    let kitchen = fake_kitchen().await;
    let svc = order_service(&kitchen.url).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(svc.place().await);
    }

    // Closed: each cancel waits out the deadline, then is deferred.
    for id in &ids[..3] {
        let (status, took) = svc.cancel(id).await;
        assert_eq!(status, 202);
        assert!(took >= TIMEOUT, "waited for the deadline: {took:?}");
        assert!(took < TIMEOUT * 3, "but not much longer: {took:?}");
    }
    assert_eq!(kitchen.requests.load(Ordering::SeqCst), 3);

    // Open: fails fast into the fallback, without calling the kitchen.
    let (status, took) = svc.cancel(&ids[3]).await;
    assert_eq!(status, 202);
    assert!(took < TIMEOUT / 3, "fails fast while open: {took:?}");
    assert_eq!(kitchen.requests.load(Ordering::SeqCst), 3);

    // The kitchen recovers; after the open period one probe goes through
    // and closes the circuit.
    kitchen.hung.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (status, _) = svc.cancel(&ids[4]).await;
    assert_eq!(status, 200, "the probe succeeded");
    let (status, took) = svc.cancel(&ids[5]).await;
    assert_eq!(status, 200, "closed again");
    assert!(took < TIMEOUT);
    assert_eq!(kitchen.requests.load(Ordering::SeqCst), 5);

    let metrics = svc
        .client
        .get(format!("{}/metrics", svc.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("circuit_breaker_transitions_total"),
        "breaker transitions are exported"
    );
    svc.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kitchen_that_is_down_defers_the_cancel_at_once() {
    // A port nobody listens on: connection refused.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let svc = order_service(&url).await;
    let id = svc.place().await;
    let (status, took) = svc.cancel(&id).await;
    assert_eq!(status, 202);
    assert!(took < TIMEOUT, "refused connections do not wait: {took:?}");
    let order: Value = svc
        .client
        .get(format!("{}/orders/{id}", svc.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(order["status"], "CANCEL_PENDING");
    // Asking again does not queue a second request.
    assert_eq!(svc.cancel(&id).await.0, 202);
    svc.service.stop().await;
}
