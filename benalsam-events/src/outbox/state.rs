//! The life of a job, and the one place that says which moves are legal.
//!
#![doc = include_str!("../../docs/job-states.md")]
//!
//! Every move names the states it may leave ([`Move::from`]); anything else is refused and
//! reported as unchanged, so a late or duplicated report can never move a job backwards:
//!
//! * `Sent`, `Released` and `PublishFailed` come from the bridge that claimed the job, and
//!   only count while it still holds the job (`processing`, `locked_by` = that bridge). A
//!   consumer that dead-lettered the job before the broker's confirm was recorded has made
//!   it `failed`; the confirm arriving afterwards cannot turn it into `sent`.
//! * `Completed` is accepted from every state but `completed`: an indexed document proves
//!   the work was done, even when the `sent` mark has not landed yet or the job was failed
//!   and its dead letter replayed.
//! * `DeadLettered` is the consumer's refusal: from `processing` (the confirm not recorded
//!   yet), `sent`, or `failed` (a replayed dead letter refused again).
//! * `completed` is final: no move leaves it.
//!
//! The SQL of [`crate::outbox::Outbox`] is generated from this table, and the model test
//! (`tests/state_machine.rs`) drives the real table through random interleavings of every
//! actor against [`Move::apply`].

use crate::outbox::JobStatus;

use JobStatus::{Completed, Failed, Pending, Processing, Sent};

/// A change of a job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Move {
    /// A bridge takes a pending job under a lease.
    Claim,
    /// A bridge takes a failed job whose backoff has elapsed.
    ClaimRetry,
    /// The lease of a claimed job ran out (its bridge died or hung).
    Reclaim,
    /// The claiming bridge gives a job back without an attempt (shutdown).
    Release,
    /// The broker confirmed the claiming bridge's publish.
    Sent,
    /// The claiming bridge could not publish (a refusal, a nack, no route).
    PublishFailed,
    /// A consumer refused the message and put it in the dead-letter queue.
    DeadLettered,
    /// A consumer applied the change to the index.
    Completed,
    /// A job sent long ago never completed: publish it again.
    Resend,
    /// An operator puts a failed job back.
    RetryFailed,
}

impl Move {
    /// Every move.
    #[cfg(test)]
    pub(crate) const ALL: [Move; 10] = [
        Move::Claim,
        Move::ClaimRetry,
        Move::Reclaim,
        Move::Release,
        Move::Sent,
        Move::PublishFailed,
        Move::DeadLettered,
        Move::Completed,
        Move::Resend,
        Move::RetryFailed,
    ];

