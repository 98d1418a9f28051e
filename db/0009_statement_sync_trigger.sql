-- The sync trigger per statement: one INSERT ... SELECT of a statement's job rows and at
-- most one NOTIFY per statement, instead of a trigger call, a job insert and a NOTIFY check
-- per row (issue 29; BENCHMARKS.md "Writers"). `migrate` attaches it to an event type's own
-- table as THREE triggers, PostgreSQL refusing transition tables on a trigger with more than
-- one event:
--   benalsam_sync_insert  AFTER INSERT  REFERENCING NEW TABLE AS new_rows
--   benalsam_sync_update  AFTER UPDATE  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
--   benalsam_sync_delete  AFTER DELETE  REFERENCING OLD TABLE AS old_rows
-- (each `:<jobs_as>` for an event type with its own job name), FOR EACH STATEMENT, beside the
-- TRUNCATE trigger of add_to_sync_queue(), and drops the row trigger benalsam_sync_queue in the
-- same transaction. Partitioned tables and inheritance parents or children keep the row
-- trigger: a statement trigger fires only for statements that name its table, and is not
-- cloned to partitions. Relation triggers stay per row (their `only=` rows are few columns
-- of small tables; their cost is the fan-out's).
--
-- It writes the job rows add_to_sync_queue() (migration 7) writes, with the same options
-- (key, ignore, channel, notify, only, as):
--   INSERT  one INSERT job per row, change_data = the row;
--   UPDATE  one UPDATE job per row whose columns (less the ignored ones; only the `only`
--           ones when given) changed, change_data = {old, new}; no-op updates enqueue nothing;
--   DELETE  one DELETE job per row, change_data = the old row;
-- and NOTIFYs once, only when it enqueued something, adaptive as in migration 4 (skipped
-- while a bridge that claims the table is busy). A statement that changes no row (the UPDATE
-- half of an INSERT ... ON CONFLICT DO UPDATE that updated nothing) enqueues and wakes nothing.
--
-- What differs from the row trigger, and why: a statement-level trigger sees the statement's
-- old and new rows as two unordered sets, with nothing that says which new row was which old
-- row. Rows are paired by key. An UPDATE that changes a key leaves an old row without a new one
-- under its key (a DELETE job of the old key) and a new row without an old one (an INSERT job of
-- the new key): the row trigger's DELETE + INSERT pair. Only when one statement moves a row
-- onto a key another row of the same statement leaves (swapping keys, possible with a
-- deferrable unique key) do the jobs differ: the key that stays gets one UPDATE job from its old
-- to its new row instead of a DELETE and an INSERT, which leaves the index as the table is (the
-- row trigger's pair can leave it wrong, depending on the order the rows were updated in). Job
-- ids within one statement follow the SELECT's order instead of the order rows were changed in;
-- a statement changes each row at most once, so the ids of one record's changes still increase.
--
-- SECURITY DEFINER with a fixed search_path and EXECUTE revoked from PUBLIC, for migration 7's
-- reasons.
DO $migration$
BEGIN
    EXECUTE replace(replace($function$
CREATE OR REPLACE FUNCTION benalsam_missing_key(tbl text, key_column text) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    RAISE EXCEPTION 'add_to_sync_queue on %: key column "%" is missing or NULL', tbl, key_column;
END
$$;

CREATE OR REPLACE FUNCTION add_to_sync_queue_statement() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, __OUTBOX_SCHEMA_IDENT__, pg_temp
AS $$
DECLARE
    outbox      constant text := __OUTBOX_SCHEMA_LITERAL__;
    opt         text;
    opt_name    text;
    key_column  text := 'id';
    ignored     text[] := '{}';
    taken       text[];
    record_as   text;
    channel     text := 'benalsam_sync_queue';
    notify      text := 'on';
    tbl         text;
    parent      text;
    trace       text;
    enqueued    bigint := 0;
BEGIN
    IF TG_LEVEL <> 'STATEMENT' OR TG_OP NOT IN ('INSERT', 'UPDATE', 'DELETE') THEN
        RAISE EXCEPTION 'add_to_sync_queue_statement on %: attach it FOR EACH STATEMENT to INSERT, UPDATE or DELETE with transition tables new_rows/old_rows', TG_TABLE_NAME;
    END IF;
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

    tbl := CASE WHEN TG_TABLE_SCHEMA = outbox THEN TG_TABLE_NAME
                ELSE TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME END;
    tbl := coalesce(record_as, tbl);

    parent := current_setting('benalsam.traceparent', true);
    IF parent IS NOT NULL AND parent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' THEN
        parent := NULL;
    END IF;
    trace := substr(parent, 4, 32);

    -- `only=`: the row is those columns and the key, built as the row function builds it.
    -- Every statement below is static, so its plan is cached for the session: EXECUTE would
    -- plan it again at every statement, which a single-row transaction pays in full.
    IF taken IS NOT NULL THEN
        taken := taken || key_column;
    END IF;

    -- new_rows exists for an INSERT only, old_rows for a DELETE only: each branch names its own.
    IF TG_OP = 'INSERT' THEN
        INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data, trace_id, traceparent)
        SELECT tbl, 'INSERT', coalesce(n.j ->> key_column, benalsam_missing_key(TG_TABLE_NAME, key_column)),
               n.j, trace, parent
          FROM (SELECT CASE WHEN taken IS NULL THEN to_jsonb(r)
                            ELSE (SELECT jsonb_object_agg(c, to_jsonb(r) -> c) FROM unnest(taken) c) END AS j
                  FROM new_rows r) n;
        GET DIAGNOSTICS enqueued = ROW_COUNT;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data, trace_id, traceparent)
        SELECT tbl, 'DELETE', coalesce(o.j ->> key_column, benalsam_missing_key(TG_TABLE_NAME, key_column)),
               o.j, trace, parent
          FROM (SELECT CASE WHEN taken IS NULL THEN to_jsonb(r)
                            ELSE (SELECT jsonb_object_agg(c, to_jsonb(r) -> c) FROM unnest(taken) c) END AS j
                  FROM old_rows r) o;
        GET DIAGNOSTICS enqueued = ROW_COUNT;
    ELSE
        -- Old and new rows paired by key (see the header): a pair whose rows differ beyond
        -- the ignored columns is an UPDATE; an old key with no new row a DELETE, a new key
        -- with no old row an INSERT (the key moved). The UNION ALL keeps DELETE before
        -- INSERT, as the row trigger writes them. MATERIALIZED: each row's jsonb is built
        -- once (inlined, the join computed to_jsonb again for its key and its output: 1.5 x).
        WITH o AS MATERIALIZED (
                 SELECT j, j ->> key_column AS k
                   FROM (SELECT CASE WHEN taken IS NULL THEN to_jsonb(r)
                                     ELSE (SELECT jsonb_object_agg(c, to_jsonb(r) -> c) FROM unnest(taken) c) END AS j
                           FROM old_rows r) s),
             n AS MATERIALIZED (
                 SELECT j, j ->> key_column AS k
                   FROM (SELECT CASE WHEN taken IS NULL THEN to_jsonb(r)
                                     ELSE (SELECT jsonb_object_agg(c, to_jsonb(r) -> c) FROM unnest(taken) c) END AS j
                           FROM new_rows r) s),
             p AS (SELECT CASE WHEN o.j IS NOT NULL
                               THEN coalesce(o.k, benalsam_missing_key(TG_TABLE_NAME, key_column)) END AS old_key,
                          CASE WHEN n.j IS NOT NULL
                               THEN coalesce(n.k, benalsam_missing_key(TG_TABLE_NAME, key_column)) END AS new_key,
                          o.j AS old_row, n.j AS new_row
                     FROM o FULL JOIN n ON o.k = n.k)
        INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data, trace_id, traceparent)
        SELECT tbl, c.op, c.k, c.d, trace, parent FROM (
            SELECT 1 AS ord, 'UPDATE' AS op, new_key AS k,
                   jsonb_build_object('old', old_row, 'new', new_row) AS d
              FROM p WHERE old_row IS NOT NULL AND new_row IS NOT NULL
               AND (old_row - ignored) <> (new_row - ignored)
            UNION ALL
            SELECT 2, 'DELETE', old_key, old_row FROM p WHERE new_row IS NULL
            UNION ALL
            SELECT 3, 'INSERT', new_key, new_row FROM p WHERE old_row IS NULL) c
        ORDER BY c.ord;
        GET DIAGNOSTICS enqueued = ROW_COUNT;
    END IF;

    IF enqueued > 0
       AND (notify = 'always'
            OR (notify <> 'off'
                AND NOT EXISTS (SELECT 1 FROM benalsam_listeners l
                                WHERE l.busy_until > clock_timestamp()
                                  AND (l.tables IS NULL OR tbl = ANY (l.tables))))) THEN
        PERFORM pg_notify(channel, '');
    END IF;
    RETURN NULL;
END
$$
$function$, '__OUTBOX_SCHEMA_IDENT__', quote_ident(current_schema())),
            '__OUTBOX_SCHEMA_LITERAL__', quote_literal(current_schema()));
END
$migration$;

REVOKE ALL ON FUNCTION add_to_sync_queue_statement() FROM PUBLIC;
