//! The synchronous half of the cancel saga: the order service asks the
//! kitchen to cancel a ticket and waits for the answer (request/response,
//! as the seed asks). The answer decides the HTTP status the customer sees;
//! no answer is not an error but a reason to defer (CANCEL_PENDING).

use std::time::Duration;

use restaurant_platform::client::{CallError, JsonClient};
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
    base_url: String,
    client: JsonClient,
    deadline: Duration,
}

impl Kitchen {
    pub fn new(base_url: impl Into<String>, deadline: Duration) -> Self {
        Kitchen {
            base_url: base_url.into(),
            client: JsonClient::new(),
            deadline,
        }
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
        let url = format!("{}/internal/cancellations", self.base_url);
        let body = CancelBody {
            order_id,
            request_id,
        };
        let headers = [("idempotency-key", order_id), ("traceparent", traceparent)];
        match self
            .client
            .post_json(&url, &body, &headers, self.deadline)
            .await
        {
            Ok((status, bytes)) => {
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
                e @ (CallError::Unreachable(_) | CallError::Timeout(_) | CallError::Invalid(_)),
            ) => KitchenAnswer::Unavailable { why: e.to_string() },
        }
    }
}
