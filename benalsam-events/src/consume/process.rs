//! One batch through the stages: verify → build → join → write → truncate → settle.

use std::sync::Arc;

use lapin::Channel;

use crate::consume::build::{self, Documents};
use crate::consume::message::{Finished, Message};
use crate::consume::shared::Shared;
use crate::consume::verify::{self, Verified};
use crate::consume::{join, settle, truncate, write};

/// Checks one batch against the outbox, builds its documents from the outbox's rows (or
/// reads the joined ones), writes it and settles every message of it.
pub(super) async fn process(
    shared: Arc<Shared>,
    channel: Option<Channel>,
    batch: Vec<Message>,
) -> Finished {
    let Some(Verified {
        deliver,
        recorded,
        mut sorted,
        reindexing,
    }) = verify::verify(&shared, batch).await
    else {
        return Finished::Abandoned;
    };
    let Documents {
        mut writable,
        joined,
        truncations,
    } = build::build(&shared, deliver, &recorded, &mut sorted);
    let Some(read) = join::join(&shared, joined, &mut sorted).await else {
        return Finished::Abandoned;
    };
    writable.extend(read);
    if let Err((mut batch, reason)) =
        write::write(&shared, writable, &reindexing, &mut sorted).await
    {
        // Nothing was done: the whole batch waits for the cluster (verifying it again
        // later is harmless).
        batch.extend(truncations);
        batch.extend(sorted.into_messages());
        return Finished::Unavailable { batch, reason };
    }
    truncate::truncate(&shared, truncations, &reindexing, &mut sorted).await;
    settle::settle(&shared, channel.as_ref(), sorted).await
}
