//! Routing: which exchange and routing key the job of an [`EventType`] goes to.
//!
//! One message per job. For a table with prefix `listing`:
//!
//! | change | routing key |
//! |---|---|
//! | INSERT | `listing.insert` |
//! | DELETE | `listing.delete` |
//! | UPDATE that changes the status column | `listing.status.<new status>` |
//! | any other UPDATE | `listing.update` |
//! | TRUNCATE | `listing.truncate` |
//!
//! A queue bound with `listing.#` therefore sees every job of the table once, and one bound
//! with `listing.status.#` sees the status changes.

use serde_json::Value;

use crate::event_type::EventType;
use crate::outbox::{Job, Operation};

impl EventType {
    /// Where a job goes, and the status it carries.
    pub(crate) fn route(&self, job: &Job) -> Route {
        let (current, previous) = match job.operation {
            Operation::Insert | Operation::Delete | Operation::Truncate | Operation::Rebuild => {
                (&job.change_data, None)
            }
            Operation::Update => (&job.change_data["new"], Some(&job.change_data["old"])),
        };
        let status = self.status_of(current);
        let previous_status = previous.and_then(|old| self.status_of(old));
        // A status that appears or disappears (NULL) is not a status change of the row.
        let status_changed = matches!((&previous_status, &status), (Some(a), Some(b)) if a != b);
        let routing_key = match (job.operation, &status) {
            (Operation::Insert, _) => format!("{}.insert", self.routing_prefix),
            (Operation::Delete, _) => format!("{}.delete", self.routing_prefix),
            (Operation::Truncate, _) => format!("{}.truncate", self.routing_prefix),
            (Operation::Rebuild, _) => format!("{}.rebuild", self.routing_prefix),
            (Operation::Update, Some(new)) if status_changed => {
                format!("{}.status.{}", self.routing_prefix, routing_word(new))
            }
            (Operation::Update, _) => format!("{}.update", self.routing_prefix),
        };
        Route {
            exchange: self.exchange.clone(),
            routing_key,
            status,
            previous_status: if status_changed {
                previous_status
            } else {
                None
            },
        }
    }

    fn status_of(&self, row: &Value) -> Option<String> {
        let column = self.status_column.as_deref()?;
        match &row[column] {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }
}

/// Where one job's message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// The exchange.
    pub(crate) exchange: String,
    /// The routing key.
    pub(crate) routing_key: String,
    /// The row's status after the change (before it, for a DELETE).
    pub(crate) status: Option<String>,
    /// The status before an UPDATE, only when the UPDATE changed it.
    pub(crate) previous_status: Option<String>,
}

/// A value made safe as one word of a topic routing key: `.`, `*` and `#` have meaning
/// there, so anything but ASCII letters, digits, `_` and `-` becomes `_`.
pub(crate) fn routing_word(value: &str) -> String {
    let word: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if word.is_empty() {
        "_".to_owned()
    } else {
        word
    }
}

/// The event types a bridge knows, looked up by table.
#[derive(Debug, Clone)]
pub(crate) struct Routes {
    types: Vec<EventType>,
}

impl Routes {
    /// Routes for these event types.
    pub(crate) fn new(types: Vec<EventType>) -> Self {
        Self { types }
    }

