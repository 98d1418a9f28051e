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

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ExchangeKind};
use serde_json::{Value, json};

use crate::error::Kind;
use crate::{Error, EventType, Result};

/// Exchange of system events (heartbeats).
pub(crate) const SYSTEM_EXCHANGE: &str = "benalsam.system";
/// Heartbeats of the binaries.
pub(crate) const HEALTH_QUEUE: &str = "system.health";

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
    /// Quorum queues only: deliveries of one message before the broker dead-letters it
    /// (a message that crashes every consumer cannot block the queue forever).
    pub delivery_limit: u32,
}

impl Default for TopologyConfig {
    /// Classic queues; status queues keep 100,000 changes for 7 days, `system.health` 1,000
    /// heartbeats for an hour; a quorum queue dead-letters a message after 20 deliveries.
    fn default() -> Self {
        Self {
            queue_type: QueueType::Classic,
            status_queue_max_length: 100_000,
            status_queue_ttl: Duration::from_secs(7 * 24 * 3600),
            health_queue_max_length: 1_000,
            health_queue_ttl: Duration::from_secs(3600),
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
        let args = Arguments(config);
        let mut t = Self {
            exchanges: Vec::new(),
            queues: Vec::new(),
            bindings: Vec::new(),
        };
        for e in event_types {
            t.exchange(&e.exchange);
            t.queue(&e.queue, args.consumed(&e.dead_letter_exchange));
            t.queue(&e.dead_letter_queue, args.plain());
            if let Some(status) = &e.status_queue {
                t.queue(
                    status,
                    args.bounded(config.status_queue_max_length, config.status_queue_ttl),
                );
            }
        }
        t.exchange(SYSTEM_EXCHANGE);
        t.queue(
            HEALTH_QUEUE,
            args.bounded(config.health_queue_max_length, config.health_queue_ttl),
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

    fn queue(&mut self, name: &str, arguments: BTreeMap<String, Argument>) {
        if !self.queues.iter().any(|q| q.name == name) {
            self.queues.push(QueueDef {
                name: name.to_owned(),
                arguments,
            });
        }
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

    /// The least privileges of the two components on this topology, as lines of
    /// `user<TAB>configure<TAB>write<TAB>read` (regular expressions, as RabbitMQ's
    /// `set_permissions` takes them; `^$` grants nothing):
    ///
    /// - `benalsam-bridge` declares everything (configure on every exchange and queue; read
    ///   on the exchanges and write on the queues to bind them), publishes events and
    ///   heartbeats (write on the exchanges), and, creating a queue with a dead-letter
    ///   exchange, needs read on the queue and write on that exchange;
    /// - `benalsam-consumer` declares nothing: it reads the queues it consumes, and writes
    ///   only dead letters and heartbeats. It cannot publish an event.
    pub fn permissions(&self) -> String {
        let dead_letter_exchanges: Vec<&str> = self
            .queues
            .iter()
            .filter_map(|q| match q.arguments.get("x-dead-letter-exchange") {
                Some(Argument::Str(dlx)) => Some(dlx.as_str()),
                _ => None,
            })
            .collect();
        let consumed: Vec<&str> = self
            .queues
            .iter()
            .filter(|q| q.arguments.contains_key("x-dead-letter-exchange"))
            .map(|q| q.name.as_str())
            .collect();
        let exchanges: Vec<&str> = self.exchanges.iter().map(|e| e.name.as_str()).collect();
        let queues: Vec<&str> = self.queues.iter().map(|q| q.name.as_str()).collect();
        let everything = [exchanges.as_slice(), queues.as_slice()].concat();
        let bridge_read = [exchanges.as_slice(), consumed.as_slice()].concat();
        let consumer_write = [dead_letter_exchanges.as_slice(), &[SYSTEM_EXCHANGE]].concat();
        format!(
            "benalsam-bridge\t{all}\t{all}\t{read}\nbenalsam-consumer\t^$\t{write}\t{consume}\n",
            all = any_of(&everything),
            read = any_of(&bridge_read),
            write = any_of(&consumer_write),
            consume = any_of(&consumed),
        )
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

/// The `x-` arguments of the kinds of queue, for one configuration.
struct Arguments<'a>(&'a TopologyConfig);

impl Arguments<'_> {
    fn plain(&self) -> BTreeMap<String, Argument> {
        BTreeMap::from([(
            "x-queue-type".to_owned(),
            Argument::Str(self.0.queue_type.as_str().to_owned()),
        )])
    }

    /// A queue a consumer reads: dead-lettering (and, for quorum queues, the delivery limit).
    fn consumed(&self, dead_letter_exchange: &str) -> BTreeMap<String, Argument> {
        let mut args = self.plain();
        args.insert(
            "x-dead-letter-exchange".to_owned(),
            Argument::Str(dead_letter_exchange.to_owned()),
        );
        if self.0.queue_type == QueueType::Quorum {
            args.insert(
                "x-delivery-limit".to_owned(),
                Argument::Int(i64::from(self.0.delivery_limit)),
            );
        }
        args
    }

    /// A queue nobody may be consuming: at most `max_length` messages of at most `ttl`.
    fn bounded(&self, max_length: u32, ttl: Duration) -> BTreeMap<String, Argument> {
        let mut args = self.plain();
        args.insert(
            "x-max-length".to_owned(),
            Argument::Int(i64::from(max_length)),
        );
        // Quorum queues only support drop-head, so both types use it.
        args.insert(
            "x-overflow".to_owned(),
            Argument::Str("drop-head".to_owned()),
        );
        let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".to_owned(), Argument::Int(millis));
        args
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

/// A regular expression matching exactly `names` (each once, in order).
fn any_of(names: &[&str]) -> String {
    let mut unique: Vec<&str> = Vec::new();
    for name in names {
        if !unique.contains(name) {
            unique.push(name);
        }
    }
    let escaped: Vec<String> = unique
        .iter()
        .map(|name| {
            name.chars()
                .map(|c| match c {
                    '.' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$'
                    | '\\' => format!("\\{c}"),
                    c => c.to_string(),
                })
                .collect()
        })
        .collect();
    format!("^({})$", escaped.join("|"))
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
    fn each_event_type_gets_its_own_queue_and_dead_letters() {
        let mut items = EventType::new("inventory", "inventory_items");
        items.routing_prefix = "inventory_item".into();
        let t = Topology::for_event_types(
            &[EventType::listings(), items.clone(), items],
            &TopologyConfig::default(),
        );
        let names: Vec<&str> = t.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "elasticsearch.sync",
                "elasticsearch.sync.dlq",
                "listing.status.changes",
                "inventory.sync",
                "inventory.sync.dlq",
                "system.health"
            ],
            "each entity once"
        );
        let inventory = &t.queues[3].arguments;
        assert_eq!(
            inventory.get("x-dead-letter-exchange"),
            Some(&Argument::Str("inventory.sync.dlx".into()))
        );
        let bound = |exchange: &str, queue: &str, key: &str| {
            t.bindings.contains(&BindingDef {
                exchange: exchange.into(),
                queue: queue.into(),
                routing_key: key.into(),
            })
        };
        assert!(bound(
            "benalsam.inventory",
            "inventory.sync",
            "inventory_item.#"
        ));
        assert!(bound("inventory.sync.dlx", "inventory.sync.dlq", "#"));
        assert!(bound("benalsam.dlx", "elasticsearch.sync.dlq", "#"));
        assert!(
            !bound("benalsam.dlx", "inventory.sync.dlq", "#"),
            "dead letters of one type never reach another's queue"
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
