//! The SQL of joined documents: the read of a document with its related rows, and the pages
//! of a related row's fan-out. Table and column names come from validated event types and are
//! written into the text once, here.

use crate::event_type::{Aggregate, EventType, Relation, RelationKind};

/// `"schema"."table"` of a table named bare (in `schema`) or schema-qualified.
fn qualified(schema: &str, table: &str) -> String {
    match table.split_once('.') {
        Some((s, t)) => format!("\"{s}\".\"{t}\""),
        None => format!("\"{schema}\".\"{table}\""),
    }
}

/// `jsonb_build_object('a', r."a", …)` of `columns` of the row alias `r`.
fn object_of(alias: &str, columns: &[String]) -> String {
    let pairs: Vec<String> = columns
        .iter()
        .map(|c| format!("'{c}', {alias}.\"{c}\""))
        .collect();
    format!("jsonb_build_object({})", pairs.join(", "))
}

/// `r."x" = d."y" AND …` over the relation's column pairs (`alias` the related row,
/// `above` the row it is joined to: the document's, or the row of the relation above).
fn join_condition(relation: &Relation, alias: &str, above: &str) -> String {
    relation
        .local_columns
        .iter()
        .zip(&relation.related_columns)
        .map(|(local, related)| format!("{alias}.\"{related}\" = {above}.\"{local}\""))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The alias of a related row at `depth` (1: a relation of the document): `r`, `r2`, ….
fn alias_at(depth: usize) -> String {
    if depth <= 1 {
        "r".to_owned()
    } else {
        format!("r{depth}")
    }
}

/// The value of `relation` for the row `above` (`d` the document's): a subquery giving an
/// object (parent) or an array of objects (children), each object holding the taken
/// columns and, under `#<name>`, the value of each of its own relations (no column is
/// called that: columns are plain identifiers, so the two never meet).
fn relation_value(schema: &str, relation: &Relation, above: &str) -> String {
    let depth = relation.depth();
    let alias = alias_at(depth);
    let source = qualified(schema, &relation.table);
    let mut object = object_of(&alias, &relation.columns());
    if !relation.relations.is_empty() {
        let below: Vec<String> = relation
            .relations
            .iter()
            .map(|r| format!("'#{}', {}", r.name, relation_value(schema, r, &alias)))
            .collect();
        object = format!("({object} || jsonb_build_object({}))", below.join(", "));
    }
    let on = join_condition(relation, &alias, above);
    match &relation.kind {
        RelationKind::Aggregate { function, .. } => {
            // The filter: a validated column and operator, and an escaped literal.
            let rows = format!(
                "FROM {source} {alias} WHERE {on}{}",
                relation.filter_sql(&alias)
            );
            let column = |c: &str| format!("{alias}.\"{c}\"");
            match function {
                Aggregate::Count => format!("(SELECT to_jsonb(count(*)) {rows})"),
                Aggregate::Exists => format!("to_jsonb(EXISTS (SELECT 1 {rows}))"),
                Aggregate::Sum(c) => {
                    format!("(SELECT to_jsonb(coalesce(sum({}), 0)) {rows})", column(c))
                }
                Aggregate::Min(c) => format!("(SELECT to_jsonb(min({})) {rows})", column(c)),
                Aggregate::Max(c) => format!("(SELECT to_jsonb(max({})) {rows})", column(c)),
            }
        }
        RelationKind::Parent => {
            format!("(SELECT {object} FROM {source} {alias} WHERE {on} LIMIT 1)")
        }
        RelationKind::Children {
            order_by,
            descending,
            limit,
            ..
        } => {
            let direction = if *descending { " DESC" } else { "" };
            let order = match order_by {
                Some(column) => {
                    format!(
                        "{alias}.\"{column}\"{direction}, {alias}.\"{}\"",
                        relation.key
                    )
                }
                None => format!("{alias}.\"{}\"{direction}", relation.key),
            };
            format!(
                "(SELECT coalesce(jsonb_agg(x.o ORDER BY x.n), '[]'::jsonb) FROM \
                 (SELECT {object} AS o, row_number() OVER (ORDER BY {order}) AS n \
                 FROM {source} {alias} WHERE {on} ORDER BY {order} LIMIT {limit}) x)"
            )
        }
    }
}

/// The key column of `event_type`'s table, typed, from the text `expr`.
fn typed_key(table: &str, key: &str, expr: &str) -> String {
    format!("(jsonb_populate_record(NULL::{table}, jsonb_build_object('{key}', {expr}))).\"{key}\"")
}

/// The SQL that reads joined documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadSql {
    /// Locks the documents: `$1` the index alias, `$2` the record ids.
    pub(crate) lock: String,
    /// The version: the next value of the outbox's id sequence.
    pub(crate) version: String,
    /// The rows: `$1` the record ids; answers `id`, `row`, `related`.
    pub(crate) select: String,
}

