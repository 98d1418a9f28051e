//! The RabbitMQ topology, defined once: declared by the binaries at start, and exported as a
//! RabbitMQ definitions file for `docker/`, so the two can never disagree.
//!
//! ```text
//! benalsam.listings (topic) ─ listing.#        ─► elasticsearch.sync ─(dead letters)─► benalsam.dlx ─ # ─► elasticsearch.sync.dlq
//!                           ─ listing.status.# ─► listing.status.changes   (bounded)
//! benalsam.system   (topic) ─ health.#         ─► system.health            (bounded)
//! ```
//!
//! Declaring against a broker that has an entity with other arguments fails with
//! an error for which [`Error::is_conflict`] holds, naming the entity and the argument, instead of a bare
//! `PRECONDITION_FAILED`.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ExchangeKind};
use serde_json::{Value, json};

use crate::error::Kind;
use crate::publish::{EventType, LISTINGS_EXCHANGE};
use crate::{Error, Result};

/// Exchange of system events (heartbeats).
pub(crate) const SYSTEM_EXCHANGE: &str = "benalsam.system";
/// Exchange that dead letters go through.
pub(crate) const DEAD_LETTER_EXCHANGE: &str = "benalsam.dlx";
/// The queue the consumer indexes from.
pub(crate) const SYNC_QUEUE: &str = "elasticsearch.sync";
/// Where messages that cannot be indexed end up, with their reason.
pub(crate) const DEAD_LETTER_QUEUE: &str = "elasticsearch.sync.dlq";
/// Status changes of listings, for notification services.
pub(crate) const STATUS_QUEUE: &str = "listing.status.changes";
/// Heartbeats of the binaries.
pub(crate) const HEALTH_QUEUE: &str = "system.health";

/// Classic or quorum queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

impl std::str::FromStr for QueueType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(Error::config(
                "BENALSAM_QUEUE_TYPE",
                format!("{other:?} is neither \"classic\" nor \"quorum\""),
            )),
        }
    }
}

/// Limits on a queue nobody may be consuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Bound {
    /// Most messages kept; the oldest are dropped beyond it.
    pub max_length: u32,
    /// Messages older than this are dropped.
    pub message_ttl: Option<Duration>,
}

/// Choices a deployment makes about the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopologyConfig {
    /// Queue type of every queue.
    pub queue_type: QueueType,
    /// Bound of `listing.status.changes` (default 100,000 messages, 7 days).
    pub status_changes: Bound,
    /// Bound of `system.health` (default 1,000 messages, 1 hour).
    pub health: Bound,
    /// Quorum queues only: deliveries of one message before the broker dead-letters it
    /// (a message that crashes every consumer cannot block the queue forever).
    pub delivery_limit: u32,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            queue_type: QueueType::Classic,
            status_changes: Bound {
                max_length: 100_000,
                message_ttl: Some(Duration::from_secs(7 * 24 * 3600)),
            },
            health: Bound {
                max_length: 1_000,
                message_ttl: Some(Duration::from_secs(3600)),
            },
            delivery_limit: 20,
        }
    }
}

/// An argument value, as both AMQP and the definitions file carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Argument {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

/// A topic exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExchangeDef {
    /// Its name.
    pub(crate) name: String,
}

/// A durable queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueDef {
    /// Its name.
    pub(crate) name: String,
    /// Its `x-` arguments.
    pub(crate) arguments: BTreeMap<String, Argument>,
}

/// A binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BindingDef {
    /// The exchange.
    pub(crate) exchange: String,
    /// The queue.
    pub(crate) queue: String,
    /// The pattern.
    pub(crate) routing_key: String,
}

/// Exchanges, queues and bindings: everything the binaries need on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Topic exchanges, all durable.
    pub(crate) exchanges: Vec<ExchangeDef>,
    /// Queues, all durable.
    pub(crate) queues: Vec<QueueDef>,
    /// Bindings.
    pub(crate) bindings: Vec<BindingDef>,
}