    /// The event type whose jobs are recorded as `table` (its table, or its `jobs_as`), if
    /// there is one: with several event types on one table, each job is one event type's.
    pub(crate) fn for_table(&self, table: &str) -> Option<&EventType> {
        self.types.iter().find(|t| t.job_table() == table)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::outbox::ClaimKind;

    fn job(operation: Operation, change_data: Value) -> Job {
        Job {
            id: 7,
            table_name: "listings".into(),
            operation,
            record_id: "r1".into(),
            change_data,
            retry_count: 0,
            created_at: SystemTime::UNIX_EPOCH,
            traceparent: None,
            claim: ClaimKind::Fresh,
        }
    }

    #[test]
    fn routing_keys_follow_the_architecture_document() {
        let listings = EventType::listings();
        let insert = listings.route(&job(
            Operation::Insert,
            json!({"status": "pending_approval"}),
        ));
        assert_eq!(insert.routing_key, "listing.insert");
        assert_eq!(insert.status.as_deref(), Some("pending_approval"));
        assert_eq!(insert.previous_status, None);

        let edit = listings.route(&job(
            Operation::Update,
            json!({"old": {"status": "active", "title": "a"}, "new": {"status": "active", "title": "b"}}),
        ));
        assert_eq!(edit.routing_key, "listing.update");
        assert_eq!(edit.previous_status, None);

        let approve = listings.route(&job(
            Operation::Update,
            json!({"old": {"status": "pending_approval"}, "new": {"status": "active"}}),
        ));
        assert_eq!(approve.routing_key, "listing.status.active");
        assert_eq!(approve.status.as_deref(), Some("active"));
        assert_eq!(approve.previous_status.as_deref(), Some("pending_approval"));

        let delete = listings.route(&job(Operation::Delete, json!({"status": "sold"})));
        assert_eq!(delete.routing_key, "listing.delete");
        assert_eq!(delete.exchange, "benalsam.listings");
    }

    #[test]
    fn tables_without_a_status_column_never_route_on_status() {
        let mut items = EventType::new("inventory", "inventory_items");
        items.routing_prefix = "inventory_item".into();
        let route = items.route(&job(
            Operation::Update,
            json!({"old": {"status": "a"}, "new": {"status": "b"}}),
        ));
        assert_eq!(route.routing_key, "inventory_item.update");
        assert_eq!(route.status, None);
    }

    #[test]
    fn two_event_types_of_one_table_each_route_their_own_jobs() {
        let public = EventType::listings();
        let mut admin = EventType::new("listings_admin", "listings");
        admin.jobs_as = Some("listings@listings_admin".into());
        let routes = Routes::new(vec![public, admin]);
        let of = |table: &str| routes.for_table(table).map(|t| t.name.clone());
        assert_eq!(of("listings").as_deref(), Some("listings"));
        assert_eq!(
            of("listings@listings_admin").as_deref(),
            Some("listings_admin")
        );
        assert_eq!(
            of("listings#seller"),
            None,
            "a relation's jobs are never published"
        );
        let mut job = job(Operation::Insert, json!({"status": "draft"}));
        job.table_name = "listings@listings_admin".into();
        let route = routes.for_table(&job.table_name).map(|t| t.route(&job));
        assert_eq!(
            route.map(|r| (r.exchange, r.routing_key)),
            Some((
                "benalsam.listings_admin".into(),
                "listings_admin.insert".into()
            ))
        );
    }

    proptest! {
        #[test]
        fn a_routing_word_is_one_safe_word(value in ".*") {
            let word = routing_word(&value);
            prop_assert!(!word.is_empty());
            prop_assert!(word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
        }

        #[test]
        fn every_job_has_exactly_one_key_under_the_prefix(
            op in prop_oneof![Just(Operation::Insert), Just(Operation::Update), Just(Operation::Delete)],
            old in proptest::option::of("[a-z_.#* ]{0,12}"),
            new in proptest::option::of("[a-z_.#* ]{0,12}"),
        ) {
            let data = match op {
                Operation::Update => json!({"old": {"status": old}, "new": {"status": new}}),
                _ => json!({"status": new}),
            };
            let route = EventType::listings().route(&job(op, data));
            prop_assert!(route.routing_key.starts_with("listing."));
            // A topic word never contains the separators, so `listing.#` always matches and
            // `listing.status.#` matches exactly the status changes.
            let words: Vec<&str> = route.routing_key.split('.').collect();
            prop_assert!(words.iter().all(|w| !w.is_empty() && !w.contains(['*', '#'])));
            let is_status_change = op == Operation::Update && old.is_some() && new.is_some() && old != new;
            prop_assert_eq!(words.get(1) == Some(&"status"), is_status_change);
            prop_assert_eq!(route.previous_status.is_some(), is_status_change);
        }
    }
}
