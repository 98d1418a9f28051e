//! Why a message was dead-lettered: the reason it carries in its headers and the label of
//! its metric.

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// Not a valid envelope (or no job id).
    Malformed,
    /// Its job is unknown to the outbox, or not as the message tells it.
    Unverified,
    /// Elasticsearch refused it permanently (a mapping error), or it is no document.
    Rejected,
    /// Elasticsearch kept refusing it as busy or unavailable.
    RetriesExhausted,
}

impl Why {
    /// The header value (and metric label).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Why::Malformed => "malformed",
            Why::Unverified => "unverified",
            Why::Rejected => "rejected",
            Why::RetriesExhausted => "retries-exhausted",
        }
    }
}
