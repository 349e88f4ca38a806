//! The API gateway: the single entry point. It routes by path prefix to the
//! services, keeps pooled keep-alive connections to them, propagates the
//! request id and W3C trace context, and turns an unreachable or slow
//! upstream into a problem-details 502/504 instead of a hung client.
#![forbid(unsafe_code)]

mod fast;
mod h1;
mod upstream;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, Method, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use restaurant_contract::{TraceContext, new_id};
use restaurant_platform::{
    breaker::{BreakerConfig, BreakerState, CircuitBreaker},
    http::{Problem, TRACEPARENT, X_REQUEST_ID, problem_safety_net},
    shutdown::Shutdown,
};
use tokio::{net::TcpListener, sync::Semaphore};
use upstream::{Answer, AnswerBody, Outgoing, Upstream};

/// What the gateway answers with.
type GatewayResponse = http::Response<ProxyBody>;

/// Where each service's replicas listen.
#[derive(Clone, Debug)]
pub struct Upstreams {
    pub order: Vec<String>,
    pub cook: Vec<String>,
    pub delivery: Vec<String>,
    pub mypage: Vec<String>,
}

impl Upstreams {
    /// One replica of each.
    pub fn single(order: String, cook: String, delivery: String, mypage: String) -> Self {
        Upstreams {
            order: vec![order],
            cook: vec![cook],
            delivery: vec![delivery],
            mypage: vec![mypage],
        }
    }
}

/// One replica of a service.
#[derive(Debug)]
struct Replica {
    base: String,
    upstream: Upstream,
    in_flight: AtomicUsize,
    /// Passive outlier detection: consecutive failures (refused or reset
    /// connections, timeouts, 5xx answers) open it, so a failing replica is
    /// ejected after a few requests, not after a health-check period; a
    /// half-open probe request, or a passing active health check, closes it.
    breaker: CircuitBreaker,
    /// Active health: the last checks of `/readyz` said ready.
    healthy: AtomicBool,
}

/// The per-replica breaker: three failures in a row eject a replica for
/// half a second, doubling while its probes fail, up to five seconds.
const REPLICA_BREAKER: BreakerConfig = BreakerConfig {
    failure_threshold: 3,
    open_for: Duration::from_millis(500),
    max_open_for: Duration::from_secs(5),
};

/// Retries as a share of requests, as in linkerd and Finagle: every request
/// deposits a fifth of a token, every retry takes one, and the balance is
/// capped. Retries then add at most ~20% load on top of the traffic: when a
/// whole service is failing, they stop instead of doubling its load.
#[derive(Debug)]
struct RetryBudget {
    /// Thousandths of a token.
    balance: AtomicI64,
}

const RETRY_DEPOSIT: i64 = 200;
const RETRY_COST: i64 = 1_000;
/// Ten retries' worth: a quiet service can still retry a few requests.
const RETRY_CAP: i64 = 10 * RETRY_COST;

impl RetryBudget {
    fn new() -> Self {
        RetryBudget {
            balance: AtomicI64::new(RETRY_CAP),
        }
    }

    fn deposit(&self) {
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b < RETRY_CAP).then(|| (b + RETRY_DEPOSIT).min(RETRY_CAP))
            });
    }

    fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= RETRY_COST).then_some(b - RETRY_COST)
            })
            .is_ok()
    }
}

/// A service's replicas. Requests go to the less busy of two picked
/// (power of two choices): near least-loaded without scanning, and no herd
/// on the single least-loaded one.
#[derive(Debug)]
struct Pool {
    service: &'static str,
    replicas: Vec<Replica>,
    cursor: AtomicUsize,
    retries: RetryBudget,
}

