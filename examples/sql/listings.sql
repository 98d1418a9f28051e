-- The marketplace's listings of the Benalsam seed: what users post and what search serves.
-- Example schema, not the library's: scripts/demo and the tests create it, and
-- `benalsam-bridge migrate` attaches the sync trigger to it (the `listings` event type).
-- Statuses follow the listing life cycle of the Benalsam admin flow:
-- a draft is submitted for approval, approved listings are active, and
-- an active listing ends sold, expired, inactive or rejected.
CREATE TABLE IF NOT EXISTS listings (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id               uuid NOT NULL,
    title                 text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    description           text NOT NULL DEFAULT '',
    category              text NOT NULL,
    subcategory           text,
    condition             text CHECK (condition IN ('new', 'like_new', 'good', 'fair', 'poor')),
    budget                numeric(14, 2) CHECK (budget >= 0),
    currency              char(3) NOT NULL DEFAULT 'TRY',
    location              text,
    location_city         text,
    location_district     text,
    location_neighborhood text,
    latitude              double precision CHECK (latitude BETWEEN -90 AND 90),
    longitude             double precision CHECK (longitude BETWEEN -180 AND 180),
    urgency               text NOT NULL DEFAULT 'medium' CHECK (urgency IN ('low', 'medium', 'high')),
    status                text NOT NULL DEFAULT 'pending_approval'
                          CHECK (status IN ('draft', 'pending_approval', 'active', 'rejected',
                                            'inactive', 'sold', 'expired')),
    attributes            jsonb NOT NULL DEFAULT '{}'::jsonb,
    images                text[] NOT NULL DEFAULT '{}',
    -- Bumped on every page view; deliberately ignored by the sync trigger.
    view_count            integer NOT NULL DEFAULT 0 CHECK (view_count >= 0),
    expires_at            timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((latitude IS NULL) = (longitude IS NULL))
);

CREATE INDEX IF NOT EXISTS listings_user_id_idx ON listings (user_id);
CREATE INDEX IF NOT EXISTS listings_status_idx ON listings (status);