impl ReadSql {
    pub(crate) fn new(schema: &str, event_type: &EventType) -> Self {
        let table = qualified(schema, &event_type.table);
        let key = &event_type.key;
        let related: Vec<String> = event_type
            .relations
            .iter()
            .map(|relation| {
                format!(
                    "'{}', {}",
                    relation.name,
                    relation_value(schema, relation, "d")
                )
            })
            .collect();
        let sequence = format!("\"{schema}\".elasticsearch_sync_queue");
        Self {
            lock: "SELECT count(pg_advisory_xact_lock(l.a, l.b)) FROM \
                   (SELECT DISTINCT hashtext($1::text) AS a, hashtext(u.k) AS b \
                   FROM unnest($2::text[]) AS u(k) ORDER BY 1, 2) l"
                .to_owned(),
            version: format!("SELECT nextval(pg_get_serial_sequence('{sequence}', 'id'))"),
            select: format!(
                "SELECT to_jsonb(d.\"{key}\") #>> '{{}}' AS id, to_jsonb(d) AS row, \
                 jsonb_build_object({}) AS related \
                 FROM {table} d WHERE d.\"{key}\" IN \
                 (SELECT {} FROM unnest($1::text[]) AS u(k))",
                related.join(", "),
                typed_key(&table, key, "u.k"),
            ),
        }
    }
}

/// Whether the row `d` is searchable under the event type's status policy (`true` without
/// one): the same test as the consumer's (`DocumentSpec::build_row`), on the same JSON value
/// of the column, so a document the fan-out skips is one the consumer would delete.
///
/// A column of the page, not a condition of its `WHERE`: the planner cannot estimate these
/// expressions, and with them in the `WHERE` it read the whole table for every page of a
/// big seller (a parallel sequential scan instead of the key index: 47 ms a page instead of
/// 0.4 ms, and PostgreSQL's CPU per fanned-out document ×3.7 in the fan-out bench).
fn searchable(event_type: &EventType) -> String {
    let (Some(statuses), Some(column)) = (
        &event_type.document.searchable_statuses,
        &event_type.status_column,
    ) else {
        return "true".to_owned();
    };
    let literals: Vec<String> = statuses
        .iter()
        .map(|s| format!("'{}'", s.replace('\'', "''")))
        .collect();
    if literals.is_empty() {
        return "false".to_owned();
    }
    format!(
        "(jsonb_typeof(to_jsonb(d.\"{column}\")) = 'string' \
         AND to_jsonb(d.\"{column}\") #>> '{{}}' IN ({}))",
        literals.join(", ")
    )
}

