//! A zero-downtime reindex: the next version of an event type's index, `<alias>_v(N+1)`,
//! built from the database while live changes keep flowing, then the alias moved to it in
//! one atomic call, and the old index deleted.
//!
//! 1. **created**: the new index is made with the file's body (no alias), then recorded in
//!    `benalsam_reindex`. From the next batch on, every consumer writes each action of the
//!    table to the new index too, with the same external version (job id).
//! 2. **backfilling**: every row is enqueued through the outbox's backfill (rows read `FOR
//!    SHARE`, job ids above every earlier job), so the rows reach the new index through the
//!    normal pipeline, joined documents too.
//! 3. **waiting**: once no job of the table up to the last backfill job is on its way, the
//!    new index is refreshed and the alias (with `is_write_index`) moved to it atomically.
//! 4. **swapped**: the old index is deleted, then the record.
//!
//! Why nothing is lost or stale: a change a consumer wrote to the old index only was verified
//! before the record existed, so its job committed before the backfill read its row, and the
//! backfill's job for that row (a higher id) carries that change or a newer one; every later
//! change reaches both indexes with its own job id, which orders it against the backfill's.
//! A delete is a tombstone under the same rule (`gc_deletes`, as on the old index).
//!
//! Each phase is recorded before the next begins: a rerun after a crash continues from it.
//! The command holds a database lock while it runs; a second reindex of the same table is
//! refused.

use std::time::{Duration, Instant};

use elasticsearch::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::outbox::{Outbox, Phase, ReindexRecord, ReindexRow};
use crate::search::{SearchNodes, create_index};
use crate::{error::Error, error::Result, event_type::EventType};

/// What a reindex did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReindexOutcome {
    /// The event type's alias.
    pub alias: String,
    /// The index the alias pointed at, now deleted.
    pub old_index: String,
    /// The index the alias points at now.
    pub new_index: String,
    /// Rows this run enqueued (0 when it resumed after the backfill).
    pub rows_enqueued: i64,
    /// The phase a crashed run had reached, when this run resumed one.
    pub resumed_from: Option<String>,
}

/// Builds the next version of `event_type`'s index and moves its alias to it (see the
/// documentation of the `reindex` command in docs/schema-changes.md); `progress` gets a line for the operator at every step and
/// every few seconds of waiting. Enqueues `batch` rows per transaction.
pub async fn reindex(
    outbox: &Outbox,
    nodes: &SearchNodes,
    event_type: &EventType,
    batch: i64,
    mut progress: impl FnMut(&str),
) -> Result<ReindexOutcome> {
    // The table as the trigger records its jobs (and the backfill its progress): the
    // record, the backfill and the consumers must all name it alike.
    let event_type = &event_type.clone().recorded_in(&outbox.config().schema);
    let name = event_type.name.as_str();
    let Some(mut record) = ReindexRecord::lock(outbox, event_type.job_table()).await? else {
        return Err(Error::reindex(
            name,
            "another reindex of this event type is running; wait for it to finish (or stop it: \
             a rerun continues where it stopped)",
        ));
    };
    let alias = event_type.index.alias.as_str();
    let (row, resumed_from) = match record.row().await? {
        Some(row) => {
            progress(&format!(
                "resuming the reindex of {name} ({} → {}) from phase {:?}",
                row.old_index, row.new_index, row.phase
            ));
            let phase = format!("{:?}", row.phase).to_lowercase();
            (row, Some(phase))
        }
        None => (
            begin(&record, nodes, event_type, &mut progress).await?,
            None,
        ),
    };
    let mut rows_enqueued = 0;
    if row.phase <= Phase::Created {
        record.set_phase(Phase::Backfilling).await?;
    }
    if row.phase <= Phase::Backfilling {
        rows_enqueued = backfill(
            outbox,
            nodes,
            event_type,
            &row.old_index,
            batch,
            &mut progress,
        )
        .await?;
        record.set_phase(Phase::Waiting).await?;
    }
    if row.phase <= Phase::Waiting {
        wait_for_jobs(&record, name, &mut progress).await?;
        swap(nodes, alias, &row.old_index, &row.new_index).await?;
        record.set_phase(Phase::Swapped).await?;
        progress(&format!("{alias} now points at {}", row.new_index));
    }
    // The old index first, then the record: a crash in between is resumed here, not taken
    // for a finished reindex (which would leave the old index behind).
    delete_index(nodes, &row.old_index).await?;
    record.finish().await?;
    progress(&format!("deleted {}", row.old_index));
    Ok(ReindexOutcome {
        alias: alias.to_owned(),
        old_index: row.old_index,
        new_index: row.new_index,
        rows_enqueued,
        resumed_from,
    })
}

