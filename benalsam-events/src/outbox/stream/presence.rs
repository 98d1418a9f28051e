//! Adaptive NOTIFY: while the stream finds jobs (a backlog, or a steady trickle it claims
//! every linger) it marks itself busy in `benalsam_listeners`, and the triggers of its
//! tables skip the NOTIFY.

use std::time::{Duration, Instant};

use crate::outbox::stream::Claimer;
use crate::outbox::stream::record::StreamEvent;

/// How long a busy mark lasts unless renewed. It bounds how long the writers of a bridge
/// that died while busy skip their NOTIFY (the other bridges poll meanwhile, and the row is
/// dropped on the next idle mark of any bridge); renewed once less than half of it is left,
/// so a draining bridge writes its row every few seconds, not once per batch.
const BUSY_LEASE: Duration = Duration::from_secs(5);

/// After a busy or idle mark fails (a schema without migration 4, a role that may not write
/// `benalsam_listeners`), how long the stream goes without marking: writers keep notifying
/// meanwhile, and the warning comes twice a minute, not once per batch.
const PRESENCE_PAUSE: Duration = Duration::from_secs(30);

/// Adaptive NOTIFY: the stream's row in `benalsam_listeners`, as far as it knows.
///
/// ```text
///  claim full ──► busy (row: busy_until = now + lease) ──► claim at once … (renew at half)
///  claim short, some jobs ──► busy ──► claim after the linger …
///                                                            │
///                                                      claim empty
///                                                            ▼
///                          idle (row deleted) ──► claim once more ──► wait: NOTIFY or poll
///
///  writer:  INSERT + trigger reads the row ─────────────── COMMIT
///           read "busy" → no NOTIFY       read "idle" → NOTIFY
/// ```
///
/// A writer skips its NOTIFY only when it read the row before the idle mark committed. If it
/// commits before the last claim starts, that claim takes its job; if it commits after, no
/// one is told: its job waits for the next writer that notifies, or for the poll, at most one
/// poll interval (the rare race this design accepts instead of making every writer lock
/// something the bridge waits on). A stream that claims only some tables marks only those;
/// the writers of other tables keep waking idle bridges. Idle bridges of the same tables are
/// not woken while one is busy: they join at their next poll, and stay while their own
/// claims come back full.
#[derive(Debug, Default)]
pub(super) struct Presence {
    /// Until when the row says busy, by this process's clock: never later than the
    /// database's, which adds the lease after this instant. `None`: no row (idle).
    busy_until: Option<Instant>,
    /// No marking before this, after a failure.
    paused_until: Option<Instant>,
}

impl Claimer {
    /// More work waits: tells writers not to notify for a while (renewing the mark once
    /// half of it is gone).
    pub(super) async fn mark_busy(&mut self) {
        let Some(presence) = self.presence.as_mut() else {
            return;
        };
        let now = Instant::now();
        if presence.paused_until.is_some_and(|t| now < t)
            || presence
                .busy_until
                .is_some_and(|t| t.saturating_duration_since(now) >= BUSY_LEASE / 2)
        {
            return;
        }
        match self.outbox.mark_busy(BUSY_LEASE).await {
            Ok(()) => {
                if presence.busy_until.is_none() {
                    tracing::debug!("draining: marked busy, writers skip NOTIFY");
                }
                presence.busy_until = Some(now + BUSY_LEASE);
                presence.paused_until = None;
                self.recorder.record(StreamEvent::Draining(true));
            }
            Err(error) => {
                presence.busy_until = None;
                presence.paused_until = Some(now + PRESENCE_PAUSE);
                self.recorder.record(StreamEvent::Draining(false));
                self.recorder.record(StreamEvent::Error(&error));
                tracing::warn!(
                    %error,
                    retry_in = ?PRESENCE_PAUSE,
                    "cannot mark the bridge busy; writers keep sending NOTIFY meanwhile"
                );
            }
        }
    }

    /// The queue is drained: when writers were told not to notify, tells them to again.
    /// True when it did (then one more claim is due before waiting).
    pub(super) async fn mark_idle(&mut self) -> bool {
        let Some(presence) = self.presence.as_mut() else {
            return false;
        };
        if presence.busy_until.take().is_none() {
            return false;
        }
        self.recorder.record(StreamEvent::Draining(false));
        // Forgotten whether or not the mark works: a failed one must not make the stream
        // claim again and again without waiting. The row's lease runs out on its own.
        tracing::debug!("drained: marking idle, writers notify again");
        if let Err(error) = self.outbox.mark_idle().await {
            presence.paused_until = Some(Instant::now() + PRESENCE_PAUSE);
            self.recorder.record(StreamEvent::Error(&error));
            tracing::warn!(
                %error,
                lease = ?BUSY_LEASE,
                "cannot mark the bridge idle; writers skip NOTIFY until its busy mark runs out"
            );
        }
        true
    }

    /// The stream ends: a busy mark goes, so writers notify the remaining bridges at once.
    pub(super) async fn leave(&mut self) {
        if self
            .presence
            .as_ref()
            .is_some_and(|p| p.busy_until.is_some())
        {
            self.mark_idle().await;
        }
    }
}
