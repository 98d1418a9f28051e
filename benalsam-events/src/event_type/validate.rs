//! What must hold for an event type to work, checked without the database: plain
//! identifiers, names the broker and the search engine accept, relations that fit together.
//! The database's catalog is checked at `migrate` and at start ([`super::catalog`]).

use super::EventType;
use crate::config::validate_identifier;
use crate::{error::Error, error::Result};

impl EventType {
    /// Checks what must hold for the event type to work, naming the setting that does not.
    /// Without the database: `migrate` and both services also check every table and column
    /// it names against the catalog.
    pub fn validate(&self) -> Result<()> {
        validate_identifier("event type name", &self.name)?;
        let (schema, table) = self.split_table();
        if let Some(schema) = schema {
            validate_identifier("table", schema)?;
        }
        validate_identifier("table", table)?;
        validate_identifier("key", &self.key)?;
        if let Some(jobs) = &self.jobs_as {
            jobs_name(self, jobs)?;
        }
        for column in &self.ignore {
            validate_identifier("ignore", column)?;
        }
        for (setting, name) in [
            ("exchange", &self.exchange),
            ("routing_prefix", &self.routing_prefix),
            ("queue", &self.queue),
            ("dead_letter_exchange", &self.dead_letter_exchange),
            ("dead_letter_queue", &self.dead_letter_queue),
        ] {
            amqp_name(setting, name)?;
        }
        if self.routing_prefix.contains(['*', '#']) || self.routing_prefix.contains("..") {
            return Err(Error::config(
                "routing_prefix",
                format!(
                    "{:?} may not hold * or # or an empty word",
                    self.routing_prefix
                ),
            ));
        }
        index_alias("index.alias", &self.index.alias)?;
        self.validate_relations()?;
        if self.is_joined() && self.builder.is_some() {
            return Err(Error::config(
                "relations",
                format!(
                    "event type {}: a custom document builder cannot have relations (its documents are built from the message)",
                    self.name
                ),
            ));
        }
        if self.document.searchable_statuses.is_some() && self.status_column.is_none() {
            return Err(Error::config(
                "searchable_statuses",
                format!(
                    "event type {}: needs a status_column to read the status from",
                    self.name
                ),
            ));
        }
        Ok(())
    }

