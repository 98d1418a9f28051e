//! The circuit breaker between the consumer and Elasticsearch.
//!
//! When the cluster as a whole fails (no answer, a failed request, every item of a bulk
//! refused as unavailable), the consumer stops taking messages, keeps the batch it holds
//! unacked, and probes again after a growing delay. Nothing is marked failed during an
//! outage. Pure state, driven by the consumer and read by its health endpoint.

use std::time::{Duration, SystemTime};

use crate::backoff::Backoff;

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CircuitState {
    /// Requests flow.
    Closed,
    /// Requests are held back until the next probe.
    Open {
        /// Consecutive systemic failures.
        failures: u32,
        /// When the circuit opened.
        since: SystemTime,
    },
}

impl CircuitState {
    /// `closed` or `open`, for health answers and metrics.
    #[cfg(test)]
    pub(crate) fn name(&self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open { .. } => "open",
        }
    }
}

/// Counts systemic failures and says how long to hold back.
#[derive(Debug, Clone)]
pub(crate) struct CircuitBreaker {
    backoff: Backoff,
    /// Systemic failures in a row; the circuit opens at the first.
    failures: u32,
    since: Option<SystemTime>,
}

impl CircuitBreaker {
    /// A closed breaker that waits along `backoff` while open.
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            failures: 0,
            since: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> CircuitState {
        match self.since {
            None => CircuitState::Closed,
            Some(since) => CircuitState::Open {
                failures: self.failures,
                since,
            },
        }
    }

    /// Records a systemic failure at `now`; returns how long to wait before the next probe.
    pub fn failure(&mut self, now: SystemTime) -> Duration {
        let delay = self.backoff.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        self.since.get_or_insert(now);
        delay
    }

    /// Records an answer from the cluster: the circuit closes.
    pub fn success(&mut self) {
        self.failures = 0;
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_failure_backs_off_and_closes_on_success() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut breaker = CircuitBreaker::new(backoff);
        assert_eq!(breaker.state(), CircuitState::Closed);
        let t0 = SystemTime::UNIX_EPOCH;
        let mut waits = Vec::new();
        for i in 0..8 {
            waits.push(breaker.failure(t0 + Duration::from_secs(i)));
        }
        assert_eq!(
            breaker.state(),
            CircuitState::Open {
                failures: 8,
                since: t0
            }
        );
        assert!(waits[0] <= Duration::from_millis(100));
        assert!(
            waits[7] >= Duration::from_secs(1),
            "waits grow to the cap: {waits:?}"
        );
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(2)));
        breaker.success();
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert_eq!(breaker.state().name(), "closed");
    }
}
