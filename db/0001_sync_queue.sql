-- The outbox: one row per change, written in the application's transaction.
--
-- Columns of the original system are kept with their names and meaning so its
-- monitoring SQL works unchanged; the rest is what a leased queue needs.
--
-- table_name names the changed table as the event types do: bare when it lives in this
-- schema, schema-qualified otherwise. record_id is the key column rendered as text (uuid,
-- bigint, or any type with a text form), so tables whose keys are not uuids fit too.
CREATE TABLE elasticsearch_sync_queue (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name      text NOT NULL,
    operation       text NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')),
    record_id       text NOT NULL,
    change_data     jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'processing', 'sent', 'completed', 'failed')),
    retry_count     integer NOT NULL DEFAULT 0,
    error_message   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Set when the job reaches completed or failed.
    processed_at    timestamptz,
    last_retry_at   timestamptz,
    -- W3C trace id (32 hex digits) of the writer, and its full traceparent.
    trace_id        text,
    traceparent     text,
    -- Lease of the bridge that claimed the job; a lapsed lease makes it claimable again.
    locked_until    timestamptz,
    locked_by       text,
    -- When a failed job may be claimed again; NULL once its attempts are used up.
    next_attempt_at timestamptz,
    sent_at         timestamptz,
    completed_at    timestamptz
);

-- Claiming, reclaiming and reporting only ever look at live states through these partial
-- indexes, so they stay small and fast however many completed rows accumulate. Claims are
-- per table (a bridge claims only the tables it routes), hence (table_name, id).
CREATE INDEX elasticsearch_sync_queue_pending_idx
    ON elasticsearch_sync_queue (table_name, id) INCLUDE (created_at)
    WHERE status = 'pending';
CREATE INDEX elasticsearch_sync_queue_retry_idx
    ON elasticsearch_sync_queue (table_name, next_attempt_at)
    WHERE status = 'failed' AND next_attempt_at IS NOT NULL;
CREATE INDEX elasticsearch_sync_queue_leased_idx
    ON elasticsearch_sync_queue (locked_until)
    WHERE status = 'processing';
CREATE INDEX elasticsearch_sync_queue_sent_idx
    ON elasticsearch_sync_queue (sent_at)
    WHERE status = 'sent';
CREATE INDEX elasticsearch_sync_queue_completed_idx
    ON elasticsearch_sync_queue (completed_at)
    WHERE status = 'completed';

-- The newest TRUNCATE of each table: no change older than it may reach the index again
-- (the consumer treats a message of an older job of that table as superseded). Kept apart
-- from the queue so purging old jobs never forgets a truncation.
CREATE TABLE benalsam_truncations (
    table_name text PRIMARY KEY,
    job_id     bigint NOT NULL
);
