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

use crate::config::QueueType;
use crate::error::Kind;
use crate::{Error, EventType, Result};

/// Exchange of system events (heartbeats).
pub(crate) const SYSTEM_EXCHANGE: &str = "benalsam.system";
/// Heartbeats of the binaries.
pub(crate) const HEALTH_QUEUE: &str = "system.health";

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
    /// What it is for, from which its arguments derive.
    pub(crate) role: QueueRole,
    /// Its `x-` arguments.
    pub(crate) arguments: BTreeMap<String, Argument>,
}

/// What a queue is for; its arguments follow from this and the [`TopologyConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QueueRole {
    /// An event type's queue, read by the consumer; dead letters go to this exchange.
    Consumed { dead_letter_exchange: String },
    /// A dead-letter queue, read by operators (`dlq list`, `dlq replay`).
    DeadLetters,
    /// A queue nobody may be reading: the oldest messages are dropped beyond `max_length`,
    /// every message after `ttl`.
    Bounded { max_length: u32, ttl: Duration },
}

/// `x-overflow`: what a queue at its length limit does with the next message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    /// Drops the oldest message (both types; the default).
    DropHead,
    /// Refuses the new one: the publisher gets a nack (both types; what quorum queues need
    /// for at-least-once dead-lettering).
    RejectPublish,
    /// Refuses and dead-letters it: classic queues only.
    #[cfg_attr(not(test), allow(dead_code))]
    RejectPublishDlx,
}

impl Overflow {
    fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// `x-dead-letter-strategy` of a quorum queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterStrategy {
    /// The queue drops a dead letter the target did not take (the default).
    #[cfg_attr(not(test), allow(dead_code))]
    AtMostOnce,
    /// The queue keeps a dead letter until the target queue confirmed it.
    AtLeastOnce,
}

impl DeadLetterStrategy {
    fn as_str(self) -> &'static str {
        match self {
            DeadLetterStrategy::AtMostOnce => "at-most-once",
            DeadLetterStrategy::AtLeastOnce => "at-least-once",
        }
    }
}

/// The `x-` arguments of one queue, typed, so that a combination RabbitMQ refuses (or, worse,
/// accepts and quietly ignores) is caught by [`QueueArguments::check`] before it reaches a
/// broker. Arguments no queue of the topology needs have no field, so they cannot be
/// emitted: `x-max-priority` and `x-queue-mode` (which quorum queues refuse), and exclusive
/// or auto-delete queues (every queue is durable and shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueArguments {
    pub(crate) queue_type: QueueType,
    pub(crate) dead_letter_exchange: Option<String>,
    pub(crate) dead_letter_strategy: Option<DeadLetterStrategy>,
    pub(crate) overflow: Option<Overflow>,
    pub(crate) max_length: Option<u32>,
    pub(crate) message_ttl: Option<Duration>,
    pub(crate) delivery_limit: Option<u32>,
}

