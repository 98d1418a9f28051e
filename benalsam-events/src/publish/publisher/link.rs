//! The publisher's link to the broker: opening it (declaring the topology), losing it, and
//! repairing a topology a publish found incomplete.

use std::time::Instant;

use futures::stream::FuturesUnordered;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::AmqpUrl;
use crate::outbox::Settle;
use crate::publish::publisher::{Outgoing, PublisherConfig, REPAIR_INTERVAL, Worker};
use crate::publish::record::PublisherEvent;
use crate::{error::Error, error::Result};

/// An open connection and its confirm-mode channel.
pub(super) struct Link {
    pub(super) connection: Connection,
    pub(super) channel: Channel,
}

impl<S: Settle> Worker<S> {
    /// Opens a connection and a confirm-mode channel (declaring the topology when it has
    /// one); on failure waits out the backoff.
    pub(super) async fn connect(&mut self) -> bool {
        match open(&self.url, self.addresses.next(), &self.config).await {
            Ok((link, index)) => {
                self.link = Some(link);
                self.connect_failures = 0;
                self.addresses.connected(index);
                let broker = self.url.addresses().get(index).map(AmqpUrl::redacted);
                tracing::info!(
                    broker = broker.as_deref().unwrap_or_default(),
                    "publisher connected"
                );
                self.recorder.record(PublisherEvent::Connected { broker });
                true
            }
            Err(error) => {
                self.recorder.record(PublisherEvent::Error(&error));
                let delay = self.config.reconnect.delay(self.connect_failures);
                self.connect_failures = self.connect_failures.saturating_add(1);
                tracing::warn!(%error, retry_in = ?delay, "publisher cannot reach RabbitMQ");
                // Confirmed jobs still get reported while the broker is away.
                self.report().await;
                tokio::time::sleep(delay).await;
                false
            }
        }
    }

    /// Drops the link; its unconfirmed jobs are published again on the next one.
    pub(super) fn link_lost(&mut self, error: Error) {
        tracing::warn!(%error, "publisher lost its channel; reconnecting");
        self.link = None;
        self.nacked_since = None;
        // The next connection starts with the address after the one just lost: a node that
        // went away is tried again only once the others have been. With one address this is
        // that address again.
        self.addresses.advance();
        self.known_exchanges.clear();
        self.confirms = FuturesUnordered::new();
        let mut orphans: Vec<Outgoing> = self
            .unconfirmed
            .drain()
            .map(|(_, f)| Outgoing::Again {
                id: f.id,
                message: f.message,
            })
            .collect();
        self.unconfirmed_bytes = 0;
        orphans.sort_unstable_by_key(|o| std::cmp::Reverse(o.id()));
        self.recorder.record(PublisherEvent::LinkLost {
            error: &error,
            republished: orphans.len() as u64,
        });
        for orphan in orphans {
            self.queue.push_front(orphan);
        }
    }

    /// Declares the topology again after a refusal that says part of it is missing, at most
    /// once per [`REPAIR_INTERVAL`]; the failed jobs are retried after their backoff.
    pub(super) async fn repair(&mut self) {
        let (Some(topology), Some(link)) = (&self.config.topology, &self.link) else {
            return;
        };
        if self
            .last_repair
            .is_some_and(|at| at.elapsed() < REPAIR_INTERVAL)
        {
            return;
        }
        self.last_repair = Some(Instant::now());
        match topology.declare(&link.connection).await {
            Ok(()) => {
                self.known_exchanges.clear();
                self.recorder.record(PublisherEvent::Repaired);
                tracing::warn!("a publish found the topology incomplete; declared it again");
            }
            Err(error) => {
                self.recorder.record(PublisherEvent::Error(&error));
                tracing::warn!(%error, "cannot declare the topology again");
            }
        }
    }
}

/// Opens a link to the first address of `url` that answers, trying them from `start`;
/// returns it with the index of that address.
async fn open(url: &AmqpUrl, start: usize, config: &PublisherConfig) -> Result<(Link, usize)> {
    let (connection, index) =
        crate::connect::amqp_from(url, &config.connection_name, start).await?;
    if let Some(topology) = &config.topology {
        topology.declare(&connection).await?;
    }
    let channel = crate::connect::confirm_channel(&connection, "publishing").await?;
    Ok((
        Link {
            connection,
            channel,
        },
        index,
    ))
}

/// Whether `exchange` exists, asked on a channel of its own (the broker closes a channel
/// that asks about a missing exchange).
pub(super) async fn exchange_exists(
    connection: &Connection,
    exchange: ShortString,
) -> Result<bool> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::amqp("opening a channel to check an exchange", e))?;
    let declared = channel
        .exchange_declare(
            exchange,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(error) => match error.kind() {
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404 => Ok(false),
            _ => Err(Error::amqp("checking an exchange", error)),
        },
    }
}
