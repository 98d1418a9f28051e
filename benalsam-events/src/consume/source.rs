//! The delivery source: consumes the configured queues on one connection, decodes every
//! delivery into an envelope (or the reason it is none), and reconnects when the link breaks.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};

use crate::config::{Addresses, AmqpUrl};
use crate::publish::{Envelope, EnvelopeError};
use crate::{error::Error, error::Result};

/// A consumed queue and where its dead letters go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueRoute {
    /// The queue consumed.
    pub(crate) queue: String,
    /// Its dead-letter exchange.
    pub(crate) dead_letter_exchange: String,
    /// Its dead-letter queue (for the depth the health answer shows).
    pub(crate) dead_letter_queue: String,
}

/// One delivery, decoded.
pub(crate) struct Incoming {
    pub(crate) delivery: Delivery,
    /// The queue it came from.
    pub(crate) route: Arc<QueueRoute>,
    pub(crate) envelope: Result<Envelope<'static>, EnvelopeError>,
}

/// What the source has next.
pub(crate) enum Event {
    Delivery(Box<Incoming>),
    /// The link broke (or the broker cancelled a consumer); reconnect.
    Lost(String),
}

/// The open link: the merged consumers and a confirm-mode channel for dead letters and
/// passive declares.
struct Link {
    connection: Connection,
    deliveries: SelectAll<BoxStream<'static, (Arc<QueueRoute>, lapin::Result<Delivery>)>>,
    side: Channel,
}

/// Consumes `queues` from `url`. See the [module documentation](self).
pub(crate) struct Source {
    url: AmqpUrl,
    queues: Vec<Arc<QueueRoute>>,
    prefetch: u16,
    /// Larger deliveries are not parsed: they are refused as too large.
    max_message_bytes: usize,
    name: String,
    link: Option<Link>,
    /// Which of the URL's addresses the next connection tries first.
    addresses: Addresses,
}

impl Source {
    pub(crate) fn new(url: AmqpUrl, queues: Vec<QueueRoute>, prefetch: u16, name: String) -> Self {
        Self {
            url,
            queues: queues.into_iter().map(Arc::new).collect(),
            prefetch,
            max_message_bytes: crate::event_type::DEFAULT_MAX_MESSAGE_BYTES,
            name,
            link: None,
            addresses: Addresses::default(),
        }
    }

    /// Refuses deliveries over `limit` bytes without parsing them.
    pub(crate) fn with_max_message_bytes(mut self, limit: usize) -> Self {
        self.max_message_bytes = limit;
        self
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.link.is_some()
    }

