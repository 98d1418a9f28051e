//! Joined documents, one floor above the outbox: reading a document with its related rows
//! under a version (`read.rs`, for the consumer), and paging a related row's
//! change out to the documents that contain it (the fan-out, for the bridge). The SQL of both
//! is in `sql.rs`; checking relations against the catalog stays in the outbox, beside the
//! migrations that call it.
//!
//! # Why a joined document converges, whatever the order of commits and deliveries
//!
//! A document built from one row is versioned by the job id of the change: PostgreSQL gives a
//! later change of the same row a larger id (the trigger runs under the row lock). A joined
//! document has no such order: a seller rename and a listing edit are changes of different
//! rows, and their ids say nothing about which one the other saw. So a joined document is
//! never built from a message. Every job of a joined event type (its own INSERT, UPDATE,
//! DELETE, and the REBUILD jobs of the fan-out) means "read this document again", and the
//! consumer reads it in one transaction:
//!
//! 1. `pg_advisory_xact_lock` on every document of the batch (sorted, so two consumers never
//!    wait on each other in a circle);
//! 2. `v = nextval` of the outbox's id sequence;
//! 3. one `SELECT` of the rows with their related rows (READ COMMITTED: its snapshot is taken
//!    when this statement starts, after 1 and 2);
//! 4. commit (the locks go).
//!
//! and writes each document with `version = v` (`version_type=external`). Two reads of the
//! same document are serialized by the lock, so the one with the larger `v` took its snapshot
//! later and saw every commit the other saw. The index keeps the largest version, hence the
//! newest snapshot; a write of an older read arriving late is refused with 409.
//!
//! Every committed change is followed by a read that starts after its commit: a job is only
//! claimed once its transaction committed, and the fan-out reads the documents of a related
//! row after the related row's change committed (a document that joins or leaves the related
//! row later has a change of its own). So the last read of every document sees every change,
//! and the index converges to the joined view of the committed rows. A redelivery is one more
//! fresh read, never an old state. `v` comes from the same sequence as job ids, so versions of
//! documents written before the event type was joined stay below the new ones.

mod document;
mod fanout;
mod page;
mod read;
mod sql;
mod status;

pub use document::{DocumentPreview, Verdict};
pub(crate) use fanout::{DEFAULT_FANOUT_PAGE, FanOut};
pub(crate) use read::{Read, read_joined};
pub(crate) use status::FanOutStatus;
