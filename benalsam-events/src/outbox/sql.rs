//! The outbox's statements for one schema, written once and prepared per connection.

use tokio_postgres::{Client, Statement};

use crate::outbox::state::Move;
use crate::{error::Error, error::Result};

macro_rules! statements {
    ($($name:ident: $what:literal),* $(,)?) => {
        /// The SQL of one schema. Table names cannot be parameters, so the (validated) schema
        /// is written into the text once, here.
        #[derive(Debug)]
        pub(super) struct Sql { $(pub(super) $name: String),* }

        #[derive(Debug)]
        pub(super) struct Statements { $(pub(super) $name: Statement),* }

        impl Sql {
            pub(super) async fn prepare(&self, client: &Client) -> Result<Statements> {
                Ok(Statements {
                    $($name: client.prepare(&self.$name).await.map_err(|e| {
                        Error::postgres(concat!("preparing the ", $what, " statement"), e)
                    })?),*
                })
            }
        }
    };
}

statements! {
    claim: "claim",
    claim_tables: "claim by table",
    verify: "verify",
    truncate_pending: "truncation",
    reclaim_expired: "reclaim",
    release: "release",
    sent: "sent",
    still_processing: "still processing",
    sent_one: "sent, one job",
    completed: "completed",
    publish_failed: "publish failed",
    dead_lettered: "dead lettered",
    backlog: "backlog",
    pending_by_table: "pending by table",
    purge_completed: "purge",
    purgeable: "count purgeable",
    resend_stale: "resend",
}

