//! The event contract between the restaurant services.
//!
//! Every message on the bus is an [`Envelope`]: a small, versioned header
//! (unique event id, type, order id, causation id, time, W3C trace context)
//! around a JSON `data` object. The header is what the platform needs to
//! route, deduplicate and trace a message without knowing the event; the
//! typed [`Event`] is what the services act on.
//!
//! Compatibility rules, the reason the envelope keeps `data` as raw JSON:
//! - unknown fields in an envelope or an event are ignored (serde's default),
//!   so a producer may add fields before its consumers know them;
//! - an unknown event `type` decodes to `None` and is skipped by consumers,
//!   so a new event never poisons an old consumer;
//! - a known type whose data does not match its schema is a contract
//!   violation ([`ContractError`]) and is parked as a dead letter.
#![forbid(unsafe_code)]

mod trace;

use serde::{Deserialize, Serialize};
pub use trace::TraceContext;

/// Version of the envelope layout. Bumped only for changes an old consumer
/// cannot read; additive changes keep it.
pub const ENVELOPE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("malformed envelope: {0}")]
    Envelope(#[source] serde_json::Error),
    #[error("event {event_type} does not match its schema: {source}")]
    Data {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A fresh, time-ordered opaque id (UUID v7): sorts by creation time, which
/// keeps B-tree inserts local and makes ids pleasant to read in logs.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Milliseconds since the Unix epoch; the one clock every table and event uses.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The wire form of every event.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub version: u32,
    /// Unique per event; consumers deduplicate on it.
    pub event_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub order_id: String,
    /// The event or request that caused this one.
    #[serde(default)]
    pub causation_id: Option<String>,
    /// Milliseconds since the epoch, taken when the producing transaction ran.
    pub occurred_at: i64,
    /// Producing service.
    pub source: String,
    /// W3C `traceparent` of the span that produced the event.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// The event's JSON as it came, decoded only by [`Envelope::event`]:
    /// straight into the typed event, with no tree of `serde_json::Value`
    /// in between (the embedded shape's consumers decode 13 envelopes per
    /// order; see docs/benchmarks.md).
    pub data: Box<serde_json::value::RawValue>,
}

/// Equal when every header field is equal and `data` is the same JSON
/// text (what this crate writes is compact and in field order).
impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
            && self.event_id == other.event_id
            && self.event_type == other.event_type
            && self.order_id == other.order_id
            && self.causation_id == other.causation_id
            && self.occurred_at == other.occurred_at
            && self.source == other.source
            && self.traceparent == other.traceparent
            && self.data.get() == other.data.get()
    }
}

