//! The kind of queue a deployment declares: a ground-floor name that errors can carry
//! (parsed from a setting in `config`).

/// Classic or quorum queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueType {
    /// One copy on one node; the fastest, and all a single-node broker offers.
    #[default]
    Classic,
    /// Replicated (Raft) across a cluster's nodes; survives the loss of a node.
    Quorum,
}

impl QueueType {
    /// The `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
