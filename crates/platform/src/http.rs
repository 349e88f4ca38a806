//! HTTP plumbing every service (and the gateway) uses.
//!
//! The rule this module enforces: a client never sees a plain-text error or
//! a 5xx for its own mistakes. Every error is RFC 9457 problem details
//! (`application/problem+json`); the extractors here wrap axum's so that a
//! malformed body, a wrong type or an oversized body becomes a clear 4xx;
//! and [`problem_safety_net`] rewrites any error response that slipped
//! through without a problem body (404 of an unknown route, 405, a panic).

use std::{
    borrow::Cow,
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{FromRequest, FromRequestParts, MatchedPath, Request, State, rejection::*},
    http::{HeaderName, HeaderValue, StatusCode, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use restaurant_contract::{Cause, TraceContext, new_id};
use serde::{Serialize, de::DeserializeOwned};

pub const PROBLEM_JSON: &str = "application/problem+json";
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An RFC 9457 problem. `detail` speaks to the client; internal causes are
/// logged, never returned.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: Cow<'static, str>,
    #[serde(serialize_with = "ser_status")]
    pub status: StatusCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extra members, flattened into the body (e.g. the current state).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Box<serde_json::Map<String, serde_json::Value>>>,
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

fn ser_status<S: serde::Serializer>(s: &StatusCode, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_u16(s.as_u16())
}

impl Problem {
    pub fn new(status: StatusCode, title: impl Into<Cow<'static, str>>) -> Self {
        Problem {
            kind: "about:blank",
            title: title.into(),
            status,
            detail: None,
            extensions: None,
            retry_after: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with(mut self, key: &str, value: impl Serialize) -> Self {
        let v = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        self.extensions
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), v);
        self
    }

    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad request").detail(detail)
    }

    pub fn validation(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request").detail(detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "Not found").detail(detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "Conflict").detail(detail)
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "Service unavailable").detail(detail)
    }

    /// A failure of ours. The cause is logged with the request; the client
    /// gets a generic message.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
            .detail("the service failed to handle the request; it has been logged")
    }
}

impl Problem {
    /// The response, with any body type (the gateway's own is not axum's).
    pub fn into_http<B: From<axum::body::Bytes>>(self) -> http::Response<B> {
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut res = http::Response::new(B::from(body.into()));
        *res.status_mut() = self.status;
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(d) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(d.as_secs().max(1)));
        }
        res
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        self.into_http()
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        Problem::internal(e)
    }
}

impl From<anyhow::Error> for Problem {
    fn from(e: anyhow::Error) -> Self {
        Problem::internal(format!("{e:#}"))
    }
}

fn rejection(status: StatusCode, text: String) -> Problem {
    let title = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "Request body too large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "Unsupported media type",
        StatusCode::UNPROCESSABLE_ENTITY => "Invalid request body",
        _ => "Malformed request",
    };
    let status = if status.is_server_error() {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    Problem::new(status, title).detail(text)
}

/// `axum::Json` whose rejections are problem details.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = Problem;
    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

