//! Aggregates over children: one scalar field of the document computed from the rows of a
//! child table (the number of a post's open applications, the date of a listing's newest
//! review), kept right by the child table's trigger like any relation.
//!
//! The filter is declared, never written as SQL: a column (checked against the catalog like
//! every other), an operator from a fixed list, and a value written into the SQL as an
//! escaped string literal, which PostgreSQL casts to the column's type. Nothing of the file
//! reaches the consumer's SQL unchecked.

use serde_json::{Map, Value};

use super::document::{Field, FieldType, field_value};
use super::{Relation, RelationKind};

/// What an aggregate computes over the matching child rows.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Aggregate {
    /// How many rows (0 without any).
    Count,
    /// Whether there is at least one.
    Exists,
    /// The sum of a column (0 without any row).
    Sum(String),
    /// The smallest value of a column (absent without any row).
    Min(String),
    /// The largest value of a column (absent without any row).
    Max(String),
}

/// The operators a filter may use.
pub(crate) const OPERATORS: &[&str] = &["=", "<>", "<", "<=", ">", ">=", "is_null", "is_not_null"];

/// A condition on the child rows an aggregate counts: `column op value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Filter {
    pub(crate) column: String,
    /// One of [`OPERATORS`] (checked by `validate`).
    pub(crate) op: String,
    /// The value compared with (none for `is_null` and `is_not_null`).
    pub(crate) value: Option<String>,
}

impl Relation {
    /// An aggregate over children: the rows of `table` whose `foreign_key` columns equal the
    /// document row's `references` columns, reduced by `function` to one value, mapped as
    /// `kind` (`Long` for a count, `Boolean` for exists, the column's type for min and max).
    ///
    /// ```
    /// use benalsam_events::EventType;
    /// use benalsam_events::event_type::{Aggregate, FieldType, Relation};
    ///
    /// let listings = EventType::listings().with_relation(
    ///     Relation::aggregate(
    ///         "open_offers", "offers", &["listing_id"], &["id"], Aggregate::Count, FieldType::Long,
    ///     )
    ///     .filter("status", "=", Some("open")),
    /// );
    /// assert!(listings.validate().is_ok());
    /// ```
    pub fn aggregate(
        name: &str,
        table: &str,
        foreign_key: &[&str],
        references: &[&str],
        function: Aggregate,
        kind: FieldType,
    ) -> Self {
        let mut relation = Self::children(name, table, foreign_key, references);
        relation.kind = RelationKind::Aggregate { function, kind };
        relation
    }

    /// An aggregate: counts only the rows where `column op value` holds (`op`: `=`, `<>`,
    /// `<`, `<=`, `>`, `>=`, or `is_null` / `is_not_null` without a value).
    pub fn filter(mut self, column: &str, op: &str, value: Option<&str>) -> Self {
        self.filter = Some(Filter {
            column: column.to_owned(),
            op: op.to_owned(),
            value: value.map(str::to_owned),
        });
        self
    }

    /// The columns an aggregate reads besides the joined ones: its column and its filter's.
    pub(crate) fn aggregate_columns(&self) -> Vec<String> {
        let mut columns = Vec::new();
        if let RelationKind::Aggregate {
            function: Aggregate::Sum(c) | Aggregate::Min(c) | Aggregate::Max(c),
            ..
        } = &self.kind
        {
            columns.push(c.clone());
        }
        if let Some(filter) = &self.filter {
            columns.push(filter.column.clone());
        }
        columns
    }

    /// The filter as SQL on the row alias `alias` (` AND …`, or nothing). The column and the
    /// operator were validated; the value is written as an escaped literal (`E'…'`, with its
    /// backslashes and quotes doubled, whatever `standard_conforming_strings` says).
    pub(crate) fn filter_sql(&self, alias: &str) -> String {
        let Some(filter) = &self.filter else {
            return String::new();
        };
        let column = format!("{alias}.\"{}\"", filter.column);
        match filter.op.as_str() {
            "is_null" => format!(" AND {column} IS NULL"),
            "is_not_null" => format!(" AND {column} IS NOT NULL"),
            op => {
                let value = filter.value.as_deref().unwrap_or_default();
                let escaped = value.replace('\\', "\\\\").replace('\'', "''");
                format!(" AND {column} {op} E'{escaped}'")
            }
        }
    }

