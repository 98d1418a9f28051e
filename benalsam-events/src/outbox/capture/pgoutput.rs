//! The messages of PostgreSQL's `pgoutput` plugin, protocol version 1, as
//! `pg_logical_slot_peek_binary_changes` returns them: one message per row of its answer.
//! Pure, so every branch is tested without a server.
//!
//! Only what capture needs is kept: transaction bounds with the commit's LSN and time, the
//! relations (a table's name and column names, sent before its first change in every
//! decoding session), and the changes with their columns as text. Types, origins and logical
//! messages are skipped.

use std::fmt;

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    /// A transaction starts; it committed at `commit_time` (microseconds since 2000-01-01 UTC).
    Begin {
        commit_time: i64,
    },
    /// The transaction ends; its commit record ends at `end_lsn`.
    Commit {
        end_lsn: u64,
    },
    /// A table's shape, valid for the changes that follow in this decoding session.
    Relation(Relation),
    Insert {
        relation: u32,
        new: Tuple,
    },
    /// `old` is there when the table's replica identity logs it (FULL: the whole old row).
    Update {
        relation: u32,
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: Tuple,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Anything capture does not need (types, origins, logical messages).
    Other,
}

/// A table as the WAL names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relation {
    pub(crate) id: u32,
    pub(crate) schema: String,
    pub(crate) name: String,
    pub(crate) columns: Vec<String>,
}

/// A row's columns, in the relation's order.
pub(crate) type Tuple = Vec<Datum>;

/// One column of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Datum {
    Null,
    /// A TOASTed value the update did not change, which the WAL does not repeat.
    Unchanged,
    /// The value in its type's text form.
    Text(String),
}

/// A message that is not what protocol version 1 says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an unreadable pgoutput message: {}", self.0)
    }
}

/// Reads one message.
pub(crate) fn parse(data: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { data, at: 0 };
    let message = match r.byte()? {
        b'B' => {
            let _final_lsn = r.u64()?;
            let commit_time = r.u64()? as i64;
            let _xid = r.u32()?;
            Message::Begin { commit_time }
        }
        b'C' => {
            let _flags = r.byte()?;
            let _commit_lsn = r.u64()?;
            let end_lsn = r.u64()?;
            let _commit_time = r.u64()?;
            Message::Commit { end_lsn }
        }
        b'R' => Message::Relation(r.relation()?),
        b'I' => {
            let relation = r.u32()?;
            r.expect(b'N')?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut old = None;
            let mut kind = r.byte()?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.byte()?;
            }
            if kind != b'N' {
                return Err(r.error(format!("update without a new row (found {kind:#04x})")));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = r.byte()?;
            if kind != b'K' && kind != b'O' {
                return Err(r.error(format!("delete without an old row (found {kind:#04x})")));
            }
            Message::Delete {
                relation,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let count = r.u32()?;
            let _options = r.byte()?;
            let relations = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Message::Truncate { relations }
        }
        _ => Message::Other,
    };
    Ok(message)
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn error(&self, what: String) -> DecodeError {
        DecodeError(format!("{what} at byte {} of {}", self.at, self.data.len()))
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| self.error(format!("{n} bytes expected")))?;
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn expect(&mut self, kind: u8) -> Result<(), DecodeError> {
        match self.byte()? {
            found if found == kind => Ok(()),
            found => Err(self.error(format!(
                "{:?} expected, found {found:#04x}",
                char::from(kind)
            ))),
        }
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }

    fn text(&mut self, bytes: usize) -> Result<String, DecodeError> {
        let raw = self.take(bytes)?.to_vec();
        String::from_utf8(raw).map_err(|_| self.error("text that is not UTF-8".to_owned()))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.data[self.at.min(self.data.len())..]
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.error("an unterminated name".to_owned()))?;
        let text = self.text(len)?;
        self.at += 1;
        Ok(text)
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32()?;
        let schema = self.string()?;
        let name = self.string()?;
        let _identity = self.byte()?;
        let count = self.u16()?;
        let mut columns = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let _flags = self.byte()?;
            columns.push(self.string()?);
            let _type = self.u32()?;
            let _modifier = self.u32()?;
        }
        Ok(Relation {
            id,
            schema,
            name,
            columns,
        })
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.u16()?;
        (0..count)
            .map(|_| match self.byte()? {
                b'n' => Ok(Datum::Null),
                b'u' => Ok(Datum::Unchanged),
                b't' => {
                    let len = self.u32()? as usize;
                    Ok(Datum::Text(self.text(len)?))
                }
                kind => Err(self.error(format!("a column of kind {kind:#04x}"))),
            })
            .collect()
    }
}

