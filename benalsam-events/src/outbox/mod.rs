//! The outbox: the job table the trigger writes, and everything that reads or moves its
//! jobs.
//!
//! * [`Outbox`] claims jobs under a lease and [settles](Settle) what became of them; it is
//!   the only thing that changes a job's state, along the moves of the state diagram below.
//! * [`JobStream`] turns the outbox into a `Stream` of claimed batches, woken by
//!   LISTEN/NOTIFY and by polling, surviving lost connections.
//! * [`migrate`] installs the job table and the trigger function; [`grants`] gives the SQL
//!   granting the bridge's and the consumer's roles what they need; the outbox's maintenance
//!   methods ([`Outbox::summary`], [`Outbox::retry_failed`], [`Outbox::backfill`],
//!   [`Outbox::purge_completed`]) serve operators.
//!
//! # The life of a job
//!
#![doc = include_str!("../../docs/job-states.md")]
//!
//! A report that its job's state does not allow (a confirm arriving after a consumer failed
//! the job, anything about a completed job) changes nothing and comes back in
//! [`Settled::unchanged`].

mod catalog;
mod grants;
mod job;
mod listener;
mod maintenance;
mod migrate;
mod queue;
mod resender;
pub(crate) mod state;
mod stream;

pub(crate) use catalog::check_catalog;
pub use grants::grants;
pub(crate) use job::{ClaimKind, JobStatus};
pub use job::{Job, Operation};
pub use maintenance::{BackfillProgress, JobSelection, StatusLine, Summary};
pub(crate) use migrate::missing_tables;
pub use migrate::{MigrationReport, migrate};
pub(crate) use queue::Recorded;
pub use queue::{Backlog, Outbox, OutboxConfig, Outcome, Settle, Settled};
pub(crate) use resender::{Resender, ResenderStatus};
pub(crate) use stream::DEFAULT_CHANNEL;
pub use stream::{JobStream, JobStreamConfig, JobStreamStatus, Wake};