/// Enqueues every row of `event_type`'s table (resuming an interrupted backfill); returns the
/// rows of the run. A backfill that enqueued nothing for a table whose index has documents
/// would swap in an empty index: that is refused rather than lose what readers see.
async fn backfill(
    outbox: &Outbox,
    nodes: &SearchNodes,
    event_type: &EventType,
    old_index: &str,
    batch: i64,
    progress: &mut impl FnMut(&str),
) -> Result<i64> {
    let done = outbox
        .backfill_type(event_type, batch, false, None, |p| {
            progress(&format!("enqueued {} of {} rows", p.rows, p.total));
            true
        })
        .await?;
    if done.rows == 0 && count(nodes, old_index).await? > 0 {
        return Err(Error::reindex(
            &event_type.name,
            format!(
                "the backfill of {} enqueued no row, yet {old_index} has documents; check the \
                 event type's table and key (the alias was not moved)",
                event_type.table
            ),
        ));
    }
    Ok(done.rows)
}

/// Creates the next index version and records the reindex; returns the record.
async fn begin(
    record: &ReindexRecord,
    nodes: &SearchNodes,
    event_type: &EventType,
    progress: &mut impl FnMut(&str),
) -> Result<ReindexRow> {
    let (name, alias) = (&event_type.name, &event_type.index.alias);
    let old = current_index(nodes, name, alias).await?;
    let new = next_version(alias, &old);
    // A leftover of a run that crashed before recording it: nothing writes to it.
    delete_index(nodes, &new).await?;
    if !create_index(nodes, &new, &event_type.index_body(), None).await? {
        return Err(Error::reindex(
            name.as_str(),
            format!("{new} was created by someone else meanwhile; run reindex again"),
        ));
    }
    // Recorded only once the index exists: a consumer writing to it before would have the
    // engine create it with a dynamic mapping.
    record.start(alias, &old, &new).await?;
    progress(&format!(
        "created {new}; consumers now write every change of {name} to it too"
    ));
    record.row().await?.ok_or_else(|| {
        Error::reindex(
            name.as_str(),
            "the reindex record vanished; run reindex again",
        )
    })
}

