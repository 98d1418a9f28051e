//! A change and what it asks of the index: the [`Operation`] a job records, and the
//! [`Action`] a [`DocumentBuilder`] makes of its envelope.
//!
//! A [`DocumentBuilder`] turns an envelope into one [`Action`] on the index: write this
//! document, or delete that one. Most event types need none: their
//! [`DocumentSpec`](crate::event_type::DocumentSpec) says which columns become which fields.
//! Implement it for a document a spec cannot describe, and give it to
//! [`EventType::with_builder`](crate::event_type::EventType::with_builder).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event_type::Envelope;

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

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[non_exhaustive]
pub enum Operation {
    /// The row was inserted; `change_data` is the new row.
    Insert,
    /// The row changed; `change_data` is `{"old": …, "new": …}`.
    Update,
    /// The row was deleted; `change_data` is the old row.
    Delete,
    /// The table was emptied; `record_id` is `*`, `change_data` is `{}`.
    Truncate,
    /// A row of a related table changed (a relation's fan-out wrote this job): the document
    /// of `record_id` is read from the database again. `change_data` is `{}`.
    Rebuild,
}

impl Operation {
    /// The spelling used in the queue table (`INSERT`, `UPDATE`, `DELETE`).
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "INSERT",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Truncate => "TRUNCATE",
            Operation::Rebuild => "REBUILD",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Operation {
    /// The operation spelled `text` in the queue table.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "INSERT" => Some(Operation::Insert),
            "UPDATE" => Some(Operation::Update),
            "DELETE" => Some(Operation::Delete),
            "TRUNCATE" => Some(Operation::Truncate),
            "REBUILD" => Some(Operation::Rebuild),
            _ => None,
        }
    }
}
