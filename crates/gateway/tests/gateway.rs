//! The gateway in front of upstreams that answer, hang or are gone.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, http::StatusCode, response::IntoResponse, routing::get};
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

async fn metrics(c: &reqwest::Client, gw: &str) -> String {
    let res = c.get(format!("{gw}/metrics")).send().await.unwrap();
    res.text().await.unwrap()
}

async fn status(c: &reqwest::Client, url: String) -> u16 {
    c.get(url).send().await.unwrap().status().as_u16()
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
    let metrics = metrics(&c, &gw).await;
    assert!(
        metrics.contains(r#"circuit_breaker_transitions_total{breaker="gateway order"#)
            && metrics.contains(r#"to="open""#),
        "the dead replica's breaker opened: {metrics}"
    );
}

/// A replica whose health and answers the test controls, counting the
/// requests it gets (health checks aside).
#[derive(Clone, Default)]
struct Flaky {
    failing: Arc<AtomicBool>,
    /// Answer 503 (a transient failure) while staying "ready".
    overloaded: Arc<AtomicBool>,
    /// Answer 503 with `Retry-After`: turning work away on purpose.
    shedding: Arc<AtomicBool>,
    hung: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
}

async fn flaky(name: &'static str) -> (String, Flaky) {
    let state = Flaky::default();
    let s = state.clone();
    let r = state.clone();
    let app = Router::new()
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move {
                    if r.failing.load(Ordering::SeqCst) || r.hung.load(Ordering::SeqCst) {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    } else {
                        (StatusCode::OK, "ready")
                    }
                }
            }),
        )
        .fallback(move || {
            let s = s.clone();
            async move {
                if s.hung.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                s.served.fetch_add(1, Ordering::SeqCst);
                let retry_after = [(axum::http::header::RETRY_AFTER, "1")];
                if s.shedding.load(Ordering::SeqCst) {
                    return (StatusCode::SERVICE_UNAVAILABLE, retry_after, name).into_response();
                }
                if s.overloaded.load(Ordering::SeqCst) {
                    return (StatusCode::SERVICE_UNAVAILABLE, name).into_response();
                }
                if s.failing.load(Ordering::SeqCst) {
                    (StatusCode::INTERNAL_SERVER_ERROR, name).into_response()
                } else {
                    (StatusCode::OK, name).into_response()
                }
            }
        });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, state)
}

async fn gateway_with(upstreams: Upstreams, timeout: Duration) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = restaurant_gateway::start(
        l,
        Config {
            timeout,
            health_interval: Duration::from_millis(100),
            ..Config::new(upstreams)
        },
        Shutdown::new(),
    )
    .unwrap();
    let url = gw.url();
    std::mem::forget(gw);
    url
}

fn order_pool(order: Vec<String>) -> Upstreams {
    Upstreams {
        order,
        cook: vec!["http://127.0.0.1:9".into()],
        delivery: vec!["http://127.0.0.1:9".into()],
        mypage: vec!["http://127.0.0.1:9".into()],
    }
}