impl Topology {
    /// The topology of the architecture document, with a dead-letter exchange and queue.
    pub fn benalsam(config: &TopologyConfig) -> Self {
        let queue_type = || {
            (
                "x-queue-type".to_owned(),
                Argument::Str(config.queue_type.as_str().to_owned()),
            )
        };
        let bounded = |bound: &Bound| {
            let mut args = BTreeMap::from([
                queue_type(),
                (
                    "x-max-length".to_owned(),
                    Argument::Int(i64::from(bound.max_length)),
                ),
                // Quorum queues only support drop-head, so both types use it.
                (
                    "x-overflow".to_owned(),
                    Argument::Str("drop-head".to_owned()),
                ),
            ]);
            if let Some(ttl) = bound.message_ttl {
                let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
                args.insert("x-message-ttl".to_owned(), Argument::Int(millis));
            }
            args
        };
        let mut sync_args = BTreeMap::from([
            queue_type(),
            (
                "x-dead-letter-exchange".to_owned(),
                Argument::Str(DEAD_LETTER_EXCHANGE.to_owned()),
            ),
        ]);
        if config.queue_type == QueueType::Quorum {
            sync_args.insert(
                "x-delivery-limit".to_owned(),
                Argument::Int(i64::from(config.delivery_limit)),
            );
        }
        let exchange = |name: &str| ExchangeDef {
            name: name.to_owned(),
        };
        let binding = |exchange: &str, queue: &str, key: &str| BindingDef {
            exchange: exchange.to_owned(),
            queue: queue.to_owned(),
            routing_key: key.to_owned(),
        };
        Self {
            exchanges: vec![
                exchange(LISTINGS_EXCHANGE),
                exchange(SYSTEM_EXCHANGE),
                exchange(DEAD_LETTER_EXCHANGE),
            ],
            queues: vec![
                QueueDef {
                    name: SYNC_QUEUE.to_owned(),
                    arguments: sync_args,
                },
                QueueDef {
                    name: DEAD_LETTER_QUEUE.to_owned(),
                    arguments: BTreeMap::from([queue_type()]),
                },
                QueueDef {
                    name: STATUS_QUEUE.to_owned(),
                    arguments: bounded(&config.status_changes),
                },
                QueueDef {
                    name: HEALTH_QUEUE.to_owned(),
                    arguments: bounded(&config.health),
                },
            ],
            bindings: vec![
                binding(LISTINGS_EXCHANGE, SYNC_QUEUE, "listing.#"),
                binding(LISTINGS_EXCHANGE, STATUS_QUEUE, "listing.status.#"),
                binding(SYSTEM_EXCHANGE, HEALTH_QUEUE, "health.#"),
                binding(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, "#"),
            ],
        }
    }

    /// Adds another table's event type: its exchange (if new) and a binding of all its
    /// routing keys to `elasticsearch.sync`.
    pub fn with_event_type(mut self, event_type: &EventType) -> Self {
        if !self.exchanges.iter().any(|e| e.name == event_type.exchange) {
            self.exchanges.push(ExchangeDef {
                name: event_type.exchange.clone(),
            });
        }
        let binding = BindingDef {
            exchange: event_type.exchange.clone(),
            queue: SYNC_QUEUE.to_owned(),
            routing_key: format!("{}.#", event_type.routing_prefix),
        };
        if !self.bindings.contains(&binding) {
            self.bindings.push(binding);
        }
        self
    }

    /// Declares everything on the broker. Idempotent; fails with
    /// a conflict ([`Error::is_conflict`]) if the broker has an entity with other settings.
    pub async fn declare(&self, connection: &Connection) -> Result<()> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::amqp("opening a channel to declare the topology", e))?;
        for exchange in &self.exchanges {
            channel
                .exchange_declare(
                    short(&exchange.name)?,
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| conflict_or(format!("exchange {}", exchange.name), e))?;
        }
        for queue in &self.queues {
            channel
                .queue_declare(
                    short(&queue.name)?,
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    field_table(&queue.arguments),
                )
                .await
                .map_err(|e| conflict_or(format!("queue {}", queue.name), e))?;
        }
        for b in &self.bindings {
            channel
                .queue_bind(
                    short(&b.queue)?,
                    short(&b.exchange)?,
                    short(&b.routing_key)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    conflict_or(
                        format!("binding {} -[{}]-> {}", b.exchange, b.routing_key, b.queue),
                        e,
                    )
                })?;
        }
        // Best effort: the channel is only for declaring.
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }

    /// The RabbitMQ definitions file (`rabbitmqctl import_definitions`, or the management
    /// plugin's `load_definitions`) holding this topology in `vhost`.
    pub fn definitions(&self, vhost: &str) -> Value {
        let arguments = |args: &BTreeMap<String, Argument>| {
            args.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Argument::Str(s) => json!(s),
                        Argument::Int(i) => json!(i),
                    };
                    (k.clone(), v)
                })
                .collect::<serde_json::Map<_, _>>()
        };
        json!({
            "vhosts": [{ "name": vhost }],
            "exchanges": self.exchanges.iter().map(|e| json!({
                "name": e.name, "vhost": vhost, "type": "topic",
                "durable": true, "auto_delete": false, "internal": false, "arguments": {}
            })).collect::<Vec<_>>(),
            "queues": self.queues.iter().map(|q| json!({
                "name": q.name, "vhost": vhost, "durable": true, "auto_delete": false,
                "arguments": arguments(&q.arguments)
            })).collect::<Vec<_>>(),
            "bindings": self.bindings.iter().map(|b| json!({
                "source": b.exchange, "vhost": vhost, "destination": b.queue,
                "destination_type": "queue", "routing_key": b.routing_key, "arguments": {}
            })).collect::<Vec<_>>(),
        })
    }
}