impl Sql {
    /// Every statement of the outbox in `schema` (SQL text).
    pub(super) fn for_schema(schema: &str) -> Self {
        let q = format!("\"{schema}\".elasticsearch_sync_queue");
        let truncations = format!("\"{schema}\".benalsam_truncations");
        // A failed job: backoff is initial × 2^(failures so far), capped, times a jitter in
        // [0.5, 1), while attempts remain and the failure is retryable.
        let fail = |action: Move| {
            format!(
                "UPDATE {q} q
                 SET status = '{}',
                     error_message = f.error,
                     retry_count = q.retry_count + 1,
                     processed_at = now(),
                     locked_until = NULL,
                     locked_by = NULL,
                     next_attempt_at = CASE
                         WHEN f.retry AND q.retry_count + 1 < $4 THEN now() + make_interval(secs =>
                             least($6::float8, $5::float8 * power(2, least(q.retry_count, 40)))
                             * (0.5 + random() * 0.5))
                     END
                 FROM unnest($1::bigint[], $2::text[], $3::bool[]) AS f(id, error, retry)
                 WHERE q.id = f.id AND {}
                 RETURNING q.id",
                action.to().as_str(),
                action.guard(Some("$7"))
            )
        };
        let (due, fresh) = (Move::ClaimRetry.guard(None), Move::Claim.guard(None));
        // The oldest pending jobs of table `t.name`, locked. A range over the one name and
        // the order (table_name, id) leave the planner one way to read them in order: the
        // pending index. With `table_name = t.name ORDER BY id` it may walk the primary key
        // instead, filtering out every completed job older than the first pending one (it
        // takes pending jobs to be spread evenly over the ids): half a second a claim on a
        // queue of a million completed jobs (benches/claim.rs), once the fillfactor of
        // migration 0005 had made the heap larger and the pending index look dearer.
        let oldest_pending = format!(
            "SELECT id FROM {q} q
             WHERE q.table_name >= t.name AND q.table_name <= t.name AND {fresh}
             ORDER BY q.table_name, q.id LIMIT $1 FOR UPDATE SKIP LOCKED"
        );
        Sql {
            // Due retries first, then pending jobs oldest first. SKIP LOCKED lets any number
            // of claimers run at once without waiting on or double-claiming each other.
            claim: claim(
                &q,
                &format!(
                    "SELECT id, true AS retry FROM {q} q
                     WHERE {due} AND next_attempt_at <= now()
                     ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED"
                ),
                // Per table on the (table_name, id) index, as below, over the tables that
                // have pending jobs: found by skipping through that index (a loose index
                // scan), so no index on id alone is needed for this claim.
                &format!(
                    "SELECT c.id, false AS retry
                     FROM (WITH RECURSIVE t(name) AS (
                               (SELECT table_name FROM {q} WHERE status = 'pending'
                                ORDER BY table_name LIMIT 1)
                               UNION ALL
                               SELECT (SELECT table_name FROM {q}
                                       WHERE status = 'pending' AND table_name > t.name
                                       ORDER BY table_name LIMIT 1)
                               FROM t WHERE t.name IS NOT NULL)
                           SELECT name FROM t WHERE name IS NOT NULL) AS t
                     CROSS JOIN LATERAL ({oldest_pending}) c
                     ORDER BY c.id LIMIT $1"
                ),
            ),
            // The same, for the tables of a bridge: per table, on the (table_name, id) index,
            // so the jobs of tables it does not route are never even read.
            claim_tables: claim(
                &q,
                &format!(
                    "SELECT c.id, true AS retry
                     FROM unnest($4::text[]) AS t(name) CROSS JOIN LATERAL (
                         SELECT id, next_attempt_at FROM {q} q
                         WHERE q.table_name = t.name AND {due} AND next_attempt_at <= now()
                         ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) c
                     ORDER BY c.next_attempt_at LIMIT $1"
                ),
                &format!(
                    "SELECT c.id, false AS retry
                     FROM unnest($4::text[]) AS t(name)
                     CROSS JOIN LATERAL ({oldest_pending}) c
                     ORDER BY c.id LIMIT $1"
                ),
            ),
            // Each delivered job as the outbox has it, and whether a later TRUNCATE of its
            // table supersedes it. One row per id asked, found or not.
            verify: format!(
                // The row comes with the check (one query per batch): the consumer builds
                // the document from it, so a message's own copy never reaches the index.
                // Only jobs that expect a delivery need it; duplicates cost no row.
                "SELECT c.id, q.table_name, q.operation, q.record_id, q.status,
                        EXISTS (SELECT 1 FROM {truncations} t
                                WHERE t.table_name = q.table_name AND t.job_id > q.id),
                        CASE WHEN q.status IN ('processing', 'sent', 'failed')
                             THEN q.change_data END,
                        q.created_at, q.traceparent
                 FROM unnest($1::bigint[]) AS c(id) LEFT JOIN {q} q ON q.id = c.id"
            ),
            truncate_pending: format!(
                "SELECT count(*) FROM {q}
                 WHERE table_name = $1 AND id < $2 AND status IN ('processing', 'sent')"
            ),
            pending_by_table: format!(
                "SELECT table_name, count(*) FROM {q} WHERE status = 'pending'
                 GROUP BY table_name ORDER BY table_name"
            ),
            reclaim_expired: format!(
                "UPDATE {q} q SET status = '{}', locked_until = NULL, locked_by = NULL
                 WHERE q.id IN (SELECT id FROM {q}
                                WHERE status = 'processing' AND locked_until < now()
                                LIMIT $1 FOR UPDATE SKIP LOCKED)
                   AND {}
                 RETURNING q.id",
                Move::Reclaim.to().as_str(),
                Move::Reclaim.guard(None)
            ),
            release: format!(
                "UPDATE {q} q SET status = '{}', locked_until = NULL, locked_by = NULL
                 WHERE q.id = ANY($1) AND {}
                 RETURNING q.id",
                Move::Release.to().as_str(),
                Move::Release.guard(Some("$2"))
            ),
            // A row another transaction holds is skipped, not waited for: mostly a consumer
            // completing the job (after which `sent` no longer applies), and waiting for
            // each of those would stall the publisher behind a consumer that keeps up with
            // it. The jobs skipped that are still this bridge's are marked one by one after
            // (see `sent_after_wait`).
            sent: format!(
                "UPDATE {q} q SET status = '{}', sent_at = now(), locked_until = NULL,
                                  locked_by = NULL, next_attempt_at = NULL
                 FROM (SELECT id FROM {q} q WHERE q.id = ANY($1) AND {}
                       FOR UPDATE SKIP LOCKED) held
                 WHERE q.id = held.id
                 RETURNING q.id",
                Move::Sent.to().as_str(),
                Move::Sent.guard(Some("$2"))
            ),
            // Jobs of this bridge still processing (read without locks), and one of them
            // marked sent, waiting for its lock: the second pass of `sent` above.
            still_processing: format!(
                "SELECT q.id FROM {q} q WHERE q.id = ANY($1) AND {}",
                Move::Sent.guard(Some("$2"))
            ),
            sent_one: format!(
                "UPDATE {q} q SET status = '{}', sent_at = now(), locked_until = NULL,
                                  locked_by = NULL, next_attempt_at = NULL
                 WHERE q.id = $1 AND {}
                 RETURNING q.id",
                Move::Sent.to().as_str(),
                Move::Sent.guard(Some("$2"))
            ),
            // The payload goes with the mark: nothing reads a completed job's change_data
            // again (completed is final: a delivery of it is a duplicate, whose document is
            // not built). The row that waits for the purge shrinks
            // from the payload's size to ~0.2 KB, and with it the page images that the purge
            // writes after a checkpoint, the biggest part of a job's WAL once the marks
            // stay on their page (benches/wal.rs).
            completed: format!(
                "UPDATE {q} q SET status = '{}', completed_at = now(), processed_at = now(),
                                  change_data = '{{}}', locked_until = NULL, locked_by = NULL,
                                  next_attempt_at = NULL
                 WHERE q.id = ANY($1) AND {}
                 RETURNING q.id",
                Move::Completed.to().as_str(),
                Move::Completed.guard(None)
            ),
            publish_failed: fail(Move::PublishFailed),
            dead_lettered: fail(Move::DeadLettered),
            // Pending work counts the outbox's own tables only ($1, all when NULL): jobs
            // nobody here routes are not work this bridge should move.
            backlog: format!(
                "SELECT (SELECT count(*) FROM {q}
                         WHERE status = 'pending' AND ($1::text[] IS NULL OR table_name = ANY($1))),
                        (SELECT extract(epoch FROM now() - min(created_at))::float8
                         FROM {q}
                         WHERE status = 'pending' AND ($1::text[] IS NULL OR table_name = ANY($1))),
                        (SELECT count(*) FROM {q}
                         WHERE status = 'failed' AND next_attempt_at IS NOT NULL),
                        (SELECT count(*) FROM {q} WHERE status = 'processing'),
                        (SELECT count(*) FROM {q} WHERE status = 'sent'),
                        (SELECT extract(epoch FROM now() - min(sent_at))::float8
                         FROM {q} WHERE status = 'sent')"
            ),
            purgeable: format!(
                "SELECT count(*) FROM {q}
                 WHERE status = 'completed' AND completed_at < now() - make_interval(secs => $1)"
            ),
            purge_completed: format!(
                "DELETE FROM {q} WHERE id IN (
                     SELECT id FROM {q}
                     WHERE status = 'completed' AND completed_at < now() - make_interval(secs => $1)
                     LIMIT $2)"
            ),
            // Back to pending, so the job stream publishes them again (same messageId).
            resend_stale: format!(
                "UPDATE {q} q SET status = '{}', sent_at = NULL
                 WHERE q.id IN (SELECT id FROM {q}
                                WHERE status = 'sent' AND sent_at < now() - make_interval(secs => $1)
                                ORDER BY sent_at LIMIT $2 FOR UPDATE SKIP LOCKED)
                   AND {}
                 RETURNING q.id",
                Move::Resend.to().as_str(),
                Move::Resend.guard(None)
            ),
        }
    }
}

