//! Event types: one table's changes, from its trigger to its search index, declared once.
//!
//! An [`EventType`] says everything about one table: its key and ignored columns (the
//! trigger's options), the exchange and routing keys of its messages, the queue the consumer
//! reads them from and its dead-letter queue, the index and how a row becomes a document.
//! Triggers, topology, indexes and documents are all derived from it, so a second table runs
//! beside the first without touching it.
//!
//! Declare them in code ([`EventType::new`] and its `with_*` methods), or in a TOML file for
//! the binaries ([`EventType::from_file`]; every key is documented in
//! `examples/config/benalsam.toml`). A document a [`DocumentSpec`] cannot describe comes from
//! a [`DocumentBuilder`] of your own ([`EventType::with_builder`]).
//!
//! ```
//! use benalsam_events::EventType;
//! use benalsam_events::event_type::{DocumentSpec, FieldType};
//!
//! let mut orders = EventType::new("orders", "shop.orders"); // names derived from "orders"
//! orders.key = "order_no".to_owned();
//! orders.document = DocumentSpec::default()
//!     .field("customer", FieldType::Keyword { normalizer: None, indexed: true })
//!     .field("total", FieldType::Double);
//! assert_eq!(orders.exchange, "benalsam.orders");
//! assert_eq!(orders.queue, "orders.sync");
//! assert_eq!(orders.dead_letter_queue, "orders.sync.dlq");
//! assert_eq!(orders.index.alias, "benalsam_orders");
//! ```

mod catalog;
mod change;
mod document;
mod envelope;
mod file;
mod file_fields;
mod origin;
mod relation;
mod relation_aggregate;
mod relation_check;
mod relation_tree;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub(crate) use catalog::check_columns;
pub use change::{Action, BuildError, DocumentBuilder, Operation};
pub use document::{DocumentSpec, FieldType};
pub(crate) use document::{Field, LOWERCASE, Row, TURKISH};
pub(crate) use envelope::DEFAULT_MAX_MESSAGE_BYTES;
pub use envelope::Envelope;
pub(crate) use envelope::{SCHEMA_VERSION, record_id_problem, trace_id_of};
pub(crate) use origin::Origin;
pub use relation::{Relation, RelationKind};
pub use relation_aggregate::Aggregate;
pub(crate) use relation_tree::{chains, relation_trigger_name, relation_truncate_trigger_name};
pub(crate) use validate::{alias_problem, aliases_collide, validate_all};

use crate::error::Result;

/// The sync triggers of an event type's table (each `…:<jobs_as>` for a job name of its
/// own). A plain table has the three statement triggers (migration 9) and the TRUNCATE
/// trigger; a partitioned or inherited table the row trigger and the TRUNCATE trigger.
pub(crate) mod sync_trigger {
    /// Every row's change, one call per row: partitioned and inherited tables, and every
    /// table migrated before migration 9.
    pub(crate) const ROWS: &str = "benalsam_sync_queue";
    /// A statement's inserted rows.
    pub(crate) const INSERT: &str = "benalsam_sync_insert";
    /// A statement's updated rows.
    pub(crate) const UPDATE: &str = "benalsam_sync_update";
    /// A statement's deleted rows.
    pub(crate) const DELETE: &str = "benalsam_sync_delete";
    /// A TRUNCATE of the table.
    pub(crate) const TRUNCATE: &str = "benalsam_sync_truncate";
    /// All of them.
    pub(crate) const ALL: [&str; 5] = [ROWS, INSERT, UPDATE, DELETE, TRUNCATE];
}

/// The tables of `event_types`, schema (`schema` for a bare name) and name, each once, in
/// order.
pub(crate) fn tables_of<'a>(
    schema: &'a str,
    event_types: &'a [EventType],
) -> Vec<(&'a str, &'a str)> {
    let mut tables: Vec<_> = event_types
        .iter()
        .map(|t| {
            let (s, table) = t.split_table();
            (s.unwrap_or(schema), table)
        })
        .collect();
    tables.sort_unstable();
    tables.dedup();
    tables
}