impl Pool {
    fn new(service: &'static str, bases: &[String]) -> Result<Self, ConfigError> {
        let replicas = bases
            .iter()
            .map(|b| {
                let base = b.trim_end_matches('/').to_owned();
                Ok(Replica {
                    upstream: Upstream::new(&base, service).map_err(ConfigError::Replica)?,
                    breaker: CircuitBreaker::new(
                        format!("gateway {service} {base}"),
                        REPLICA_BREAKER,
                    ),
                    base,
                    in_flight: AtomicUsize::new(0),
                    healthy: AtomicBool::new(true),
                })
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(Pool {
            service,
            replicas,
            cursor: AtomicUsize::new(0),
            retries: RetryBudget::new(),
        })
    }

    /// A replica to try, never `avoid`; healthy ones first. No allocation:
    /// this runs for every proxied request.
    fn pick(&self, avoid: Option<usize>) -> Option<usize> {
        let n = self.replicas.len();
        let admitted = |i: usize| Some(i) != avoid && self.replicas[i].breaker.admits();
        let healthy = |i: usize| admitted(i) && self.replicas[i].healthy.load(Ordering::Relaxed);
        // Replicas the health checks call unready are used only when no
        // other is left (a check can lag a recovery); an open breaker is
        // never overridden: failing fast is its point.
        let mut usable: &dyn Fn(usize) -> bool = &healthy;
        let mut count = (0..n).filter(|&i| healthy(i)).count();
        if count == 0 {
            usable = &admitted;
            count = (0..n).filter(|&i| admitted(i)).count();
        }
        let nth = |k: usize| (0..n).filter(|&i| usable(i)).nth(k);
        match count {
            0 => None,
            1 => nth(0),
            m => {
                let c = self.cursor.fetch_add(1, Ordering::Relaxed);
                let a = nth(c % m)?;
                // A second, different candidate spread by a multiplicative hash.
                let b = nth((c % m + 1 + c.wrapping_mul(0x9E37_79B9) % (m - 1)) % m)?;
                let load = |i: usize| self.replicas[i].in_flight.load(Ordering::Relaxed);
                Some(if load(b) < load(a) { b } else { a })
            }
        }
    }

    /// Records an active health check of replica `i`.
    fn checked(&self, i: usize, ready: bool) {
        let r = &self.replicas[i];
        let was = r.healthy.swap(ready, Ordering::Relaxed);
        if ready {
            // Recovered: re-admit at once rather than after the open period.
            r.breaker.reset();
        }
        if was != ready {
            tracing::info!(service = self.service, replica = %r.base, ready, "replica health changed");
        }
        let healthy = self
            .replicas
            .iter()
            .filter(|r| r.healthy.load(Ordering::Relaxed))
            .count();
        metrics::gauge!("gateway_healthy_replicas", "service" => self.service).set(healthy as f64);
    }
}

/// A route: requests whose path starts with `prefix` (at a segment
/// boundary) go to `pool`; `rewrite` replaces the prefix if set.
#[derive(Clone, Debug)]
struct Route {
    prefix: String,
    rewrite: Option<String>,
    pool: Arc<Pool>,
    /// Deadline of one upstream exchange on this route.
    timeout: Duration,
    metrics: Arc<RouteMetrics>,
}

/// A route's metric handles, looked up once rather than per request (a
/// lookup hashes the name and every label), labelled with the route's
/// prefix and its upstream.
#[derive(Debug)]
struct RouteMetrics {
    latency: metrics::Histogram,
    requests: std::sync::Mutex<std::collections::HashMap<u16, metrics::Counter>>,
    route: String,
    upstream: &'static str,
}

impl RouteMetrics {
    fn new(route: &str, upstream: &'static str) -> Self {
        RouteMetrics {
            latency: metrics::histogram!("gateway_request_duration_seconds",
                "route" => route.to_owned(), "upstream" => upstream),
            requests: Default::default(),
            route: route.to_owned(),
            upstream,
        }
    }

    /// Counts a response, registering its status's counter the first time.
    fn record(&self, status: http::StatusCode, elapsed: Duration) {
        self.latency.record(elapsed.as_secs_f64());
        let mut counters = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        counters
            .entry(status.as_u16())
            .or_insert_with(|| {
                metrics::counter!("gateway_requests_total", "route" => self.route.clone(),
                    "upstream" => self.upstream, "status" => status.as_str().to_owned())
            })
            .increment(1);
    }
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        path.strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

/// A route as configured.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, matched at a segment boundary (`/orders` matches
    /// `/orders` and `/orders/1`, not `/ordersx`); the longest match wins.
    pub prefix: String,
    /// The upstream (a key of `upstreams`) that serves it.
    pub upstream: String,
    /// Replaces the prefix before forwarding, if set.
    #[serde(default)]
    pub rewrite: Option<String>,
    /// This route's upstream deadline, instead of the gateway's `timeout`.
    #[serde(default, rename = "timeout_ms", deserialize_with = "millis")]
    pub timeout: Option<Duration>,
}

fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Ok(<Option<u64> as serde::Deserialize>::deserialize(d)?.map(Duration::from_millis))
}

impl RouteConfig {
    fn new(prefix: &str, upstream: &str, rewrite: Option<&str>) -> Self {
        RouteConfig {
            prefix: prefix.into(),
            upstream: upstream.into(),
            rewrite: rewrite.map(Into::into),
            timeout: None,
        }
    }
}

/// The routes of the restaurant API: each service's resources, and each
/// service's dead-letter admin under `/admin/<service>`.
pub fn default_routes() -> Vec<RouteConfig> {
    let mut routes = vec![
        RouteConfig::new("/orders", "order", None),
        RouteConfig::new("/menus", "cook", None),
        RouteConfig::new("/cooks", "cook", None),
        RouteConfig::new("/deliveries", "delivery", None),
        RouteConfig::new("/mypages", "mypage", None),
    ];
    for service in ["order", "cook", "delivery", "mypage"] {
        routes.push(RouteConfig::new(
            &format!("/admin/{service}"),
            service,
            Some("/admin"),
        ));
    }
    routes
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the gateway configuration is not valid TOML for it: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("route {prefix}: {why}")]
    Route { prefix: String, why: String },
    #[error("upstream {0} has no replicas")]
    Empty(String),
    #[error("replica {0}")]
    Replica(String),
}

