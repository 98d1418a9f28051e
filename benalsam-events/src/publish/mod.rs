//! Publishing: how a job becomes a message, where it goes, and the sink that sends it.
//!
//! * routing: which exchange and routing key the job of an [`EventType`](crate::event_type::EventType)
//!   goes to.
//! * [`Envelope`]: the versioned JSON body of every message, and its AMQP properties.
//! * [`Topology`]: exchanges, queues, bindings and dead-lettering, defined once as data,
//!   declared by the bridge and exported as a RabbitMQ definitions file.
//! * [`Publisher`]: a `Sink` of jobs into RabbitMQ with publisher confirms; it reports each
//!   outcome to the outbox ([`Settle`](crate::outbox::Settle)) and changes no job itself.

mod confirm;
mod envelope;
mod publisher;
mod record;
mod routing;
mod topology;

pub use crate::config::QueueType;
pub(crate) use crate::error::EnvelopeError;
pub use crate::event_type::Envelope;
pub(crate) use crate::event_type::LISTINGS_EXCHANGE;
pub(crate) use envelope::{JOB_ID_HEADER, TRACEPARENT_HEADER};
pub use publisher::{Publisher, PublisherConfig};
pub use record::PublisherStatus;
pub(crate) use routing::{Route, Routes};
pub(crate) use topology::SYSTEM_EXCHANGE;
pub use topology::{Topology, TopologyConfig};
