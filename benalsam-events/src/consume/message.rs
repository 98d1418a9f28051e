//! A message on its way through the stages, and how a batch of them ended.

use std::sync::Arc;

use lapin::message::Delivery;
use tokio::time::Instant;

use crate::consume::source::QueueRoute;
use crate::error::Result;
use crate::event_type::{Action, BuildError};
use crate::ops::metrics::OfType;
use crate::publish::{Envelope, EnvelopeError};

/// What a message holds once decoded, and once built.
pub(crate) enum Body {
    /// Not a valid envelope.
    Malformed(EnvelopeError),
    /// A change as the message names it (its job, table, record, operation), its row
    /// dropped: the document is built once the delivery is verified, from the outbox's copy
    /// of the row (or, for a joined event type, from the rows read from the database), and
    /// it becomes a `Change`. A truncation stays as it is: it asks for no document.
    Verifying { envelope: Box<Envelope<'static>> },
    /// A verified change, and the action it asks of the index (or why it cannot become
    /// one), written with `version` (the job id, or for a joined document the version of
    /// its read).
    Change {
        envelope: Box<Envelope<'static>>,
        action: Result<Action, BuildError>,
        version: i64,
    },
}

impl Body {
    pub(crate) fn envelope(&self) -> Option<&Envelope<'static>> {
        match self {
            Body::Change { envelope, .. } | Body::Verifying { envelope } => Some(envelope),
            Body::Malformed(_) => None,
        }
    }
}

/// A message on its way into the index.
pub(crate) struct Message {
    pub(crate) delivery: Delivery,
    pub(crate) route: Arc<QueueRoute>,
    pub(crate) body: Body,
    /// Its event type, as its metrics are labelled.
    pub(crate) event_type: OfType,
    /// Its share of a bulk request's bytes.
    pub(crate) bytes: usize,
    /// Item attempts so far.
    pub(crate) attempts: u32,
    /// Not to be retried before this.
    pub(crate) not_before: Instant,
    /// The consumer span of this message, continuing the job's trace; ends with it.
    pub(crate) span: tracing::Span,
}

impl Message {
    pub(crate) fn job_id(&self) -> Option<i64> {
        match &self.body {
            Body::Change { envelope, .. } | Body::Verifying { envelope } => Some(envelope.job_id),
            Body::Malformed(_) => None,
        }
    }
}

/// How one batch ended.
pub(crate) enum Finished {
    /// Written and settled; `retries` wait for their backoff. `link_broken` when dead
    /// letters could not be published (the channel is gone).
    Done {
        retries: Vec<Message>,
        link_broken: bool,
    },
    /// The cluster is unavailable: nothing was done; hold the batch.
    Unavailable { batch: Vec<Message>, reason: String },
    /// Shutdown came while outcomes could not be recorded: left unacked for redelivery.
    Abandoned,
}
