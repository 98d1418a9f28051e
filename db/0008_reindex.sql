-- Reindexes under way: one row per event type whose next index version is being built
-- (`benalsam-consumer reindex --type <name>`, see docs/schema-changes.md).
--
-- While a row exists, every consumer writes each action of the table (index, delete, a
-- truncation's deletes) to new_index as well as to the alias, with the same external
-- versions, so the new index misses no live change; consumers read this table with every
-- batch, never cached. The reindex command moves `phase` along
--   created → backfilling → waiting → swapped
-- and deletes the row once the alias points at new_index (then it deletes old_index). A
-- rerun after a crash continues from the phase recorded here. first_job is the highest job
-- id when the row was made; last_job the highest once every row was enqueued: the alias moves
-- when no job of the table up to last_job is still on its way.
CREATE TABLE benalsam_reindex (
    table_name text PRIMARY KEY,
    alias      text NOT NULL,
    old_index  text NOT NULL,
    new_index  text NOT NULL,
    phase      text NOT NULL CHECK (phase IN ('created', 'backfilling', 'waiting', 'swapped')),
    first_job  bigint NOT NULL,
    last_job   bigint,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