    /// Why its aggregate settings cannot work (checked by `validate`), if they cannot.
    pub(crate) fn aggregate_problem(&self) -> Option<(&'static str, String)> {
        let RelationKind::Aggregate { kind, .. } = &self.kind else {
            return self
                .filter
                .as_ref()
                .map(|_| ("where", "applies to kind = \"aggregate\" only".to_owned()));
        };
        if !self.fields.is_empty() || !self.relations.is_empty() {
            return Some((
                "fields",
                "an aggregate is one value: it takes no fields and no relations".to_owned(),
            ));
        }
        if matches!(kind, FieldType::GeoPoint { .. } | FieldType::Object) {
            return Some((
                "type",
                "an aggregate is a long, double, date, keyword or boolean".to_owned(),
            ));
        }
        let filter = self.filter.as_ref()?;
        if !OPERATORS.contains(&filter.op.as_str()) {
            return Some((
                "where.op",
                format!("{:?} is not one of {}", filter.op, OPERATORS.join(", ")),
            ));
        }
        let wants_value = !filter.op.starts_with("is_");
        if wants_value != filter.value.is_some() {
            return Some((
                "where.value",
                format!(
                    "{} takes {}",
                    filter.op,
                    if wants_value { "a value" } else { "no value" }
                ),
            ));
        }
        if filter.value.as_deref().is_some_and(|v| v.contains('\0')) {
            return Some(("where.value", "may not hold a NUL character".to_owned()));
        }
        None
    }