/// The exchange of listing events, as the architecture document names it.
pub(crate) const LISTINGS_EXCHANGE: &str = "benalsam.listings";

/// The index of an event type, behind its alias.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IndexSpec {
    /// The alias everything reads and writes through; the index is `<alias>_v1`.
    pub alias: String,
    /// Primary shards of a new index.
    pub shards: u32,
    /// Replicas per shard; 0 on a single node keeps the cluster green.
    pub replicas: u32,
    /// How soon a write becomes searchable.
    pub refresh_interval: String,
    /// How long a delete's tombstone (and its version) is kept. An index operation older than
    /// the delete arriving within this time is refused as stale; after it, it would bring the
    /// document back. At least one hour, which outlasts every retry and resend of the
    /// pipeline; a shorter value is raised to it.
    pub gc_deletes: Duration,
}

impl IndexSpec {
    /// An index behind `alias`, one shard, no replica, refreshed every second.
    pub fn new(alias: &str) -> Self {
        Self {
            alias: alias.to_owned(),
            shards: 1,
            replicas: 0,
            refresh_interval: "1s".to_owned(),
            gc_deletes: MIN_GC_DELETES,
        }
    }
}

/// The shortest `gc_deletes` any index of the library gets.
pub(crate) const MIN_GC_DELETES: Duration = Duration::from_secs(3600);

/// One table's changes, from trigger to index. See the [module documentation](self).
#[derive(Clone)]
#[non_exhaustive]
pub struct EventType {
    /// Its name, in metrics, logs and the operator's commands (`listings`).
    pub name: String,
    /// The table: bare when it lives in the outbox's schema, `schema.table` otherwise.
    pub table: String,
    /// The name its jobs are recorded under, when several event types take one table
    /// (`listings@admin`): each then has its own triggers, jobs, states and dead letters.
    /// `None` (the default): the table's name, as before; see [`EventType::validate`] for
    /// the form.
    pub jobs_as: Option<String>,
    /// The column that identifies a row (the trigger's `key=`, the document id).
    pub key: String,
    /// Columns whose changes alone are no change for search (view counters).
    pub ignore: Vec<String>,
    /// Whether the trigger sends `NOTIFY` (off for write-heavy tables; bridges then poll).
    pub notify: bool,
    /// The topic exchange its messages go to.
    pub exchange: String,
    /// First word of its routing keys: `<prefix>.insert`, `.update`, `.delete`, `.truncate`.
    pub routing_prefix: String,
    /// A column whose changes get `<prefix>.status.<new value>` routing keys.
    pub status_column: Option<String>,
    /// The queue the consumer reads its messages from (bound with `<prefix>.#`).
    pub queue: String,
    /// The exchange its refused messages go to...
    pub dead_letter_exchange: String,
    /// ...and the queue that keeps them.
    pub dead_letter_queue: String,
    /// A bounded queue of its status changes for notification services (bound with
    /// `<prefix>.status.#`), if it has one.
    pub status_queue: Option<String>,
    /// Its search index.
    pub index: IndexSpec,
    /// How its rows become documents (unless it has a builder of its own).
    pub document: DocumentSpec,
    /// Rows of other tables that are part of its documents ([`Relation`]). With any, every
    /// document is read from the database when it is indexed (a *joined* event type).
    pub relations: Vec<Relation>,
    pub(crate) builder: Option<(Arc<dyn DocumentBuilder>, Value)>,
    /// Where its file declared each key (empty when built in code), for the errors.
    pub(crate) origin: Origin,
}

impl std::fmt::Debug for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventType")
            .field("name", &self.name)
            .field("table", &self.table)
            .field("jobs_as", &self.jobs_as)
            .field("exchange", &self.exchange)
            .field("queue", &self.queue)
            .field("index", &self.index.alias)
            .field("custom_builder", &self.builder.is_some())
            .finish_non_exhaustive()
    }
}

