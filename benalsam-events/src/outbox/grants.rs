//! The least privileges of the bridge's and the consumer's PostgreSQL roles, as SQL.
//!
//! The outbox's tables belong to the role that ran [`migrate`](super::migrate); the services
//! may run as roles of their own with only what their work needs. What each needs was measured
//! against the real database (`system-tests/tests/least_privilege.rs` runs both binaries as roles
//! holding exactly these grants, and nothing more):
//!
//! | role | on the outbox | on the event types' tables |
//! |---|---|---|
//! | bridge | `SELECT, UPDATE` on the job table (claims, marks); `SELECT, INSERT, UPDATE, DELETE` on `benalsam_listeners` (adaptive NOTIFY) | joined event types: `SELECT` on the table and its related tables, `INSERT` on the job table (the fan-out's REBUILD jobs) |
//! | consumer | `SELECT, UPDATE` on the job table (checks, marks); `SELECT` on `benalsam_truncations` and `benalsam_reindex` (reindexes under way) | joined event types: `SELECT` on the table and its related tables, `USAGE` on the job table's id sequence (a document's version) |
//!
//! and `USAGE` on every schema involved. With WAL capture the bridge writes the jobs itself:
//! `INSERT` on the job table, `SELECT, INSERT, UPDATE` on `benalsam_truncations`, `SELECT,
//! UPDATE` on `benalsam_capture`, `USAGE` on the schemas of the event types' tables (their row
//! types), and the `REPLICATION` attribute, which only a superuser can give (`ALTER ROLE …
//! REPLICATION`; the bridge refuses to start without it). Application roles need nothing on the outbox: the
//! trigger function runs as its owner (migration 7). `migrate`, `backfill`, `purge`,
//! `retry`, `reindex` and the other operator commands run as the outbox's owner.

use std::collections::BTreeSet;

use crate::config::validate_schema;
use crate::outbox::OutboxConfig;
use crate::{error::Result, event_type::EventType};

/// `GRANT` statements (one per line, each ending in `;`) giving `bridge` and `consumer`
/// (either may be left out) what the bridge and the consumer need on the outbox of `outbox`
/// for `event_types`, and nothing more. Run them as the outbox's owner.
pub(crate) fn grants(
    outbox: &OutboxConfig,
    event_types: &[EventType],
    bridge: Option<&str>,
    consumer: Option<&str>,
) -> Result<String> {
    let schema = validate_schema(&outbox.schema)?;
    for event_type in event_types {
        event_type.validate()?;
    }
    let queue = format!("{}.elasticsearch_sync_queue", quoted(schema));
    // The tables a joined document is read from, and their schemas.
    let mut joined = BTreeSet::new();
    for event_type in event_types.iter().filter(|t| !t.relations.is_empty()) {
        let (table_schema, table) = event_type.split_table();
        joined.insert((table_schema.unwrap_or(schema), table));
        for chain in crate::event_type::chains(&event_type.relations) {
            let Some(relation) = chain.last() else {
                continue;
            };
            let (table_schema, table) = relation.split_table();
            joined.insert((table_schema.unwrap_or(schema), table));
        }
    }
    // A capturing bridge casts to the row types of the event types' tables.
    let captured = (event_types.iter())
        .filter(|_| outbox.capture_slot.is_some())
        .map(|t| t.split_table().0.unwrap_or(schema));
    let schemas: BTreeSet<&str> = std::iter::once(schema)
        .chain(joined.iter().map(|(s, _)| *s))
        .collect();
    let bridge_schemas: BTreeSet<&str> = schemas.iter().copied().chain(captured).collect();
    let tables = joined
        .iter()
        .map(|(s, t)| format!("{}.{}", quoted(s), quoted(t)))
        .collect::<Vec<_>>()
        .join(", ");

    let mut sql = String::new();
    let mut line = |text: String| {
        sql.push_str(&text);
        sql.push_str(";\n");
    };
    if let Some(role) = bridge {
        bridge_grants(
            &mut line,
            outbox,
            &queue,
            &bridge_schemas,
            &tables,
            quoted(role),
        );
    }
    if let Some(role) = consumer {
        let role = quoted(role);
        for s in &schemas {
            line(format!("GRANT USAGE ON SCHEMA {} TO {role}", quoted(s)));
        }
        line(format!("GRANT SELECT, UPDATE ON {queue} TO {role}"));
        line(format!(
            "GRANT SELECT ON {}.benalsam_truncations TO {role}",
            quoted(schema)
        ));
        // Which reindexes are under way: read with every batch.
        line(format!(
            "GRANT SELECT ON {}.benalsam_reindex TO {role}",
            quoted(schema)
        ));
        if !joined.is_empty() {
            line(format!("GRANT SELECT ON {tables} TO {role}"));
            line(format!(
                "GRANT USAGE ON SEQUENCE {}.elasticsearch_sync_queue_id_seq TO {role}",
                quoted(schema)
            ));
        }
    }
    Ok(sql)
}

