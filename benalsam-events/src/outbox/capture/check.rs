//! What the bridge checks at start: everything capture through its slot needs, each refusal
//! saying what to do; and, for a bridge without the setting, whether the outbox is captured.

use tokio_postgres::Client;

use super::setup::{SETTING, TRIGGERS, require_logical, validate_slot};
use crate::config::DatabaseUrl;
use crate::error::{Error, Result};
use crate::event_type::{EventType, sync_trigger};

/// At the start of a bridge without the setting: a warning when the outbox is captured (this
/// bridge publishes, and another bridge must capture, or the changes stay in the slot).
pub(crate) async fn warn_if_captured(url: &DatabaseUrl, schema: &str) -> Result<()> {
    let client = crate::connect::postgres(url).await?;
    let found = client
        .query(
            &format!("SELECT slot FROM \"{schema}\".benalsam_capture ORDER BY 1"),
            &[],
        )
        .await;
    let slots: Vec<String> = match found {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        // A least-privilege bridge of an outbox fed by triggers has no grant on the table
        // (nothing of its work reads it): then it cannot know, and says nothing.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            tracing::debug!(error = %e, "cannot read benalsam_capture; not looking for WAL captures");
            Vec::new()
        }
        Err(e) => return Err(Error::postgres("looking for WAL captures", e)),
    };
    for slot in slots {
        tracing::warn!(%slot, "the outbox is captured from the WAL, and this bridge does not capture \
            (BENALSAM_CAPTURE_SLOT unset): it publishes the jobs, and a bridge with the setting must run, \
            or changes wait in the slot");
    }
    Ok(())
}

/// Refused: a role that may not read replication slots.
async fn require_replication(client: &Client) -> Result<()> {
    let fail = |e| Error::postgres("checking WAL capture", e);
    let role = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(fail)?;
    if !role.get::<_, bool>(1) {
        let name: String = role.get(0);
        return Err(Error::config(
            SETTING,
            format!(
                "the bridge's role {name} may not read replication slots; a superuser gives it that with ALTER ROLE \"{name}\" REPLICATION"
            ),
        ));
    }
    Ok(())
}

/// At the bridge's start: everything capture through `slot` needs, each refusal saying what
/// to do.
pub(crate) async fn check(
    url: &DatabaseUrl,
    schema: &str,
    slot: &str,
    event_types: &[EventType],
) -> Result<()> {
    validate_slot(slot)?;
    let client = crate::connect::postgres(url).await?;
    require_logical(&client).await?;
    let fail = |e| Error::postgres("checking WAL capture", e);
    require_replication(&client).await?;
    let migrate = "run `benalsam-bridge migrate` with the setting";
    let ready = client
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = $1
                                   AND database = current_database()),
                        EXISTS (SELECT FROM \"{schema}\".benalsam_capture WHERE slot = $1)"
            ),
            &[&slot],
        )
        .await
        .map_err(fail)?;
    if !(ready.get::<_, bool>(0) && ready.get::<_, bool>(1)) {
        return Err(Error::config(
            SETTING,
            format!("replication slot {slot} is not set up in this database; {migrate}"),
        ));
    }
    for event_type in event_types {
        let (table_schema, table) = event_type.split_table();
        let table_schema = table_schema.unwrap_or(schema);
        let names: Vec<String> = sync_trigger::ALL
            .iter()
            .map(|base| event_type.sync_trigger(base))
            .collect();
        let row = client
            .query_one(
                "SELECT c.relreplident = 'f',
                        EXISTS (SELECT FROM pg_publication_tables p WHERE p.pubname = $3
                                   AND p.schemaname = $1 AND p.tablename = $2),
                        EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid
                                   AND t.tgname = ANY ($4::text[])),
                        EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid
                                   AND a.attgenerated <> '' AND NOT a.attisdropped)
                   FROM pg_class c WHERE c.oid = to_regclass(format('%I.%I', $1::text, $2::text))",
                &[&table_schema, &table, &slot, &names],
            )
            .await
            .map_err(fail)?;
        if row.get::<_, bool>(3) {
            return Err(Error::config(
                SETTING,
                format!(
                    "{table_schema}.{table} has generated columns, which pgoutput does not send; {TRIGGERS}"
                ),
            ));
        }
        let problem = if !row.get::<_, bool>(0) {
            "does not have REPLICA IDENTITY FULL"
        } else if !row.get::<_, bool>(1) {
            "is not in the slot's publication"
        } else if row.get::<_, bool>(2) {
            "still has its sync triggers (every change would be recorded twice)"
        } else {
            continue;
        };
        return Err(Error::config(
            SETTING,
            format!("{table_schema}.{table} {problem}; {migrate}"),
        ));
    }
    Ok(())
}