    /// The states this move may leave.
    pub(crate) const fn from(self) -> &'static [JobStatus] {
        match self {
            Move::Claim => &[Pending],
            Move::ClaimRetry => &[Failed],
            Move::Reclaim | Move::Release | Move::Sent | Move::PublishFailed => &[Processing],
            Move::DeadLettered => &[Processing, Sent, Failed],
            Move::Completed => &[Pending, Processing, Sent, Failed],
            Move::Resend => &[Sent],
            Move::RetryFailed => &[Failed],
        }
    }

    /// The state it leads to.
    pub(crate) const fn to(self) -> JobStatus {
        match self {
            Move::Claim | Move::ClaimRetry => Processing,
            Move::Reclaim | Move::Release | Move::Resend | Move::RetryFailed => Pending,
            Move::Sent => Sent,
            Move::PublishFailed | Move::DeadLettered => Failed,
            Move::Completed => Completed,
        }
    }

    /// Whether only the bridge holding the job's lease may make this move.
    pub(crate) const fn needs_lease(self) -> bool {
        matches!(self, Move::Release | Move::Sent | Move::PublishFailed)
    }

    /// The SQL condition under which a row of alias `q` may make this move; `worker` is the
    /// placeholder of the reporting claimer's id, for the moves that need the lease (without
    /// one, those moves are never allowed).
    pub(crate) fn guard(self, worker: Option<&str>) -> String {
        let states: Vec<String> = self
            .from()
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        let states = format!("q.status IN ({})", states.join(", "));
        match (self.needs_lease(), worker) {
            (false, _) => states,
            (true, Some(worker)) => format!("{states} AND q.locked_by = {worker}"),
            (true, None) => "false".to_owned(),
        }
    }

    /// What the move does, for error messages.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Move::Claim | Move::ClaimRetry => "claiming jobs",
            Move::Reclaim => "reclaiming expired leases",
            Move::Release => "releasing jobs",
            Move::Sent => "marking jobs sent",
            Move::PublishFailed | Move::DeadLettered => "marking jobs failed",
            Move::Completed => "marking jobs completed",
            Move::Resend => "resending stale sent jobs",
            Move::RetryFailed => "retrying failed jobs",
        }
    }

    /// The move applied to a job held by `holder` (its `locked_by`), made by `by`; `None`
    /// when it is not allowed. The model of the SQL, for tests.
    #[cfg(test)]
    pub(crate) fn apply(
        self,
        status: JobStatus,
        holder: Option<&str>,
        by: Option<&str>,
    ) -> Option<JobStatus> {
        let allowed = self.from().contains(&status) && (!self.needs_lease() || holder == by);
        allowed.then_some(self.to())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn completed_is_final() {
        for m in Move::ALL {
            assert!(
                !m.from().contains(&Completed),
                "{m:?} must not leave completed"
            );
        }
    }

    #[test]
    fn a_late_confirm_cannot_overwrite_a_dead_letter() {
        // The consumer refused the message before the bridge recorded the confirm.
        let after_dead_letter = Move::DeadLettered
            .apply(Processing, Some("a"), None)
            .expect("a consumer may fail a job whose confirm is not recorded");
        assert_eq!(after_dead_letter, Failed);
        assert_eq!(Move::Sent.apply(Failed, None, Some("a")), None);
    }

    #[test]
    fn only_the_lease_holder_reports_for_the_bridge() {
        assert_eq!(
            Move::Sent.apply(Processing, Some("a"), Some("a")),
            Some(Sent)
        );
        assert_eq!(Move::Sent.apply(Processing, Some("b"), Some("a")), None);
        assert_eq!(Move::Release.apply(Processing, Some("b"), Some("a")), None);
        // A consumer completes whoever holds the job.
        assert_eq!(
            Move::Completed.apply(Processing, Some("b"), None),
            Some(Completed)
        );
    }

    #[test]
    fn guards_name_the_states_and_the_lease() {
        assert_eq!(
            Move::Sent.guard(Some("$9")),
            "q.status IN ('processing') AND q.locked_by = $9"
        );
        assert_eq!(
            Move::Completed.guard(Some("$9")),
            "q.status IN ('pending', 'processing', 'sent', 'failed')"
        );
        assert_eq!(Move::Sent.guard(None), "false");
    }

    fn status() -> impl Strategy<Value = JobStatus> {
        proptest::sample::select(JobStatus::ALL.to_vec())
    }

    fn any_move() -> impl Strategy<Value = Move> {
        proptest::sample::select(Move::ALL.to_vec())
    }

    proptest! {
        /// Whatever sequence of reports arrives, a completed job stays completed, and a job
        /// only ever reaches `sent` from `processing`.
        #[test]
        fn no_sequence_leaves_completed_or_skips_processing(
            start in status(),
            moves in proptest::collection::vec((any_move(), any::<bool>()), 0..40),
        ) {
            let mut state = start;
            let mut holder = Some("a");
            for (m, mine) in moves {
                let by = if mine { Some("a") } else { Some("b") };
                if let Some(next) = m.apply(state, holder, by) {
                    prop_assert!(state != Completed);
                    if next == Sent {
                        prop_assert_eq!(state, Processing);
                    }
                    holder = if next == Processing { by } else { None };
                    state = next;
                }
            }
        }
    }
}
