//! The API gateway: the single entry point. It routes by path prefix to the
//! services, keeps pooled keep-alive connections to them, propagates the
//! request id and W3C trace context, and turns an unreachable or slow
//! upstream into a problem-details 502/504 instead of a hung client.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use restaurant_contract::{TraceContext, new_id};
use restaurant_platform::{
    http::{Problem, TRACEPARENT, X_REQUEST_ID, problem_safety_net},
    shutdown::Shutdown,
};
use tokio::{net::TcpListener, sync::Semaphore};

/// Where each service listens.
#[derive(Clone, Debug)]
pub struct Upstreams {
    pub order: String,
    pub cook: String,
    pub delivery: String,
    pub mypage: String,
}

/// A route: requests whose path starts with `prefix` (at a segment
/// boundary) go to `service`; `rewrite` replaces the prefix if set.
#[derive(Clone, Debug)]
struct Route {
    prefix: &'static str,
    service: &'static str,
    rewrite: Option<&'static str>,
    base: String,
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        path.strip_prefix(self.prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

fn routes(u: &Upstreams) -> Vec<Route> {
    let r = |prefix, service, rewrite, base: &String| Route {
        prefix,
        service,
        rewrite,
        base: base.trim_end_matches('/').to_owned(),
    };
    vec![
        r("/orders", "order", None, &u.order),
        r("/menus", "cook", None, &u.cook),
        r("/cooks", "cook", None, &u.cook),
        r("/deliveries", "delivery", None, &u.delivery),
        r("/mypages", "mypage", None, &u.mypage),
        // Each service's dead-letter admin, under one roof.
        r("/admin/order", "order", Some("/admin"), &u.order),
        r("/admin/cook", "cook", Some("/admin"), &u.cook),
        r("/admin/delivery", "delivery", Some("/admin"), &u.delivery),
        r("/admin/mypage", "mypage", Some("/admin"), &u.mypage),
    ]
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[derive(Clone)]
struct Gateway {
    routes: Arc<Vec<Route>>,
    client: Client<HttpConnector, Body>,
    timeout: Duration,
    /// Proxied requests in flight. When none is left the gateway sheds load
    /// with a fast 503 + Retry-After instead of queueing without bound: a
    /// queue only converts overload into timeouts for everyone.
    in_flight: Arc<Semaphore>,
    shutdown: Shutdown,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub upstreams: Upstreams,
    /// Deadline for one upstream exchange (headers of the response).
    pub timeout: Duration,
    /// Most proxied requests in flight at once; beyond it, 503.
    pub max_in_flight: usize,
}

impl Config {
    pub fn new(upstreams: Upstreams) -> Self {
        Config {
            upstreams,
            timeout: Duration::from_secs(10),
            max_in_flight: 2048,
        }
    }
}

pub fn router(config: Config, shutdown: Shutdown) -> Router {
    restaurant_platform::telemetry::metrics_handle();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector);
    let gw = Gateway {
        routes: Arc::new(routes(&config.upstreams)),
        client,
        timeout: config.timeout,
        in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
        shutdown,
    };
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|| async { restaurant_platform::telemetry::render_metrics() }),
        )
        .fallback(proxy)
        .with_state(gw)
        .layer(axum::middleware::from_fn(problem_safety_net))
}

async fn readyz(State(gw): State<Gateway>) -> Response {
    if gw.shutdown.is_triggered() {
        return Problem::unavailable("draining for shutdown").into_response();
    }
    let mut seen = std::collections::BTreeMap::new();
    for r in gw.routes.iter() {
        seen.entry(r.service).or_insert_with(|| r.base.clone());
    }
    let checks = seen.into_iter().map(|(service, base)| {
        let client = gw.client.clone();
        async move {
            let uri: Uri = format!("{base}/readyz").parse().ok()?;
            let req = Request::get(uri).body(Body::empty()).ok()?;
            let ok = tokio::time::timeout(Duration::from_secs(1), client.request(req))
                .await
                .ok()
                .and_then(Result::ok)
                .is_some_and(|r| r.status().is_success());
            (!ok).then_some(service)
        }
    });
    let down: Vec<&str> = futures_util::future::join_all(checks)
        .await
        .into_iter()
        .flatten()
        .collect();
    if down.is_empty() {
        axum::Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        Problem::unavailable(format!("not ready: {}", down.join(", ")))
            .with("notReady", down)
            .into_response()
    }
}

async fn proxy(State(gw): State<Gateway>, mut req: Request) -> Response {
    let Ok(_slot) = gw.in_flight.clone().try_acquire_owned() else {
        metrics::counter!("gateway_shed_total").increment(1);
        return Problem::unavailable("the gateway is at capacity; retry shortly")
            .retry_after(Duration::from_secs(1))
            .into_response();
    };
    let path = req.uri().path();
    let Some(route) = gw.routes.iter().find(|r| r.matches(path)) else {
        return Problem::not_found(format!("no route for {path}")).into_response();
    };
    let rest = &path[route.prefix.len()..];
    let new_path = match route.rewrite {
        Some(to) => format!("{to}{rest}"),
        None => path.to_owned(),
    };
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri: Uri = match format!("{}{new_path}{query}", route.base).parse() {
        Ok(u) => u,
        Err(_) => return Problem::bad_request("malformed request target").into_response(),
    };
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
    headers.remove(header::HOST);
    let request_id = match headers.get(&X_REQUEST_ID) {
        Some(v) => v.clone(),
        None => {
            let v = HeaderValue::from_str(&new_id()).expect("uuid is a valid header");
            headers.insert(X_REQUEST_ID.clone(), v.clone());
            v
        }
    };
    let trace = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map(|t| t.child())
        .unwrap_or_else(TraceContext::new_root);
    if let Ok(v) = HeaderValue::from_str(&trace.to_string()) {
        headers.insert(TRACEPARENT.clone(), v);
    }
    let service = route.service;
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(gw.timeout, gw.client.request(req)).await;
    let mut res = match result {
        Ok(Ok(res)) => res.map(Body::new).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(service, error = %e, "upstream unreachable");
            Problem::new(http::StatusCode::BAD_GATEWAY, "Upstream unavailable")
                .detail(format!(
                    "the {service} service cannot be reached; try again shortly"
                ))
                .retry_after(Duration::from_secs(1))
                .into_response()
        }
        Err(_) => Problem::new(http::StatusCode::GATEWAY_TIMEOUT, "Upstream timeout")
            .detail(format!(
                "the {service} service did not answer within {:?}",
                gw.timeout
            ))
            .into_response(),
    };
    for h in HOP_BY_HOP {
        res.headers_mut().remove(*h);
    }
    res.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    let status = res.status().as_u16().to_string();
    metrics::counter!("gateway_requests_total", "service" => service, "status" => status)
        .increment(1);
    metrics::histogram!("gateway_request_duration_seconds", "service" => service)
        .record(started.elapsed().as_secs_f64());
    res
}

/// A running gateway.
pub struct RunningGateway {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    shutdown: Shutdown,
}

impl RunningGateway {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) {
        self.shutdown.trigger();
        let _ = self.task.await;
    }

    pub fn kill(self) {
        self.task.abort();
    }
}

pub fn start(
    listener: TcpListener,
    config: Config,
    shutdown: Shutdown,
) -> std::io::Result<RunningGateway> {
    let addr = listener.local_addr()?;
    let app = router(config, shutdown.clone());
    let s = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = restaurant_platform::http::serve(listener, app, s).await {
            tracing::error!(error = %e, "gateway server failed");
        }
    });
    Ok(RunningGateway {
        addr,
        task,
        shutdown,
    })
}