impl QueueArguments {
    /// The arguments of a queue with `role` under `config`. Pure: what the broker is asked
    /// for, the definitions file holds, and the tests check, all come from here.
    pub(crate) fn derive(role: &QueueRole, config: &TopologyConfig) -> Self {
        let quorum = config.queue_type == QueueType::Quorum;
        let mut args = Self {
            queue_type: config.queue_type,
            dead_letter_exchange: None,
            dead_letter_strategy: None,
            overflow: None,
            max_length: None,
            message_ttl: None,
            // Every quorum queue, dead-letter queues included: 4.x would otherwise drop a
            // DLQ's message (it has no dead-letter exchange) after 20 `dlq list`s, each of
            // which hands the messages back.
            delivery_limit: quorum.then_some(config.delivery_limit),
        };
        match role {
            QueueRole::Consumed {
                dead_letter_exchange,
            } => {
                args.dead_letter_exchange = Some(dead_letter_exchange.clone());
                if quorum {
                    // A quorum queue dead-letters at most once by default: a dead letter the
                    // DLQ does not confirm is lost. at-least-once keeps it until confirmed,
                    // and RabbitMQ honours it only with reject-publish (with drop-head it
                    // falls back to at-most-once). The queue has no length limit, so
                    // reject-publish refuses nothing unless an operator's policy sets one;
                    // then the bridge gets a nack and the job is retried.
                    args.dead_letter_strategy = Some(DeadLetterStrategy::AtLeastOnce);
                    args.overflow = Some(Overflow::RejectPublish);
                }
            }
            QueueRole::DeadLetters => {}
            QueueRole::Bounded { max_length, ttl } => {
                args.max_length = Some(*max_length);
                // drop-head on both types: quorum queues have no reject-publish-dlx, and a
                // status or health queue nobody reads must never refuse (a nack would fail
                // the job whose message also went to the sync queue).
                args.overflow = Some(Overflow::DropHead);
                args.message_ttl = Some(*ttl);
            }
        }
        args
    }

    /// Refuses what RabbitMQ cannot do with these arguments, naming `queue` and why.
    pub(crate) fn check(&self, queue: &str) -> Result<()> {
        let refuse = |reason: &str| Err(Error::config(format!("queue {queue}"), reason));
        let quorum = self.queue_type == QueueType::Quorum;
        if !quorum && self.delivery_limit.is_some() {
            return refuse("x-delivery-limit applies to quorum queues only");
        }
        if !quorum && self.dead_letter_strategy.is_some() {
            return refuse("x-dead-letter-strategy applies to quorum queues only");
        }
        if quorum && self.overflow == Some(Overflow::RejectPublishDlx) {
            return refuse(
                "quorum queues have no x-overflow reject-publish-dlx (RabbitMQ 3.10 accepts it \
                 and silently drops the head instead); use reject-publish or drop-head",
            );
        }
        if self.dead_letter_strategy == Some(DeadLetterStrategy::AtLeastOnce) {
            if self.overflow != Some(Overflow::RejectPublish) {
                return refuse(
                    "at-least-once dead-lettering needs x-overflow reject-publish (with \
                     drop-head RabbitMQ falls back to at-most-once)",
                );
            }
            if self.dead_letter_exchange.is_none() {
                return refuse("at-least-once dead-lettering needs a dead-letter exchange");
            }
        }
        if self.delivery_limit == Some(0) {
            return refuse("x-delivery-limit 0 dead-letters a message at its first return");
        }
        if self.max_length == Some(0) {
            return refuse("x-max-length 0 keeps no message");
        }
        if self.message_ttl.is_some_and(|ttl| ttl.is_zero()) {
            return refuse("x-message-ttl 0 keeps no message");
        }
        Ok(())
    }

    /// The arguments as the broker and the definitions file take them.
    pub(crate) fn table(&self) -> BTreeMap<String, Argument> {
        let mut table = BTreeMap::from([(
            "x-queue-type".to_owned(),
            Argument::Str(self.queue_type.as_str().to_owned()),
        )]);
        let mut put = |key: &str, value: Argument| {
            table.insert(key.to_owned(), value);
        };
        if let Some(dlx) = &self.dead_letter_exchange {
            put("x-dead-letter-exchange", Argument::Str(dlx.clone()));
        }
        if let Some(strategy) = self.dead_letter_strategy {
            put(
                "x-dead-letter-strategy",
                Argument::Str(strategy.as_str().to_owned()),
            );
        }
        if let Some(overflow) = self.overflow {
            put("x-overflow", Argument::Str(overflow.as_str().to_owned()));
        }
        if let Some(max) = self.max_length {
            put("x-max-length", Argument::Int(i64::from(max)));
        }
        if let Some(ttl) = self.message_ttl {
            let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            put("x-message-ttl", Argument::Int(millis));
        }
        if let Some(limit) = self.delivery_limit {
            put("x-delivery-limit", Argument::Int(i64::from(limit)));
        }
        table
    }
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

