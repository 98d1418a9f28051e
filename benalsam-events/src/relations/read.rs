//! The joined read: documents `ids` of a joined event type with their related rows, in one
//! transaction under a fresh version (the module documentation of [`crate::relations`] says
//! why this order converges).

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::event_type::EventType;
use crate::outbox::Outbox;
use crate::relations::sql::ReadSql;
use crate::{error::Error, error::Result};

/// Reads the documents `ids` of the joined `event_type` with their related rows, on the
/// outbox's transaction connection (the consumer's [`Ledger`](crate::consume) does this for
/// every batch of joined messages).
pub(crate) async fn read_joined(
    outbox: &Outbox,
    event_type: &EventType,
    ids: &[String],
) -> Result<Read> {
    let mut slot = outbox.transaction_client().await;
    let mut client = match slot.take() {
        Some(client) if !client.is_closed() => client,
        _ => crate::connect::postgres_as(outbox.database_url(), "benalsam-joined").await?,
    };
    let sql = ReadSql::new(&outbox.config().schema, event_type);
    let read = read(&mut client, &sql, event_type, ids).await;
    if !client.is_closed() {
        *slot = Some(client);
    }
    read
}

/// Documents read from the database under one version.
#[derive(Debug, Clone, Default)]
pub(crate) struct Read {
    /// The version every document of this read is written with.
    pub(crate) version: i64,
    /// By record id: the row and the relations' values. An id that is not here has no row.
    pub(crate) rows: HashMap<String, (Value, Map<String, Value>)>,
}

/// Reads the documents `ids` of `event_type` in one transaction on `client` (see the module
/// documentation for why in this order).
async fn read(
    client: &mut tokio_postgres::Client,
    sql: &ReadSql,
    event_type: &EventType,
    ids: &[String],
) -> Result<Read> {
    let fail = |e| {
        Error::postgres(
            format!("reading the joined documents of {}", event_type.name),
            e,
        )
    };
    let tx = client.transaction().await.map_err(fail)?;
    tx.query_one(&sql.lock, &[&event_type.index.alias, &ids])
        .await
        .map_err(fail)?;
    let version: i64 = tx.query_one(&sql.version, &[]).await.map_err(fail)?.get(0);
    let found = tx.query(&sql.select, &[&ids]).await.map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    let mut rows = HashMap::with_capacity(found.len());
    for row in found {
        let id: String = row.get(0);
        let columns: Value = row.get(1);
        let related = match row.get::<_, Value>(2) {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        rows.insert(id, (columns, related));
    }
    Ok(Read { version, rows })
}