/// The SQL of one relation's fan-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FanOutSql {
    /// One page of REBUILD jobs: `$1` the related row, `$2` the page size, `$3` the job
    /// table name of the documents, `$4` trace id, `$5` traceparent, `$6` the related
    /// change's `created_at` (and `$7` the last key of the previous page, in `next`).
    /// Answers: documents in the page, jobs added, the page's last key, documents in the page
    /// the status policy keeps.
    ///
    /// A REBUILD job is dated by the related change (`created_at = $6`), not by its own
    /// insert: the consumer measures end-to-end latency from `created_at`, and for a joined
    /// change that is the related row's commit. Nothing orders or leases by it (claims go by
    /// id, leases by `locked_until`); the oldest-pending age then says how long the change has
    /// waited, fan-out included.
    ///
    /// Documents the status policy keeps out of the index are not in the page: a REBUILD
    /// job would only delete a document that is not there. Safe whatever the order of
    /// commits: such a document got out of the index by a change of its own row (its own job
    /// deletes it, or did), and when its status changes back, that UPDATE's job reads the
    /// joined view after this related change committed.
    pub(crate) first: String,
    pub(crate) next: String,
    /// The pages of a TRUNCATE of the related table (same parameters; `$1` is any JSON
    /// object): every document that could have joined a truncated row. For a parent, the
    /// documents whose foreign key is not null; for children, every document. After the
    /// truncate the database no longer knows which documents had related rows, so all the
    /// event type's documents the status policy admits are rebuilt (the others are not in
    /// the index).
    pub(crate) all_first: String,
    pub(crate) all_next: String,
    /// Records progress and renews the lease: `$1` job id, `$2` progress, `$3` lease
    /// seconds, `$4` worker id. Zero rows: the job is no longer this worker's.
    pub(crate) progress: String,
    /// REBUILD jobs of the documents' table `$1` not yet indexed (pending, claimed or sent).
    /// Three counts rather than `status IN (…)`: each is answered from its state's partial
    /// index (the `IN` form cost PostgreSQL three times the CPU).
    pub(crate) outstanding: String,
}