/// Builds the routing table: one pool per upstream, routes longest prefix
/// first.
fn routes(config: &Config) -> Result<(Vec<Route>, Vec<Arc<Pool>>), ConfigError> {
    let mut pools = std::collections::BTreeMap::new();
    for (name, replicas) in &config.upstreams {
        if replicas.is_empty() {
            return Err(ConfigError::Empty(name.clone()));
        }
        // Pool names label metrics for the life of the process.
        let service: &'static str = Box::leak(name.clone().into_boxed_str());
        pools.insert(name.clone(), Arc::new(Pool::new(service, replicas)?));
    }
    let mut routes = Vec::with_capacity(config.routes.len());
    for r in &config.routes {
        let bad = |why: &str| ConfigError::Route {
            prefix: r.prefix.clone(),
            why: why.into(),
        };
        if !r.prefix.starts_with('/') || r.prefix.len() > 1 && r.prefix.ends_with('/') {
            return Err(bad("a prefix starts with / and does not end with one"));
        }
        let pool = pools
            .get(&r.upstream)
            .ok_or_else(|| bad(&format!("no upstream named {}", r.upstream)))?;
        routes.push(Route {
            prefix: r.prefix.clone(),
            rewrite: r.rewrite.clone(),
            pool: pool.clone(),
            timeout: r.timeout.unwrap_or(config.timeout),
            metrics: Arc::new(RouteMetrics::new(&r.prefix, pool.service)),
        });
    }
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    Ok((routes, pools.into_values().collect()))
}

/// Largest request body the gateway forwards: the services' own limit, so
/// a body they would refuse is refused here, after it was read whole, and
/// never races the upstream's early answer against our upload to it.
const MAX_PROXIED_BODY: usize = restaurant_platform::http::MAX_BODY_BYTES;
/// How much of a too-large body is still read (and dropped) before the 413,
/// so a client that is still sending gets the answer instead of a reset.
const MAX_DISCARDED_BODY: usize = 4 * 1024 * 1024;

#[derive(Clone)]
struct Gateway {
    routes: Arc<Vec<Route>>,
    pools: Arc<Vec<Arc<Pool>>>,
    /// Proxied requests in flight. When none is left the gateway sheds load
    /// with a fast 503 + Retry-After instead of queueing without bound: a
    /// queue only converts overload into timeouts for everyone.
    in_flight: Arc<Semaphore>,
    shutdown: Shutdown,
}

