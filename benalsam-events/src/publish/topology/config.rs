//! The choices a deployment makes about the topology, and the checks of them.

use std::time::Duration;

use crate::config::QueueType;
use crate::{error::Error, error::Result};

/// Choices a deployment makes about the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopologyConfig {
    /// Queue type of every queue.
    pub queue_type: QueueType,
    /// Most messages kept in each status queue (`listing.status.changes`); the oldest are
    /// dropped beyond it.
    pub status_queue_max_length: u32,
    /// Status changes older than this are dropped from the status queues.
    pub status_queue_ttl: Duration,
    /// Most heartbeats kept in `system.health`.
    pub health_queue_max_length: u32,
    /// Heartbeats older than this are dropped.
    pub health_queue_ttl: Duration,
    /// Quorum queues only (`x-delivery-limit`, on every queue): how often one message may
    /// come back to its queue before the broker dead-letters it (or, without a dead-letter
    /// exchange, drops it). The default, [`TopologyConfig::UNLIMITED_DELIVERIES`], means in
    /// effect never: the consumer never sends a message back on purpose (it acks, or
    /// dead-letters a copy itself with the reason and marks the job failed), so a message
    /// comes back only when a consumer's channel goes away (a crash, a restart, a failover)
    /// holding it, and that must not turn a job into a dead letter behind the consumer's
    /// back. It is an explicit number because "no limit" has no spelling that both broker
    /// generations read alike: RabbitMQ 3.10 counts every return and reads `-1` (and `0`)
    /// as "dead-letter at the first return", while 4.x reads a missing argument as 20.
    pub delivery_limit: u32,
}

impl TopologyConfig {
    /// The default delivery limit of quorum queues: the largest a 32-bit count holds, which
    /// no message reaches (see [`TopologyConfig::delivery_limit`]).
    pub const UNLIMITED_DELIVERIES: u32 = u32::MAX;

    /// Checks the choices: every bound and limit must be positive. The error names the
    /// setting.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            (
                "TopologyConfig::status_queue_max_length",
                self.status_queue_max_length > 0,
            ),
            (
                "TopologyConfig::health_queue_max_length",
                self.health_queue_max_length > 0,
            ),
            (
                "TopologyConfig::status_queue_ttl",
                !self.status_queue_ttl.is_zero(),
            ),
            (
                "TopologyConfig::health_queue_ttl",
                !self.health_queue_ttl.is_zero(),
            ),
        ];
        if let Some((setting, _)) = positive.iter().find(|(_, ok)| !ok) {
            return Err(Error::config(*setting, "must be greater than zero"));
        }
        if self.delivery_limit == 0 {
            return Err(Error::config(
                "TopologyConfig::delivery_limit",
                "0 would dead-letter every message the first time a consumer hands it back \
                 (a restart is enough); leave the default, which no message reaches",
            ));
        }
        Ok(())
    }
}

impl Default for TopologyConfig {
    /// Classic queues; status queues keep 100,000 changes for 7 days, `system.health` 1,000
    /// heartbeats for an hour; quorum queues without a delivery limit in effect.
    fn default() -> Self {
        Self {
            queue_type: QueueType::Classic,
            status_queue_max_length: 100_000,
            status_queue_ttl: Duration::from_secs(7 * 24 * 3600),
            health_queue_max_length: 1_000,
            health_queue_ttl: Duration::from_secs(3600),
            delivery_limit: Self::UNLIMITED_DELIVERIES,
        }
    }
}