impl EventType {
    /// The event type `name` of `table`, with names derived from `name`: exchange
    /// `benalsam.<name>`, routing prefix `<name>`, queue `<name>.sync` with `<name>.sync.dlx`
    /// and `<name>.sync.dlq`, index `benalsam_<name>`; key `id`; a document of `id`, `job_id`
    /// and `indexed_at` only, until fields are added.
    pub fn new(name: &str, table: &str) -> Self {
        let queue = format!("{name}.sync");
        Self {
            name: name.to_owned(),
            table: table.to_owned(),
            jobs_as: None,
            key: "id".to_owned(),
            ignore: Vec::new(),
            notify: true,
            exchange: format!("benalsam.{name}"),
            routing_prefix: name.to_owned(),
            status_column: None,
            dead_letter_exchange: format!("{queue}.dlx"),
            dead_letter_queue: format!("{queue}.dlq"),
            queue,
            status_queue: None,
            index: IndexSpec::new(&format!("benalsam_{name}")),
            document: DocumentSpec::default(),
            relations: Vec::new(),
            builder: None,
            origin: Origin::default(),
        }
    }

    /// The listings of the architecture document, exactly as the binaries run them without a
    /// configuration file: table `listings` (view counts ignored), `benalsam.listings` with
    /// `listing.*` keys and status changes on `listing.status.<status>`, `elasticsearch.sync`
    /// dead-lettering through `benalsam.dlx` into `elasticsearch.sync.dlq`, the bounded
    /// `listing.status.changes`, and the `benalsam_listings` index with Turkish analysis where
    /// only `active` listings are searchable.
    pub fn listings() -> Self {
        let mut listings = Self::new("listings", "listings");
        listings.ignore = vec!["view_count".to_owned()];
        listings.exchange = LISTINGS_EXCHANGE.to_owned();
        listings.routing_prefix = "listing".to_owned();
        listings.status_column = Some("status".to_owned());
        listings.queue = "elasticsearch.sync".to_owned();
        listings.dead_letter_exchange = "benalsam.dlx".to_owned();
        listings.dead_letter_queue = "elasticsearch.sync.dlq".to_owned();
        listings.status_queue = Some("listing.status.changes".to_owned());
        listings.document = document::listings();
        listings
    }

    /// Builds its documents with `builder` instead of the [`DocumentSpec`]; `properties` is
    /// the mapping of the fields it writes (`id`, `job_id` and `indexed_at` are added).
    pub fn with_builder(
        mut self,
        builder: impl DocumentBuilder + 'static,
        properties: Value,
    ) -> Self {
        self.builder = Some((Arc::new(builder), properties));
        self
    }

    /// Adds a relation: rows of another table in every document. See [`Relation`].
    pub fn with_relation(mut self, relation: Relation) -> Self {
        self.relations.push(relation);
        self
    }

    /// Whether its documents are joined from several tables (it has relations): they are
    /// then read from the database when indexed, not taken from the message.
    pub fn is_joined(&self) -> bool {
        !self.relations.is_empty()
    }

    /// The action for a joined document read from the database: `row` is the event type's
    /// row (`None`: gone), `related` the relations' values by name, `version` the number it
    /// is written with.
    pub(crate) fn joined_action(
        &self,
        id: String,
        row: Option<&Value>,
        related: &serde_json::Map<String, Value>,
        version: i64,
    ) -> std::result::Result<Action, BuildError> {
        let mut extra = serde_json::Map::new();
        if row.is_some() {
            for relation in &self.relations {
                let read = related.get(&relation.name).unwrap_or(&Value::Null);
                if let Some(value) = relation.value(read).map_err(|why| {
                    BuildError(format!("record {id}: relation {}: {why}", relation.name))
                })? {
                    extra.insert(relation.name.clone(), value);
                }
            }
        }
        let empty = Value::Object(serde_json::Map::new());
        self.document.build_row(
            &self.index.alias,
            self.status_column.as_deref(),
            Row {
                id,
                deleted: row.is_none(),
                columns: row.unwrap_or(&empty),
                version,
            },
            extra,
        )
    }

