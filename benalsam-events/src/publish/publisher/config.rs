//! The settings of a [`Publisher`](super::Publisher).

use std::time::Duration;

use crate::backoff::Backoff;
use crate::event_type::DEFAULT_MAX_MESSAGE_BYTES;
use crate::publish::Topology;

/// Settings of a [`Publisher`](super::Publisher).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PublisherConfig {
    /// Most messages published and not yet confirmed.
    pub window: usize,
    /// Most bytes of message bodies published and not yet confirmed (one message is always
    /// allowed, however large): large rows narrow the window instead of growing memory.
    pub window_bytes: usize,
    /// Confirmed jobs are reported in one call once this many have gathered...
    pub report_batch: usize,
    /// ...or this long after the first of them, whichever comes first.
    pub report_interval: Duration,
    /// Delays between reconnect attempts.
    pub reconnect: Backoff,
    /// The `app_id` property of every message.
    pub app_id: String,
    /// The connection's name in the management UI.
    pub connection_name: String,
    /// Declared on every new connection and after a refusal that says it is missing.
    pub topology: Option<Topology>,
    /// Largest message body published (`BENALSAM_MAX_MESSAGE_BYTES`): a job whose message
    /// would be larger fails at once, with the reason, and is not tried again. Keep it at or
    /// under the broker's `max_message_size` and the consumers' limit.
    pub max_message_bytes: usize,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            window: 1000,
            window_bytes: 4 * 1024 * 1024,
            report_batch: 500,
            report_interval: Duration::from_millis(20),
            reconnect: Backoff::default(),
            app_id: "benalsam-bridge".to_owned(),
            connection_name: "benalsam-bridge publisher".to_owned(),
            topology: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}
