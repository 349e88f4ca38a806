//! A consecutive-failures circuit breaker, in the shape of linkerd2-proxy's:
//! a gate, a failure counter, an exponentially growing open period, and one
//! probe call in the half-open state.
//!
//! ```text
//!   CLOSED ──N failures in a row──▶ OPEN ──open period over──▶ HALF_OPEN (one probe)
//!     ▲                               ▲                            │
//!     └──────── probe succeeds ───────┼────────────────────────────┤
//!                                     └── probe fails (period ×2) ─┘
//! ```
//!
//! While open, calls fail at once instead of waiting for a timeout: a slow
//! dependency then costs its callers nothing, and it gets room to recover.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// How long it stays open the first time.
    pub open_for: Duration,
    /// The open period doubles with every failed probe, up to this.
    pub max_open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The gauge value: 0 closed, 1 open, 2 half-open.
    fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: u32,
    open_until: Instant,
    open_for: Duration,
    /// A half-open probe is in flight: everyone else fails fast.
    probing: bool,
}

/// Shared by every caller of one dependency.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    name: Arc<str>,
    config: BreakerConfig,
    inner: Arc<Mutex<Inner>>,
}

/// The circuit is open: the call was not attempted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit {0} is open")]
pub struct Rejected(pub Arc<str>);

/// Permission for one call. Report how it went with [`Permit::success`] or
/// [`Permit::failure`]; a permit dropped unreported (its caller was
/// cancelled) counts as a failure, so a probe can never leak.
#[derive(Debug)]
pub struct Permit {
    breaker: CircuitBreaker,
    reported: bool,
}

impl Permit {
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.on_result(true);
    }

    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.on_result(false);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.on_result(false);
        }
    }
}

impl CircuitBreaker {
    pub fn new(name: impl Into<Arc<str>>, config: BreakerConfig) -> Self {
        let name = name.into();
        metrics::gauge!("circuit_breaker_state", "breaker" => name.to_string()).set(0.0);
        CircuitBreaker {
            name,
            config,
            inner: Arc::new(Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                open_until: Instant::now(),
                open_for: config.open_for,
                probing: false,
            })),
        }
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent (every
        // critical section is a few assignments), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call asked for now would be let through (without asking):
    /// closed, or open with its period over, or half-open with no probe out.
    pub fn admits(&self) -> bool {
        let inner = self.lock();
        match inner.state {
            BreakerState::Closed => true,
            BreakerState::Open => Instant::now() >= inner.open_until,
            BreakerState::HalfOpen => !inner.probing,
        }
    }

    /// Closes the circuit: the dependency is known to be well again (say, an
    /// active health check passed), so there is no reason to wait for a probe.
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.failures = 0;
        if inner.state != BreakerState::Closed {
            inner.probing = false;
            inner.open_for = self.config.open_for;
            self.transition(&mut inner, BreakerState::Closed);
        }
    }

    /// Asks to make a call.
    pub fn acquire(&self) -> Result<Permit, Rejected> {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => {}
            BreakerState::Open if Instant::now() < inner.open_until => {
                return Err(Rejected(self.name.clone()));
            }
            BreakerState::Open => {
                self.transition(&mut inner, BreakerState::HalfOpen);
                inner.probing = true;
            }
            BreakerState::HalfOpen if inner.probing => return Err(Rejected(self.name.clone())),
            BreakerState::HalfOpen => inner.probing = true,
        }
        drop(inner);
        Ok(Permit {
            breaker: self.clone(),
            reported: false,
        })
    }

    fn on_result(&self, ok: bool) {
        let mut inner = self.lock();
        match (inner.state, ok) {
            (BreakerState::HalfOpen, true) => {
                inner.failures = 0;
                inner.probing = false;
                inner.open_for = self.config.open_for;
                self.transition(&mut inner, BreakerState::Closed);
            }
            (BreakerState::HalfOpen, false) => {
                inner.probing = false;
                inner.open_for = (inner.open_for * 2).min(self.config.max_open_for);
                inner.open_until = Instant::now() + inner.open_for;
                self.transition(&mut inner, BreakerState::Open);
            }
            (BreakerState::Closed, true) => inner.failures = 0,
            (BreakerState::Closed, false) => {
                inner.failures += 1;
                if inner.failures >= self.config.failure_threshold {
                    inner.open_until = Instant::now() + inner.open_for;
                    self.transition(&mut inner, BreakerState::Open);
                }
            }
            // A call that started before the circuit opened: its result says
            // nothing the open state does not already know.
            (BreakerState::Open, _) => {}
        }
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState) {
        let from = inner.state;
        inner.state = to;
        let name = self.name.to_string();
        metrics::gauge!("circuit_breaker_state", "breaker" => name.clone()).set(to.gauge());
        metrics::counter!("circuit_breaker_transitions_total", "breaker" => name, "to" => to.as_str())
            .increment(1);
        match to {
            BreakerState::Open => tracing::warn!(
                breaker = &*self.name, from = from.as_str(), open_for = ?inner.open_for,
                "circuit opened: calls fail fast"
            ),
            _ => tracing::info!(
                breaker = &*self.name,
                from = from.as_str(),
                to = to.as_str(),
                "circuit state changed"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(
            "test",
            BreakerConfig {
                failure_threshold: 3,
                open_for: Duration::from_secs(10),
                max_open_for: Duration::from_secs(25),
            },
        )
    }

    fn fail(b: &CircuitBreaker, n: u32) {
        for _ in 0..n {
            b.acquire().unwrap().failure();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_only() {
        let b = breaker();
        fail(&b, 2);
        b.acquire().unwrap().success(); // resets the count
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.acquire().unwrap_err(), Rejected("test".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_one_probe_through_and_closes_on_success() {
        let b = breaker();
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(b.acquire().is_err(), "still open");
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = b.acquire().expect("probe allowed");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.acquire().is_err(), "only one probe at a time");
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        b.acquire().unwrap().success();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_twice_as_long_up_to_the_cap() {
        let b = breaker();
        fail(&b, 3);
        let mut open_for = 10;
        for expected in [20, 25, 25] {
            tokio::time::advance(Duration::from_secs(open_for)).await;
            b.acquire().expect("probe").failure();
            tokio::time::advance(Duration::from_secs(expected - 1)).await;
            assert!(b.acquire().is_err(), "open for {expected}s");
            open_for = 1;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        b.acquire().expect("probe").success();
        assert_eq!(b.state(), BreakerState::Closed);
        // After recovery the open period starts small again.
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_counts_as_a_failure() {
        let b = breaker();
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(b.acquire().unwrap());
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_closes_an_open_circuit_at_once() {
        let b = breaker();
        fail(&b, 3);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.admits());
        b.reset();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admits());
        b.acquire().unwrap().success();
    }
}
