-- WAL capture (issue 29; docs/database.md "WAL capture"): a bridge that reads a logical
-- replication slot instead of the sync triggers records here how far it has written jobs.
-- The row is written in the same transaction as the jobs, so a capture that stops between
-- its commit and the slot's advance skips, when it starts again, every transaction that
-- ends at or before `position` instead of writing its jobs twice. `migrate` adds a row per
-- slot (the slot and a publication of the same name are created beside it), and moves the
-- position past the changes the sync triggers it drops had recorded.
CREATE TABLE benalsam_capture (
    slot       text PRIMARY KEY,
    position   pg_lsn NOT NULL DEFAULT '0/0',
    updated_at timestamptz NOT NULL DEFAULT now()
);