/// The gateway's configuration: `Config::new` for the restaurant's
/// services, or a TOML file (`Config::from_toml`, `serve gateway --config`).
///
/// ```toml
/// timeout_ms = 10000          # upstream deadline, unless a route says otherwise
/// max_in_flight = 2048        # beyond it: 503 + Retry-After
/// health_interval_ms = 500    # active checks of every replica's /readyz
/// drain_ms = 5000             # on SIGTERM: unready, still serving, this long
/// cors_origins = ["https://app.example"]
///
/// [upstreams]
/// order = ["http://10.0.0.1:8081", "http://10.0.0.2:8081"]
/// cook = ["http://10.0.0.1:8082"]
/// delivery = ["http://10.0.0.1:8083"]
/// mypage = ["http://10.0.0.1:8084"]
///
/// [[routes]]                  # optional: the restaurant's routes by default
/// prefix = "/orders"
/// upstream = "order"
/// timeout_ms = 2000
/// ```
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Upstream name → its replicas' base URLs.
    pub upstreams: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default = "default_routes")]
    pub routes: Vec<RouteConfig>,
    /// Deadline for one upstream exchange (headers of the response).
    #[serde(
        default = "defaults::timeout",
        rename = "timeout_ms",
        deserialize_with = "millis_or"
    )]
    pub timeout: Duration,
    /// Most proxied requests in flight at once; beyond it, 503.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    /// How often every replica's `/readyz` is checked.
    #[serde(
        default = "defaults::health_interval",
        rename = "health_interval_ms",
        deserialize_with = "millis_or"
    )]
    pub health_interval: Duration,
    /// Browser origins allowed by CORS (`*` for any); empty: no CORS.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// After shutdown is triggered: how long to keep serving while `/readyz`
    /// says 503, so load balancers stop sending before connections close.
    #[serde(default, rename = "drain_ms", deserialize_with = "millis_or")]
    pub drain: Duration,
}

fn millis_or<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Ok(millis(d)?.unwrap_or_default())
}

mod defaults {
    use std::time::Duration;

    pub fn timeout() -> Duration {
        Duration::from_secs(10)
    }

    pub fn max_in_flight() -> usize {
        2048
    }

    pub fn health_interval() -> Duration {
        Duration::from_millis(500)
    }
}

impl Config {
    /// The restaurant's routes in front of these replicas.
    pub fn new(upstreams: Upstreams) -> Self {
        Config {
            upstreams: [
                ("order", upstreams.order),
                ("cook", upstreams.cook),
                ("delivery", upstreams.delivery),
                ("mypage", upstreams.mypage),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            routes: default_routes(),
            timeout: defaults::timeout(),
            max_in_flight: defaults::max_in_flight(),
            health_interval: defaults::health_interval(),
            cors_origins: Vec::new(),
            drain: Duration::ZERO,
        }
    }

    /// Reads a configuration file's text, and checks that it can work.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)?;
        routes(&config)?;
        Ok(config)
    }
}

/// The gateway's own endpoints; everything else is proxied.
const OWN_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// What serves one connection's requests: the proxy, or for the gateway's
/// own endpoints an axum router (they are rare; the proxy path does not go
/// through a router's boxing and per-request extensions).
#[derive(Clone)]
struct Front {
    gw: Gateway,
    own: Router,
    cors: Option<tower_http::cors::CorsLayer>,
}

impl Front {
    fn new(config: &Config, shutdown: Shutdown) -> Result<Self, ConfigError> {
        restaurant_platform::telemetry::metrics_handle();
        let (routes, pools) = routes(config)?;
        let gw = Gateway {
            routes: Arc::new(routes),
            pools: Arc::new(pools),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            shutdown,
        };
        let own = restaurant_platform::http::probe_routes(get(readyz))
            .with_state(gw.clone())
            .layer(axum::middleware::from_fn(problem_safety_net));
        Ok(Front {
            gw,
            own,
            cors: cors(&config.cors_origins),
        })
    }

    async fn handle(self, req: Request<Incoming>) -> GatewayResponse {
        if !OWN_PATHS.contains(&req.uri().path()) {
            return proxy(&self.gw, req).await;
        }
        let res = tower::ServiceExt::oneshot(self.own, req)
            .await
            .unwrap_or_else(|e: Infallible| match e {});
        let (parts, body) = res.into_parts();
        // Small bodies of our own making: reading them cannot fail.
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        http::Response::from_parts(parts, body.into())
    }
}

/// Serves `front` on `listener` until `shutdown`, then for `drain` more
/// (unready, still serving), then closes idle connections and lets
/// in-flight requests finish.
async fn serve(listener: TcpListener, front: Front, shutdown: Shutdown, drain: Duration) {
    let closing = Shutdown::new();
    // Every connection's task holds a sender: when all are gone, so are
    // the connections.
    let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let mut stop = std::pin::pin!(async move {
        shutdown.wait().await;
        tokio::time::sleep(drain).await;
    });
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        // Responses are written whole; Nagle would only hold back the last
        // segment of one until the client's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let (front, closing, open) = (front.clone(), closing.clone(), open.clone());
        tokio::spawn(async move {
            fast::connection(front, tcp, closing).await;
            drop(open);
        });
    }
    drop(listener);
    closing.trigger();
    drop(open);
    let _ = all_closed.recv().await;
}

