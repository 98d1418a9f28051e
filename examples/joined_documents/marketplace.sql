-- The rows a listing's search document is joined from (example schema, beside
-- examples/sql/listings.sql): its seller, its category's localized name, its photos.
-- `benalsam-bridge migrate --config examples/joined_documents/listings.toml` attaches a
-- relation trigger to each of these tables.
CREATE TABLE IF NOT EXISTS users (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    display_name text NOT NULL,
    rating       numeric(2, 1) CHECK (rating BETWEEN 0 AND 5),
    -- Not in any document: a change of these alone enqueues nothing.
    email        text,
    last_seen_at timestamptz
);

CREATE TABLE IF NOT EXISTS categories (
    slug    text PRIMARY KEY,
    name_tr text NOT NULL,
    name_en text NOT NULL
);

CREATE TABLE IF NOT EXISTS listing_images (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    listing_id uuid NOT NULL,
    url        text NOT NULL,
    position   integer NOT NULL DEFAULT 0
);

-- The fan-out finds a seller's listings through listings_user_id_idx and a category's
-- through this one; a document's photos through the last.
CREATE INDEX IF NOT EXISTS listings_category_idx ON listings (category);
CREATE INDEX IF NOT EXISTS listing_images_listing_idx ON listing_images (listing_id, position);
