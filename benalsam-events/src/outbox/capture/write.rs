//! The capture's transaction: a look's jobs, the position and one NOTIFY, committed
//! together (see the module's exactly-once argument), and the SQL that turns the WAL's rows
//! into the trigger's jobs.

use tokio_postgres::Client;

use super::changes::Rows;
use super::pgoutput::lsn_text;
use super::{Capture, Target};
use crate::error::{Error, Result};

impl Capture {
    /// Writes the jobs, the position and a NOTIFY in one transaction; the jobs written.
    pub(super) async fn write(
        &self,
        client: &mut Client,
        rows: &[(&Target, Rows)],
        upto: u64,
    ) -> Result<usize> {
        let fail = |what: &'static str| move |e| Error::postgres(what, e);
        let schema = &self.schema;
        let tx = client
            .transaction()
            .await
            .map_err(fail("starting the capture's transaction"))?;
        let mut written = 0;
        for (target, rows) in rows.iter().filter(|(_, r)| !r.is_empty()) {
            let sql = insert_sql(schema, &target.schema, &target.table);
            let count: i64 = tx
                .query_one(
                    &sql,
                    &[
                        &rows.operations,
                        &rows.new,
                        &rows.old,
                        &rows.committed,
                        &target.jobs,
                        &target.key,
                        &target.ignore,
                    ],
                )
                .await
                .map_err(|e| Error::postgres(format!("writing the jobs of {}", target.jobs), e))?
                .get(0);
            written += count as usize;
        }
        tx.execute(
            &format!(
                "UPDATE \"{schema}\".benalsam_capture
                    SET position = $2::text::pg_lsn, updated_at = now() WHERE slot = $1"
            ),
            &[&self.slot, &lsn_text(upto)],
        )
        .await
        .map_err(fail("recording the capture's position"))?;
        if written > 0 {
            tx.execute("SELECT pg_notify($1, '')", &[&self.channel])
                .await
                .map_err(fail("waking the bridges"))?;
        }
        tx.commit()
            .await
            .map_err(fail("committing the captured jobs"))?;
        Ok(written)
    }
}

/// The table's columns today, in order.
pub(super) async fn columns_of(client: &Client, schema: &str, table: &str) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = to_regclass(format('%I.%I', $1::text, $2::text))
                AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&schema, &table],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading the columns of {schema}.{table}"), e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The job insert of one event type: the record literals become the table's type and its
/// `to_jsonb`, as the trigger builds `change_data`; an UPDATE that changed only ignored
/// columns writes nothing; a TRUNCATE job also moves the table's truncation mark. Ids follow
/// the rows' order, which is commit order.
fn insert_sql(outbox: &str, schema: &str, table: &str) -> String {
    format!(
        "WITH c AS (
             SELECT u.ord, u.op, u.at,
                    to_jsonb(CAST(u.new_row AS \"{schema}\".\"{table}\")) AS n,
                    to_jsonb(CAST(u.old_row AS \"{schema}\".\"{table}\")) AS o
               FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
                    WITH ORDINALITY AS u(op, new_row, old_row, at, ord)),
         ins AS (
             INSERT INTO \"{outbox}\".elasticsearch_sync_queue
                    (table_name, operation, record_id, change_data, created_at)
             SELECT $5, c.op,
                    CASE c.op WHEN 'TRUNCATE' THEN '*' ELSE coalesce(c.n, c.o) ->> $6 END,
                    CASE c.op WHEN 'INSERT' THEN c.n WHEN 'DELETE' THEN c.o
                              WHEN 'UPDATE' THEN jsonb_build_object('old', c.o, 'new', c.n)
                              ELSE '{{}}' END,
                    timestamptz '2000-01-01 00:00:00+00' + c.at * interval '1 microsecond'
               FROM c
              WHERE c.op <> 'UPDATE' OR (c.o - $7::text[]) <> (c.n - $7::text[])
              ORDER BY c.ord
             RETURNING id, operation),
         truncated AS (
             INSERT INTO \"{outbox}\".benalsam_truncations (table_name, job_id)
             SELECT $5, max(id) FROM ins WHERE operation = 'TRUNCATE' HAVING count(*) > 0
             ON CONFLICT (table_name)
             DO UPDATE SET job_id = greatest(benalsam_truncations.job_id, EXCLUDED.job_id))
         SELECT count(*) FROM ins"
    )
}
