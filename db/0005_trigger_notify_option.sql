-- add_to_sync_queue() gains the option notify=off.
--
-- Every transaction that sends a NOTIFY takes a lock shared by the whole cluster at commit;
-- with many small concurrent write transactions that lock is the trigger's main cost (the
-- pipeline benchmark measured inserts at about half the speed of the same table without the
-- trigger). A write-heavy table can turn NOTIFY off and run the bridge in poll-only mode with
-- a short poll interval (BENALSAM_POLL_ONLY, BENALSAM_POLL_INTERVAL=100ms):
--
--   CREATE TRIGGER … EXECUTE FUNCTION add_to_sync_queue('ignore=view_count', 'notify=off');
--
-- search_path FROM CURRENT keeps the function writing to the schema this migration runs in.
CREATE OR REPLACE FUNCTION add_to_sync_queue() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    opt         text;
    opt_name    text;
    key_column  text := 'id';
    ignored     text[] := '{}';
    channel     text := 'benalsam_sync_queue';
    notify      boolean := true;
    old_row     jsonb;
    new_row     jsonb;
    data        jsonb;
    rec_id      text;
    parent      text;
BEGIN
    IF TG_NARGS > 0 THEN
        FOREACH opt IN ARRAY TG_ARGV LOOP
            opt_name := split_part(opt, '=', 1);
            CASE opt_name
                WHEN 'key' THEN key_column := substr(opt, length(opt_name) + 2);
                WHEN 'ignore' THEN ignored := string_to_array(substr(opt, length(opt_name) + 2), ',');
                WHEN 'channel' THEN channel := substr(opt, length(opt_name) + 2);
                WHEN 'notify' THEN notify := substr(opt, length(opt_name) + 2) <> 'off';
                ELSE RAISE EXCEPTION 'add_to_sync_queue on %: unknown option "%" (known: key, ignore, channel, notify)',
                                     TG_TABLE_NAME, opt;
            END CASE;
        END LOOP;
    END IF;

    IF TG_OP = 'INSERT' THEN
        new_row := to_jsonb(NEW);
        data := new_row;
        rec_id := new_row ->> key_column;
    ELSIF TG_OP = 'UPDATE' THEN
        old_row := to_jsonb(OLD);
        new_row := to_jsonb(NEW);
        -- No-op updates and updates of ignored columns only are not changes for search.
        IF (old_row - ignored) = (new_row - ignored) THEN
            RETURN NULL;
        END IF;
        data := jsonb_build_object('old', old_row, 'new', new_row);
        rec_id := new_row ->> key_column;
    ELSE
        old_row := to_jsonb(OLD);
        data := old_row;
        rec_id := old_row ->> key_column;
    END IF;

    IF rec_id IS NULL THEN
        RAISE EXCEPTION 'add_to_sync_queue on %: key column "%" is missing or NULL', TG_TABLE_NAME, key_column;
    END IF;

    -- The writer's trace context, when it set one with
    -- SET LOCAL benalsam.traceparent = '00-<trace id>-<span id>-<flags>'.
    -- A malformed value is ignored rather than failing the application's write.
    parent := current_setting('benalsam.traceparent', true);
    IF parent IS NOT NULL AND parent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' THEN
        parent := NULL;
    END IF;

    INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data, trace_id, traceparent)
    VALUES (TG_TABLE_NAME, TG_OP, rec_id, data, substr(parent, 4, 32), parent);

    IF notify THEN
        PERFORM pg_notify(channel, '');
    END IF;
    RETURN NULL;
END
$$;

