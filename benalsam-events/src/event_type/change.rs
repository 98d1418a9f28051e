//! Search documents, built from change messages.
//!
//! A [`DocumentBuilder`] turns an envelope into one [`Action`] on the index: write this
//! document, or delete that one. Most event types need none: their
//! [`DocumentSpec`](crate::event_type::DocumentSpec) says which columns become which fields.
//! Implement it for a document a spec cannot describe, and give it to
//! [`EventType::with_builder`](crate::EventType::with_builder).

use serde_json::Value;

use crate::publish::Envelope;

/// One operation on the index.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Action {
    /// Write (create or replace) this document.
    Index {
        /// Index or alias.
        index: String,
        /// Document id.
        id: String,
        /// The document.
        document: Value,
    },
    /// Delete this document (absent already is fine).
    Delete {
        /// Index or alias.
        index: String,
        /// Document id.
        id: String,
    },
}

impl Action {
    /// The document id.
    pub fn id(&self) -> &str {
        match self {
            Action::Index { id, .. } | Action::Delete { id, .. } => id,
        }
    }

    /// Whether this deletes.
    pub fn is_delete(&self) -> bool {
        matches!(self, Action::Delete { .. })
    }
}

/// Why no action could be built: the message is valid, but its row is not a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot build a search document: {0}")]
pub struct BuildError(pub String);

/// Turns the envelopes of one table into index actions.
pub trait DocumentBuilder: Send + Sync + std::fmt::Debug {
    /// The action for this change.
    fn build(&self, envelope: &Envelope<'_>) -> Result<Action, BuildError>;
}
