//! The synchronous half of the cancel saga: the order service asks the
//! kitchen to cancel a ticket and waits for the answer (request/response,
//! as the seed asks). The answer decides the HTTP status the customer sees;
//! no answer is not an error but a reason to defer (CANCEL_PENDING).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use restaurant_platform::{
    breaker::{BreakerConfig, CircuitBreaker},
    client::{CallError, JsonClient},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KitchenAnswer {
    /// The ticket is cancelled (or was never started) and stock restored.
    Cancelled { reason: String },
    /// Cooking already finished.
    TooLate { reason: String },
    /// No usable answer within the deadline.
    Unavailable { why: String },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CancelBody<'a> {
    order_id: &'a str,
    request_id: &'a str,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Kitchen {
    /// The kitchen's replicas; calls rotate over them and move on to the
    /// next when one refuses the connection (nothing was sent to it).
    base_urls: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    client: JsonClient,
    deadline: Duration,
    /// Opens after consecutive timeouts or connection failures, so that a
    /// hung kitchen costs a cancel nothing: the call fails fast into the
    /// durable fallback instead of waiting out the deadline each time.
    breaker: CircuitBreaker,
}

impl Kitchen {
    /// `base_url` may list several replicas, comma-separated.
    pub fn new(base_url: impl Into<String>, deadline: Duration, breaker: BreakerConfig) -> Self {
        let base_urls = base_url
            .into()
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        Kitchen {
            base_urls: Arc::new(base_urls),
            next: Arc::new(AtomicUsize::new(0)),
            client: JsonClient::new(),
            deadline,
            breaker: CircuitBreaker::new("order_to_cook_cancel", breaker),
        }
    }

    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Asks the kitchen to cancel `order_id`'s ticket. The kitchen treats a
    /// repeated request for the same order as the same request, so a retry
    /// (ours, or the durable fallback's) never cancels twice.
    pub async fn cancel(
        &self,
        order_id: &str,
        request_id: &str,
        traceparent: &str,
    ) -> KitchenAnswer {
        let body = CancelBody {
            order_id,
            request_id,
        };
        let headers = [("idempotency-key", order_id), ("traceparent", traceparent)];
        let permit = match self.breaker.acquire() {
            Ok(p) => p,
            Err(open) => {
                return KitchenAnswer::Unavailable {
                    why: open.to_string(),
                };
            }
        };
        let started = tokio::time::Instant::now();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut result = Err(CallError::Refused("no kitchen configured".into()));
        for k in 0..self.base_urls.len() {
            let base = &self.base_urls[(first + k) % self.base_urls.len()];
            let url = format!("{base}/internal/cancellations");
            let left = self.deadline.saturating_sub(started.elapsed());
            result = self.client.post_json(&url, &body, &headers, left).await;
            // Only a refused connection is safe to retry elsewhere: the
            // request never left. A timeout may have reached the kitchen.
            if !matches!(result, Err(CallError::Refused(_))) {
                break;
            }
        }
        match result {
            Ok((status, bytes)) => {
                // Any answer but a server error means the kitchen works.
                if status.is_server_error() {
                    permit.failure();
                } else {
                    permit.success();
                }
                let answer: Option<Answer> = serde_json::from_slice(&bytes).ok();
                let text = answer
                    .and_then(|a| a.reason.or(a.detail))
                    .unwrap_or_default();
                match status.as_u16() {
                    200 => KitchenAnswer::Cancelled { reason: text },
                    409 => KitchenAnswer::TooLate { reason: text },
                    s => KitchenAnswer::Unavailable {
                        why: format!("kitchen answered {s}: {text}"),
                    },
                }
            }
            Err(
                e @ (CallError::Refused(_) | CallError::Unreachable(_) | CallError::Timeout(_)),
            ) => {
                permit.failure();
                KitchenAnswer::Unavailable { why: e.to_string() }
            }
            Err(e @ CallError::Invalid(_)) => {
                // Our request could not be built: not the kitchen's fault.
                permit.success();
                KitchenAnswer::Unavailable { why: e.to_string() }
            }
        }
    }
}