/// CORS for browser clients: preflights answered here, the API's own
/// headers allowed in, and the ones a client reads (request id, location,
/// retry-after) exposed.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::CONTENT_TYPE,
                header::HeaderName::from_static("idempotency-key"),
                X_REQUEST_ID.clone(),
                TRACEPARENT.clone(),
            ])
            .expose_headers([X_REQUEST_ID.clone(), header::LOCATION, header::RETRY_AFTER])
            .max_age(Duration::from_secs(600)),
    )
}

/// Asks a replica's `/readyz`, with a short deadline.
async fn probe(replica: &Replica) -> bool {
    let req = Outgoing {
        method: http::Method::GET,
        target: Bytes::from_static(b"/readyz"),
        lines: Vec::new(),
        body: Bytes::new(),
    };
    tokio::time::timeout(Duration::from_secs(1), replica.upstream.exchange(&req))
        .await
        .ok()
        .and_then(Result::ok)
        .is_some_and(|a| (200..300).contains(&a.head.status))
}

/// A pool's only replica, ready and with its breaker closed, is checked
/// every this many intervals instead of every one.
const SOLE_REPLICA_CHECKED_EVERY: u64 = 10;

/// Whether replica `i` of `pool`, whose last checks failed `failures`
/// times in a row, is checked at tick `tick`. A check chooses between
/// replicas, and tells when one recovers. A sole replica gets the traffic
/// whatever its checks say, and when it fails, its breaker opens (or a rare
/// check fails) and it is checked every interval until it recovers,
/// re-admitted as fast as before. Checking it every 500 ms cost an idle
/// `restaurant up` 80 requests and 160 database and log round trips in
/// 10 s, most of its idle CPU.
fn check_due(pool: &Pool, i: usize, failures: u32, tick: u64) -> bool {
    let r = &pool.replicas[i];
    pool.replicas.len() > 1
        || failures > 0
        || !r.healthy.load(Ordering::Relaxed)
        || r.breaker.state() != BreakerState::Closed
        || tick.is_multiple_of(SOLE_REPLICA_CHECKED_EVERY)
}

/// Active health checks: every replica's `/readyz`, every `interval` (a sole
/// replica less often while it is well, see [`check_due`]). Two failed
/// checks in a row mark a replica unready (it then gets traffic only if no
/// other is left); one passing check marks it ready and closes its breaker,
/// so a recovered replica is re-admitted within one interval.
async fn check_health(gw: Gateway, interval: Duration) {
    let mut failures: Vec<Vec<u32>> = gw.pools.iter().map(|p| vec![0; p.replicas.len()]).collect();
    for tick in 1.. {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = gw.shutdown.wait() => return,
        }
        let mut checks = Vec::new();
        for (p, pool) in gw.pools.iter().enumerate() {
            for (i, r) in pool.replicas.iter().enumerate() {
                r.upstream.expire_idle();
                if check_due(pool, i, failures[p][i], tick) {
                    checks.push(async move { (p, i, probe(r).await) });
                }
            }
        }
        for (p, i, ready) in futures_util::future::join_all(checks).await {
            let n = &mut failures[p][i];
            *n = if ready { 0 } else { *n + 1 };
            if ready || *n >= 2 {
                gw.pools[p].checked(i, ready);
            }
        }
    }
}