    /// The type of an existing `queue` that refused this topology's arguments, when it is
    /// the other type: read from the broker's reply when it names `x-queue-type`, otherwise
    /// found by declaring the queue with the other type's arguments (which changes nothing
    /// when they match: a declare of an existing queue with equal arguments is a no-op).
    /// RabbitMQ 3.10 names the first argument that differs, which for a classic queue asked
    /// to be quorum is `x-overflow`, not `x-queue-type`: hence the second question.
    async fn existing_type(
        &self,
        connection: &Connection,
        queue: &QueueDef,
        refusal: &Error,
    ) -> Option<QueueType> {
        if let Kind::TopologyConflict { detail, .. } = refusal.kind()
            && let Some(current) = current_queue_type(detail)
            && current != self.config.queue_type
        {
            return Some(current);
        }
        for other in [QueueType::Classic, QueueType::Quorum] {
            if other == self.config.queue_type {
                continue;
            }
            let config = TopologyConfig {
                queue_type: other,
                ..self.config.clone()
            };
            let arguments = QueueArguments::derive(&queue.role, &config).table();
            let channel = connection.create_channel().await.ok()?;
            let name = short(&queue.name).ok()?;
            if declare_queue(&channel, name, &arguments).await.is_ok() {
                let _ = channel.close(200, "queue type found".into()).await;
                return Some(other);
            }
        }
        None
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

    /// Declares everything on the broker. Idempotent; fails with
    /// a conflict ([`Error::is_conflict`]) if the broker has an entity with other settings,
    /// naming it and the argument; a queue of the other type (a classic deployment started
    /// with quorum queues, or the reverse) is named as such, with both types and the way to
    /// migrate.
    pub async fn declare(&self, connection: &Connection) -> Result<()> {
        self.validate()?;
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
            let declared = declare_queue(&channel, short(&queue.name)?, &queue.arguments).await;
            if let Err(error) = declared {
                let error = conflict_or(format!("queue {}", queue.name), error);
                if !error.is_conflict() {
                    return Err(error);
                }
                // The broker closed the channel; ask on fresh ones whether the queue is
                // of the other type.
                if let Some(existing) = self.existing_type(connection, queue, &error).await {
                    return Err(Error::from(Kind::QueueTypeMismatch {
                        queue: queue.name.clone(),
                        existing,
                        wanted: self.config.queue_type,
                    }));
                }
                return Err(error);
            }
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

fn short(name: &str) -> Result<ShortString> {
    ShortString::try_new(name).map_err(|_| {
        Error::config(
            "topology",
            format!("name {name:?} is longer than 255 bytes"),
        )
    })
}

/// Declares one durable queue with `arguments`.
async fn declare_queue(
    channel: &lapin::Channel,
    name: ShortString,
    arguments: &BTreeMap<String, Argument>,
) -> std::result::Result<(), lapin::Error> {
    channel
        .queue_declare(
            name,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            field_table(arguments),
        )
        .await
        .map(|_| ())
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

/// The existing queue's type in RabbitMQ's "inequivalent arg 'x-queue-type' for queue …:
/// received 'classic' but current is 'quorum'" reply.
fn current_queue_type(detail: &str) -> Option<QueueType> {
    if inequivalent_argument(detail).as_deref() != Some("x-queue-type") {
        return None;
    }
    let current = detail.rsplit("current is ").next()?;
    current.trim().trim_matches('\'').parse().ok()
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

    fn quorum() -> TopologyConfig {
        TopologyConfig {
            queue_type: QueueType::Quorum,
            ..TopologyConfig::default()
        }
    }

    fn str_arg(q: &QueueDef, key: &str) -> Option<String> {
        match q.arguments.get(key) {
            Some(Argument::Str(s)) => Some(s.clone()),
            _ => None,
        }
    }

    #[test]
    fn classic_queues_keep_exactly_the_arguments_they_always_had() {
        let t = Topology::benalsam(&TopologyConfig::default());
        let keys = |i: usize| t.queues[i].arguments.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(0), ["x-dead-letter-exchange", "x-queue-type"]);
        assert_eq!(keys(1), ["x-queue-type"]);
        assert_eq!(
            keys(2),
            [
                "x-max-length",
                "x-message-ttl",
                "x-overflow",
                "x-queue-type"
            ]
        );
    }

    #[test]
    fn quorum_sync_queues_dead_letter_at_least_once_and_nothing_is_dead_lettered_by_count() {
        let t = Topology::benalsam(&quorum());
        let sync = &t.queues[0];
        assert_eq!(str_arg(sync, "x-queue-type").as_deref(), Some("quorum"));
        assert_eq!(
            str_arg(sync, "x-dead-letter-strategy").as_deref(),
            Some("at-least-once")
        );
        assert_eq!(
            str_arg(sync, "x-overflow").as_deref(),
            Some("reject-publish")
        );
        assert!(!sync.arguments.contains_key("x-max-length"));
        for q in &t.queues {
            assert_eq!(
                q.arguments.get("x-delivery-limit"),
                Some(&Argument::Int(i64::from(u32::MAX))),
                "{}",
                q.name
            );
        }
        let status = &t.queues[2];
        assert_eq!(str_arg(status, "x-overflow").as_deref(), Some("drop-head"));
        assert_eq!(
            status.arguments.get("x-max-length"),
            Some(&Argument::Int(100_000))
        );
    }

    #[test]
    fn impossible_combinations_are_refused_with_the_reason() {
        let ok = QueueArguments::derive(
            &QueueRole::Consumed {
                dead_letter_exchange: "dlx".into(),
            },
            &quorum(),
        );
        assert!(ok.check("q").is_ok());
        let refused = |args: QueueArguments, says: &str| {
            let error = args.check("q").expect_err(says);
            assert!(error.is_config(), "{error}");
            let text = error.to_string();
            assert!(text.contains("queue q") && text.contains(says), "{text}");
        };
        let classic = QueueArguments {
            queue_type: QueueType::Classic,
            ..ok.clone()
        };
        refused(
            QueueArguments {
                dead_letter_strategy: None,
                ..classic.clone()
            },
            "x-delivery-limit applies to quorum queues only",
        );
        refused(
            QueueArguments {
                delivery_limit: None,
                ..classic
            },
            "x-dead-letter-strategy applies to quorum queues only",
        );
        refused(
            QueueArguments {
                overflow: Some(Overflow::RejectPublishDlx),
                dead_letter_strategy: Some(DeadLetterStrategy::AtMostOnce),
                ..ok.clone()
            },
            "reject-publish-dlx",
        );
        refused(
            QueueArguments {
                overflow: Some(Overflow::DropHead),
                ..ok.clone()
            },
            "needs x-overflow reject-publish",
        );
        refused(
            QueueArguments {
                dead_letter_exchange: None,
                ..ok.clone()
            },
            "needs a dead-letter exchange",
        );
        refused(
            QueueArguments {
                delivery_limit: Some(0),
                ..ok.clone()
            },
            "first return",
        );
        let config = TopologyConfig {
            delivery_limit: 0,
            ..quorum()
        };
        let error = Topology::benalsam(&config).validate().expect_err("limit 0");
        assert_eq!(error.setting(), Some("TopologyConfig::delivery_limit"));
        let config = TopologyConfig {
            status_queue_max_length: 0,
            ..TopologyConfig::default()
        };
        let error = config.validate().expect_err("no room");
        assert_eq!(
            error.setting(),
            Some("TopologyConfig::status_queue_max_length")
        );
    }

    #[test]
    fn a_bad_queue_type_names_the_setting_and_the_choices() {
        let error = "lazy".parse::<QueueType>().expect_err("not a type");
        assert_eq!(error.setting(), Some("BENALSAM_QUEUE_TYPE"));
        let text = error.to_string();
        assert!(
            text.contains("\"classic\"") && text.contains("\"quorum\""),
            "{text}"
        );
        assert_eq!("quorum".parse::<QueueType>().ok(), Some(QueueType::Quorum));
    }

    #[test]
    fn the_existing_type_is_read_from_the_broker_reply() {
        let reply = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q1' in vhost '/': received 'classic' but current is 'quorum'";
        assert_eq!(current_queue_type(reply), Some(QueueType::Quorum));
        let other = "PRECONDITION_FAILED - inequivalent arg 'x-overflow' for queue 'c1' in vhost '/': received the value 'reject-publish' of type 'longstr' but current is none";
        assert_eq!(current_queue_type(other), None);
    }

    /// Quorum-only arguments, classic-only arguments and values, and what quorum queues
    /// refuse or ignore.
    const QUORUM_ONLY: [&str; 3] = [
        "x-delivery-limit",
        "x-dead-letter-strategy",
        "x-quorum-initial-group-size",
    ];
    const NEVER_ON_QUORUM: [&str; 4] = [
        "x-max-priority",
        "x-queue-mode",
        "x-queue-master-locator",
        "x-queue-version",
    ];

    proptest::proptest! {
        #[test]
        fn every_derived_queue_is_valid_for_its_type(
            quorum in proptest::bool::ANY,
            status_max in 1u32..=u32::MAX,
            health_max in 1u32..=u32::MAX,
            ttl_ms in 1u64..=30 * 24 * 3600 * 1000,
            limit in 1u32..=u32::MAX,
            with_status in proptest::bool::ANY,
        ) {
            let config = TopologyConfig {
                queue_type: if quorum { QueueType::Quorum } else { QueueType::Classic },
                status_queue_max_length: status_max,
                health_queue_max_length: health_max,
                status_queue_ttl: Duration::from_millis(ttl_ms),
                delivery_limit: limit,
                ..TopologyConfig::default()
            };
            let mut items = EventType::new("inventory", "inventory_items");
            if !with_status {
                items.status_queue = None;
            }
            let t = Topology::for_event_types(&[EventType::listings(), items], &config);
            proptest::prop_assert!(t.validate().is_ok());
            for q in &t.queues {
                let wanted = config.queue_type.as_str().to_owned();
                proptest::prop_assert_eq!(str_arg(q, "x-queue-type"), Some(wanted));
                let overflow = str_arg(q, "x-overflow");
                if quorum {
                    for key in NEVER_ON_QUORUM {
                        proptest::prop_assert!(!q.arguments.contains_key(key), "{} {}", q.name, key);
                    }
                    proptest::prop_assert_ne!(overflow.as_deref(), Some("reject-publish-dlx"));
                    proptest::prop_assert_eq!(
                        q.arguments.get("x-delivery-limit"),
                        Some(&Argument::Int(i64::from(limit)))
                    );
                    if q.arguments.contains_key("x-dead-letter-exchange") {
                        let strategy = str_arg(q, "x-dead-letter-strategy");
                        proptest::prop_assert_eq!(strategy.as_deref(), Some("at-least-once"));
                        proptest::prop_assert_eq!(overflow.as_deref(), Some("reject-publish"));
                    }
                } else {
                    for key in QUORUM_ONLY {
                        proptest::prop_assert!(!q.arguments.contains_key(key), "{} {}", q.name, key);
                    }
                }
                // A bounded queue keeps its bound and never refuses a publish.
                if q.arguments.contains_key("x-max-length") {
                    proptest::prop_assert_eq!(overflow.as_deref(), Some("drop-head"));
                    proptest::prop_assert!(q.arguments.contains_key("x-message-ttl"));
                }
            }
        }
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