    /// Checks its relations: each valid, no name twice, no field name taken, trigger names
    /// that fit PostgreSQL.
    fn validate_relations(&self) -> Result<()> {
        // A relation's field may not take a name the document already uses: its own fields,
        // and the combined fields their copy_to feed (also from other relations).
        let mut fields: Vec<&str> = self.document.field_names().collect();
        fields.extend(self.document.copy_targets());
        fields.extend(
            self.relations
                .iter()
                .flat_map(|r| r.copy_targets().into_iter().map(|(target, _)| target)),
        );
        for (i, relation) in self.relations.iter().enumerate() {
            relation.validate(&self.name, &fields)?;
            // Every relation of the tree has its trigger.
            for chain in super::chains(std::slice::from_ref(relation)) {
                let Some(relation) = chain.last() else {
                    continue;
                };
                let trigger = super::relation_trigger_name(self, relation);
                if trigger.len() > 63 {
                    return Err(Error::config(
                        "BENALSAM_CONFIG",
                        format!(
                            "{}: the trigger name {trigger} is over PostgreSQL's 63 bytes; shorten the event type's or the relations' names",
                            relation.at(&self.name, "name")
                        ),
                    ));
                }
            }
            if self.relations[..i].iter().any(|r| r.name == relation.name) {
                return Err(Error::config(
                    "BENALSAM_CONFIG",
                    format!(
                        "{}: the name is used twice",
                        relation.at(&self.name, "name")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks event types together: each valid, no two recording their jobs under one name, and
/// no two writing one index.
///
/// Several event types may take one table (a public index and an internal one with other
/// fields, statuses and relations): each has its own triggers on the table and records its
/// own jobs, so every job, its state, its dead letter and its document belong to one event
/// type. What cannot work is two of them recording their jobs under one name (the default,
/// the table's name): they would share one trigger and one job per change. Two event types
/// behind one alias would put each other's documents (and mappings) in one index; an alias
/// that is another's versioned index name (`<alias>_v1`) would write into that index.
pub(crate) fn validate_all(event_types: &[EventType]) -> Result<()> {
    for (i, event_type) in event_types.iter().enumerate() {
        event_type.validate()?;
        if let Some(other) = event_types[..i]
            .iter()
            .find(|o| o.job_table() == event_type.job_table())
        {
            return Err(Error::config(
                "jobs_as",
                format!(
                    "event types {} and {} both record the jobs of table {:?} as {:?}; give the \
                     second one a job name of its own (jobs_as = \"{}@{}\") and leave the one \
                     that ran before without one, so its waiting jobs stay its own",
                    other.name,
                    event_type.name,
                    event_type.table,
                    event_type.job_table(),
                    event_type.split_table().1,
                    event_type.name
                ),
            ));
        }
        if let Some(other) = event_types[..i]
            .iter()
            .find(|o| aliases_collide(&o.index.alias, &event_type.index.alias))
        {
            return Err(Error::config(
                "index.alias",
                format!(
                    "event types {} and {} would write one index ({:?} and {:?}); give each its own alias",
                    other.name, event_type.name, other.index.alias, event_type.index.alias
                ),
            ));
        }
    }
    Ok(())
}

/// The longest job name of its own: its triggers (`benalsam_sync_truncate:<name>`) must fit
/// PostgreSQL's 63 bytes.
const MAX_JOBS_AS: usize = 63 - "benalsam_sync_truncate:".len();

/// Checks a job name of its own: `<table>@<word>` (its table, bare or as written, then
/// lowercase letters, digits, `_`), at most 40 bytes. The `@` keeps it apart from every table's
/// name (the default job name) and `#` from the relations' jobs (`<job name>#<relation>`).
fn jobs_name(of: &EventType, jobs: &str) -> Result<()> {
    let (event_type, table) = (&of.name, of.split_table().1);
    let word = |w: &str, dot: bool| {
        !w.is_empty()
            && w.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || (dot && c == '.')
            })
    };
    let fits = jobs.len() <= MAX_JOBS_AS
        && jobs.split_once('@').is_some_and(|(t, name)| {
            word(t, true) && (t == of.table || t == table) && word(name, false)
        });
    if fits {
        Ok(())
    } else {
        Err(Error::config(
            "jobs_as",
            format!(
                "event type {event_type}: {jobs:?} is not a job name: write <table>@<word> \
                 (its table, then a-z, 0-9, _; at most {MAX_JOBS_AS} bytes), e.g. \"{table}@{event_type}\""
            ),
        ))
    }
}

/// Whether the indices behind aliases `a` and `b` can be the same name: the same alias, or
/// one alias being the other's versioned index (`<alias>_v<N>`).
pub(crate) fn aliases_collide(a: &str, b: &str) -> bool {
    let versioned = |alias: &str, other: &str| {
        other
            .strip_prefix(alias)
            .and_then(|rest| rest.strip_prefix("_v"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    a == b || versioned(a, b) || versioned(b, a)
}

/// Bytes kept free after an alias for its versioned index's suffix (`_v` and up to ten digits).
const VERSION_SUFFIX_ROOM: usize = 12;

/// Checks an index alias by the search engine's rules for index and alias names, leaving
/// room for the `_v<N>` suffix of the index behind it.
pub(crate) fn index_alias(setting: &str, alias: &str) -> Result<()> {
    alias_problem(alias).map_or(Ok(()), |why| Err(Error::config(setting, why)))
}

/// What is wrong with `alias` as an index alias, if anything.
pub(crate) fn alias_problem(alias: &str) -> Option<String> {
    index_name(alias, 255 - VERSION_SUFFIX_ROOM)
        .err()
        .map(|why| format!("{alias:?} is not a usable index name: {why}"))
}

/// Why `name` is not a name Elasticsearch and OpenSearch accept for an index or alias that
/// this library may create and write (their rules, plus a refusal of what addresses more than
/// one index, `_all` and wildcards, or belongs to the engine: names starting with `_` or `.`).
/// A request to `PUT /_all/_mapping` changes every index of the cluster, another
/// application's included; a name that merely works is not enough.
pub(crate) fn index_name(name: &str, max_bytes: usize) -> std::result::Result<(), String> {
    const FORBIDDEN: &[char] = &['\\', '/', '*', '?', '"', '<', '>', '|', ' ', ',', '#', ':'];
    if name.is_empty() {
        return Err("it is empty".to_owned());
    }
    if name.len() > max_bytes {
        return Err(format!(
            "it is {} bytes; at most {max_bytes} (the engine's limit is 255, and the index behind an alias adds _v<N>)",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("\".\" and \"..\" are not index names".to_owned());
    }
    if let Some(first) = name
        .chars()
        .next()
        .filter(|c| matches!(c, '_' | '-' | '+' | '.'))
    {
        return Err(format!(
            "it may not start with {first:?} (_all and names starting with _ or . belong to the engine; - and + are refused by it)"
        ));
    }
    if let Some(c) = name.chars().find(|c| FORBIDDEN.contains(c)) {
        return Err(format!(
            "it may not contain {c:?} (wildcards, lists and separators address other indices): none of \\ / * ? \" < > | , # : or a space"
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "it may not contain {c:?} (no spaces or control characters)"
        ));
    }
    // As the engine checks it: lowercasing must change nothing. Titlecase letters (`ᾈ`,
    // `ǅ`) are not uppercase, yet lowercasing changes them.
    if name.to_lowercase() != name {
        return Err("it must be lowercase".to_owned());
    }
    Ok(())
}

/// Checks a RabbitMQ name (exchange, queue, routing prefix): not empty, at most 255 bytes,
/// printable, not one of the broker's own (`amq.`).
fn amqp_name(setting: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(Error::config(
            setting,
            format!("{name:?} must be 1 to 255 printable bytes"),
        ));
    }
    if name.starts_with("amq.") {
        return Err(Error::config(
            setting,
            format!("{name:?}: names starting with amq. belong to the broker"),
        ));
    }
    Ok(())
}