async fn readyz(State(gw): State<Gateway>) -> Response {
    if gw.shutdown.is_triggered() {
        return Problem::unavailable("draining for shutdown").into_response();
    }
    let checks = gw.pools.iter().map(|pool| {
        let pool = pool.clone();
        async move {
            for (i, r) in pool.replicas.iter().enumerate() {
                if probe(r).await {
                    // What a health check would learn: use it now.
                    pool.checked(i, true);
                    return None;
                }
            }
            Some(pool.service)
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

/// Why a request body is not forwarded.
enum BodyError {
    /// Larger than [`MAX_PROXIED_BODY`] (read and dropped up to
    /// [`MAX_DISCARDED_BODY`], so the client hears why).
    TooLarge,
    /// The client stopped sending midway: a truncated body is never forwarded.
    Broken,
}

async fn read_body(mut body: Incoming) -> Result<Bytes, BodyError> {
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(chunk) = frame.map_err(|_| BodyError::Broken)?.into_data() else {
            continue; // trailers: not forwarded
        };
        seen += chunk.len();
        if seen <= MAX_PROXIED_BODY {
            buf.extend_from_slice(&chunk);
        } else if seen > MAX_DISCARDED_BODY {
            return Err(BodyError::TooLarge);
        }
    }
    if seen > MAX_PROXIED_BODY {
        return Err(BodyError::TooLarge);
    }
    Ok(buf.into())
}

/// Takes a request in, or says why not: at capacity, or no route.
fn admit<'g>(
    gw: &'g Gateway,
    path: &str,
) -> Result<(&'g Route, tokio::sync::OwnedSemaphorePermit), Problem> {
    let Ok(slot) = gw.in_flight.clone().try_acquire_owned() else {
        metrics::counter!("gateway_shed_total").increment(1);
        return Err(
            Problem::unavailable("the gateway is at capacity; retry shortly")
                .retry_after(Duration::from_secs(1)),
        );
    };
    match gw.routes.iter().find(|r| r.matches(path)) {
        Some(route) => Ok((route, slot)),
        None => Err(Problem::not_found(format!("no route for {path}"))),
    }
}

/// The target sent upstream: origin-form, the route's prefix rewritten if
/// it says so. `original` is the request's own path and query.
fn upstream_target(route: &Route, path: &str, query: Option<&str>, original: Bytes) -> Bytes {
    match route.rewrite.as_deref() {
        None => original,
        Some(to) => {
            let rest = &path[route.prefix.len()..];
            Bytes::from(match query {
                Some(q) => format!("{to}{rest}?{q}"),
                None => format!("{to}{rest}"),
            })
        }
    }
}

/// The header lines forwarded upstream, and the request id: hop-by-hop
/// headers, `Host` and `Content-Length` (both written per attempt) left
/// out, a request id added if absent, and the W3C trace context continued
/// as a child span (or started).
fn request_lines<'h>(headers: impl Iterator<Item = (&'h [u8], &'h [u8])>) -> (Vec<u8>, Bytes) {
    let mut lines = Vec::with_capacity(512);
    let mut request_id = None;
    let mut parent = None;
    for (name, value) in headers {
        if h1::is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"host")
            || name.eq_ignore_ascii_case(b"content-length")
        {
            continue;
        }
        if name.eq_ignore_ascii_case(TRACEPARENT.as_str().as_bytes()) {
            parent = std::str::from_utf8(value)
                .ok()
                .and_then(TraceContext::parse);
            continue;
        }
        if name.eq_ignore_ascii_case(X_REQUEST_ID.as_str().as_bytes()) && request_id.is_none() {
            request_id = Some(Bytes::copy_from_slice(value));
        }
        h1::put_header(&mut lines, name, value);
    }
    let request_id = request_id.unwrap_or_else(|| {
        let id = Bytes::from(new_id());
        h1::put_header(&mut lines, X_REQUEST_ID.as_str().as_bytes(), &id);
        id
    });
    let trace = parent.map_or_else(TraceContext::new_root, |t| t.child());
    h1::put_header(&mut lines, TRACEPARENT.as_str().as_bytes(), &trace.encode());
    (lines, request_id)
}

