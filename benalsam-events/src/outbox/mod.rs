//! The outbox: the job table the trigger writes, and everything that reads or moves its
//! jobs.
//!
//! * [`Outbox`] claims jobs under a lease and [settles](Settle) what became of them; it is
//!   the only thing that changes a job's state, along the moves of the state diagram below.
//! * [`JobStream`] turns the outbox into a `Stream` of claimed batches, woken by
//!   LISTEN/NOTIFY and by polling, surviving lost connections.
//! * With [`OutboxConfig::capture_slot`] set, the bridge writes the jobs from the WAL
//!   (logical decoding) instead of triggers, exactly once and in commit order; `capture`
//!   has the how and why.
//! * [`OutboxConfig::migrate`] installs the job table and the trigger function; [`OutboxConfig::grants`] gives the SQL
//!   granting the bridge's and the consumer's roles what they need; the outbox's maintenance
//!   methods ([`Outbox::summary`], [`Outbox::retry_failed`], [`Outbox::backfill`],
//!   [`Outbox::purge_completed`], [`Outbox::document`]) serve operators.
//!
//! # The life of a job
//!
#![doc = include_str!("../../docs/job-states.md")]
//!
//! A report that its job's state does not allow (a confirm arriving after a consumer failed
//! the job, anything about a completed job) changes nothing and comes back in
//! [`Settled::unchanged`].

mod backfill;
mod backlog;
mod capture;
mod catalog;
mod config;
mod grants;
mod job;
mod listener;
mod lookup;
mod maintenance;
mod migrate;
mod queue;
#[cfg(feature = "consumer")]
mod reindex;
mod resender;
mod settle;
mod sql;
pub(crate) mod state;
mod stream;
mod sync_triggers;

pub use backfill::BackfillProgress;
pub use backlog::Backlog;
pub(crate) use capture::{Capture, CaptureStatus, check as check_capture, warn_if_captured};
pub(crate) use catalog::check_catalog;
pub use config::OutboxConfig;
pub(crate) use job::{ClaimKind, JobStatus};
pub use job::{Job, Operation};
pub(crate) use lookup::Recorded;
pub use maintenance::{JobSelection, StatusLine, Summary};
pub use migrate::MigrationReport;
pub(crate) use migrate::check_tables;
pub(crate) use migrate::migrate;
pub use queue::Outbox;
#[cfg(feature = "consumer")]
pub(crate) use reindex::{Phase, ReindexRecord, ReindexRow};
pub(crate) use resender::{Resender, ResenderStatus};
pub use settle::{Outcome, Settle, Settled};
pub(crate) use stream::DEFAULT_CHANNEL;
pub use stream::{JobStream, JobStreamConfig, JobStreamStatus, Wake};