    /// Reads the event types of a TOML file, checking every key (an unknown key, a wrong
    /// type, a name used twice, a field that cannot work): the error names the file, the line
    /// and the key. The line of every key that names a column is kept, so that the catalog
    /// check of `migrate` and of the services' start names it too.
    pub fn from_file(path: &std::path::Path) -> Result<Vec<Self>> {
        file::load(path)
    }

    /// Where to say a mistake about `key` is: `file:line: event type "x", key`, or without
    /// the place for an event type built in code. `path` finds the line (`ignore.views`).
    pub(crate) fn at(&self, key: &str, path: &str) -> String {
        format!(
            "{}event type {:?}, {key}",
            self.origin.prefix(path),
            self.name
        )
    }

    /// The schema (when qualified) and the table name.
    pub(crate) fn split_table(&self) -> (Option<&str>, &str) {
        match self.table.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, &self.table),
        }
    }

    /// The event type with its table named as the trigger records it for a job table in
    /// `queue_schema`: bare when the table is in that schema, schema-qualified otherwise.
    pub(crate) fn recorded_in(mut self, queue_schema: &str) -> Self {
        if let (Some(schema), table) = self.split_table()
            && schema == queue_schema
        {
            self.table = table.to_owned();
        }
        self
    }

    /// The name its jobs are recorded under: [`EventType::jobs_as`], else the table (as
    /// [`EventType::recorded_in`] names it). Everything that follows a job goes by it: the
    /// claims, the routes, the consumer's event type, truncations, reindexes, backfills.
    pub(crate) fn job_table(&self) -> &str {
        self.jobs_as.as_deref().unwrap_or(&self.table)
    }

    /// The name of its sync trigger `base` (one of [`sync_trigger::ALL`]) on its table:
    /// `base` itself for the jobs named by the table (what every deployment has),
    /// `<base>:<jobs_as>` for an event type with a job name of its own, so each event type on
    /// a table has its own triggers.
    pub(crate) fn sync_trigger(&self, base: &str) -> String {
        match &self.jobs_as {
            None => base.to_owned(),
            Some(jobs) => format!("{base}:{jobs}"),
        }
    }

    /// The trigger's arguments.
    pub(crate) fn trigger_options(&self, channel: &str) -> Vec<String> {
        let mut options = vec![format!("key={}", self.key)];
        if let Some(jobs) = &self.jobs_as {
            options.push(format!("as={jobs}"));
        }
        if !self.ignore.is_empty() {
            options.push(format!("ignore={}", self.ignore.join(",")));
        }
        options.push(format!("channel={channel}"));
        if !self.notify {
            options.push("notify=off".to_owned());
        }
        options
    }

    /// The action a change asks of the index: what the consumer writes for `envelope`. A
    /// custom [`DocumentBuilder`] may start from it and adjust.
    pub fn action(&self, envelope: &Envelope<'_>) -> std::result::Result<Action, BuildError> {
        match &self.builder {
            Some((builder, _)) => builder.build(envelope),
            None => self
                .document
                .build(&self.index.alias, self.status_column.as_deref(), envelope),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::validate::index_name;
    use super::*;

    #[test]
    fn names_derive_from_the_event_type_s_name() {
        let orders = EventType::new("orders", "shop.orders");
        assert_eq!(orders.exchange, "benalsam.orders");
        assert_eq!(orders.queue, "orders.sync");
        assert_eq!(orders.dead_letter_exchange, "orders.sync.dlx");
        assert_eq!(orders.dead_letter_queue, "orders.sync.dlq");
        assert_eq!(orders.index.alias, "benalsam_orders");
        assert_eq!(orders.split_table(), (Some("shop"), "orders"));
        assert!(orders.validate().is_ok());
        let mut bad = orders.clone();
        bad.document.searchable_statuses = Some(vec!["open".into()]);
        assert_eq!(
            bad.validate().expect_err("no status column").setting(),
            Some("searchable_statuses")
        );
    }

    #[test]
    fn index_names_follow_the_engine_s_rules_and_address_one_index() {
        for good in [
            "benalsam_listings",
            "orders-2026",
            "a",
            "shop.orders",
            "çarşı",
            "x1",
        ] {
            assert_eq!(index_name(good, 243), Ok(()), "{good}");
        }
        let long = "a".repeat(244);
        for bad in [
            "_all",
            "*",
            "listings*",
            "list?ngs",
            "_x",
            "-x",
            "+x",
            ".x",
            ".",
            "..",
            "a,b",
            "Listings",
            "ᾈ",
            "a/b",
            "a\\b",
            "a b",
            "a#b",
            "a:b",
            "a\"b",
            "a<b",
            "a>b",
            "a|b",
            "",
            "a\tb",
            long.as_str(),
        ] {
            assert!(index_name(bad, 243).is_err(), "{bad:?} is refused");
        }
        let mut all = EventType::new("orders", "orders");
        all.index.alias = "_all".to_owned();
        let error = all.validate().expect_err("_all refused");
        assert_eq!(error.setting(), Some("index.alias"));
        assert!(error.to_string().contains("_all"), "{error}");
    }

    #[test]
    fn two_event_types_may_not_write_one_index() {
        let orders = EventType::new("orders", "orders");
        let mut again = EventType::new("orders2", "orders2");
        again.index.alias = orders.index.alias.clone();
        let error = validate_all(&[orders.clone(), again.clone()]).expect_err("shared alias");
        assert_eq!(error.setting(), Some("index.alias"));
        again.index.alias = format!("{}_v1", orders.index.alias);
        assert!(
            validate_all(&[orders.clone(), again.clone()]).is_err(),
            "the versioned index"
        );
        again.index.alias = format!("{}_v", orders.index.alias);
        assert!(
            validate_all(&[orders, again]).is_ok(),
            "not a versioned name"
        );
        assert!(!aliases_collide("a", "ab") && aliases_collide("a_v12", "a"));
    }

    #[test]
    fn two_event_types_may_take_one_table_under_two_job_names() {
        let orders = EventType::new("orders", "orders");
        let mut admin = EventType::new("orders_admin", "orders");
        admin.index.alias = "orders_admin".to_owned();
        let error = validate_all(&[orders.clone(), admin.clone()])
            .expect_err("one table, two event types, one job name");
        assert_eq!(error.setting(), Some("jobs_as"));
        assert!(
            error.to_string().contains("orders@orders_admin"),
            "the error says what to write: {error}"
        );
        admin.jobs_as = Some("orders@orders_admin".to_owned());
        validate_all(&[orders.clone(), admin.clone()]).expect("two job names");
        assert_eq!(admin.job_table(), "orders@orders_admin");
        assert_eq!(orders.job_table(), "orders");
        for base in sync_trigger::ALL {
            assert_ne!(orders.sync_trigger(base), admin.sync_trigger(base));
        }
        assert_eq!(
            orders.sync_trigger(sync_trigger::ROWS),
            "benalsam_sync_queue",
            "the trigger every deployment has keeps its name"
        );
        assert!(
            admin
                .trigger_options("ch")
                .contains(&"as=orders@orders_admin".to_owned())
        );
        for wrong in [
            "orders",
            "orders#x",
            "@x",
            "orders@",
            "Orders@x",
            "orders@x@y",
            "users@x",
        ] {
            admin.jobs_as = Some(wrong.to_owned());
            let error = admin.validate().expect_err(wrong);
            assert_eq!(error.setting(), Some("jobs_as"), "{wrong}");
        }
        admin.jobs_as = Some(format!("orders@{}", "x".repeat(40)));
        assert!(
            admin.validate().is_err(),
            "its trigger names must fit 63 bytes"
        );
    }

    proptest::proptest! {
        /// Whatever a name holds, an accepted one is one concrete index the engine allows.
        #[test]
        fn an_accepted_index_name_addresses_exactly_one_index(name in "\\PC{0,20}|[a-z_.*,-]{0,6}") {
            if index_name(&name, 243).is_ok() {
                proptest::prop_assert!(!name.is_empty() && name.len() <= 243);
                proptest::prop_assert!(!name.starts_with(['_', '-', '+', '.']));
                proptest::prop_assert!(!name.contains(['*', '?', ',', ' ', '/', '\\', '"', '<', '>', '|', '#', ':']));
                proptest::prop_assert_eq!(name.to_lowercase(), name.clone());
                proptest::prop_assert!(name != "_all");
            }
        }
    }

    #[test]
    fn the_listings_index_is_the_one_deployments_already_have() {
        let body = EventType::listings().index_body();
        let p = &body["mappings"]["properties"];
        assert_eq!(
            p["title"],
            json!({"type": "text", "analyzer": "benalsam_turkish", "copy_to": "search_text",
                   "fields": {"raw": {"type": "keyword", "ignore_above": 256}}})
        );
        assert_eq!(
            p["description"],
            json!({"type": "text", "analyzer": "benalsam_turkish", "copy_to": "search_text"})
        );
        assert_eq!(
            p["search_text"],
            json!({"type": "text", "analyzer": "benalsam_turkish"})
        );
        assert_eq!(
            p["location_city"],
            json!({"type": "keyword", "normalizer": "benalsam_lowercase"})
        );
        assert_eq!(p["images"], json!({"type": "keyword", "index": false}));
        assert_eq!(p["attributes"], json!({"type": "object", "dynamic": true}));
        assert_eq!(p["geo_location"], json!({"type": "geo_point"}));
        assert_eq!(p["budget"], json!({"type": "double"}));
        assert_eq!(p.as_object().map(|o| o.len()), Some(24));
        assert_eq!(body["mappings"]["dynamic"], "strict");
        assert_eq!(body["settings"]["gc_deletes"], "3600s");
        assert!(body["settings"]["analysis"]["analyzer"]["benalsam_turkish"].is_object());
    }

    #[test]
    fn a_custom_body_keeps_the_delete_protection() {
        #[derive(Debug)]
        struct Nothing;
        impl DocumentBuilder for Nothing {
            fn build(&self, _: &Envelope<'_>) -> std::result::Result<Action, BuildError> {
                Err(BuildError("nothing".into()))
            }
        }
        let mut custom =
            EventType::new("x", "x").with_builder(Nothing, json!({"name": {"type": "text"}}));
        custom.index.gc_deletes = Duration::from_secs(60);
        let body = custom.index_body();
        assert_eq!(
            body["settings"]["gc_deletes"], "3600s",
            "raised to the minimum"
        );
        assert_eq!(body["mappings"]["properties"]["job_id"]["type"], "long");
    }

    #[test]
    fn a_custom_mapping_gets_the_turkish_analysis_only_when_it_names_it() {
        #[derive(Debug)]
        struct Nothing;
        impl DocumentBuilder for Nothing {
            fn build(&self, _: &Envelope<'_>) -> std::result::Result<Action, BuildError> {
                Err(BuildError("nothing".into()))
            }
        }
        // Engines without analysis-common refuse an index defining it, used or not.
        let plain =
            EventType::new("x", "x").with_builder(Nothing, json!({"name": {"type": "text"}}));
        assert!(plain.index_body()["settings"]["analysis"].is_null());
        let turkish = EventType::new("x", "x").with_builder(
            Nothing,
            json!({"name": {"type": "text", "analyzer": "benalsam_turkish"},
                   "city": {"type": "keyword", "normalizer": "benalsam_lowercase"}}),
        );
        let analysis = &turkish.index_body()["settings"]["analysis"];
        assert!(analysis["analyzer"]["benalsam_turkish"].is_object());
        assert!(analysis["normalizer"]["benalsam_lowercase"].is_object());
    }
}
