-- A job board whose search documents use every shape of relation (jobs.toml): a post with
-- its company, the company's industry and the industry's sector (relations of relations,
-- three levels), its tags through post_tags (many-to-many), and its open applications
-- counted (an aggregate over children). `benalsam-bridge migrate --config
-- examples/joined_documents/jobs.toml` attaches a trigger to each of these tables.
CREATE TABLE IF NOT EXISTS sectors (
    id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL
);

CREATE TABLE IF NOT EXISTS industries (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name      text NOT NULL,
    sector_id bigint REFERENCES sectors (id)
);

CREATE TABLE IF NOT EXISTS companies (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text NOT NULL,
    industry_id   bigint REFERENCES industries (id),
    -- Not in any document: a change of it alone enqueues nothing.
    billing_email text
);

CREATE TABLE IF NOT EXISTS job_posts (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    company_id bigint REFERENCES companies (id),
    title      text NOT NULL,
    status     text NOT NULL DEFAULT 'open',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS tags (
    id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL
);

-- The join table: one row per link, no key of its own (its jobs are keyed by tag_id).
CREATE TABLE IF NOT EXISTS post_tags (
    post_id  bigint NOT NULL REFERENCES job_posts (id) ON DELETE CASCADE,
    tag_id   bigint NOT NULL REFERENCES tags (id) ON DELETE CASCADE,
    position integer NOT NULL DEFAULT 0,
    PRIMARY KEY (post_id, tag_id)
);

CREATE TABLE IF NOT EXISTS applications (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    post_id    bigint NOT NULL REFERENCES job_posts (id) ON DELETE CASCADE,
    status     text NOT NULL DEFAULT 'open',
    -- Not in any document.
    cover_note text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The fan-out joins back along each path: a sector's posts through its industries and
-- their companies, a tag's posts through post_tags; the read goes the other way, through
-- the keys. Index every column a path joins on.
CREATE INDEX IF NOT EXISTS job_posts_company_idx ON job_posts (company_id);
CREATE INDEX IF NOT EXISTS companies_industry_idx ON companies (industry_id);
CREATE INDEX IF NOT EXISTS industries_sector_idx ON industries (sector_id);
CREATE INDEX IF NOT EXISTS post_tags_tag_idx ON post_tags (tag_id);
CREATE INDEX IF NOT EXISTS applications_post_idx ON applications (post_id, status);