/// The bridge's part: claims and marks, adaptive NOTIFY, the REBUILD jobs of joined event
/// types, and with WAL capture the jobs themselves and the capture's position.
fn bridge_grants(
    line: &mut impl FnMut(String),
    outbox: &OutboxConfig,
    queue: &str,
    schemas: &BTreeSet<&str>,
    tables: &str,
    role: String,
) {
    for s in schemas {
        line(format!("GRANT USAGE ON SCHEMA {} TO {role}", quoted(s)));
    }
    if tables.is_empty() && outbox.capture_slot.is_none() {
        line(format!("GRANT SELECT, UPDATE ON {queue} TO {role}"));
    } else {
        line(format!("GRANT SELECT, INSERT, UPDATE ON {queue} TO {role}"));
    }
    if !tables.is_empty() {
        line(format!("GRANT SELECT ON {tables} TO {role}"));
    }
    line(format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON {}.benalsam_listeners TO {role}",
        quoted(&outbox.schema)
    ));
    if outbox.capture_slot.is_some() {
        line(format!(
            "GRANT SELECT, INSERT, UPDATE ON {}.benalsam_truncations TO {role}",
            quoted(&outbox.schema)
        ));
        line(format!(
            "GRANT SELECT, UPDATE ON {}.benalsam_capture TO {role}",
            quoted(&outbox.schema)
        ));
    }
}

/// `name` as a quoted SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_listings_need_the_measured_minimum() {
        let sql = grants(
            &OutboxConfig::in_schema("public"),
            &[EventType::listings()],
            Some("bridge"),
            Some("con\"sumer"),
        )
        .expect("valid");
        assert_eq!(
            sql,
            "GRANT USAGE ON SCHEMA \"public\" TO \"bridge\";\n\
             GRANT SELECT, UPDATE ON \"public\".elasticsearch_sync_queue TO \"bridge\";\n\
             GRANT SELECT, INSERT, UPDATE, DELETE ON \"public\".benalsam_listeners TO \"bridge\";\n\
             GRANT USAGE ON SCHEMA \"public\" TO \"con\"\"sumer\";\n\
             GRANT SELECT, UPDATE ON \"public\".elasticsearch_sync_queue TO \"con\"\"sumer\";\n\
             GRANT SELECT ON \"public\".benalsam_truncations TO \"con\"\"sumer\";\n\
             GRANT SELECT ON \"public\".benalsam_reindex TO \"con\"\"sumer\";\n"
        );
        assert_eq!(
            grants(
                &OutboxConfig::in_schema("public"),
                &[EventType::listings()],
                None,
                None
            )
            .expect("valid"),
            ""
        );
    }

    #[test]
    fn a_capturing_bridge_writes_jobs_and_its_position() {
        let mut outbox = OutboxConfig::in_schema("public");
        outbox.capture_slot = Some("benalsam".to_owned());
        let sql = grants(
            &outbox,
            &[EventType::new("orders", "shop.orders")],
            Some("bridge"),
            None,
        )
        .expect("valid");
        assert_eq!(
            sql,
            "GRANT USAGE ON SCHEMA \"public\" TO \"bridge\";\n\
             GRANT USAGE ON SCHEMA \"shop\" TO \"bridge\";\n\
             GRANT SELECT, INSERT, UPDATE ON \"public\".elasticsearch_sync_queue TO \"bridge\";\n\
             GRANT SELECT, INSERT, UPDATE, DELETE ON \"public\".benalsam_listeners TO \"bridge\";\n\
             GRANT SELECT, INSERT, UPDATE ON \"public\".benalsam_truncations TO \"bridge\";\n\
             GRANT SELECT, UPDATE ON \"public\".benalsam_capture TO \"bridge\";\n"
        );
    }
}
