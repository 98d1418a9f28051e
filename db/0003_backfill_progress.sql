-- Progress of backfills: enqueueing a job for every existing row of a table, in key order,
-- so a database that existed before the trigger gets indexed. One row per table; a backfill
-- that was interrupted continues after last_key.
CREATE TABLE benalsam_backfill (
    table_name  text PRIMARY KEY,
    key_column  text NOT NULL,
    last_key    text,
    rows_queued bigint NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