    /// The aggregate's value from what the database read (a JSON scalar), as its type.
    pub(crate) fn aggregate_value(
        &self,
        kind: &FieldType,
        read: &Value,
    ) -> std::result::Result<Option<Value>, String> {
        let mut row = Map::new();
        row.insert("v".to_owned(), read.clone());
        field_value("v", &Field::from_column("v", kind.clone()), &row)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn open() -> Relation {
        Relation::aggregate(
            "open_applications",
            "applications",
            &["post_id"],
            &["id"],
            Aggregate::Count,
            FieldType::Long,
        )
        .filter("status", "=", Some("open"))
    }

    #[test]
    fn a_filter_is_a_checked_column_a_listed_operator_and_an_escaped_literal() {
        assert_eq!(open().filter_sql("r"), " AND r.\"status\" = E'open'");
        let sneaky = open().filter("status", "=", Some("x' OR true --\\"));
        assert_eq!(
            sneaky.filter_sql("r"),
            " AND r.\"status\" = E'x'' OR true --\\\\'",
            "the quote and the backslash stay inside the literal"
        );
        assert_eq!(
            open().filter("closed_at", "is_null", None).filter_sql("r2"),
            " AND r2.\"closed_at\" IS NULL"
        );
        assert_eq!(open().aggregate_problem(), None);
        for (bad, key) in [
            (open().filter("status", "; DROP", Some("x")), "where.op"),
            (open().filter("status", "=", None), "where.value"),
            (open().filter("status", "is_null", Some("x")), "where.value"),
            (open().field("x", FieldType::Long), "fields"),
            (
                Relation::children("a", "t", &["x"], &["id"]).filter("s", "=", Some("o")),
                "where",
            ),
        ] {
            assert_eq!(
                bad.aggregate_problem().map(|(k, _)| k),
                Some(key),
                "{bad:?}"
            );
        }
        let err = open()
            .filter("bad column", "=", Some("x"))
            .validate("jobs", &[])
            .expect_err("not an identifier")
            .to_string();
        assert!(err.contains("relations.open_applications.where"), "{err}");
    }

    #[test]
    fn an_aggregate_reads_its_columns_and_gives_one_typed_value() {
        let newest = Relation::aggregate(
            "newest_review",
            "reviews",
            &["listing_id"],
            &["id"],
            Aggregate::Max("created_at".into()),
            FieldType::Date,
        );
        assert_eq!(newest.columns(), ["created_at", "id", "listing_id"]);
        assert_eq!(open().columns(), ["id", "post_id", "status"]);
        assert_eq!(open().value(&json!(3)).expect("a count"), Some(json!(3)));
        assert_eq!(newest.value(&Value::Null).expect("no review"), None);
        assert_eq!(
            newest
                .value(&json!("2026-12-06T10:00:00+00:00"))
                .expect("a date"),
            Some(json!("2026-12-06T10:00:00+00:00"))
        );
        assert!(open().value(&json!("many")).is_err());
    }

    #[test]
    fn an_aggregate_of_the_file_is_checked_naming_its_key() {
        let file = |relation: &str| {
            format!(
                "[[event_type]]\nname = \"jobs\"\ntable = \"job_posts\"\n\
                 [event_type.document.fields]\ntitle = {{ type = \"text\" }}\n\
                 [event_type.relations.open]\ntable = \"applications\"\nforeign_key = [\"post_id\"]\n{relation}"
            )
        };
        let parse = |relation: &str| {
            crate::event_type::file::parse(&file(relation), "jobs.toml").map_err(|e| e.to_string())
        };
        let jobs = parse("kind = \"aggregate\"\nfunction = \"count\"\nwhere = { column = \"status\", op = \"<>\", value = 3 }")
            .expect("valid");
        assert_eq!(
            jobs[0].relations[0].filter_sql("r"),
            " AND r.\"status\" <> E'3'"
        );
        for (relation, says) in [
            (
                "kind = \"aggregate\"",
                "relations.open.function: an aggregate needs a function",
            ),
            (
                "kind = \"aggregate\"\nfunction = \"max\"\ncolumn = \"at\"",
                "relations.open.type: min and max need",
            ),
            (
                "kind = \"aggregate\"\nfunction = \"count\"\ncolumn = \"at\"",
                "relations.open.column: count and exists",
            ),
            (
                "kind = \"children\"\nfunction = \"count\"",
                "relations.open.function: applies to kind = \"aggregate\"",
            ),
            (
                "kind = \"aggregate\"\nfunction = \"count\"\nlimit = 3",
                "relations.open.limit",
            ),
            (
                "kind = \"aggregate\"\nfunction = \"count\"\nwhere = { column = \"status\", op = \"= 1 OR\", value = \"x\" }",
                "jobs.toml:6: event type \"jobs\", relations.open.where.op",
            ),
            (
                "kind = \"aggregate\"\nfunction = \"count\"\nwhere = { column = \"st atus\", op = \"=\", value = \"x\" }",
                "jobs.toml:11: event type \"jobs\", relations.open.where.column",
            ),
        ] {
            let err = parse(relation).expect_err(says);
            assert!(err.contains(says), "{says}\n {err}");
        }
    }

    proptest::proptest! {
        /// Whatever the file's value holds, it stays one literal: after `E'`, every quote and
        /// backslash of it comes doubled, and the literal ends where the SQL does.
        #[test]
        fn a_filter_value_never_leaves_its_literal(value in "\\PC{0,30}|['\\\\ ;-]{0,12}") {
            let sql = open().filter("status", "<>", Some(&value)).filter_sql("r");
            let body = sql
                .strip_prefix(" AND r.\"status\" <> E'")
                .and_then(|rest| rest.strip_suffix('\''));
            proptest::prop_assert!(body.is_some(), "{}", sql);
            let mut rest = body.unwrap_or_default().chars();
            let mut decoded = String::new();
            while let Some(c) = rest.next() {
                if c == '\'' || c == '\\' {
                    // Inside an E'' literal a quote or a backslash is only ever doubled.
                    proptest::prop_assert_eq!(rest.next(), Some(c), "{}", sql);
                }
                decoded.push(c);
            }
            proptest::prop_assert_eq!(decoded, value);
        }
    }
}