impl Envelope {
    /// Wraps `event` for `order_id`, caused by `cause`.
    pub fn new(source: &str, order_id: &str, event: &Event, cause: &Cause) -> Self {
        Envelope {
            version: ENVELOPE_VERSION,
            event_id: new_id(),
            event_type: event.event_type().to_owned(),
            order_id: order_id.to_owned(),
            causation_id: cause.id.clone(),
            occurred_at: now_ms(),
            source: source.to_owned(),
            traceparent: cause.trace.as_ref().map(|t| t.child().to_string()),
            data: event.data(),
        }
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, ContractError> {
        serde_json::from_slice(bytes).map_err(ContractError::Envelope)
    }

    pub fn to_json(&self) -> String {
        // Serializing a struct of strings and a Value cannot fail.
        serde_json::to_string(self).expect("envelope serializes")
    }

    /// The typed event, `Ok(None)` for a type this build does not know.
    pub fn event(&self) -> Result<Option<Event>, ContractError> {
        Event::decode(&self.event_type, &self.data)
    }

    /// The cause to hand to events this one triggers.
    pub fn as_cause(&self) -> Cause {
        Cause {
            id: Some(self.event_id.clone()),
            trace: self.traceparent.as_deref().and_then(TraceContext::parse),
        }
    }
}

/// What caused an event: the id of the request or event, and its trace.
#[derive(Debug, Clone, Default)]
pub struct Cause {
    pub id: Option<String>,
    pub trace: Option<TraceContext>,
}

impl Cause {
    pub fn request(request_id: impl Into<String>, trace: Option<TraceContext>) -> Self {
        Cause {
            id: Some(request_id.into()),
            trace,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    pub menu_id: String,
    pub qty: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPlaced {
    pub customer_id: String,
    pub restaurant_id: String,
    pub items: Vec<OrderLine>,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reason {
    pub reason: String,
}

/// A line the kitchen could not serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shortage {
    pub menu_id: String,
    pub requested: i64,
    /// `None` when the restaurant has no such menu item.
    pub available: Option<i64>,
}

/// The seed's `CookStockChecked`: the kitchen's answer to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockChecked {
    pub cook_id: String,
    pub in_stock: bool,
    #[serde(default)]
    pub shortages: Vec<Shortage>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CookRef {
    pub cook_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CookCompleted {
    pub cook_id: String,
    pub restaurant_id: String,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CookCancelled {
    #[serde(default)]
    pub cook_id: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequested {
    pub request_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryStarted {
    pub delivery_id: String,
    pub cook_id: String,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRef {
    pub delivery_id: String,
}

macro_rules! events {
    ($($variant:ident($data:ty) = $name:literal,)*) => {
        /// Every event of the flows. The order id lives in the envelope.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Event {
            $($variant($data),)*
        }

        impl Event {
            /// Every type name this build knows, for consumers' filters.
            pub const TYPES: &'static [&'static str] = &[$($name,)*];

            pub fn event_type(&self) -> &'static str {
                match self {
                    $(Event::$variant(_) => $name,)*
                }
            }

            fn data(&self) -> Box<serde_json::value::RawValue> {
                match self {
                    $(Event::$variant(d) => serde_json::value::to_raw_value(d).expect("event serializes"),)*
                }
            }

            pub fn decode(
                event_type: &str,
                data: &serde_json::value::RawValue,
            ) -> Result<Option<Event>, ContractError> {
                let wrap = |source| ContractError::Data { event_type: event_type.to_owned(), source };
                Ok(Some(match event_type {
                    $($name => Event::$variant(serde_json::from_str::<$data>(data.get()).map_err(wrap)?),)*
                    _ => return Ok(None),
                }))
            }
        }
    };
}

events! {
    OrderPlaced(OrderPlaced) = "OrderPlaced",
    OrderRejected(Reason) = "OrderRejected",
    OrderCancelRequested(CancelRequested) = "OrderCancelRequested",
    OrderCancelled(Reason) = "OrderCancelled",
    OrderDelivered(DeliveryRef) = "OrderDelivered",
    StockChecked(StockChecked) = "StockChecked",
    CookStarted(CookRef) = "CookStarted",
    CookCompleted(CookCompleted) = "CookCompleted",
    CookCancelled(CookCancelled) = "CookCancelled",
    CookCancelRefused(CookCancelled) = "CookCancelRefused",
    DeliveryStarted(DeliveryStarted) = "DeliveryStarted",
    DeliveryCompleted(DeliveryRef) = "DeliveryCompleted",
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed() -> Event {
        Event::OrderPlaced(OrderPlaced {
            customer_id: "c1".into(),
            restaurant_id: "r1".into(),
            items: vec![OrderLine {
                menu_id: "m1".into(),
                qty: 2,
            }],
            address: "Seoul".into(),
        })
    }

    #[test]
    fn envelope_round_trips_through_json() {
        let trace = TraceContext::new_root();
        let env = Envelope::new(
            "order",
            "o1",
            &placed(),
            &Cause::request("req-1", Some(trace)),
        );
        let json = env.to_json();
        let back = Envelope::from_json(json.as_bytes()).unwrap();
        assert_eq!(back, env);
        // On the wire `data` is the event's object, not a string holding it.
        let wire: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(wire["data"]["address"], "Seoul");
        assert_eq!(back.event().unwrap(), Some(placed()));
        assert_eq!(back.causation_id.as_deref(), Some("req-1"));
        let child = TraceContext::parse(back.traceparent.as_deref().unwrap()).unwrap();
        assert_eq!(child.trace_id, trace.trace_id, "children keep the trace id");
        assert_ne!(child.span_id, trace.span_id);
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let json = r#"{"version":1,"eventId":"e","type":"CookStarted","orderId":"o",
            "occurredAt":1,"source":"cook","future":"x","data":{"cookId":"k","extra":[1]}}"#;
        let env = Envelope::from_json(json.as_bytes()).unwrap();
        assert_eq!(
            env.event().unwrap(),
            Some(Event::CookStarted(CookRef {
                cook_id: "k".into()
            }))
        );
    }

    #[test]
    fn unknown_types_decode_to_none_and_bad_data_is_an_error() {
        let mut env = Envelope::new("order", "o1", &placed(), &Cause::default());
        env.event_type = "SomethingNew".into();
        assert_eq!(env.event().unwrap(), None);
        env.event_type = "OrderPlaced".into();
        env.data = serde_json::value::to_raw_value(&serde_json::json!({"customerId": 5})).unwrap();
        assert!(matches!(env.event(), Err(ContractError::Data { .. })));
    }

    #[test]
    fn every_event_type_name_is_unique() {
        let mut names = Event::TYPES.to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Event::TYPES.len());
    }
}