/// The claim statement: `due` (retries whose backoff is over) and `fresh` (pending jobs)
/// select `(id, retry)` rows under `FOR UPDATE SKIP LOCKED`, at most `$1` in all; the picked
/// jobs become `processing` under a lease of `$2` seconds held by `$3`.
fn claim(q: &str, due: &str, fresh: &str) -> String {
    format!(
        "WITH due AS ({due}), fresh AS ({fresh}), picked AS (
             SELECT id, retry FROM due UNION ALL SELECT id, retry FROM fresh LIMIT $1
         )
         UPDATE {q} q
         SET status = '{processing}',
             locked_until = now() + make_interval(secs => $2),
             locked_by = $3,
             last_retry_at = CASE WHEN picked.retry THEN now() ELSE q.last_retry_at END
         FROM picked WHERE q.id = picked.id
         RETURNING q.id, q.table_name, q.operation, q.record_id, q.change_data,
                   q.retry_count, q.created_at, q.traceparent, picked.retry",
        processing = Move::Claim.to().as_str(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_settled_move_is_guarded() {
        let sql = Sql::for_schema("s");
        assert!(
            sql.sent
                .contains("q.status IN ('processing') AND q.locked_by = $2")
        );
        assert!(
            sql.publish_failed
                .contains("q.status IN ('processing') AND q.locked_by = $7")
        );
        assert!(
            sql.dead_lettered
                .contains("q.status IN ('processing', 'sent', 'failed')")
        );
        assert!(!sql.completed.contains("'completed')"));
    }
}
