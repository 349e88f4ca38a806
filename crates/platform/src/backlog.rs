//! Admission by the bus's backlog: a hard bound on what the bus holds
//! while a consumer does not keep up.
//!
//! Both buses keep every event a durable consumer has not passed, however
//! old or many (the retention bounds, [`MAX_EVENTS`] and [`MAX_MESSAGES`],
//! drop only what every consumer has passed). So a consumer that stops for
//! good (its service down, its database locked, a bug) makes the bus grow
//! by everything published after it: at the embedded shape's full load
//! ~700 MB a minute. Refusing the publishes instead (JetStream's `discard:
//! new`) would stop the healthy consumers too and only move the growth into
//! the outboxes, while the order service went on accepting orders that
//! could not progress. The bound is therefore kept where work enters: while
//! the slowest consumer trails the newest event by more than the limit, the
//! order service answers new orders with 503 and `Retry-After`, and the bus
//! grows only by the events of the orders already accepted. Everything else
//! (reads, cancels, the sagas in flight) goes on, and placements are taken
//! again as soon as the consumer is back within the limit.

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::{
    bus::{Bus, MAX_EVENTS, MAX_MESSAGES, set_behind},
    http::Problem,
    shutdown::Shutdown,
};

/// How often the backlog is looked at: a query of the log's consumer
/// positions, or one listing of the stream's consumers on JetStream. A
/// placement is refused or admitted again at most this late.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The most entries the slowest durable consumer may trail by before new
/// orders are refused: events on the embedded log, messages (each the
/// events of one outbox row and type) on JetStream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Limit {
    /// The bus's own retention bound: [`MAX_EVENTS`] on the log,
    /// [`MAX_MESSAGES`] on JetStream, so that a stuck consumer holds back
    /// at most as much again as the bus keeps anyway.
    #[default]
    Auto,
    /// No bound: the bus grows while a consumer is stuck.
    Off,
    Entries(u64),
}

impl Limit {
    /// The bound on `bus`, if any.
    pub fn on(self, bus: &Bus) -> Option<u64> {
        match self {
            Limit::Auto => Some(match bus {
                Bus::Embedded(_) => MAX_EVENTS as u64,
                Bus::Nats(_) => MAX_MESSAGES,
            }),
            Limit::Off => None,
            Limit::Entries(n) => Some(n),
        }
    }
}

impl FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Limit::Auto),
            "off" => Ok(Limit::Off),
            n => match n.replace('_', "").parse::<u64>() {
                Ok(n) if n > 0 => Ok(Limit::Entries(n)),
                _ => Err(format!(
                    "{s:?} is not a backlog limit: a number of entries above 0, `auto` or `off`"
                )),
            },
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Auto => f.write_str("auto"),
            Limit::Off => f.write_str("off"),
            Limit::Entries(n) => write!(f, "{n}"),
        }
    }
}

/// Counts placements turned away, by `reason`.
pub const REFUSED_COUNTER: &str = "orders_refused_total";
/// Counts looks at the bus's backlog.
pub const CHECKS_COUNTER: &str = "backlog_checks_total";

/// Whether the bus's backlog admits new work; cheap to clone and to ask.
#[derive(Clone, Debug)]
pub struct Backlog {
    limit: Option<u64>,
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The consumer over the limit and by how much, at the last check;
    /// `None` while every consumer is within it.
    over: Mutex<Option<(String, u64)>>,
    /// The last check failed (logged once, not every second).
    failing: AtomicBool,
}

impl Backlog {
    /// `limit` entries at most ([`Limit::on`]); `None` admits everything.
    pub fn new(limit: Option<u64>) -> Self {
        Backlog {
            limit,
            state: Arc::default(),
        }
    }

    /// Looks at the bus once and admits or refuses from now on. A bus that
    /// cannot be asked leaves the last answer as it was: while it is down
    /// the outboxes hold what the services publish, as they are made to,
    /// and refusing orders for it would turn a short outage of the bus
    /// into one of the order service.
    ///
    /// Returns how far the farthest consumer trails.
    pub async fn check(&self, bus: &Bus) -> anyhow::Result<u64> {
        let Some(limit) = self.limit else {
            return Ok(0);
        };
        metrics::counter!(CHECKS_COUNTER).increment(1);
        let behind = match bus.consumers_behind().await {
            Ok(behind) => {
                if self.state.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the bus's backlog can be read again");
                }
                behind
            }
            Err(e) => {
                if !self.state.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "reading the bus's backlog failed; admission stays as it was");
                }
                return Err(e);
            }
        };
        set_behind(&behind);
        let farthest = behind.into_iter().max_by_key(|(_, n)| *n);
        let trails = farthest.as_ref().map_or(0, |(_, n)| *n);
        let over = farthest.filter(|(_, n)| *n > limit);
        let was = std::mem::replace(
            &mut *self.state.over.lock().expect("backlog lock"),
            over.clone(),
        )
        .is_some();
        match (&over, was) {
            (Some((consumer, n)), false) => tracing::warn!(
                consumer,
                behind = n,
                limit,
                "a consumer trails the bus past the backlog limit; refusing new orders"
            ),
            (None, true) => {
                tracing::info!(
                    limit,
                    "the bus's backlog is within its limit; taking orders again"
                )
            }
            _ => {}
        }
        Ok(trails)
    }

    /// `Err` with the 503 to answer while the backlog is over its limit.
    pub fn admit(&self) -> Result<(), Problem> {
        let Some((consumer, behind)) = self.state.over.lock().expect("backlog lock").clone() else {
            return Ok(());
        };
        metrics::counter!(REFUSED_COUNTER, "reason" => "backlog").increment(1);
        Err(Problem::unavailable(format!(
            "new orders are refused while the consumer {consumer:?} trails the event bus by \
             {behind} entries (the limit is {}); try again shortly",
            self.limit.unwrap_or_default()
        ))
        .with("consumer", consumer)
        .with("behind", behind)
        .retry_after(CHECK_EVERY))
    }

    /// Checks every [`CHECK_EVERY`] until shutdown. On a log only this
    /// process appends to, not while it rests: with nothing appended since
    /// a check that found every consumer caught up, none can have fallen
    /// behind, and an idle system reads no database (`tests/idle.rs`).
    pub async fn watch(self, bus: Bus, shutdown: Shutdown) {
        if self.limit.is_none() {
            return;
        }
        // The head at the last check that found every consumer caught up.
        let mut settled_at: Option<i64> = None;
        loop {
            let head = bus.own_head();
            if head.is_none() || head != settled_at {
                // A failure is logged by `check` and changes nothing.
                settled_at = match self.check(&bus).await {
                    Ok(0) => head,
                    _ => None,
                };
            }
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_reads_as_it_is_written() {
        for (text, limit) in [
            ("auto", Limit::Auto),
            ("off", Limit::Off),
            ("250000", Limit::Entries(250_000)),
        ] {
            assert_eq!(text.parse::<Limit>(), Ok(limit));
            assert_eq!(limit.to_string(), text);
        }
        assert_eq!("1_000".parse::<Limit>(), Ok(Limit::Entries(1_000)));
        for bad in ["0", "-1", "lots", ""] {
            assert!(bad.parse::<Limit>().is_err(), "{bad:?}");
        }
    }
}
