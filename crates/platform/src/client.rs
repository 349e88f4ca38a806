//! A small pooled HTTP/1.1 client for service-to-service calls (the order
//! service's synchronous cancel request to the kitchen). Every call has a
//! deadline; errors say whether the peer answered at all, which is what a
//! caller needs to decide between "refused" and "try later".

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The connection could not be made: the request was never sent, so it
    /// is safe to send it elsewhere.
    #[error("peer refused the connection: {0}")]
    Refused(String),
    /// No answer: the connection broke after the request may have been sent.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    #[error("deadline of {0:?} passed")]
    Timeout(Duration),
    #[error("bad request: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug)]
pub struct JsonClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl Default for JsonClient {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonClient {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        JsonClient { inner }
    }

    /// GETs `url`, returning status and body, within `deadline`.
    pub async fn get(
        &self,
        url: &str,
        deadline: Duration,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| CallError::Invalid(e.to_string()))?;
        self.send(req, deadline).await
    }

    /// POSTs `body` as JSON, returning status and body, within `deadline`.
    pub async fn post_json<T: Serialize>(
        &self,
        url: &str,
        body: &T,
        headers: &[(&str, &str)],
        deadline: Duration,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let bytes = serde_json::to_vec(body).map_err(|e| CallError::Invalid(e.to_string()))?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| CallError::Invalid(e.to_string()))?;
        self.send(req, deadline).await
    }

    async fn send(
        &self,
        req: Request<Full<Bytes>>,
        deadline: Duration,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let call = async {
            let res = self.inner.request(req).await.map_err(|e| {
                if e.is_connect() {
                    CallError::Refused(e.to_string())
                } else {
                    CallError::Unreachable(e.to_string())
                }
            })?;
            let status = res.status();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        // No time left: do not send. (A zero timeout would still let the
        // call win the race against the timer on a busy runtime.)
        if deadline.is_zero() {
            return Err(CallError::Timeout(deadline));
        }
        tokio::time::timeout(deadline, call)
            .await
            .map_err(|_| CallError::Timeout(deadline))?
    }
}