/// Sends a request to one of the route's replicas and, after a failure,
/// to another where that is safe. The answer, or the problem to answer
/// with; and whether it was retried.
async fn forward(route: &Route, out: &Outgoing) -> (Result<Answer, Problem>, bool) {
    let pool = &route.pool;
    let service = pool.service;
    let cannot_reach = || format!("the {service} service cannot be reached; try again shortly");
    // Every breaker open: nothing was tried.
    let unavailable = || Problem::unavailable(cannot_reach()).retry_after(Duration::from_secs(1));
    // Tried, and the upstream could not be reached.
    let bad_gateway = || {
        Problem::new(http::StatusCode::BAD_GATEWAY, "Upstream unavailable")
            .detail(cannot_reach())
            .retry_after(Duration::from_secs(1))
    };
    let idempotent = upstream::idempotent(&out.method);
    pool.retries.deposit();
    let mut tried: Option<usize> = None;
    // A retry that may repeat an effect: only for idempotent requests, once,
    // to another replica, within the budget.
    let may_retry = |tried: Option<usize>| {
        let ok =
            idempotent && tried.is_none() && pool.replicas.len() > 1 && pool.retries.withdraw();
        if ok {
            metrics::counter!("gateway_retries_total", "service" => service).increment(1);
        }
        ok
    };
    let answer = loop {
        let Some(i) = pool.pick(tried) else {
            if tried.is_some() {
                // The only replica refused the connection.
                break Err(bad_gateway());
            }
            // Every replica's breaker is open: fail fast.
            break Err(unavailable());
        };
        let replica = &pool.replicas[i];
        // `pick` saw the breaker admit; another request may have taken the
        // one half-open probe since.
        let Ok(permit) = replica.breaker.acquire() else {
            if tried.is_none() {
                tried = Some(i);
                continue;
            }
            break Err(unavailable());
        };
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(route.timeout, replica.upstream.exchange(out)).await;
        replica.in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(Ok(answer)) => {
                let status = answer.head.status;
                if status >= 500 && !answer.head.sheds() {
                    permit.failure();
                } else {
                    permit.success();
                }
                if matches!(status, 502..=504) && may_retry(tried) {
                    tracing::warn!(service, replica = %replica.base, status, "retrying on another replica");
                    tried = Some(i);
                    continue;
                }
                break Ok(answer);
            }
            // Refused: nothing was sent, so any request, whatever its
            // method, can go to another replica once.
            Ok(Err(e @ upstream::Failure::Connect(_))) if tried.is_none() => {
                permit.failure();
                tracing::warn!(service, replica = %replica.base, error = %e, "replica unreachable; trying another");
                tried = Some(i);
            }
            Ok(Err(e)) if may_retry(tried) => {
                permit.failure();
                tracing::warn!(service, replica = %replica.base, error = %e, "upstream failed; retrying on another replica");
                tried = Some(i);
            }
            Ok(Err(e)) => {
                permit.failure();
                tracing::warn!(service, replica = %replica.base, error = %e, "upstream unreachable");
                break Err(bad_gateway());
            }
            Err(_) if may_retry(tried) => {
                permit.failure();
                tracing::warn!(service, replica = %replica.base, "upstream timed out; retrying on another replica");
                tried = Some(i);
            }
            Err(_) => {
                permit.failure();
                break Err(
                    Problem::new(http::StatusCode::GATEWAY_TIMEOUT, "Upstream timeout").detail(
                        format!(
                            "the {service} service did not answer within {:?}",
                            route.timeout
                        ),
                    ),
                );
            }
        }
    };
    (answer, tried.is_some())
}

/// Counts a proxied request and, if the access log is on, logs it.
fn observe(
    route: &Route,
    method: &http::Method,
    path: &str,
    status: http::StatusCode,
    elapsed: Duration,
    retried: bool,
    request_id: &[u8],
) {
    route.metrics.record(status, elapsed);
    tracing::info!(
        target: "access",
        %method,
        path,
        status = status.as_u16(),
        service = route.pool.service,
        retried,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        request_id = %String::from_utf8_lossy(request_id),
    );
}

/// The hyper path's proxy: requests the gateway's own path hands over
/// (see `fast`), as a `Request` in and a `Response` out.
async fn proxy(gw: &Gateway, req: Request<Incoming>) -> GatewayResponse {
    let path = req.uri().path();
    let (route, _slot) = match admit(gw, path) {
        Ok(admitted) => admitted,
        Err(problem) => return problem.into_http(),
    };
    let original = req.uri().path_and_query().map_or_else(
        || Bytes::from_static(b"/"),
        |p| Bytes::copy_from_slice(p.as_str().as_bytes()),
    );
    let target = upstream_target(route, path, req.uri().query(), original);
    let logged_path = path.to_owned();
    let (lines, request_id) = request_lines(
        req.headers()
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
    );
    let (parts, body) = req.into_parts();
    // Read whole, so a request that could not be delivered (connection
    // refused: nothing was sent) can go to another replica whatever its
    // method. Bodies here are small; the services cap them at 64 KiB.
    let body = if body.is_end_stream() {
        Bytes::new()
    } else {
        match read_body(body).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => {
                return Problem::new(
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    "Request body too large",
                )
                .detail(format!("the body exceeds {MAX_PROXIED_BODY} bytes"))
                .into_http();
            }
            Err(BodyError::Broken) => {
                return Problem::bad_request("the request body could not be read whole")
                    .into_http();
            }
        }
    };
    let out = Outgoing {
        method: parts.method,
        target,
        lines,
        body,
    };
    let started = std::time::Instant::now();
    let (answer, retried) = forward(route, &out).await;
    let mut res: GatewayResponse = match answer {
        Ok(answer) => answer_response(answer),
        Err(problem) => problem.into_http(),
    };
    if let Ok(v) = HeaderValue::from_maybe_shared(request_id.clone()) {
        res.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    observe(
        route,
        &out.method,
        &logged_path,
        res.status(),
        started.elapsed(),
        retried,
        &request_id,
    );
    res
}

