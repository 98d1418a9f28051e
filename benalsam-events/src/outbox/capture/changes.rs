//! From `pgoutput` messages to the rows of the job insert: pure, tested without a server.
//!
//! A peek's messages become whole transactions ([`transactions`]), each with the end of its
//! commit record (the capture's position) and its commit time. The changes of those past the
//! position become, per event type, one row each: its operation and its old and new rows as
//! record literals of the table's type (`("1","a title",)`), which PostgreSQL turns into the
//! same `to_jsonb` the trigger writes (see `capture::write`). An UPDATE that moves a key is
//! a DELETE of the old key and an INSERT of the new one, as the trigger writes it.

use std::collections::HashMap;
use std::sync::Arc;

use super::pgoutput::{Datum, DecodeError, Message, Relation, Tuple};

/// One committed transaction's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transaction {
    pub(crate) end_lsn: u64,
    pub(crate) commit_time: i64,
    pub(crate) changes: Vec<Change>,
}

/// One change of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) relation: Arc<Relation>,
    pub(crate) kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    Insert(Tuple),
    Update(Option<Tuple>, Tuple),
    Delete(Tuple),
    Truncate,
}

/// Groups a peek's messages into its transactions. A change of a relation the session has
/// not described, or a change outside a transaction, is an error: the plugin never sends one.
pub(crate) fn transactions(
    messages: impl IntoIterator<Item = Result<Message, DecodeError>>,
) -> Result<Vec<Transaction>, String> {
    let mut relations: HashMap<u32, Arc<Relation>> = HashMap::new();
    let mut open: Option<(i64, Vec<Change>)> = None;
    let mut done = Vec::new();
    for message in messages {
        let message = message.map_err(|e| e.to_string())?;
        let (relation, kind) = match message {
            Message::Begin { commit_time } => {
                open = Some((commit_time, Vec::new()));
                continue;
            }
            Message::Commit { end_lsn } => {
                let (commit_time, changes) = open
                    .take()
                    .ok_or("a commit without its transaction's start")?;
                done.push(Transaction {
                    end_lsn,
                    commit_time,
                    changes,
                });
                continue;
            }
            Message::Relation(relation) => {
                relations.insert(relation.id, Arc::new(relation));
                continue;
            }
            Message::Other => continue,
            Message::Insert { relation, new } => (vec![relation], Kind::Insert(new)),
            Message::Update { relation, old, new } => (vec![relation], Kind::Update(old, new)),
            Message::Delete { relation, old } => (vec![relation], Kind::Delete(old)),
            Message::Truncate { relations } => (relations, Kind::Truncate),
        };
        let (_, changes) = open.as_mut().ok_or("a change outside of a transaction")?;
        for id in relation {
            let relation = relations
                .get(&id)
                .ok_or_else(|| format!("a change of relation {id}, which was never described"))?;
            changes.push(Change {
                relation: Arc::clone(relation),
                kind: kind.clone(),
            });
        }
    }
    Ok(done)
}

/// The rows of one event type's job insert, in the order the changes committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Rows {
    pub(crate) operations: Vec<&'static str>,
    pub(crate) new: Vec<Option<String>>,
    pub(crate) old: Vec<Option<String>>,
    /// Commit times, microseconds since 2000-01-01 UTC.
    pub(crate) committed: Vec<i64>,
    /// Changes left out because their key was NULL (the trigger would have refused them).
    pub(crate) keyless: usize,
}

impl Rows {
    fn push(&mut self, operation: &'static str, old: Option<String>, new: Option<String>, at: i64) {
        self.operations.push(operation);
        self.old.push(old);
        self.new.push(new);
        self.committed.push(at);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }

    /// Adds what `change` asks of an event type keyed by `key`, with `attributes` the
    /// table's columns today (the record literal's fields, in order).
    pub(crate) fn add(
        &mut self,
        change: &Change,
        key: &str,
        attributes: &[String],
        at: i64,
    ) -> Result<(), String> {
        let columns = &change.relation.columns;
        let key_of = |tuple: &Tuple| match columns.iter().position(|c| c == key) {
            Some(i) => match tuple.get(i) {
                Some(Datum::Text(text)) => Some(text.clone()),
                _ => None,
            },
            None => None,
        };
        let literal = |tuple: &Tuple, old: Option<&Tuple>| literal(attributes, columns, tuple, old);
        match &change.kind {
            Kind::Truncate => self.push("TRUNCATE", None, None, at),
            Kind::Insert(new) | Kind::Delete(new) if key_of(new).is_none() => self.keyless += 1,
            Kind::Insert(new) => self.push("INSERT", None, Some(literal(new, None)?), at),
            Kind::Delete(old) => self.push("DELETE", Some(literal(old, None)?), None, at),
            Kind::Update(None, _) => {
                return Err(format!(
                    "an update of {}.{} without its old row: its REPLICA IDENTITY must be FULL (migrate sets it)",
                    change.relation.schema, change.relation.name
                ));
            }
            Kind::Update(Some(old), new) => {
                let (old_key, new_key) = (key_of(old), key_of(new));
                if old_key.is_none() || new_key.is_none() {
                    self.keyless += 1;
                    return Ok(());
                }
                let (old_row, new_row) = (literal(old, None)?, literal(new, Some(old))?);
                if old_key == new_key {
                    self.push("UPDATE", Some(old_row), Some(new_row), at);
                } else {
                    self.push("DELETE", Some(old_row), None, at);
                    self.push("INSERT", None, Some(new_row), at);
                }
            }
        }
        Ok(())
    }
}