#[tokio::test]
async fn a_failing_replica_is_ejected_after_a_few_errors_and_readmitted_when_well() {
    let ((a, _), (b, sick)) = (flaky("a").await, flaky("b").await);
    let gw = gateway_with(order_pool(vec![a, b]), Duration::from_secs(5)).await;
    let c = reqwest::Client::new();
    sick.failing.store(true, Ordering::SeqCst);
    let mut errors = 0;
    for _ in 0..100 {
        let res = c.get(format!("{gw}/orders/1")).send().await.unwrap();
        if res.status() != 200 {
            errors += 1;
        }
    }
    // Its breaker opens after three 5xx in a row, and health checks mark
    // it unready: what fails is the few requests before that.
    assert!(errors <= 3, "{errors} of 100 requests failed");
    let served_while_sick = sick.served.load(Ordering::SeqCst);

    sick.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..40 {
        let res = c.get(format!("{gw}/orders/1")).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert!(
        sick.served.load(Ordering::SeqCst) > served_while_sick + 5,
        "the recovered replica gets traffic again"
    );
}

/// A 503 with `Retry-After` is the upstream turning work away on purpose
/// (the order service over its backlog limit): passed on every time, and
/// the replica's breaker stays closed, so its other requests still reach
/// it. A 503 without it is a failure like any 5xx.
#[tokio::test]
async fn a_replica_shedding_with_retry_after_keeps_its_breaker_closed() {
    let (only, state) = flaky("only").await;
    let gw = gateway_with(order_pool(vec![only]), Duration::from_secs(5)).await;
    let c = reqwest::Client::new();
    state.shedding.store(true, Ordering::SeqCst);
    for _ in 0..10 {
        let res = c.post(format!("{gw}/orders")).send().await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["retry-after"], "1");
    }
    assert_eq!(state.served.load(Ordering::SeqCst), 10, "each reached it");
    state.shedding.store(false, Ordering::SeqCst);
    let res = c.get(format!("{gw}/orders/1")).send().await.unwrap();
    assert_eq!(
        res.status(),
        200,
        "answered at once, no breaker to wait out"
    );

    state.overloaded.store(true, Ordering::SeqCst);
    for _ in 0..10 {
        let res = c.post(format!("{gw}/orders")).send().await.unwrap();
        assert_eq!(res.status(), 503);
    }
    assert_eq!(
        state.served.load(Ordering::SeqCst),
        11 + 3,
        "three failures open the breaker, which answers the rest itself"
    );
}

