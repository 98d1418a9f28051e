//! Carry PostgreSQL row changes through RabbitMQ into Elasticsearch, reliably.
//!
//! An application writes its tables as usual; the trigger `add_to_sync_queue()` records every
//! change as a job in the outbox table `elasticsearch_sync_queue`, in the same transaction,
//! and wakes listeners with `NOTIFY`. The bridge turns those jobs into RabbitMQ messages;
//! the consumer turns the messages into Elasticsearch bulk requests.
//!
//! # One job's path
//!
//! ```text
//!  app ─INSERT/UPDATE/DELETE/TRUNCATE─► table ─trigger─► outbox row (pending)  same transaction
//!                                                 │
//!      outbox ─claim, lease─► JobStream ─► Publisher ─publish, confirm─► exchange ─► queue
//!        ▲                                   │ sent                                  │
//!        └───────────── Settle ◄─────────────┘                                       │
//!        ▲                                                                           ▼
//!        └──── completed / failed ◄──── Indexer: batch ─► _bulk (version = job id) ◄─┘
//! ```
//!
//! Each hop retries until it has a confirmation, so a message may arrive twice; the index
//! still changes once per change, because every write carries the job id as its external
//! version. Only the [`Outbox`] changes a job's state; the publisher and the indexer report
//! what happened ([`Outcome`]) through [`Settle`].
//!
//! A document joined from related tables ([`event_type::Relation`]) is read from the
//! database when it is indexed, under a version drawn after a lock on the document; a
//! related row's change is fanned out by the bridge to the documents that contain it.
//!
//! # Layout
//!
//! Each folder is one floor and imports only the floors below it (`scripts/floors` checks
//! it), from the top:
//!
//! | module | what it holds |
//! |---|---|
//! | [`bridge`], [`consumer`] | the two services as functions: [`bridge::run`], [`consumer::run`] (and their health verdicts, heartbeats) |
//! | [`consume`] | messages into the index, one file per stage: source → admit → batch → verify → build / join → write → truncate → settle, composed by the [`Indexer`]; dead letters |
//! | [`publish`] | jobs into messages: routing, the AMQP side of the [`Envelope`], the [`Topology`], the [`Publisher`] sink |
//! | [`relations`] | joined documents: the joined read and the fan-out of related-row changes (fair across changes, claims given back on stop), their SQL |
//! | [`search`] | everything that speaks the search engine's dialect: client and nodes, bulk requests and answers, mappings, delete queries |
//! | [`outbox`] | the job table: [`Outbox`] (claim, settle, maintenance), [`JobStream`], migrations and grants, the job state machine, relations against the catalog |
//! | [`event_type`] | the model: [`EventType`] (one table from trigger to index, in code or from a TOML file), documents as data, relations, the change data ([`Envelope`], [`Action`], [`DocumentBuilder`]) |
//! | [`ops`] | observability: health answers and server, [`Metrics`]; spans and their trace context across the broker (installing a subscriber or an exporter is the application's: the binaries do it in `benalsam-cli`) |
//! | [`config`] | service URLs that never print a password, secrets from files; opening connections as the library does ([`DatabaseUrl::connect`], [`AmqpUrl::connect`], [`SearchUrl::client`]) |
//!
//! # Features
//!
//! | feature | default | adds |
//! |---|---|---|
//! | `bridge` | yes | [`bridge::run`] and what only the bridge needs: claiming, publishing, the fan-out of relations |
//! | `consumer` | yes | [`consumer::run`], the `Indexer` and the DLQ tools: RabbitMQ → Elasticsearch, with the Elasticsearch client |
//!
//! A service that only publishes builds with `default-features = false, features =
//! ["bridge"]` and carries no search client.
//!
//! # Quick start: the outbox as a stream
//!
//! ```no_run
//! use benalsam_events::{JobStream, JobStreamConfig, Outbox, OutboxConfig, Outcome, Settle};
//! use futures::StreamExt;
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() -> Result<(), benalsam_events::Error> {
//! let url = "postgres://benalsam:benalsam@127.0.0.1:5432/benalsam".parse()?;
//! let outbox = Outbox::new(url, OutboxConfig::default())?;
//! let shutdown = CancellationToken::new();
//! let mut jobs = JobStream::new(outbox.clone(), JobStreamConfig::default(), shutdown.clone())?;
//! while let Some(batch) = jobs.next().await {
//!     // ... deliver the batch somewhere, then report what became of it:
//!     let reports: Vec<_> = batch.iter().map(|job| (job.id, Outcome::Completed)).collect();
//!     outbox.settle(&reports).await?;
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
// A build with one service only (features `bridge` or `consumer` alone) leaves internals the
// other one uses without callers; they are shared code, not dead code.
#![cfg_attr(
    not(all(feature = "bridge", feature = "consumer")),
    allow(dead_code, unused_imports)
)]

mod backoff;
pub mod config;
mod connect;
pub mod consume;
mod error;
pub mod event_type;
pub mod ops;
pub mod outbox;
pub mod publish;
mod queue_type;
pub mod relations;
pub mod search;
#[cfg(any(feature = "bridge", feature = "consumer"))]
mod service;

#[cfg(feature = "bridge")]
pub use service::bridge;
#[cfg(feature = "consumer")]
pub use service::consumer;

// The clients whose types appear in this API, so users need not match versions by hand.
#[cfg(feature = "consumer")]
pub use elasticsearch;
pub use lapin;
pub use tokio_postgres;

pub use backoff::Backoff;
pub use config::{AmqpUrl, DatabaseUrl, SearchUrl};
#[cfg(feature = "consumer")]
pub use consume::{Indexer, IndexerConfig};
pub use error::{Error, Result};
pub use event_type::EventType;
pub use event_type::{Action, BuildError, DocumentBuilder};
pub use ops::Metrics;
pub use outbox::{Job, JobStream, JobStreamConfig, Outbox, OutboxConfig, Outcome, Settle};
pub use publish::{Envelope, Publisher, PublisherConfig, Topology};