/// The condition on the document row `d` that it contains the related row `$1` of the last
/// relation of `chain`: its columns match the row's (a relation of the document), or a row
/// of each relation above joins it back to `d` (a relation of a relation: `EXISTS` over
/// the join of the tables along the path, which the read joins the other way).
fn contains(schema: &str, chain: &[&Relation]) -> String {
    let Some((changed, above)) = chain.split_last() else {
        return "false".to_owned();
    };
    let related = qualified(schema, &changed.table);
    let last = if above.is_empty() {
        "d".to_owned()
    } else {
        alias_at(above.len())
    };
    let matches = changed
        .local_columns
        .iter()
        .zip(&changed.related_columns)
        .map(|(local, other)| {
            format!(
                "{last}.\"{local}\" = (jsonb_populate_record(NULL::{related}, $1::jsonb)).\"{other}\""
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ");
    let Some((top, deeper)) = above.split_first() else {
        return matches;
    };
    let mut from = format!("{} r", qualified(schema, &top.table));
    for (i, relation) in deeper.iter().enumerate() {
        let (alias, parent) = (alias_at(i + 2), alias_at(i + 1));
        from.push_str(&format!(
            " JOIN {} {alias} ON {}",
            qualified(schema, &relation.table),
            join_condition(relation, &alias, &parent)
        ));
    }
    format!(
        "EXISTS (SELECT 1 FROM {from} WHERE {} AND {matches})",
        join_condition(top, "r", "d")
    )
}

impl FanOutSql {
    /// The fan-out of the last relation of `chain` (the relations from the document's down
    /// to it) of `event_type`.
    pub(crate) fn new(schema: &str, event_type: &EventType, chain: &[&Relation]) -> Self {
        let table = qualified(schema, &event_type.table);
        let key = &event_type.key;
        let queue = format!("\"{schema}\".elasticsearch_sync_queue");
        let matches = contains(schema, chain);
        // A truncation of the related table: every document that may have joined it. Only a
        // relation of the document's own row can say which (its foreign key is set); deeper
        // or child rows leave no trace once gone, so every document. `$1` is still named (a
        // statement's parameters are all typed from its text).
        let any = match chain {
            [relation] if relation.kind == RelationKind::Parent => relation
                .local_columns
                .iter()
                .map(|local| format!("d.\"{local}\" IS NOT NULL"))
                .chain(std::iter::once("$1::jsonb IS NOT NULL".to_owned()))
                .collect::<Vec<_>>()
                .join(" AND "),
            _ => "$1::jsonb IS NOT NULL".to_owned(),
        };
        let keep = searchable(event_type);
        let page = |matches: &str, after: &str| {
            format!(
                "WITH page AS ( \
                   SELECT d.\"{key}\" AS k, {keep} AS keep FROM {table} d WHERE {matches}{after} \
                   ORDER BY d.\"{key}\" LIMIT $2), \
                 added AS ( \
                   INSERT INTO {queue} (table_name, operation, record_id, change_data, trace_id, traceparent, created_at) \
                   SELECT $3::text, 'REBUILD', to_jsonb(p.k) #>> '{{}}', '{{}}'::jsonb, $4::text, $5::text, $6::timestamptz FROM page p \
                   WHERE p.keep AND NOT EXISTS (SELECT 1 FROM {queue} q WHERE q.table_name = $3::text \
                     AND q.record_id = to_jsonb(p.k) #>> '{{}}' AND q.status = 'pending' AND q.operation = 'REBUILD') \
                   RETURNING 1) \
                 SELECT (SELECT count(*) FROM page), (SELECT count(*) FROM added), \
                        (SELECT to_jsonb(k) #>> '{{}}' FROM page ORDER BY k DESC LIMIT 1), \
                        (SELECT count(*) FROM page WHERE keep)"
            )
        };
        let after = format!(" AND d.\"{key}\" > {}", typed_key(&table, key, "$7::text"));
        Self {
            first: page(&matches, ""),
            next: page(&matches, &after),
            all_first: page(&any, ""),
            all_next: page(&any, &after),
            outstanding: {
                let count = |status: &str| {
                    format!(
                        "(SELECT count(*) FROM {queue} WHERE status = '{status}' \
                         AND table_name = $1 AND operation = 'REBUILD')"
                    )
                };
                format!(
                    "SELECT {} + {} + {}",
                    count("pending"),
                    count("processing"),
                    count("sent")
                )
            },
            progress: format!(
                "UPDATE {queue} SET change_data = change_data || jsonb_build_object('fanout', $2::jsonb), \
                 locked_until = now() + make_interval(secs => $3) \
                 WHERE id = $1 AND status = 'processing' AND locked_by = $4"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_type::FieldType;

    fn joined() -> EventType {
        EventType::new("listings", "listings")
            .with_relation(
                Relation::parent("seller", "users", &["user_id"], &["id"])
                    .field("name", FieldType::Long),
            )
            .with_relation(
                Relation::children("images", "shop.images", &["listing_id"], &["id"])
                    .field("url", FieldType::Long)
                    .order_by("position", true)
                    .limit(3),
            )
    }

    #[test]
    fn a_read_locks_then_versions_then_selects_the_rows_with_their_relations() {
        let sql = ReadSql::new("app", &joined());
        assert!(sql.lock.contains("ORDER BY 1, 2"), "locks in one order");
        assert!(
            sql.version
                .contains("'\"app\".elasticsearch_sync_queue', 'id'")
        );
        let select = &sql.select;
        assert!(
            select.contains("FROM \"app\".\"users\" r WHERE r.\"id\" = d.\"user_id\" LIMIT 1"),
            "{select}"
        );
        assert!(
            select.contains("FROM \"shop\".\"images\" r WHERE r.\"listing_id\" = d.\"id\""),
            "{select}"
        );
        assert!(
            select.contains("ORDER BY r.\"position\" DESC, r.\"id\" LIMIT 3"),
            "{select}"
        );
        assert!(
            select.contains("jsonb_populate_record(NULL::\"app\".\"listings\""),
            "typed keys keep the index usable"
        );
    }

    #[test]
    fn a_fan_out_pages_by_key_and_skips_documents_already_waiting() {
        let event_type = joined();
        let sql = FanOutSql::new("app", &event_type, &[&event_type.relations[0]]);
        assert!(sql.first.contains(
            "d.\"user_id\" = (jsonb_populate_record(NULL::\"app\".\"users\", $1::jsonb)).\"id\""
        ));
        assert!(!sql.first.contains("$7"));
        assert!(
            sql.first.contains("$6::timestamptz"),
            "dated by the related change"
        );
        assert!(sql.next.contains("d.\"id\" > "));
        assert!(sql.first.contains("NOT EXISTS"));
        assert!(sql.progress.contains("locked_by = $4"));
    }

    #[test]
    fn a_truncate_pages_through_every_document_that_could_have_joined_it() {
        let event_type = joined();
        let seller = FanOutSql::new("app", &event_type, &[&event_type.relations[0]]);
        assert!(
            seller
                .all_first
                .contains("WHERE d.\"user_id\" IS NOT NULL AND $1::jsonb IS NOT NULL"),
            "a parent: the documents with a foreign key"
        );
        assert!(seller.all_next.contains("d.\"id\" > "));
        let images = FanOutSql::new("app", &event_type, &[&event_type.relations[1]]);
        assert!(
            images
                .all_first
                .contains("WHERE $1::jsonb IS NOT NULL ORDER BY"),
            "children: every document"
        );
        assert!(images.all_first.contains("WHERE p.keep AND NOT EXISTS"));
    }

    #[test]
    fn a_fan_out_leaves_out_documents_the_status_policy_excludes() {
        let mut event_type = joined();
        let sql = FanOutSql::new("app", &event_type, &[&event_type.relations[0]]);
        assert!(!sql.first.contains("jsonb_typeof"), "no policy, no filter");
        assert!(sql.first.contains("true AS keep"));
        event_type.status_column = Some("status".into());
        event_type.document.searchable_statuses = Some(vec!["active".into(), "it's".into()]);
        let sql = FanOutSql::new("app", &event_type, &[&event_type.relations[0]]);
        for page in [&sql.first, &sql.next] {
            assert!(
                page.contains("to_jsonb(d.\"status\") #>> '{}' IN ('active', 'it''s')) AS keep"),
                "{page}"
            );
            assert!(page.contains("WHERE p.keep AND NOT EXISTS"), "{page}");
        }
    }

    fn deep() -> EventType {
        EventType::new("jobs", "job_posts")
            .with_relation(
                Relation::parent("company", "companies", &["company_id"], &["id"])
                    .field("name", FieldType::Long)
                    .relation(
                        Relation::parent("industry", "industries", &["industry_id"], &["id"])
                            .relation(
                                Relation::parent("sector", "sectors", &["sector_id"], &["id"])
                                    .field("name", FieldType::Long),
                            ),
                    ),
            )
            .with_relation(
                Relation::children("tags", "post_tags", &["post_id"], &["id"])
                    .key("tag_id")
                    .order_by("position", false)
                    .through(
                        Relation::parent("tag", "tags", &["tag_id"], &["id"])
                            .field("name", FieldType::Long),
                    ),
            )
    }

    #[test]
    fn a_read_nests_a_subquery_per_level_under_names_no_column_has() {
        let select = ReadSql::new("app", &deep()).select;
        for part in [
            "(SELECT (jsonb_build_object('id', r.\"id\", 'industry_id', r.\"industry_id\", 'name', r.\"name\") || jsonb_build_object('#industry', ",
            "FROM \"app\".\"industries\" r2 WHERE r2.\"id\" = r.\"industry_id\" LIMIT 1)",
            "FROM \"app\".\"sectors\" r3 WHERE r3.\"id\" = r2.\"sector_id\" LIMIT 1)",
            "FROM \"app\".\"companies\" r WHERE r.\"id\" = d.\"company_id\" LIMIT 1)",
            "'#tag', (SELECT jsonb_build_object('id', r2.\"id\", 'name', r2.\"name\") FROM \"app\".\"tags\" r2 WHERE r2.\"id\" = r.\"tag_id\" LIMIT 1)",
            "FROM \"app\".\"post_tags\" r WHERE r.\"post_id\" = d.\"id\" ORDER BY r.\"position\", r.\"tag_id\" LIMIT 10",
        ] {
            assert!(select.contains(part), "{part}\n in {select}");
        }
    }

    #[test]
    fn a_fan_out_below_the_top_joins_back_along_the_path() {
        let jobs = deep();
        let company = &jobs.relations[0];
        let industry = &company.relations[0];
        let sector = &industry.relations[0];
        let sql = FanOutSql::new("app", &jobs, &[company, industry, sector]);
        let path = "EXISTS (SELECT 1 FROM \"app\".\"companies\" r \
                    JOIN \"app\".\"industries\" r2 ON r2.\"id\" = r.\"industry_id\" \
                    WHERE r.\"id\" = d.\"company_id\" \
                    AND r2.\"sector_id\" = (jsonb_populate_record(NULL::\"app\".\"sectors\", $1::jsonb)).\"id\")";
        assert!(sql.first.contains(path), "{}", sql.first);
        assert!(sql.next.contains(path));
        let sql = FanOutSql::new("app", &jobs, &[company, industry]);
        assert!(sql.first.contains(
            "EXISTS (SELECT 1 FROM \"app\".\"companies\" r WHERE r.\"id\" = d.\"company_id\" \
             AND r.\"industry_id\" = (jsonb_populate_record(NULL::\"app\".\"industries\", $1::jsonb)).\"id\")"
        ), "{}", sql.first);
        let tags = &jobs.relations[1];
        let sql = FanOutSql::new("app", &jobs, &[tags, &tags.relations[0]]);
        assert!(
            sql.first.contains(
                "EXISTS (SELECT 1 FROM \"app\".\"post_tags\" r WHERE r.\"post_id\" = d.\"id\" \
             AND r.\"tag_id\" = (jsonb_populate_record(NULL::\"app\".\"tags\", $1::jsonb)).\"id\")"
            ),
            "a tag rename: the documents that link it"
        );
        let sql = FanOutSql::new("app", &jobs, &[tags]);
        assert!(sql.first.contains(
            "WHERE d.\"id\" = (jsonb_populate_record(NULL::\"app\".\"post_tags\", $1::jsonb)).\"post_id\""
        ), "a link added or removed: its one document");
    }

    #[test]
    fn an_aggregate_is_one_subquery_with_its_filter() {
        use crate::event_type::Aggregate;
        let jobs = EventType::new("jobs", "job_posts")
            .with_relation(
                Relation::aggregate(
                    "open",
                    "applications",
                    &["post_id"],
                    &["id"],
                    Aggregate::Count,
                    FieldType::Long,
                )
                .filter("status", "=", Some("open")),
            )
            .with_relation(Relation::aggregate(
                "paid",
                "applications",
                &["post_id"],
                &["id"],
                Aggregate::Sum("fee".into()),
                FieldType::Double,
            ))
            .with_relation(Relation::aggregate(
                "any",
                "applications",
                &["post_id"],
                &["id"],
                Aggregate::Exists,
                FieldType::Boolean,
            ));
        let select = ReadSql::new("app", &jobs).select;
        for part in [
            "'open', (SELECT to_jsonb(count(*)) FROM \"app\".\"applications\" r WHERE r.\"post_id\" = d.\"id\" AND r.\"status\" = E'open')",
            "'paid', (SELECT to_jsonb(coalesce(sum(r.\"fee\"), 0)) FROM \"app\".\"applications\" r WHERE r.\"post_id\" = d.\"id\")",
            "'any', to_jsonb(EXISTS (SELECT 1 FROM \"app\".\"applications\" r WHERE r.\"post_id\" = d.\"id\"))",
        ] {
            assert!(select.contains(part), "{part}\n in {select}");
        }
        let sql = FanOutSql::new("app", &jobs, &[&jobs.relations[0]]);
        assert!(sql.first.contains(
            "d.\"id\" = (jsonb_populate_record(NULL::\"app\".\"applications\", $1::jsonb)).\"post_id\""
        ));
    }
}