    /// Opens the link: a consuming channel with the prefetch, one consumer per queue. Returns
    /// the address reached, redacted.
    pub(crate) async fn connect(&mut self) -> Result<String> {
        const SETUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
        let (connection, index) =
            crate::connect::amqp_from(&self.url, &self.name, self.addresses.next()).await?;
        // Set before the consumers start: a failure below moves the next attempt on too.
        self.addresses.reached(index);
        // Setting up can wait on the broker without end (a `basic.consume` of a quorum queue
        // whose leader is being elected, on a node that just came back): bounded, so the next
        // attempt goes to the next address.
        let setup = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| Error::amqp("opening the consuming channel", e))?;
            channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| Error::amqp("setting the prefetch", e))?;
            let mut deliveries = SelectAll::new();
            for route in &self.queues {
                let consumer = channel
                    .basic_consume(
                        short(&route.queue)?,
                        short(&format!("{} {}", self.name, route.queue))?,
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| Error::amqp(format!("consuming {}", route.queue), e))?;
                let route = Arc::clone(route);
                deliveries.push(consumer.map(move |d| (Arc::clone(&route), d)).boxed());
            }
            let side = crate::connect::confirm_channel(&connection, "dead-letter").await?;
            Ok::<_, Error>((deliveries, side))
        };
        let (deliveries, side) = match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
            Ok(Ok(set_up)) => set_up,
            failed => {
                // Not left open on a node that does not serve: the next attempt goes on.
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    connection.close(200, "setup failed".into()),
                )
                .await;
                return Err(match failed {
                    Ok(Err(error)) => error,
                    _ => Error::broker(format!(
                        "the consuming channel was not set up within {SETUP_TIMEOUT:?}; the next broker address is tried"
                    )),
                });
            }
        };
        self.link = Some(Link {
            connection,
            deliveries,
            side,
        });
        self.addresses.connected(index);
        Ok(self
            .url
            .addresses()
            .get(index)
            .map(AmqpUrl::redacted)
            .unwrap_or_default())
    }

    /// The next delivery; waits forever while there is none. Call only while connected.
    pub(crate) async fn next(&mut self) -> Event {
        let Some(link) = self.link.as_mut() else {
            return Event::Lost("no channel".to_owned());
        };
        match link.deliveries.next().await {
            Some((route, Ok(delivery))) => {
                // Parsing would take several times the body's size again.
                let envelope = if delivery.data.len() > self.max_message_bytes {
                    Err(EnvelopeError::TooLarge {
                        bytes: delivery.data.len(),
                        limit: self.max_message_bytes,
                    })
                } else {
                    Envelope::parse(&delivery.data)
                };
                Event::Delivery(Box::new(Incoming {
                    delivery,
                    route,
                    envelope,
                }))
            }
            Some((_, Err(error))) => Event::Lost(format!("consuming: {error}")),
            None => Event::Lost("the broker cancelled the consumers".to_owned()),
        }
    }

    /// The channel dead letters are published on, while connected.
    pub(crate) fn dead_letters(&self) -> Option<Channel> {
        self.link.as_ref().map(|l| l.side.clone())
    }

    /// Drops the link; unacked deliveries go back to the queues.
    pub(crate) fn lost(&mut self) {
        self.link = None;
        // The next connection starts with the address after the one just lost.
        self.addresses.advance();
    }

    /// Messages waiting in each consumed queue and each dead-letter queue (`true`), when it
    /// answers.
    pub(crate) async fn depths(&mut self) -> Vec<(String, bool, Option<u32>)> {
        let Some(link) = self.link.as_mut() else {
            return Vec::new();
        };
        // Asked together, so a broker that stopped answering holds the loop for one
        // BROKER_ANSWER, not one per queue.
        let connection = &link.connection;
        let questions = self.queues.iter().flat_map(|route| {
            [(&route.queue, false), (&route.dead_letter_queue, true)].map(
                |(queue, dlq)| async move { (queue.clone(), dlq, depth(connection, queue).await) },
            )
        });
        futures::future::join_all(questions).await
    }

    /// Closes the link; a broker that does not answer the close within a few seconds is left
    /// (its unacked deliveries go back to the queue when the connection ends).
    pub(crate) async fn close(&mut self) {
        if let Some(link) = self.link.take() {
            let _ = tokio::time::timeout(
                BROKER_ANSWER,
                link.connection.close(200, "shutting down".into()),
            )
            .await;
        }
    }
}

fn short(name: &str) -> Result<ShortString> {
    ShortString::try_new(name)
        .map_err(|_| Error::config("queue", format!("{name:?} is longer than 255 bytes")))
}

/// Asked on a channel of its own: the broker closes a channel that asks about a missing
/// queue, and the dead-letter channel must not go with it. Bounded: a broker that stopped
/// answering (before its connection is known lost) must not hold up the consumer's loop,
/// whose shutdown and deliveries wait behind this question.
async fn depth(connection: &Connection, queue: &str) -> Option<u32> {
    tokio::time::timeout(BROKER_ANSWER, ask_depth(connection, queue))
        .await
        .ok()
        .flatten()
}

/// How long a question to the broker that nothing waits on (a depth, a close) may take.
const BROKER_ANSWER: std::time::Duration = std::time::Duration::from_secs(5);

async fn ask_depth(connection: &Connection, queue: &str) -> Option<u32> {
    let channel = connection.create_channel().await.ok()?;
    let declared = channel
        .queue_declare(
            short(queue).ok()?,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok();
    let _ = channel.close(200, "looked".into()).await;
    declared.map(|q| q.message_count())
}
