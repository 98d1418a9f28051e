//! Reports of what became of jobs ([`Outcome`]) and the outbox applying them: one guarded
//! statement per kind of move.

use std::future::Future;

use super::Outbox;
use crate::error::Result;
use crate::outbox::state::Move;

/// What became of a job, as the part that handled it reports it to [`Settle::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The broker confirmed its message (from the bridge that claimed it).
    Sent,
    /// Given back unhandled, without counting an attempt (from the claimer, at shutdown).
    Released,
    /// The claimer could not deliver it. A retryable failure is claimed again after its
    /// backoff while attempts remain; otherwise the job stays `failed` with `error`.
    Failed {
        /// What went wrong, stored in `error_message`.
        error: String,
        /// Whether another attempt may succeed (a refused publish: yes; a row too large to
        /// be a message: no).
        retry: bool,
    },
    /// The change reached its destination (from a consumer): final. The job's
    /// `change_data` is emptied (`{}`): nothing needs it again.
    Completed,
    /// A consumer refused the message and dead-lettered it; the job stays `failed` with
    /// `error` until its dead letter is replayed or an operator retries it.
    DeadLettered {
        /// Why, stored in `error_message`.
        error: String,
    },
}

impl Outcome {
    fn action(&self) -> Move {
        match self {
            Outcome::Sent => Move::Sent,
            Outcome::Released => Move::Release,
            Outcome::Failed { .. } => Move::PublishFailed,
            Outcome::Completed => Move::Completed,
            Outcome::DeadLettered { .. } => Move::DeadLettered,
        }
    }
}

/// Which of the reported jobs changed state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settled {
    /// Jobs that made the move, ascending.
    pub changed: Vec<i64>,
    /// Jobs that did not: unknown ids, or a move their state does not allow (a late confirm
    /// of a job a consumer already failed, anything reported for a completed job).
    pub unchanged: Vec<i64>,
}

/// Where outcomes are recorded. The [`Outbox`] is the implementation; the publisher, the
/// indexer and custom sinks report through it, and only it changes job states.
pub trait Settle: Send + Sync + 'static {
    /// Records `reports`, each a job id and its outcome.
    fn settle(&self, reports: &[(i64, Outcome)]) -> impl Future<Output = Result<Settled>> + Send;
}

impl Settle for Outbox {
    /// One statement per kind of outcome present; each guarded by the states its move may
    /// leave ([`crate::outbox`]'s state diagram).
    async fn settle(&self, reports: &[(i64, Outcome)]) -> Result<Settled> {
        let mut changed = Vec::new();
        // Completions first: a job reported both completed and failed in one call is done.
        for action in [
            Move::Completed,
            Move::DeadLettered,
            Move::PublishFailed,
            Move::Sent,
            Move::Release,
        ] {
            let group: Vec<&(i64, Outcome)> = reports
                .iter()
                .filter(|(_, o)| o.action() == action)
                .collect();
            if group.is_empty() {
                continue;
            }
            changed.extend(self.apply(action, &group).await?);
        }
        let requested: Vec<i64> = reports.iter().map(|(id, _)| *id).collect();
        Ok(settled(&requested, changed))
    }
}

fn settled(requested: &[i64], mut changed: Vec<i64>) -> Settled {
    changed.sort_unstable();
    changed.dedup();
    let mut unchanged: Vec<i64> = requested
        .iter()
        .copied()
        .filter(|id| changed.binary_search(id).is_err())
        .collect();
    unchanged.sort_unstable();
    unchanged.dedup();
    Settled { changed, unchanged }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_splits_requested_ids() {
        let s = settled(&[5, 3, 9, 3], vec![9, 3]);
        assert_eq!(s.changed, vec![3, 9]);
        assert_eq!(s.unchanged, vec![5]);
    }
}
