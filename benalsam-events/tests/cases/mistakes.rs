//! The mistakes a person makes in an event-type file, one column name at a time: shared by
//! the library's `migrate` test and the binaries' start-up test.
#![allow(dead_code)] // each test binary uses a part

use std::path::PathBuf;

use crate::support::unique_name;

/// The application's tables: companies (state, not status; views, a counter) and their job
/// posts.
pub const TABLES: &str = "
    CREATE TABLE companies (id bigint PRIMARY KEY, name text NOT NULL, state text NOT NULL,
                            views integer NOT NULL DEFAULT 0, lat double precision,
                            lon double precision);
    CREATE TABLE job_posts (id bigint PRIMARY KEY, company_id bigint NOT NULL,
                            title text NOT NULL, position integer NOT NULL DEFAULT 0);";

/// A file that works with [`TABLES`].
pub const FILE: &str = r#"[[event_type]]
name = "companies"
key = "id"
status_column = "state"
ignore = ["views"]

[event_type.document]
searchable_statuses = ["open"]

[event_type.document.fields]
name = { type = "text" }
label = { type = "keyword", column = "name" }
geo = { type = "geo_point", lat = "lat", lon = "lon" }

[event_type.relations.posts]
table = "job_posts"
kind = "children"
foreign_key = ["company_id"]
order_by = "position"
fields.title = { type = "text" }
"#;

/// Each mistake: what it replaces in [`FILE`], with what, and the key the refusal names.
pub const MISTAKES: &[(&str, &str, &str)] = &[
    ("key = \"id\"", "key = \"idd\"", "key = \"idd\""),
    (
        "status_column = \"state\"",
        "status_column = \"status\"",
        "status_column = \"status\"",
    ),
    ("[\"views\"]", "[\"view\"]", "ignore = \"view\""),
    (
        "column = \"name\"",
        "column = \"nmae\"",
        "document.fields.label.column = \"nmae\"",
    ),
    (
        "lat = \"lat\"",
        "lat = \"latitude\"",
        "document.fields.geo.lat = \"latitude\"",
    ),
    (
        "order_by = \"position\"",
        "order_by = \"postion\"",
        "relations.posts.order_by = \"postion\"",
    ),
    (
        "foreign_key = [\"company_id\"]",
        "foreign_key = [\"company\"]",
        "relations.posts.foreign_key = \"company\"",
    ),
    (
        "fields.title = { type = \"text\" }",
        "fields.titel = { type = \"text\" }",
        "relations.posts.fields.titel = \"titel\"",
    ),
];

/// [`FILE`] with one mistake, written to a file of its own; the file and the mistake's line.
pub fn with_mistake(from: &str, to: &str) -> (PathBuf, usize) {
    assert!(FILE.contains(from), "{from}");
    let text = FILE.replacen(from, to, 1);
    let at = text.find(to).expect("the mistake is in the text");
    let line = text[..at].matches('\n').count() + 1;
    let path = std::env::temp_dir().join(format!("{}.toml", unique_name("mistake")));
    std::fs::write(&path, text).expect("write the event-type file");
    (path, line)
}
