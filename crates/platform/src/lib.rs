//! What every restaurant service shares, so that a service crate holds only
//! its domain. Read in this order:
//!
//! - [`db`]: one database per service (SQLite file by default, PostgreSQL for
//!   scale-out) behind one portable SQL dialect, with migrations.
//! - [`outbox`]: events are written in the same transaction as the state
//!   change that causes them; a relay moves them to the bus afterwards.
//! - [`bus`]: the event bus. [`bus::EventLog`] is the embedded durable log
//!   (SQLite, no server) with durable consumer positions.
//! - [`consumer`]: at-least-once delivery made effectively-once: each event is
//!   applied in the handler's own transaction together with a record of its
//!   id; an event that keeps failing is parked as a dead letter.
//! - [`timer`]: durable timers as "due at" columns polled by one loop.
//! - [`http`]: problem-details errors, extractors that never leak a plain
//!   rejection, request ids and trace context, health and metrics routes.
//! - [`service`]: wiring a service's parts into running tasks.
//! - [`batch`]: group commit for request handlers' small writes.
//! - [`backlog`]: new work refused while a consumer trails the bus too far.
//! - [`breaker`]: a circuit breaker for synchronous calls to another service.
//! - [`shutdown`], [`telemetry`], [`client`].
#![forbid(unsafe_code)]

pub mod backlog;
pub mod batch;
pub mod breaker;
pub mod bus;
pub mod client;
pub mod consumer;
pub mod db;
pub mod http;
pub mod outbox;
pub mod service;
pub mod shutdown;
mod tail;
pub mod telemetry;
pub mod timer;

pub use restaurant_contract as contract;

/// Formats epoch milliseconds as RFC 3339 (UTC), the form every API returns.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The inverse of [`rfc3339`]: epoch milliseconds, `None` for text that is
/// not an RFC 3339 time.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_milliseconds_as_rfc3339() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            super::rfc3339(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
    }

    #[test]
    fn parses_the_apis_timestamps() {
        assert_eq!(
            super::parse_rfc3339("2023-11-14T22:13:20.123Z"),
            Some(1_700_000_000_123)
        );
        assert_eq!(super::parse_rfc3339("nonsense"), None);
    }
}