fn json_rejection(rej: JsonRejection) -> Problem {
    match &rej {
        JsonRejection::BytesRejection(BytesRejection::FailedToBufferBody(
            FailedToBufferBody::LengthLimitError(_),
        )) => rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body exceeds {MAX_BODY_BYTES} bytes"),
        ),
        _ => rejection(rej.status(), rej.body_text()),
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` whose rejections are problem details.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|rej| rejection(rej.status(), rej.body_text()))
    }
}

/// `axum::extract::Query` whose rejections are problem details.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|rej| rejection(rej.status(), rej.body_text()))
    }
}

/// A query parameter the endpoint cannot do without: present and non-empty.
pub fn required(value: Option<String>, name: &str) -> Result<String, Problem> {
    value
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| Problem::bad_request(format!("the {name} query parameter is required")))
}

/// Who asked, for correlation: the request id (from `x-request-id` or new)
/// and the W3C trace context (continued from `traceparent` or a new root).
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub request_id: String,
    pub trace: TraceContext,
}

impl RequestContext {
    pub fn cause(&self) -> Cause {
        Cause::request(self.request_id.clone(), Some(self.trace))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        Ok(parts
            .extensions
            .get::<RequestContext>()
            .cloned()
            .unwrap_or_else(|| context_from_headers(&parts.headers)))
    }
}

fn context_from_headers(headers: &axum::http::HeaderMap) -> RequestContext {
    let request_id = headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(new_id);
    let trace = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map(|t| t.child())
        .unwrap_or_else(TraceContext::new_root);
    RequestContext { request_id, trace }
}

async fn request_context(mut req: Request, next: Next) -> Response {
    let ctx = context_from_headers(req.headers());
    let id = HeaderValue::from_str(&ctx.request_id).ok();
    req.extensions_mut().insert(ctx);
    let mut res = next.run(req).await;
    if let Some(id) = id {
        res.headers_mut().insert(X_REQUEST_ID.clone(), id);
    }
    res
}

/// Rewrites error responses without a problem body into problem details.
pub async fn problem_safety_net(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_problem = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if is_problem {
        return res;
    }
    let title = status.canonical_reason().unwrap_or("Error");
    let detail = match status {
        StatusCode::NOT_FOUND => "no such resource",
        StatusCode::METHOD_NOT_ALLOWED => "this method is not allowed on this resource",
        s if s.is_server_error() => "the service failed to handle the request",
        _ => "the request was refused",
    };
    let mut problem = Problem::new(status, title).detail(detail);
    if let Some(allow) = res.headers().get(header::ALLOW).cloned() {
        let mut r = problem.clone().into_response();
        r.headers_mut().insert(header::ALLOW, allow);
        return r;
    }
    problem.retry_after = res
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .map(Duration::from_secs);
    problem.into_response()
}

async fn record_metrics(service: &'static str, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    let start = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    let labels = [
        ("service", service.to_owned()),
        ("route", route),
        ("method", method),
        ("status", status),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    res
}

/// Wraps a service's API with the standard layers: body limit, request
/// context, metrics, panic catching and the problem-details safety net.
pub fn standard_layers(service: &'static str, router: Router) -> Router {
    router
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(move |req, next| {
            record_metrics(service, req, next)
        }))
        .layer(middleware::from_fn(request_context))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                Problem::internal("handler panicked").into_response()
            },
        ))
        .layer(middleware::from_fn(problem_safety_net))
}

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub db: crate::db::Db,
    pub bus: crate::bus::Bus,
    pub shutdown: crate::shutdown::Shutdown,
}

/// `/healthz` (the process answers), `/readyz` (its database and bus answer,
/// and it is not draining) and `/metrics` (Prometheus text).
pub fn health_routes(ready: Readiness) -> Router {
    probe_routes(get(readyz)).with_state(ready)
}

/// `/healthz`, `/metrics`, and `/readyz` as `readyz` says: what every
/// process serves, the gateway included (its readiness is its upstreams').
pub fn probe_routes<S: Clone + Send + Sync + 'static>(
    readyz: axum::routing::MethodRouter<S>,
) -> Router<S> {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", readyz)
        .route(
            "/metrics",
            get(|| async { crate::telemetry::render_metrics() }),
        )
}

async fn readyz(State(r): State<Readiness>) -> Result<impl IntoResponse, Problem> {
    if r.shutdown.is_triggered() {
        return Err(Problem::unavailable("draining for shutdown"));
    }
    let check = async {
        r.db.ping().await.map_err(|e| format!("database: {e}"))?;
        r.bus.ping().await.map_err(|e| format!("event bus: {e}"))?;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(())) => Ok(axum::Json(serde_json::json!({"status": "ready"}))),
        Ok(Err(e)) => Err(Problem::unavailable(e)),
        Err(_) => Err(Problem::unavailable("readiness checks timed out")),
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets in-flight
/// requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: crate::shutdown::Shutdown,
) -> std::io::Result<()> {
    serve_draining(listener, router, shutdown, Duration::ZERO).await
}

/// [`serve`], but once shutdown is triggered it keeps accepting and serving
/// for `drain` (readiness already answers 503, so load balancers move away)
/// before it stops accepting and finishes the requests in flight.
pub async fn serve_draining(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: crate::shutdown::Shutdown,
    drain: Duration,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Responses are written whole; Nagle would only hold back the last
    // segment of one until the peer's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.wait().await;
            tokio::time::sleep(drain).await;
        })
        .await
}