/// An upstream's answer as a hyper response: hop-by-hop headers dropped,
/// the length left to the body.
fn answer_response(answer: Answer) -> GatewayResponse {
    let head = &answer.head;
    let mut res = http::Response::new(match answer.body {
        AnswerBody::Whole(b) => ProxyBody::Full(Full::new(b)),
        AnswerBody::Streamed(s) => ProxyBody::Streamed(s),
    });
    *res.status_mut() =
        http::StatusCode::from_u16(head.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    let headers = res.headers_mut();
    for (name, value) in head.passed_on() {
        if let (Ok(n), Ok(v)) = (
            header::HeaderName::from_bytes(name),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    res
}

/// A proxied answer's body: read whole, or streamed when it was too large
/// to hold.
pub(crate) enum ProxyBody {
    Full(Full<Bytes>),
    Streamed(upstream::Streamed),
}

impl Default for ProxyBody {
    fn default() -> Self {
        ProxyBody::Full(Full::default())
    }
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> Self {
        ProxyBody::Full(Full::new(b))
    }
}

impl hyper::body::Body for ProxyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(full) => std::pin::Pin::new(full)
                .poll_frame(cx)
                .map_err(|e| match e {}),
            ProxyBody::Streamed(s) => std::pin::Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(full) => full.is_end_stream(),
            ProxyBody::Streamed(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ProxyBody::Full(full) => full.size_hint(),
            ProxyBody::Streamed(s) => s.size_hint(),
        }
    }
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
    let front = Front::new(&config, shutdown.clone())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio::spawn(check_health(front.gw.clone(), config.health_interval));
    let task = tokio::spawn(serve(listener, front, shutdown.clone(), config.drain));
    Ok(RunningGateway {
        addr,
        task,
        shutdown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_budget_allows_a_fifth_of_the_traffic_after_its_reserve() {
        let b = RetryBudget::new();
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10, "the reserve");
        for _ in 0..50 {
            b.deposit();
        }
        assert_eq!(
            (0..20).filter(|_| b.withdraw()).count(),
            10,
            "50 requests earn 10 retries"
        );
        for _ in 0..1000 {
            b.deposit();
        }
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10, "capped");
    }

    #[test]
    fn a_sole_replica_is_checked_every_interval_only_while_it_is_unwell() {
        let due = |pool: &Pool, i: usize| -> Vec<u64> {
            (1..=20).filter(|&t| check_due(pool, i, 0, t)).collect()
        };
        let every: Vec<u64> = (1..=20).collect();
        let two = Pool::new(
            "order",
            &["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
        )
        .unwrap();
        assert_eq!(due(&two, 0), every, "checks choose between replicas");
        let sole = Pool::new("order", &["http://127.0.0.1:1".into()]).unwrap();
        assert_eq!(due(&sole, 0), [10, 20]);
        assert!(
            check_due(&sole, 0, 1, 11),
            "one check failed: the next is due"
        );
        sole.checked(0, false);
        assert_eq!(due(&sole, 0), every, "unready: watched for recovery");
        sole.checked(0, true);
        assert_eq!(due(&sole, 0), [10, 20]);
        for _ in 0..REPLICA_BREAKER.failure_threshold {
            sole.replicas[0].breaker.acquire().unwrap().failure();
        }
        assert_eq!(due(&sole, 0), every, "ejected: watched for recovery");
        sole.checked(0, true);
        assert_eq!(due(&sole, 0), [10, 20], "a passing check closes it");
    }
}