/// The record literal of `tuple` (whose columns are `columns`) for a table whose columns
/// are `attributes` today: a column the WAL lacks (added since) is NULL, one the table lost
/// is left out. An unchanged TOASTed value is taken from `old`, the whole old row a FULL
/// replica identity logs.
pub(crate) fn literal(
    attributes: &[String],
    columns: &[String],
    tuple: &Tuple,
    old: Option<&Tuple>,
) -> Result<String, String> {
    let mut out = String::from("(");
    for (n, attribute) in attributes.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let Some(i) = columns.iter().position(|c| c == attribute) else {
            continue;
        };
        let datum = match tuple.get(i) {
            Some(Datum::Unchanged) => old.and_then(|o| o.get(i)).unwrap_or(&Datum::Unchanged),
            Some(datum) => datum,
            None => &Datum::Null,
        };
        match datum {
            Datum::Text(text) => quote_into(&mut out, text),
            Datum::Null => {}
            Datum::Unchanged => {
                return Err(format!(
                    "column {attribute}: an unchanged TOASTed value without the old row (REPLICA IDENTITY FULL logs it)"
                ));
            }
        }
    }
    out.push(')');
    Ok(out)
}

/// A field of a record literal: always quoted (an empty string is not NULL), with `"` and
/// `\` escaped as record input reads them.
fn quote_into(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation(columns: &[&str]) -> Arc<Relation> {
        Arc::new(Relation {
            id: 7,
            schema: "shop".into(),
            name: "listings".into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        })
    }

    fn text(values: &[Option<&str>]) -> Tuple {
        values
            .iter()
            .map(|v| v.map_or(Datum::Null, |t| Datum::Text(t.to_owned())))
            .collect()
    }

    fn names(columns: &[&str]) -> Vec<String> {
        columns.iter().map(|c| (*c).to_owned()).collect()
    }

    #[test]
    fn literals_quote_every_value_and_leave_nulls_empty() {
        let columns = names(&["id", "title", "note"]);
        let row = text(&[Some("1"), Some(r#"a "b" \c, (d)"#), None]);
        assert_eq!(
            literal(&columns, &columns, &row, None).as_deref(),
            Ok(r#"("1","a \"b\" \\c, (d)",)"#)
        );
        assert_eq!(
            literal(
                &columns,
                &columns,
                &text(&[Some("1"), Some(""), None]),
                None
            )
            .as_deref(),
            Ok(r#"("1","",)"#)
        );
    }

    #[test]
    fn literals_follow_today_s_columns() {
        let wal = names(&["id", "gone", "title"]);
        let today = names(&["id", "title", "added"]);
        let row = text(&[Some("1"), Some("x"), Some("t")]);
        assert_eq!(
            literal(&today, &wal, &row, None).as_deref(),
            Ok(r#"("1","t",)"#)
        );
    }

    #[test]
    fn unchanged_toast_comes_from_the_old_row() {
        let columns = names(&["id", "body"]);
        let old = text(&[Some("1"), Some("long")]);
        let new = vec![Datum::Text("1".into()), Datum::Unchanged];
        assert_eq!(
            literal(&columns, &columns, &new, Some(&old)).as_deref(),
            Ok(r#"("1","long")"#)
        );
        assert!(literal(&columns, &columns, &new, None).is_err());
    }

    #[test]
    fn a_key_move_is_a_delete_and_an_insert_and_keyless_rows_are_counted() -> Result<(), String> {
        let rel = relation(&["id", "title"]);
        let attributes = names(&["id", "title"]);
        let mut rows = Rows::default();
        let change = |kind| Change {
            relation: Arc::clone(&rel),
            kind,
        };
        let (a, b) = (text(&[Some("1"), Some("x")]), text(&[Some("2"), Some("x")]));
        rows.add(
            &change(Kind::Update(Some(a.clone()), b.clone())),
            "id",
            &attributes,
            5,
        )?;
        rows.add(
            &change(Kind::Update(Some(a.clone()), a.clone())),
            "id",
            &attributes,
            6,
        )?;
        rows.add(
            &change(Kind::Insert(text(&[None, Some("y")]))),
            "id",
            &attributes,
            7,
        )?;
        rows.add(&change(Kind::Truncate), "id", &attributes, 8)?;
        assert_eq!(rows.operations, ["DELETE", "INSERT", "UPDATE", "TRUNCATE"]);
        assert_eq!(rows.committed, [5, 5, 6, 8]);
        assert_eq!(rows.old[0].as_deref(), Some(r#"("1","x")"#));
        assert_eq!(rows.new[1].as_deref(), Some(r#"("2","x")"#));
        assert_eq!(rows.keyless, 1);
        assert!(
            rows.add(&change(Kind::Update(None, a)), "id", &attributes, 9)
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn transactions_carry_their_changes_and_commit() -> Result<(), String> {
        let described = Message::Relation((*relation(&["id"])).clone());
        let messages = vec![
            Ok(Message::Begin { commit_time: 11 }),
            Ok(described),
            Ok(Message::Insert {
                relation: 7,
                new: text(&[Some("1")]),
            }),
            Ok(Message::Truncate {
                relations: vec![7, 7],
            }),
            Ok(Message::Commit { end_lsn: 99 }),
        ];
        let done = transactions(messages)?;
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].end_lsn, done[0].commit_time), (99, 11));
        assert_eq!(done[0].changes.len(), 3);
        let undescribed = vec![
            Ok(Message::Begin { commit_time: 1 }),
            Ok(Message::Delete {
                relation: 8,
                old: text(&[Some("1")]),
            }),
        ];
        assert!(transactions(undescribed).is_err());
        Ok(())
    }
}
