//! How many actions the next bulk request carries: as many as configured while the engine
//! answers quickly, fewer while it is slow or refuses items as busy.
//!
//! ```text
//!             answer within target/2 and the batch was full: + max/8 (up to max)
//!            ┌──────────────────────────────────────────────┐
//!            │                                              ▼
//!   ┌────────┴───────┐   slower than target: × 3/4   ┌────────────────┐
//!   │  size = max    │ ─────────────────────────────►│ min ≤ size <max│
//!   │ (the default)  │   items refused busy: × 1/2   │                │
//!   └────────────────┘ ─────────────────────────────►└────────────────┘
//! ```
//!
//! Why size and not only concurrency: a busy search node answers 429 for the items its write
//! queue cannot take, and its answer time grows with the request's size. Halving the request
//! on refusals and shrinking it while answers are slow gives the node less to parse and hold
//! at once, and a retry repeats less work; growing back slowly (additively) once answers are
//! quick again avoids swinging between the two. A request that was not full says nothing
//! about whether a larger one would be quick, so it never grows the size.

use std::time::Duration;

/// The next bulk request's size, from the answers to the previous ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pace {
    size: usize,
    min: usize,
    max: usize,
    target: Duration,
}

/// What one bulk request's answer says about the engine's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    /// Actions the request carried.
    pub(crate) items: usize,
    /// How long the engine took to answer.
    pub(crate) took: Duration,
    /// Items it refused as busy or unavailable (429, 503), to be retried.
    pub(crate) busy: usize,
}

impl Pace {
    /// Starts at `max` actions per request; never goes below `min(10, max)`.
    pub(crate) fn new(max: usize, target: Duration) -> Self {
        let max = max.max(1);
        Self {
            size: max,
            min: max.min(10),
            max,
            target,
        }
    }

    /// Actions the next request may carry.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Adjusts the size to one answer.
    pub(crate) fn observe(&mut self, answer: Answer) {
        let size = if answer.busy > 0 {
            self.size / 2
        } else if answer.took > self.target {
            self.size * 3 / 4
        } else if answer.took <= self.target / 2 && answer.items >= self.size {
            self.size.saturating_add((self.max / 8).max(1))
        } else {
            self.size
        };
        self.size = size.clamp(self.min, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TARGET: Duration = Duration::from_secs(1);

    fn answer(items: usize, millis: u64, busy: usize) -> Answer {
        Answer {
            items,
            took: Duration::from_millis(millis),
            busy,
        }
    }

    #[test]
    fn quick_answers_keep_the_configured_size() {
        let mut pace = Pace::new(500, TARGET);
        for _ in 0..10 {
            pace.observe(answer(500, 40, 0));
        }
        assert_eq!(pace.size(), 500);
    }

    #[test]
    fn refusals_halve_slowness_shrinks_and_quick_full_answers_grow_back() {
        let mut pace = Pace::new(500, TARGET);
        pace.observe(answer(500, 200, 3));
        assert_eq!(pace.size(), 250, "items refused as busy halve the size");
        pace.observe(answer(250, 1_500, 0));
        assert_eq!(
            pace.size(),
            187,
            "an answer slower than the target shrinks it by a quarter"
        );
        pace.observe(answer(100, 10, 0));
        assert_eq!(pace.size(), 187, "a request that was not full says nothing");
        pace.observe(answer(187, 700, 0));
        assert_eq!(
            pace.size(),
            187,
            "between half the target and the target: kept"
        );
        pace.observe(answer(187, 100, 0));
        assert_eq!(
            pace.size(),
            249,
            "quick and full: grows by an eighth of the maximum"
        );
        for _ in 0..10 {
            pace.observe(answer(pace.size(), 100, 0));
        }
        assert_eq!(pace.size(), 500, "never above the configured size");
    }

    #[test]
    fn the_floor_is_ten_actions_or_the_maximum() {
        let mut pace = Pace::new(500, TARGET);
        for _ in 0..20 {
            pace.observe(answer(pace.size(), 10, 1));
        }
        assert_eq!(pace.size(), 10);
        let mut small = Pace::new(4, TARGET);
        small.observe(answer(4, 10, 1));
        assert_eq!(small.size(), 4, "a maximum below ten is also the floor");
        assert_eq!(Pace::new(0, TARGET).size(), 1, "at least one action");
    }

    proptest! {
        #[test]
        fn the_size_stays_within_its_bounds_and_moves_the_right_way(
            max in 1usize..5_000,
            answers in prop::collection::vec((0usize..6_000, 0u64..3_000, 0usize..3), 1..60),
        ) {
            let mut pace = Pace::new(max, TARGET);
            for (items, millis, busy) in answers {
                let before = pace.size();
                let a = answer(items, millis, busy);
                pace.observe(a);
                let after = pace.size();
                prop_assert!((max.min(10)..=max).contains(&after));
                if busy > 0 || a.took > TARGET {
                    prop_assert!(after <= before, "a busy or slow answer never grows the size");
                }
                if busy == 0 && a.took <= TARGET {
                    prop_assert!(after >= before, "a quick answer without refusals never shrinks it");
                }
                if items < before {
                    prop_assert!(after <= before, "a request that was not full never grows it");
                }
            }
        }
    }
}
