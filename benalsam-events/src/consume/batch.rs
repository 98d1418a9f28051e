//! Gathering messages into bulk requests: a batch closes when it holds `count` actions or
//! `bytes` of request, or `linger` after its first message, whichever comes first.

use std::time::Duration;

use tokio::time::Instant;

/// When a batch is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Most actions per batch.
    pub(crate) count: usize,
    /// Most request bytes per batch.
    pub(crate) bytes: usize,
    /// Longest wait after the first item.
    pub(crate) linger: Duration,
}

/// One batch being filled.
#[derive(Debug)]
pub(crate) struct Batcher<T> {
    limits: Limits,
    items: Vec<T>,
    bytes: usize,
    opened: Option<Instant>,
}

impl<T> Batcher<T> {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            items: Vec::new(),
            bytes: 0,
            opened: None,
        }
    }

    /// Adds an item of `bytes`; the first one starts the linger.
    pub(crate) fn push(&mut self, item: T, bytes: usize) {
        self.opened.get_or_insert_with(Instant::now);
        self.items.push(item);
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// Changes the most actions per batch (the pace of the bulk requests); a batch already
    /// over the new count is full.
    pub(crate) fn set_count(&mut self, count: usize) {
        self.limits.count = count.max(1);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether no more may be added.
    pub(crate) fn is_full(&self) -> bool {
        self.items.len() >= self.limits.count || self.bytes >= self.limits.bytes
    }

    /// When the batch closes at the latest; `None` while empty.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.opened.map(|at| at + self.limits.linger)
    }

    /// Whether the batch should go now: full, or its linger is over.
    pub(crate) fn is_ready(&self) -> bool {
        !self.is_empty() && (self.is_full() || self.deadline().is_some_and(|d| Instant::now() >= d))
    }

    /// Takes the batch, leaving an empty one.
    pub(crate) fn take(&mut self) -> Vec<T> {
        self.opened = None;
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            count: 3,
            bytes: 100,
            linger: Duration::from_millis(50),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_when_full_or_after_its_linger() {
        let mut batcher = Batcher::new(limits());
        assert!(!batcher.is_ready() && batcher.deadline().is_none());
        batcher.push(1, 10);
        assert!(!batcher.is_ready(), "one item, linger not over");
        tokio::time::advance(Duration::from_millis(49)).await;
        assert!(!batcher.is_ready());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(batcher.is_ready(), "the linger is over");
        assert_eq!(batcher.take(), vec![1]);
        assert!(batcher.is_empty() && batcher.deadline().is_none());

        batcher.push(2, 10);
        batcher.push(3, 10);
        batcher.push(4, 10);
        assert!(batcher.is_full() && batcher.is_ready(), "three items");
        assert_eq!(batcher.take(), vec![2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_close_a_batch_too() {
        let mut batcher = Batcher::new(limits());
        batcher.push("big", 60);
        assert!(!batcher.is_full());
        batcher.push("bigger", 60);
        assert!(batcher.is_full() && batcher.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn the_linger_starts_with_the_first_item() {
        let mut batcher = Batcher::new(limits());
        tokio::time::advance(Duration::from_secs(10)).await;
        batcher.push(1, 1);
        assert!(!batcher.is_ready(), "an idle time before does not count");
        let deadline = batcher.deadline().expect("open");
        assert_eq!(deadline, Instant::now() + Duration::from_millis(50));
    }
}