/// An LSN in PostgreSQL's text form (`16/B374D848`).
pub(crate) fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Reads an LSN in its text form.
pub(crate) fn lsn_of(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    (high <= 0xFFFF_FFFF && low <= 0xFFFF_FFFF).then_some((high << 32) | low)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn tuple_bytes(tuple: &[Datum]) -> Vec<u8> {
        let mut out = (tuple.len() as u16).to_be_bytes().to_vec();
        for datum in tuple {
            match datum {
                Datum::Null => out.push(b'n'),
                Datum::Unchanged => out.push(b'u'),
                Datum::Text(text) => {
                    out.push(b't');
                    out.extend((text.len() as u32).to_be_bytes());
                    out.extend(text.as_bytes());
                }
            }
        }
        out
    }

    fn relation_bytes(id: u32, schema: &str, name: &str, columns: &[&str]) -> Vec<u8> {
        let mut out = vec![b'R'];
        out.extend(id.to_be_bytes());
        for text in [schema, name] {
            out.extend(text.as_bytes());
            out.push(0);
        }
        out.push(b'f');
        out.extend((columns.len() as u16).to_be_bytes());
        for column in columns {
            out.push(1);
            out.extend(column.as_bytes());
            out.push(0);
            out.extend(23u32.to_be_bytes());
            out.extend((-1i32).to_be_bytes());
        }
        out
    }

    #[test]
    fn reads_the_messages_capture_needs() {
        let mut begin = vec![b'B'];
        begin.extend(7u64.to_be_bytes());
        begin.extend(1_000_000i64.to_be_bytes());
        begin.extend(42u32.to_be_bytes());
        assert_eq!(
            parse(&begin),
            Ok(Message::Begin {
                commit_time: 1_000_000
            })
        );

        let mut commit = vec![b'C', 0];
        commit.extend(0x1_0000_0010u64.to_be_bytes());
        commit.extend(0x1_0000_0020u64.to_be_bytes());
        commit.extend(5u64.to_be_bytes());
        assert_eq!(
            parse(&commit),
            Ok(Message::Commit {
                end_lsn: 0x1_0000_0020
            })
        );

        assert_eq!(
            parse(&relation_bytes(16385, "shop", "listings", &["id", "title"])),
            Ok(Message::Relation(Relation {
                id: 16385,
                schema: "shop".into(),
                name: "listings".into(),
                columns: vec!["id".into(), "title".into()],
            }))
        );

        let row = vec![Datum::Text("1".into()), Datum::Null, Datum::Unchanged];
        let mut update = vec![b'U'];
        update.extend(9u32.to_be_bytes());
        update.push(b'O');
        update.extend(tuple_bytes(&row));
        update.push(b'N');
        update.extend(tuple_bytes(&row));
        assert_eq!(
            parse(&update),
            Ok(Message::Update {
                relation: 9,
                old: Some(row.clone()),
                new: row.clone()
            })
        );

        let mut truncate = vec![b'T'];
        truncate.extend(2u32.to_be_bytes());
        truncate.push(0);
        truncate.extend(3u32.to_be_bytes());
        truncate.extend(4u32.to_be_bytes());
        assert_eq!(
            parse(&truncate),
            Ok(Message::Truncate {
                relations: vec![3, 4]
            })
        );
        assert_eq!(parse(b"Yanything"), Ok(Message::Other));
    }

    #[test]
    fn short_or_odd_messages_are_errors_not_panics() {
        assert!(parse(b"").is_err());
        assert!(parse(b"I\0\0").is_err());
        assert!(parse(b"D\0\0\0\x01X\0\0").is_err());
        assert!(parse(b"R\0\0\0\x01noterminator").is_err());
        let mut insert = vec![b'I'];
        insert.extend(1u32.to_be_bytes());
        insert.push(b'N');
        insert.extend(1u16.to_be_bytes());
        insert.push(b't');
        insert.extend(u32::MAX.to_be_bytes());
        assert!(parse(&insert).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn rows_come_back_as_written(
            values in proptest::collection::vec(proptest::option::of(".{0,12}"), 0..8),
            relation in any::<u32>(),
        ) {
            let row: Tuple = values
                .into_iter()
                .map(|v| v.map_or(Datum::Null, Datum::Text))
                .collect();
            let mut insert = vec![b'I'];
            insert.extend(relation.to_be_bytes());
            insert.push(b'N');
            insert.extend(tuple_bytes(&row));
            prop_assert_eq!(parse(&insert), Ok(Message::Insert { relation, new: row }));
        }

        #[test]
        fn lsns_read_back(lsn in any::<u64>()) {
            prop_assert_eq!(lsn_of(&lsn_text(lsn)), Some(lsn));
        }
    }
}
