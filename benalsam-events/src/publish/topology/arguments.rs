//! The entities of a topology as data: exchanges, queues with the arguments their role and
//! the configuration give them, bindings.

use std::collections::BTreeMap;
use std::time::Duration;

use super::TopologyConfig;
use crate::config::QueueType;
use crate::{error::Error, error::Result};

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