/// Waits until no job of the table up to the backfill's last one is on its way; a job of
/// the reindex that failed for good stops it (the new index would miss its document).
async fn wait_for_jobs(
    record: &ReindexRecord,
    name: &str,
    progress: &mut impl FnMut(&str),
) -> Result<()> {
    let row = record
        .row()
        .await?
        .ok_or_else(|| Error::reindex(name, "the reindex record vanished; run reindex again"))?;
    let last = row.last_job.unwrap_or(i64::MAX);
    let mut told = Instant::now();
    loop {
        let (unsettled, failed) = record.unsettled(row.first_job, last).await?;
        if failed > 0 {
            return Err(Error::reindex(
                name,
                format!(
                    "{failed} jobs since the reindex began failed for good, so {} would miss \
                     their documents; see `benalsam-consumer dlq list --type {name}`, fix the \
                     cause, retry them (`benalsam-bridge retry`), then run reindex again: it \
                     continues from here",
                    row.new_index
                ),
            ));
        }
        if unsettled == 0 {
            return Ok(());
        }
        if told.elapsed() >= Duration::from_secs(5) {
            progress(&format!(
                "waiting for {unsettled} jobs of {name} to be indexed"
            ));
            told = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The one index behind `alias`.
async fn current_index(nodes: &SearchNodes, name: &str, alias: &str) -> Result<String> {
    let (status, answer) = nodes
        .json_request(Method::Get, &format!("/_alias/{alias}"), None)
        .await?;
    let indices: Vec<String> = match &answer {
        Value::Object(map) if status.is_success() => map.keys().cloned().collect(),
        _ if status == StatusCode::NOT_FOUND => Vec::new(),
        _ => {
            return Err(Error::search_response(
                format!("reading alias {alias}"),
                status.as_u16(),
                answer.to_string(),
            ));
        }
    };
    match indices.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::reindex(
            name,
            format!(
                "{alias} is not an alias of an index (start the consumer once to create \
                 {alias}_v1 behind it; an index named {alias} itself must be moved behind an \
                 alias by hand)"
            ),
        )),
        many => Err(Error::reindex(
            name,
            format!(
                "alias {alias} points at {} indexes; leave one behind it",
                many.join(", ")
            ),
        )),
    }
}

/// `<alias>_v(N+1)` after `<alias>_vN`; `<alias>_v2` after an index of another name.
pub(crate) fn next_version(alias: &str, current: &str) -> String {
    let version = current
        .strip_prefix(alias)
        .and_then(|rest| rest.strip_prefix("_v"))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(1);
    format!("{alias}_v{}", version.saturating_add(1))
}

/// Refreshes `new`, then moves `alias` from `old` to `new` in one call; nothing when it
/// points at `new` already (a run that crashed after the move).
async fn swap(nodes: &SearchNodes, alias: &str, old: &str, new: &str) -> Result<()> {
    let (status, answer) = nodes
        .json_request(Method::Post, &format!("/{new}/_refresh"), None)
        .await?;
    if !status.is_success() {
        return Err(Error::search_response(
            format!("refreshing {new}"),
            status.as_u16(),
            answer.to_string(),
        ));
    }
    let (status, answer) = nodes
        .json_request(Method::Get, &format!("/_alias/{alias}"), None)
        .await?;
    if status.is_success() && answer.get(new).is_some() && answer.get(old).is_none() {
        return Ok(());
    }
    let actions = json!({ "actions": [
        { "add": { "index": new, "alias": alias, "is_write_index": true } },
        { "remove": { "index": old, "alias": alias } }
    ]});
    let (status, answer) = nodes
        .json_request(Method::Post, "/_aliases", Some(&actions))
        .await?;
    if !status.is_success() {
        return Err(Error::search_response(
            format!("moving alias {alias} from {old} to {new}"),
            status.as_u16(),
            answer.to_string(),
        ));
    }
    Ok(())
}

/// How many documents `index` holds.
async fn count(nodes: &SearchNodes, index: &str) -> Result<u64> {
    let (status, answer) = nodes
        .json_request(Method::Get, &format!("/{index}/_count"), None)
        .await?;
    if !status.is_success() {
        return Err(Error::search_response(
            format!("counting the documents of {index}"),
            status.as_u16(),
            answer.to_string(),
        ));
    }
    Ok(answer["count"].as_u64().unwrap_or(0))
}

/// Deletes `index`; one that does not exist is fine.
async fn delete_index(nodes: &SearchNodes, index: &str) -> Result<()> {
    let (status, answer) = nodes
        .json_request(Method::Delete, &format!("/{index}"), None)
        .await?;
    if status.is_success() || status == StatusCode::NOT_FOUND {
        return Ok(());
    }
    Err(Error::search_response(
        format!("deleting index {index}"),
        status.as_u16(),
        answer.to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_version_follows_the_current_one() {
        assert_eq!(next_version("listings", "listings_v1"), "listings_v2");
        assert_eq!(next_version("listings", "listings_v9"), "listings_v10");
        assert_eq!(next_version("listings", "legacy"), "listings_v2");
        assert_eq!(next_version("listings", "listings_vx"), "listings_v2");
    }
}
