//! The loop: takes deliveries while there is room, starts batches while slots are free,
//! holds retries for their backoff and whole batches while the circuit is open, and reconnects
//! when the link breaks. Each batch runs the stages of `process` on its own.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::consume::admit;
use crate::consume::batch::Batcher;
use crate::consume::circuit::CircuitBreaker;
use crate::consume::message::{Finished, Message};
use crate::consume::process;
use crate::consume::record::IndexerEvent;
use crate::consume::shared::Shared;
use crate::consume::source::{Event, Incoming, Source};

/// What the loop may wake for without a delivery: a batch's linger, a due retry, a probe, a
/// depth check.
#[derive(Debug, Clone, Copy)]
struct Wake {
    batch_closes: Option<Instant>,
    batch_full: bool,
    next_retry: Option<Instant>,
    probe_at: Option<Instant>,
    in_flight: usize,
    max_in_flight: usize,
    depth_check: Instant,
}

impl Wake {
    /// The earliest moment at which waking could act. A batch whose linger is over but finds
    /// every in-flight slot taken waits for a batch to finish (which wakes the loop anyway);
    /// a due retry waits while the batch is full; a probe waits for the batch in flight.
    /// Waking for them earlier would spin, taking the CPU the search engine needs.
    fn at(self) -> Instant {
        let room = self.probe_at.is_none() && self.in_flight < self.max_in_flight;
        [
            self.batch_closes.filter(|_| room),
            self.next_retry.filter(|_| !self.batch_full),
            self.probe_at.filter(|_| self.in_flight == 0),
        ]
        .into_iter()
        .flatten()
        .fold(self.depth_check, Instant::min)
    }
}

/// The loop's state.
pub(super) struct Run {
    shared: Arc<Shared>,
    source: Source,
    batcher: Batcher<Message>,
    /// Messages waiting for a retry, unacked.
    held: Vec<Message>,
    /// Batches held back by an open circuit, the next probe first.
    outage: VecDeque<Vec<Message>>,
    in_flight: FuturesUnordered<BoxFuture<'static, Finished>>,
    breaker: CircuitBreaker,
    probe_at: Option<Instant>,
    connect_failures: u32,
    next_depth_check: Instant,
}

impl Run {
    pub(super) fn new(
        shared: Arc<Shared>,
        source: Source,
        batcher: Batcher<Message>,
        breaker: CircuitBreaker,
    ) -> Self {
        Self {
            shared,
            source,
            batcher,
            held: Vec::new(),
            outage: VecDeque::new(),
            in_flight: FuturesUnordered::new(),
            breaker,
            probe_at: None,
            connect_failures: 0,
            next_depth_check: Instant::now(),
        }
    }

    pub(super) fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    fn record(&self, event: IndexerEvent<'_>) {
        self.shared.record(event);
    }

