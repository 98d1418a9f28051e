-- Joined documents (relations of an event type, see the README's "Relations").
--
-- A relation's table (the seller's `users`, a listing's `listing_images`) gets the same
-- trigger function with two more options, and records one job per change under the name
-- `<event type table>#<relation>` instead of its own table's name. Those jobs are never
-- published: a bridge's fan-out reads them and writes one REBUILD job per document that
-- contains the changed row. A REBUILD job carries no row (`change_data` is `{}`): the
-- consumer reads the document's rows from the database when it indexes it.
ALTER TABLE elasticsearch_sync_queue DROP CONSTRAINT elasticsearch_sync_queue_operation_check;
ALTER TABLE elasticsearch_sync_queue ADD CONSTRAINT elasticsearch_sync_queue_operation_check
    CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REBUILD')) NOT VALID;

-- The fan-out skips a document that has a REBUILD job waiting to be claimed: that job is
-- claimed, and its document read, after the change that would have asked for another one.
CREATE INDEX elasticsearch_sync_queue_rebuild_idx
    ON elasticsearch_sync_queue (table_name, record_id)
    WHERE status = 'pending' AND operation = 'REBUILD';

-- add_to_sync_queue(): records every change of a table as a job and wakes listeners.
--
-- `benalsam-bridge migrate` attaches it to every configured table:
--   AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW   (the changes)
--   AFTER TRUNCATE ... FOR EACH STATEMENT                (a truncation empties the index)
-- Options are trigger arguments of the form name=value:
--   key=<column>             column that identifies the row (default id)
--   ignore=<col>[,<col>...]  columns whose changes alone enqueue nothing (view counters)
--   channel=<name>           NOTIFY channel (default benalsam_sync_queue)
--   notify=off               no NOTIFY (write-heavy tables; the bridge then polls)
--   notify=always            NOTIFY at every change, even while a bridge is busy
--   (any other notify= value is the default: adaptive)
--   only=<col>[,<col>...]    the columns that matter, all others ignored; the job's row holds
--                            these columns only (a relation takes a few columns of a table)
--   as=<name>                the table name the jobs are recorded under (a relation's jobs
--                            are `<event type table>#<relation>`)
--
-- The NOTIFY carries no data: the job row is the truth and the notification only a
-- wake-up. Its payload is constant, so PostgreSQL folds the notifications of one
-- transaction into one. Every committing NOTIFY takes a lock shared by the whole cluster,
-- which is why a write-heavy table may turn it off.
--
-- Adaptive NOTIFY (the default): the NOTIFY is skipped while benalsam_listeners has a live
-- row of a bridge that claims this table: that bridge is draining and claims again without
-- being told. It marks itself idle (deletes its row) when a claim comes back short, then
-- claims once more before it waits; a writer that read "busy" just before that flip and
-- commits just after that last claim is found by the next notifying writer or by the
-- bridge's poll, at most one poll interval later. clock_timestamp(), not now(): a long
-- transaction must not take a row that expired after it began for a live one.
--
-- An UPDATE that changes the key is two jobs: a DELETE of the old key, an INSERT of the
-- new one, so the old key's document leaves the index.
--
-- SET search_path FROM CURRENT pins the queue table to the schema this migration ran in,
-- whatever search_path the writing application uses; current_schema() is that schema, so a
-- table there is named bare and any other schema-qualified.
CREATE OR REPLACE FUNCTION add_to_sync_queue() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    opt         text;
    opt_name    text;
    key_column  text := 'id';
    ignored     text[] := '{}';
    taken       text[];
    record_as   text;
    channel     text := 'benalsam_sync_queue';
    notify      text := 'on';
    tbl         text;
    old_row     jsonb;
    new_row     jsonb;
    old_key     text;
    new_key     text;
    parent      text;
    trace       text;
    truncated   bigint;
BEGIN
    IF TG_NARGS > 0 THEN
        FOREACH opt IN ARRAY TG_ARGV LOOP
            opt_name := split_part(opt, '=', 1);
            CASE opt_name
                WHEN 'key' THEN key_column := substr(opt, length(opt_name) + 2);
                WHEN 'ignore' THEN ignored := string_to_array(substr(opt, length(opt_name) + 2), ',');
                WHEN 'channel' THEN channel := substr(opt, length(opt_name) + 2);
                WHEN 'notify' THEN notify := substr(opt, length(opt_name) + 2);
                WHEN 'only' THEN taken := string_to_array(substr(opt, length(opt_name) + 2), ',');
                WHEN 'as' THEN record_as := substr(opt, length(opt_name) + 2);
                ELSE RAISE EXCEPTION 'add_to_sync_queue on %: unknown option "%" (known: key, ignore, channel, notify, only, as)',
                                     TG_TABLE_NAME, opt;
            END CASE;
        END LOOP;
    END IF;

    tbl := CASE WHEN TG_TABLE_SCHEMA = current_schema() THEN TG_TABLE_NAME
                ELSE TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME END;
    tbl := coalesce(record_as, tbl);

    -- The writer's trace context, when it set one with
    -- SET LOCAL benalsam.traceparent = '00-<trace id>-<span id>-<flags>'.
    -- A malformed value is ignored rather than failing the application's write.
    parent := current_setting('benalsam.traceparent', true);
    IF parent IS NOT NULL AND parent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' THEN
        parent := NULL;
    END IF;
    trace := substr(parent, 4, 32);

    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data, trace_id, traceparent)
        VALUES (tbl, 'TRUNCATE', '*', '{}', trace, parent)
        RETURNING id INTO truncated;
        INSERT INTO benalsam_truncations (table_name, job_id) VALUES (tbl, truncated)
        ON CONFLICT (table_name) DO UPDATE SET job_id = greatest(benalsam_truncations.job_id, EXCLUDED.job_id);
    ELSIF TG_OP = 'INSERT' THEN
        new_row := to_jsonb(NEW);
        new_key := new_row ->> key_column;
        IF taken IS NOT NULL THEN
            new_row := (SELECT jsonb_object_agg(c, new_row -> c) FROM unnest(taken || key_column) c);
        END IF;
        IF new_key IS NULL THEN
            RAISE EXCEPTION 'add_to_sync_queue on %: key column "%" is missing or NULL', TG_TABLE_NAME, key_column;
        END IF;
        INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data, trace_id, traceparent)
        VALUES (tbl, 'INSERT', new_key, new_row, trace, parent);
    ELSIF TG_OP = 'UPDATE' THEN
        old_row := to_jsonb(OLD);
        new_row := to_jsonb(NEW);
        IF taken IS NOT NULL THEN
            old_row := (SELECT jsonb_object_agg(c, old_row -> c) FROM unnest(taken || key_column) c);
            new_row := (SELECT jsonb_object_agg(c, new_row -> c) FROM unnest(taken || key_column) c);
        END IF;
        -- No-op updates and updates of ignored columns only are not changes for search.
        IF (old_row - ignored) = (new_row - ignored) THEN
            RETURN NULL;
        END IF;
        old_key := old_row ->> key_column;
        new_key := new_row ->> key_column;
        IF new_key IS NULL OR old_key IS NULL THEN
            RAISE EXCEPTION 'add_to_sync_queue on %: key column "%" is missing or NULL', TG_TABLE_NAME, key_column;
        END IF;
        IF old_key = new_key THEN
            INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data, trace_id, traceparent)
            VALUES (tbl, 'UPDATE', new_key, jsonb_build_object('old', old_row, 'new', new_row), trace, parent);
        ELSE
            INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data, trace_id, traceparent)
            VALUES (tbl, 'DELETE', old_key, old_row, trace, parent),
                   (tbl, 'INSERT', new_key, new_row, trace, parent);
        END IF;
    ELSE
        old_row := to_jsonb(OLD);
        old_key := old_row ->> key_column;
        IF taken IS NOT NULL THEN
            old_row := (SELECT jsonb_object_agg(c, old_row -> c) FROM unnest(taken || key_column) c);
        END IF;
        IF old_key IS NULL THEN
            RAISE EXCEPTION 'add_to_sync_queue on %: key column "%" is missing or NULL', TG_TABLE_NAME, key_column;
        END IF;
        INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data, trace_id, traceparent)
        VALUES (tbl, 'DELETE', old_key, old_row, trace, parent);
    END IF;

    IF notify = 'always'
       OR (notify <> 'off'
           AND NOT EXISTS (SELECT 1 FROM benalsam_listeners l
                           WHERE l.busy_until > clock_timestamp()
                             AND (l.tables IS NULL OR tbl = ANY (l.tables)))) THEN
        PERFORM pg_notify(channel, '');
    END IF;
    RETURN NULL;
END
$$;