fn short(name: &str) -> Result<ShortString> {
    ShortString::try_new(name).map_err(|_| {
        Error::config(
            "topology",
            format!("name {name:?} is longer than 255 bytes"),
        )
    })
}

fn field_table(args: &BTreeMap<String, Argument>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in args {
        let value = match value {
            Argument::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            Argument::Int(i) => AMQPValue::LongLongInt(*i),
        };
        table.insert(key.as_str().into(), value);
    }
    table
}

/// Turns a 406 PRECONDITION_FAILED into a conflict that names what differs.
fn conflict_or(entity: String, error: lapin::Error) -> Error {
    if let lapin::ErrorKind::ProtocolError(amqp) = error.kind()
        && amqp.get_id() == 406
    {
        let detail = amqp.get_message().to_string();
        return Error::from(Kind::TopologyConflict {
            argument: inequivalent_argument(&detail),
            entity,
            detail,
        });
    }
    Error::amqp(format!("declaring {entity}"), error)
}

/// The argument named in RabbitMQ's "inequivalent arg 'x-max-length' for queue …" reply.
fn inequivalent_argument(detail: &str) -> Option<String> {
    let rest = detail.split("inequivalent arg '").nth(1)?;
    Some(rest.split('\'').next()?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_s_names_and_bindings() {
        let t = Topology::benalsam(&TopologyConfig::default());
        let names: Vec<&str> = t.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "elasticsearch.sync",
                "elasticsearch.sync.dlq",
                "listing.status.changes",
                "system.health"
            ]
        );
        assert!(t.bindings.contains(&BindingDef {
            exchange: "benalsam.listings".into(),
            queue: "elasticsearch.sync".into(),
            routing_key: "listing.#".into()
        }));
        let sync = &t.queues[0].arguments;
        assert_eq!(
            sync.get("x-dead-letter-exchange"),
            Some(&Argument::Str("benalsam.dlx".into()))
        );
        assert!(
            !sync.contains_key("x-max-length"),
            "the sync queue is never bounded"
        );
    }

    #[test]
    fn quorum_queues_get_a_delivery_limit() {
        let t = Topology::benalsam(&TopologyConfig {
            queue_type: QueueType::Quorum,
            ..TopologyConfig::default()
        });
        assert_eq!(
            t.queues[0].arguments.get("x-delivery-limit"),
            Some(&Argument::Int(20))
        );
        assert!(
            t.queues
                .iter()
                .all(|q| q.arguments.get("x-queue-type") == Some(&Argument::Str("quorum".into())))
        );
    }

    #[test]
    fn a_new_event_type_adds_its_exchange_and_binding_once() {
        let items = EventType {
            table: "inventory_items".into(),
            routing_prefix: "inventory_item".into(),
            exchange: "benalsam.inventory".into(),
            status_column: None,
        };
        let t = Topology::benalsam(&TopologyConfig::default())
            .with_event_type(&items)
            .with_event_type(&items);
        assert_eq!(
            t.exchanges
                .iter()
                .filter(|e| e.name == "benalsam.inventory")
                .count(),
            1
        );
        assert_eq!(
            t.bindings
                .iter()
                .filter(|b| b.routing_key == "inventory_item.#")
                .count(),
            1
        );
    }

    #[test]
    fn the_argument_is_read_from_the_broker_reply() {
        let reply = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'system.health' in vhost '/': received the value '5' of type 'signedint' but current is none";
        assert_eq!(
            inequivalent_argument(reply).as_deref(),
            Some("x-max-length")
        );
        assert_eq!(inequivalent_argument("PRECONDITION_FAILED - other"), None);
    }
}
