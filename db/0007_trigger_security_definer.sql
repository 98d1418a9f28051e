-- The outbox is written by the trigger only.
--
-- Until now add_to_sync_queue() ran as the role of the writing application, so every role
-- that wrote one synced table needed INSERT on the job table, and with it could insert a job
-- of any table (an invented listing, indexed as if the application had written it). From
-- this migration on the function is SECURITY DEFINER: it runs as its owner, the role that ran
-- `migrate` (the outbox's owner), and application roles need no privilege on the outbox's
-- tables at all. What a writer can cause is what the trigger records: the rows it writes,
-- under its table's name.
--
-- A SECURITY DEFINER function must not be steered by the caller's session:
--   * search_path is fixed to pg_catalog, the outbox's schema, pg_temp (pg_temp last, so a
--     temporary table of the writer can never stand in for the job table, and pg_catalog
--     first, so no function or operator of another schema can stand in for a built-in);
--     the outbox's schema is written into the function when this migration runs, hence the
--     EXECUTE of the text below with it filled in;
--   * EXECUTE is revoked from PUBLIC: creating a trigger needs EXECUTE on its function, so no
--     other role can attach it to a table of its own with options of its choosing (as=listings
--     would record that table's rows as listings). Triggers attached by `migrate` keep firing:
--     PostgreSQL checks the privilege when a trigger is created, not when it fires.
-- The body is migration 6's but for the outbox's schema: a table in it is named bare, any
-- other schema-qualified, as before.
DO $migration$
BEGIN
    EXECUTE replace(replace($function$
CREATE OR REPLACE FUNCTION add_to_sync_queue() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, __OUTBOX_SCHEMA_IDENT__, pg_temp
AS $$
DECLARE
    -- The outbox's schema, fixed when migration 7 ran (current_schema() in here would be
    -- pg_catalog, the first entry of the function's search_path).
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

    tbl := CASE WHEN TG_TABLE_SCHEMA = outbox THEN TG_TABLE_NAME
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
$$
$function$, '__OUTBOX_SCHEMA_IDENT__', quote_ident(current_schema())),
            '__OUTBOX_SCHEMA_LITERAL__', quote_literal(current_schema()));
END
$migration$;

REVOKE ALL ON FUNCTION add_to_sync_queue() FROM PUBLIC;
