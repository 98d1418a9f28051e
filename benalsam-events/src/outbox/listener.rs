//! The LISTEN side of the job stream: a dedicated connection whose notifications are only
//! wake-ups.
//!
//! A notification says "look at the table", nothing more; what to do is always read from the
//! table. Notifications are lost while nobody listens, so every (re)connect also wakes the
//! stream for a sweep, and the stream polls on an interval besides.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use crate::backoff::Backoff;
use crate::config::DatabaseUrl;
use crate::outbox::stream::record::{StreamEvent, StreamRecorder};

type Status = StreamRecorder;

/// The listening task; it stops when this is dropped.
#[derive(Debug)]
pub(crate) struct Listener {
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Starts listening on `channel` (a validated identifier), waking `wake` on every
    /// notification and after every (re)connect.
    pub(crate) fn spawn(
        url: DatabaseUrl,
        channel: String,
        wake: Arc<Notify>,
        status: Status,
        backoff: Backoff,
    ) -> Self {
        let task = tokio::spawn(async move {
            let mut attempt = 0u32;
            loop {
                match listen(&url, &channel, &wake, &status).await {
                    // The connection was up, so the next failure starts the backoff over.
                    Ok(()) => attempt = 0,
                    Err(error) => {
                        status.record(StreamEvent::Error(&error));
                        tracing::warn!(%error, channel, "cannot LISTEN; retrying");
                    }
                }
                status.record(StreamEvent::Listening(false));
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        });
        Self { task }
    }
}

/// One listening session: returns `Ok` when an established connection ends.
async fn listen(
    url: &DatabaseUrl,
    channel: &str,
    wake: &Notify,
    status: &Status,
) -> Result<(), crate::error::Error> {
    // The connection is idle most of the time: the keepalives of every library connection
    // notice a silently dropped one (a NAT, a failover) within a minute, not two hours.
    let (client, mut connection) =
        crate::connect::postgres_connection(url, "benalsam-listener").await?;

    // A Connection polled as a future drops notifications; poll_message hands them over.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let pump = tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    });

    let listened = client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .map_err(|e| crate::error::Error::postgres(format!("LISTEN {channel}"), e));
    if let Err(error) = listened {
        pump.abort();
        return Err(error);
    }
    status.record(StreamEvent::Listening(true));
    tracing::debug!(channel, "listening");
    // Anything committed while nobody listened is found by this sweep.
    wake.notify_one();

    while rx.recv().await.is_some() {
        wake.notify_one();
    }
    match pump.await {
        Ok(Ok(())) => tracing::warn!(channel, "LISTEN connection closed; reconnecting"),
        Ok(Err(error)) => {
            let error = crate::error::Error::postgres("LISTEN connection", error);
            status.record(StreamEvent::Error(&error));
            tracing::warn!(%error, channel, "LISTEN connection failed; reconnecting");
        }
        Err(join) => tracing::warn!(%join, channel, "LISTEN task ended; reconnecting"),
    }
    Ok(())
}
