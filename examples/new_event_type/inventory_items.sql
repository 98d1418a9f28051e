-- The table of the new event type: what a warehouse application already has.
-- Nothing here is about search; `benalsam-bridge migrate` attaches the trigger.
CREATE TABLE IF NOT EXISTS inventory_items (
    sku         text PRIMARY KEY,
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    quantity    integer NOT NULL DEFAULT 0,
    state       text NOT NULL DEFAULT 'stocked'
                CHECK (state IN ('stocked', 'backorder', 'discontinued')),
    warehouse   text,
    latitude    double precision,
    longitude   double precision,
    scan_count  integer NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
