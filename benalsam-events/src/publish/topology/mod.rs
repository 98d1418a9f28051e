//! The RabbitMQ topology, defined once: declared by the binaries at start, and exported as a
//! RabbitMQ definitions file for `docker/`, so the two can never disagree.
//!
//! Derived from the event types; for the listings of the architecture document:
//!
//! ```text
//! benalsam.listings (topic) ─ listing.#        ─► elasticsearch.sync ─(dead letters)─► benalsam.dlx ─ # ─► elasticsearch.sync.dlq
//!                           ─ listing.status.# ─► listing.status.changes   (bounded)
//! benalsam.system   (topic) ─ health.#         ─► system.health            (bounded)
//! ```
//!
//! Every other event type gets the same shape under its own names. Declaring against a
//! broker that has an entity with other arguments fails with an error for which
//! [`Error::is_conflict`] holds, naming the entity and the argument, instead of a bare
//! `PRECONDITION_FAILED`.

mod arguments;
mod config;
mod declare;
mod export;

pub(crate) use arguments::{
    Argument, BindingDef, ExchangeDef, QueueArguments, QueueDef, QueueRole,
};
pub use config::TopologyConfig;

use crate::config::QueueType;
use crate::{error::Result, event_type::EventType};

/// Exchange of system events (heartbeats).
pub(crate) const SYSTEM_EXCHANGE: &str = "benalsam.system";
/// Heartbeats of the binaries.
pub(crate) const HEALTH_QUEUE: &str = "system.health";

/// Exchanges, queues and bindings: everything the binaries need on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The choices it was derived with.
    pub(crate) config: TopologyConfig,
    /// Topic exchanges, all durable.
    pub(crate) exchanges: Vec<ExchangeDef>,
    /// Queues, all durable.
    pub(crate) queues: Vec<QueueDef>,
    /// Bindings.
    pub(crate) bindings: Vec<BindingDef>,
}

impl Topology {
    /// The topology of the architecture document: the listings' exchange and queues, the
    /// status queue, the system exchange and the dead-lettering.
    pub fn benalsam(config: &TopologyConfig) -> Self {
        Self::for_event_types(&[EventType::listings()], config)
    }

    /// Everything `event_types` need: each one's exchange, its queue bound with
    /// `<prefix>.#` and dead-lettering through its own exchange into its own queue, its
    /// bounded status queue (when it has one) bound with `<prefix>.status.#`; and
    /// `benalsam.system` with the bounded `system.health`. An entity two event types share is
    /// declared once.
    pub fn for_event_types(event_types: &[EventType], config: &TopologyConfig) -> Self {
        let mut t = Self {
            config: config.clone(),
            exchanges: Vec::new(),
            queues: Vec::new(),
            bindings: Vec::new(),
        };
        for e in event_types {
            t.exchange(&e.exchange);
            t.queue(
                &e.queue,
                QueueRole::Consumed {
                    dead_letter_exchange: e.dead_letter_exchange.clone(),
                },
            );
            t.queue(&e.dead_letter_queue, QueueRole::DeadLetters);
            if let Some(status) = &e.status_queue {
                t.queue(
                    status,
                    QueueRole::Bounded {
                        max_length: config.status_queue_max_length,
                        ttl: config.status_queue_ttl,
                    },
                );
            }
        }
        t.exchange(SYSTEM_EXCHANGE);
        t.queue(
            HEALTH_QUEUE,
            QueueRole::Bounded {
                max_length: config.health_queue_max_length,
                ttl: config.health_queue_ttl,
            },
        );
        for e in event_types {
            t.bind(&e.exchange, &e.queue, &format!("{}.#", e.routing_prefix));
            if let Some(status) = &e.status_queue {
                t.bind(
                    &e.exchange,
                    status,
                    &format!("{}.status.#", e.routing_prefix),
                );
            }
        }
        t.bind(SYSTEM_EXCHANGE, HEALTH_QUEUE, "health.#");
        for e in event_types {
            t.exchange(&e.dead_letter_exchange);
            t.bind(&e.dead_letter_exchange, &e.dead_letter_queue, "#");
        }
        t
    }

    fn exchange(&mut self, name: &str) {
        if !self.exchanges.iter().any(|e| e.name == name) {
            self.exchanges.push(ExchangeDef {
                name: name.to_owned(),
            });
        }
    }

    fn queue(&mut self, name: &str, role: QueueRole) {
        if !self.queues.iter().any(|q| q.name == name) {
            let arguments = QueueArguments::derive(&role, &self.config).table();
            self.queues.push(QueueDef {
                name: name.to_owned(),
                role,
                arguments,
            });
        }
    }

    /// The queue type of this topology's queues.
    pub fn queue_type(&self) -> QueueType {
        self.config.queue_type
    }

    /// Checks the choices and every queue's arguments (see [`TopologyConfig::validate`]).
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        for queue in &self.queues {
            QueueArguments::derive(&queue.role, &self.config).check(&queue.name)?;
        }
        Ok(())
    }

    fn bind(&mut self, exchange: &str, queue: &str, routing_key: &str) {
        let binding = BindingDef {
            exchange: exchange.to_owned(),
            queue: queue.to_owned(),
            routing_key: routing_key.to_owned(),
        };
        if !self.bindings.contains(&binding) {
            self.bindings.push(binding);
        }
    }
}

#[cfg(test)]
mod tests;
