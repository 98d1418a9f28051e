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
//!
//! # At depth: relations of relations, links, aggregates
//!
//! The read and its versioning do not change with depth: one `SELECT` reads the document with
//! every level (a subquery per relation, nested), under the same lock and version, so the
//! argument above holds for it as it is. What depth changes is *which* documents a change
//! must reach, and there the argument needs one more step.
//!
//! A change of a row at level k (a sector, under a company's industry) records one job
//! `<table>#<path>`. Its fan-out finds the documents by joining the rows of levels 1 … k−1
//! back to the document's row (`sql.rs`, `contains`), in a statement that starts after the
//! change committed (a job is claimed only once its transaction committed). A document that
//! contains the row at that moment gets a REBUILD job, read after the commit: it sees the
//! change. A document that comes to contain the row later does so by a change of a row *on
//! the path* (a company moved to another industry, an industry to another sector, a link
//! added): every column a level joins on is one its table's trigger takes (`only=` holds the
//! columns a relation's own relations join on), so that change records a job of its own,
//! whose read or fan-out starts after *its* commit and sees both. A document that stops
//! containing it is re-read by the same job (a moved row fans out its old and its new place).
//! So whichever of two crossed commits is later, the job of the later one reads after both:
//! the tests commit a sector rename and a company's move into that sector in both orders while
//! the other is open, and a tag rename and a new link to it the same way.
//!
//! A link (a many-to-many relation's join row) is a child row whose parent relation is
//! the linked table: adding or removing it is a change of its one document; a change of the
//! linked row is a change at level 2. An aggregate is recomputed whole by every read from
//! the committed child rows (never kept as a running total), so it has nothing to drift: any
//! change of a row it takes (inserted, deleted, moved to another document, or a change of
//! the aggregated or the filter's column) is a job that re-reads the document.

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