#[tokio::test]
async fn a_hung_replica_times_out_then_its_breaker_fails_calls_fast() {
    let (only, state) = flaky("only").await;
    state.hung.store(true, Ordering::SeqCst);
    let gw = gateway_with(order_pool(vec![only]), Duration::from_millis(200)).await;
    let c = reqwest::Client::new();
    for _ in 0..3 {
        let res = c.get(format!("{gw}/orders/1")).send().await.unwrap();
        assert_eq!(res.status(), 504);
    }
    let started = Instant::now();
    let res = c.get(format!("{gw}/orders/1")).send().await.unwrap();
    assert_eq!(res.status(), 503, "the open breaker answers");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "failing fast took {:?}",
        started.elapsed()
    );
    assert_eq!(res.headers()["retry-after"], "1");
    // Recovery: the next health check re-admits it.
    state.hung.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let res = c.get(format!("{gw}/orders/1")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn only_idempotent_requests_are_retried_on_another_replica() {
    let ((a, busy), (b, well)) = (flaky("a").await, flaky("b").await);
    busy.overloaded.store(true, Ordering::SeqCst);
    let gw = gateway_with(order_pool(vec![a, b]), Duration::from_secs(5)).await;
    let c = reqwest::Client::new();
    let mut unavailable = 0;
    for _ in 0..20 {
        let res = c.post(format!("{gw}/orders")).send().await.unwrap();
        match res.status().as_u16() {
            200 => {}
            503 => unavailable += 1,
            s => panic!("unexpected {s}"),
        }
    }
    let hits = busy.served.load(Ordering::SeqCst) + well.served.load(Ordering::SeqCst);
    assert_eq!(hits, 20, "a POST reached an upstream exactly once");
    assert_eq!(unavailable, busy.served.load(Ordering::SeqCst));
    assert!(unavailable > 0, "some POSTs met the busy replica");

    // GETs that meet the busy replica go to the other one instead.
    tokio::time::sleep(Duration::from_millis(600)).await; // its breaker half-opens
    let before = busy.served.load(Ordering::SeqCst);
    for _ in 0..20 {
        let res = c.get(format!("{gw}/orders/1")).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert!(
        busy.served.load(Ordering::SeqCst) > before,
        "a GET met the busy one"
    );
    let metrics = metrics(&c, &gw).await;
    assert!(
        metrics.contains(r#"gateway_retries_total{service="order"}"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"gateway_requests_total{route="/orders",upstream="order",status="503"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn cors_answers_preflights_for_allowed_origins_only() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = restaurant_gateway::start(
        l,
        Config {
            cors_origins: vec!["https://app.example".into()],
            ..Config::new(order_pool(vec![echo().await]))
        },
        Shutdown::new(),
    )
    .unwrap();
    let url = gw.url();
    let c = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        c.request(reqwest::Method::OPTIONS, format!("{url}/orders"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,idempotency-key",
            )
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert!(ok.status().is_success());
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let allowed = ok.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap();
    assert!(allowed.contains("idempotency-key"), "{allowed}");
    let other = preflight("https://evil.example").await.unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
    let res = c
        .get(format!("{url}/orders/1"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let exposed = res.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");
}

#[tokio::test]
async fn on_shutdown_it_reports_unready_first_and_keeps_serving_through_the_drain() {
    let (only, _) = flaky("only").await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = Shutdown::new();
    let gw = restaurant_gateway::start(
        l,
        Config {
            drain: Duration::from_millis(500),
            ..Config::new(order_pool(vec![only]))
        },
        shutdown.clone(),
    )
    .unwrap();
    let url = gw.url();
    let c = reqwest::Client::new();
    assert_eq!(status(&c, format!("{url}/orders/1")).await, 200);
    let stopping = tokio::spawn(gw.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = c.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "unready at once");
    let res = c.get(format!("{url}/orders/1")).send().await.unwrap();
    assert_eq!(res.status(), 200, "still serving while draining");
    let started = Instant::now();
    stopping.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        c.get(format!("{url}/orders/1")).send().await.is_err(),
        "stopped accepting after the drain"
    );
}

/// A replica that can be restarted on its port the way an orchestrator
/// does it: report unready, wait, stop gracefully, start again.
struct Restartable {
    addr: std::net::SocketAddr,
    draining: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Restartable {
    async fn start(addr: &str) -> Self {
        let mut r = Restartable {
            addr: addr.parse().unwrap(),
            draining: Arc::default(),
            served: Arc::default(),
            stop: None,
            task: None,
        };
        r.serve().await;
        r
    }

    async fn serve(&mut self) {
        let (draining, served) = (self.draining.clone(), self.served.clone());
        let app = Router::new()
            .route(
                "/readyz",
                get(move || {
                    let draining = draining.clone();
                    async move {
                        if draining.load(Ordering::SeqCst) {
                            StatusCode::SERVICE_UNAVAILABLE
                        } else {
                            StatusCode::OK
                        }
                    }
                }),
            )
            .fallback(move || {
                let served = served.clone();
                async move {
                    served.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    "ok"
                }
            });
        let l = TcpListener::bind(self.addr).await.unwrap();
        self.addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        }));
    }

    async fn restart(&mut self) {
        self.draining.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.serve().await;
        self.draining.store(false, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn no_request_fails_while_one_of_two_replicas_restarts_under_load() {
    let stable = Restartable::start("127.0.0.1:0").await;
    let mut restarted = Restartable::start("127.0.0.1:0").await;
    let gw = gateway_with(
        order_pool(vec![
            format!("http://{}", stable.addr),
            format!("http://{}", restarted.addr),
        ]),
        Duration::from_secs(5),
    )
    .await;
    let running = Arc::new(AtomicBool::new(true));
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (gw, running) = (gw.clone(), running.clone());
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                let (mut sent, mut failed) = (0, Vec::new());
                while running.load(Ordering::SeqCst) {
                    let res = if (sent + w) % 2 == 0 {
                        c.get(format!("{gw}/orders/1")).send().await
                    } else {
                        c.post(format!("{gw}/orders")).send().await
                    };
                    sent += 1;
                    match res {
                        Ok(r) if r.status().is_success() => {}
                        Ok(r) => failed.push(r.status().to_string()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (sent, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    restarted.restart().await;
    let before = restarted.served.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::SeqCst);
    let mut total = 0;
    for l in load {
        let (sent, failed) = l.await.unwrap();
        assert!(failed.is_empty(), "failed: {failed:?}");
        total += sent;
    }
    assert!(total > 100, "steady load: {total} requests");
    assert!(
        restarted.served.load(Ordering::SeqCst) > before,
        "the restarted replica is back in rotation"
    );
    drop(stable);
}

#[tokio::test]
async fn routes_upstreams_and_per_route_timeouts_come_from_a_toml_file() {
    let (fast, slow) = (echo().await, hung().await);
    let config = Config::from_toml(&format!(
        r#"
        timeout_ms = 5000
        health_interval_ms = 100

        [upstreams]
        api = ["{fast}", "{fast}"]
        legacy = ["{slow}"]

        [[routes]]
        prefix = "/v2"
        upstream = "api"
        rewrite = "/orders"

        [[routes]]
        prefix = "/v2/slow"
        upstream = "legacy"
        timeout_ms = 200
        "#
    ))
    .unwrap();
    assert_eq!(config.upstreams["api"].len(), 2);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = restaurant_gateway::start(l, config, Shutdown::new()).unwrap();
    let url = gw.url();
    let c = reqwest::Client::new();
    let res = c.get(format!("{url}/v2/7?x=1")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().starts_with("/orders/7?x=1 "));
    // The longer prefix wins, with its own deadline.
    let started = Instant::now();
    let res = c.get(format!("{url}/v2/slow/1")).send().await.unwrap();
    assert_eq!(res.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The restaurant's routes are not there unless configured.
    assert_eq!(status(&c, format!("{url}/orders/1")).await, 404);
}

#[test]
fn a_configuration_that_cannot_work_is_refused_with_the_reason() {
    let err = |text: &str| Config::from_toml(text).unwrap_err().to_string();
    assert!(err("[upstreams]\norder = []").contains("order has no replicas"));
    let e = err("[upstreams]\na = [\"http://x\"]\n[[routes]]\nprefix = \"/p\"\nupstream = \"b\"");
    assert!(e.contains("no upstream named b"), "{e}");
    let e = err("[upstreams]\na = [\"http://x\"]\n[[routes]]\nprefix = \"p\"\nupstream = \"a\"");
    assert!(e.contains("starts with /"), "{e}");
    assert!(err("timeout = 5\n[upstreams]").contains("unknown field"));
    // Without routes, the restaurant's are used.
    let c = Config::from_toml(
        "[upstreams]\norder = [\"http://o\"]\ncook = [\"http://c\"]\n\
         delivery = [\"http://d\"]\nmypage = [\"http://m\"]",
    )
    .unwrap();
    assert_eq!(c.routes, restaurant_gateway::default_routes());
}

#[tokio::test]
async fn a_body_larger_than_the_services_accept_is_refused_here_with_413() {
    let gw = gateway(
        Upstreams::single(echo().await, gone().await, gone().await, gone().await),
        Duration::from_secs(5),
        16,
    )
    .await;
    let c = reqwest::Client::new();
    for size in [70 * 1024, 1024 * 1024, 8 * 1024 * 1024] {
        let res = c
            .post(format!("{gw}/orders"))
            .header("content-type", "application/json")
            .body("x".repeat(size))
            .send()
            .await;
        match res {
            Ok(res) => {
                assert_eq!(res.status(), 413, "{size} bytes");
                assert_eq!(res.headers()["content-type"], "application/problem+json");
            }
            // Past the discard limit the gateway may close while the client
            // is still sending; below it the client must hear the 413.
            Err(e) => assert!(size > 4 * 1024 * 1024, "{size} bytes: {e}"),
        }
    }
    let ok = c
        .post(format!("{gw}/orders"))
        .body("x".repeat(60 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ok.status(),
        405,
        "a body within the limit reaches the upstream"
    );
}
