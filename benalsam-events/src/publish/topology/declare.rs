//! Declaring a topology on the broker, and turning its refusals into errors that name what
//! differs.

use std::collections::BTreeMap;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ExchangeKind};

use super::{Argument, QueueArguments, QueueDef, Topology, TopologyConfig};
use crate::config::QueueType;
use crate::error::Kind;
use crate::{error::Error, error::Result};

impl Topology {
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
pub(super) fn inequivalent_argument(detail: &str) -> Option<String> {
    let rest = detail.split("inequivalent arg '").nth(1)?;
    Some(rest.split('\'').next()?.to_owned())
}

/// The existing queue's type in RabbitMQ's "inequivalent arg 'x-queue-type' for queue …:
/// received 'classic' but current is 'quorum'" reply.
pub(super) fn current_queue_type(detail: &str) -> Option<QueueType> {
    if inequivalent_argument(detail).as_deref() != Some("x-queue-type") {
        return None;
    }
    let current = detail.rsplit("current is ").next()?;
    current.trim().trim_matches('\'').parse().ok()
}