    pub(super) async fn run(&mut self, shutdown: &CancellationToken) {
        while !shutdown.is_cancelled() {
            if !self.source.is_connected() && !self.connect(shutdown).await {
                continue;
            }
            self.check_depths().await;
            self.batcher.set_count(self.shared.bulk_limit());
            self.release_due_retries();
            self.dispatch();
            let circuit_open = self.probe_at.is_some();
            let intake = !circuit_open && !self.batcher.is_full();
            let wake_at = self.wake_at();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(finished) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.finished(finished);
                }
                event = self.source.next(), if intake => match event {
                    Event::Delivery(incoming) => self.admit(*incoming),
                    Event::Lost(why) => self.link_lost(&why),
                },
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// At shutdown: the batch being filled and the held-back batches go out (unless the
    /// circuit is open), every batch in flight finishes; retries go back to the queue.
    pub(super) async fn finish(&mut self) {
        if self.probe_at.is_none() {
            if !self.batcher.is_empty() {
                let batch = self.batcher.take();
                self.spawn(batch);
            }
            while let Some(batch) = self.outage.pop_front() {
                self.spawn(batch);
            }
        }
        while let Some(finished) = self.in_flight.next().await {
            if let Finished::Done { retries, .. } = finished {
                self.held.extend(retries);
            }
        }
        self.held.clear();
        self.source.close().await;
    }

    async fn connect(&mut self, shutdown: &CancellationToken) -> bool {
        // A shutdown is let through while connecting: setting up a channel on a node that
        // has just come back can take as long as the node likes, and SIGTERM must not wait
        // for it.
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return false,
            attempt = self.source.connect() => attempt,
        };
        match attempt {
            Ok(broker) => {
                self.connect_failures = 0;
                tracing::info!(%broker, "consuming");
                self.record(IndexerEvent::Connected { broker });
                true
            }
            Err(error) => {
                self.record(IndexerEvent::Error(&error.to_string()));
                let delay = self.shared.config.reconnect.delay(self.connect_failures);
                self.connect_failures = self.connect_failures.saturating_add(1);
                tracing::warn!(%error, retry_in = ?delay, "consumer cannot reach RabbitMQ");
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(delay) => {}
                }
                false
            }
        }
    }

    fn link_lost(&mut self, why: &str) {
        tracing::warn!(reason = why, "consumer lost its channel; reconnecting");
        self.source.lost();
        // The broker hands unacked messages back: whatever waits here comes again.
        self.held.clear();
        self.outage.clear();
        drop(self.batcher.take());
        self.record(IndexerEvent::Disconnected { why: Some(why) });
    }

    /// When to wake without a delivery (see [`Wake`]).
    fn wake_at(&self) -> Instant {
        Wake {
            batch_closes: self.batcher.deadline(),
            batch_full: self.batcher.is_full(),
            next_retry: self.held.iter().map(|m| m.not_before).min(),
            probe_at: self.probe_at,
            in_flight: self.in_flight.len(),
            max_in_flight: self.shared.config.in_flight,
            depth_check: self.next_depth_check,
        }
        .at()
    }

    /// Moves retries whose backoff is over into the batch being filled.
    fn release_due_retries(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.held.len() && !self.batcher.is_full() {
            if self.held[i].not_before <= now {
                let message = self.held.swap_remove(i);
                let bytes = message.bytes;
                self.batcher.push(message, bytes);
            } else {
                i += 1;
            }
        }
    }

    /// Starts batches while there is room: held-back ones first. While the circuit is open,
    /// only one probe at a time, when it is due.
    fn dispatch(&mut self) {
        if let Some(probe_at) = self.probe_at {
            if self.in_flight.is_empty() && Instant::now() >= probe_at {
                let batch = self
                    .outage
                    .pop_front()
                    .unwrap_or_else(|| self.batcher.take());
                if !batch.is_empty() {
                    self.spawn(batch);
                }
            }
            return;
        }
        while self.in_flight.len() < self.shared.config.in_flight {
            if let Some(batch) = self.outage.pop_front() {
                self.spawn(batch);
            } else if self.batcher.is_ready() {
                let batch = self.batcher.take();
                self.spawn(batch);
            } else {
                break;
            }
        }
    }

    fn spawn(&mut self, batch: Vec<Message>) {
        let shared = Arc::clone(&self.shared);
        let channel = self.source.dead_letters();
        self.in_flight
            .push(Box::pin(process::process(shared, channel, batch)));
    }

    fn finished(&mut self, finished: Finished) {
        match finished {
            Finished::Done {
                retries,
                link_broken,
            } => {
                if self.probe_at.take().is_some() {
                    self.breaker.success();
                    self.record(IndexerEvent::Circuit {
                        state: self.breaker.state(),
                        reason: None,
                    });
                    tracing::info!("Elasticsearch answers again: circuit closed");
                }
                self.held.extend(retries);
                if link_broken {
                    self.link_lost("dead letters could not be published");
                }
            }
            Finished::Unavailable { batch, reason } => {
                let wait = self.breaker.failure(SystemTime::now());
                self.probe_at = Some(Instant::now() + wait);
                self.record(IndexerEvent::Circuit {
                    state: self.breaker.state(),
                    reason: Some(&reason),
                });
                tracing::warn!(%reason, probe_in = ?wait, "Elasticsearch unavailable: circuit open, holding the batch");
                self.outage.push_front(batch);
            }
            Finished::Abandoned => {}
        }
    }

    /// Decodes one delivery into the batch being filled.
    fn admit(&mut self, incoming: Incoming) {
        let message = admit::admit(&self.shared, incoming);
        let bytes = message.bytes;
        self.batcher.push(message, bytes);
    }

    /// Looks at the depth of the queue and the DLQ every few seconds.
    async fn check_depths(&mut self) {
        const EVERY: Duration = Duration::from_secs(5);
        if Instant::now() < self.next_depth_check {
            return;
        }
        self.next_depth_check = Instant::now() + EVERY;
        let depths = self.source.depths().await;
        self.record(IndexerEvent::Depths(&depths));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_loop_wakes_only_for_what_it_can_act_on() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let past = now - Duration::from_millis(1);
        let wake = Wake {
            batch_closes: Some(past),
            batch_full: true,
            next_retry: Some(past),
            probe_at: None,
            in_flight: 2,
            max_in_flight: 2,
            depth_check: later,
        };
        assert_eq!(
            wake.at(),
            later,
            "a ready batch with no free slot and retries behind a full batch wait: no spin"
        );
        assert_eq!(
            Wake {
                in_flight: 1,
                ..wake
            }
            .at(),
            past,
            "a free slot: the batch goes"
        );
        assert_eq!(
            Wake {
                batch_full: false,
                batch_closes: None,
                ..wake
            }
            .at(),
            past,
            "room in the batch: the retry goes in"
        );
        let open = Wake {
            batch_closes: Some(past),
            probe_at: Some(now),
            in_flight: 1,
            ..wake
        };
        assert_eq!(
            open.at(),
            later,
            "the circuit is open and a batch is still out"
        );
        assert_eq!(
            Wake {
                in_flight: 0,
                ..open
            }
            .at(),
            now,
            "then the probe is due"
        );
    }
}
