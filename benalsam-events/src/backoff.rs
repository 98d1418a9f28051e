//! Exponential backoff with jitter, for reconnects and retries.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{error::Error, error::Result};

/// Delays that double from `initial` up to `max`, each drawn from the upper half of its step
/// ("equal jitter"): spread out enough that many clients do not retry in lockstep, never
/// shorter than half the step so a failing service is not hammered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// Delay before the first retry (before jitter).
    pub initial: Duration,
    /// Cap on any delay.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `initial` doubling to `max`.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The step for `attempt` (0-based) before jitter: `initial × 2^attempt`, capped at `max`.
    pub fn step(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay for `attempt`, with `unit` in `[0, 1)` choosing where in the upper half of
    /// the step it falls. Pure, so it can be tested; [`Backoff::delay`] supplies randomness.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let step = self.step(attempt);
        let half = step / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The delay for `attempt` (0-based), randomised.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, fastrand::f64())
    }
}

impl Default for Backoff {
    /// 250 ms doubling to 30 s: for reconnecting to a service that went away.
    fn default() -> Self {
        Self::new(Duration::from_millis(250), Duration::from_secs(30))
    }
}

/// Runs `op` until it succeeds, waiting out `backoff` between attempts while its error
/// [can be retried](Error::is_retryable); any other error is returned at once. Returns
/// `Ok(None)` when `shutdown` is cancelled first. For start-up steps that should wait for a
/// service rather than give up (migrations, declaring the topology).
pub(crate) async fn retry<T, F, Fut>(
    what: &str,
    backoff: Backoff,
    shutdown: &CancellationToken,
    mut op: F,
) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 0u32;
    loop {
        let error: Error = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            result = op() => match result {
                Ok(value) => return Ok(Some(value)),
                Err(error) if error.is_retryable() => error,
                Err(error) => return Err(error),
            },
        };
        let delay = backoff.delay(attempt);
        tracing::warn!(%error, retry_in = ?delay, "{what} failed; retrying");
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_and_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.step(0), Duration::from_millis(100));
        assert_eq!(b.step(1), Duration::from_millis(200));
        assert_eq!(b.step(3), Duration::from_millis(800));
        assert_eq!(b.step(4), Duration::from_secs(1));
        assert_eq!(b.step(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for attempt in 0..40 {
            let step = b.step(attempt);
            for unit in [0.0, 0.25, 0.5, 0.999, 1.0, -3.0, 7.0] {
                let d = b.delay_with(attempt, unit);
                assert!(
                    d >= step / 2 && d <= step,
                    "attempt {attempt} unit {unit}: {d:?} vs {step:?}"
                );
            }
            let random = b.delay(attempt);
            assert!(random >= step / 2 && random <= step);
        }
    }
}
