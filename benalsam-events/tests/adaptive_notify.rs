//! Adaptive NOTIFY against a real PostgreSQL: writers skip the NOTIFY while a bridge that
//! claims their table is busy, and send it otherwise; the job stream marks itself busy while
//! it drains and idle when it is done.
//!
//! Absence of a notification is proven, not waited for: after the write under test, the
//! same connection sends `NOTIFY <channel>, 'probe'` in a later transaction. PostgreSQL
//! delivers the notifications of one session in commit order, so when the probe arrives
//! with nothing before it, the write did not notify.

mod support;

use std::time::Duration;

use benalsam_events::ops::Live;
use benalsam_events::outbox::JobStreamStatus;
use benalsam_events::outbox::Wake;
use benalsam_events::{EventType, Job, JobStream, JobStreamConfig, OutboxConfig};
use futures::StreamExt;
use support::{LISTINGS_SQL, TestSchema, database_url, listings_triggers, unique_name};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(30);

const INSERT_ONE: &str = "INSERT INTO listings (user_id, title, category, status)
                          VALUES (gen_random_uuid(), 'Satılık bisiklet', 'spor', 'active')";

/// A LISTEN connection on a channel of its own.
struct Listening {
    channel: String,
    payloads: UnboundedReceiver<String>,
    _client: tokio_postgres::Client,
}

impl Listening {
    async fn new(channel: &str) -> Self {
        let (client, mut connection) = tokio_postgres::connect(database_url().expose(), NoTls)
            .await
            .expect("listener connects");
        let (tx, payloads) = tokio::sync::mpsc::unbounded_channel();
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n.payload().to_owned());
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .expect("LISTEN");
        Self {
            channel: channel.to_owned(),
            payloads,
            _client: client,
        }
    }

    /// Takes every notification `writer` sent so far.
    async fn catch_up(&mut self, writer: &tokio_postgres::Client) {
        self.notified_by(writer, "SELECT 1").await;
    }

    /// Whether `write`, run on `writer` (in its own transaction), sent a NOTIFY.
    async fn notified_by(&mut self, writer: &tokio_postgres::Client, write: &str) -> bool {
        writer.batch_execute(write).await.expect("the write");
        writer
            .batch_execute(&format!("NOTIFY {}, 'probe'", self.channel))
            .await
            .expect("the probe");
        let mut woken = false;
        loop {
            let payload = tokio::time::timeout(PATIENCE, self.payloads.recv())
                .await
                .expect("the probe arrives")
                .expect("the listener is alive");
            if payload == "probe" {
                return woken;
            }
            assert_eq!(payload, "", "the trigger's notifications carry nothing");
            woken = true;
        }
    }
}

/// A schema with the listings trigger on a channel of its own, and a listener on it.
async fn setup() -> (TestSchema, Listening) {
    let db = TestSchema::new().await;
    let channel = unique_name("ch");
    db.use_channel(&channel).await;
    let listening = Listening::new(&channel).await;
    (db, listening)
}

/// Marks a (pretend) bridge busy for `tables` (`NULL` or an array literal) until `until`.
async fn busy(db: &TestSchema, listener: &str, tables: &str, until: &str) {
    db.client
        .batch_execute(&format!(
            "INSERT INTO benalsam_listeners (listener, tables, busy_until)
             VALUES ('{listener}', {tables}, {until})
             ON CONFLICT (listener) DO UPDATE
             SET tables = EXCLUDED.tables, busy_until = EXCLUDED.busy_until"
        ))
        .await
        .expect("busy row");
}

async fn jobs(db: &TestSchema) -> i64 {
    db.client
        .query_one("SELECT count(*) FROM elasticsearch_sync_queue", &[])
        .await
        .expect("count jobs")
        .get(0)
}

async fn listener_rows(db: &TestSchema) -> Vec<(String, Option<Vec<String>>, bool)> {
    db.client
        .query(
            "SELECT listener, tables, busy_until > now() FROM benalsam_listeners ORDER BY 1",
            &[],
        )
        .await
        .expect("read benalsam_listeners")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Waits until the stream's LISTEN connection is up, so a NOTIFY reaches it.
async fn until_listening(status: &Live<JobStreamStatus>) {
    tokio::time::timeout(PATIENCE, async {
        while status.snapshot().listening != Some(true) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("listening");
}

/// Waits until `benalsam_listeners` is empty: every bridge is idle.
async fn until_idle(db: &TestSchema) {
    tokio::time::timeout(PATIENCE, async {
        while !listener_rows(db).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stream marks itself idle");
}

#[tokio::test]
async fn a_live_busy_bridge_of_the_table_silences_the_writers() {
    let (db, mut listening) = setup().await;
    assert!(
        listening.notified_by(&db.client, INSERT_ONE).await,
        "nobody busy: the write notifies"
    );

    // A bridge of every table, then one of this table only: no NOTIFY either way.
    busy(&db, "all tables", "NULL", "now() + interval '1 hour'").await;
    assert!(!listening.notified_by(&db.client, INSERT_ONE).await);
    db.client
        .batch_execute("DELETE FROM benalsam_listeners")
        .await
        .expect("clear");
    busy(
        &db,
        "listings only",
        "ARRAY['orders', 'listings']",
        "now() + interval '1 hour'",
    )
    .await;
    assert!(!listening.notified_by(&db.client, INSERT_ONE).await);
    // Updates and deletes alike.
    assert!(
        !listening
            .notified_by(
                &db.client,
                "UPDATE listings SET title = 'Yeni başlık'; DELETE FROM listings"
            )
            .await
    );
    // The jobs are written all the same: three inserts, three updates, three deletes.
    assert_eq!(jobs(&db).await, 9);
    db.drop().await;
}

#[tokio::test]
async fn an_expired_busy_mark_or_one_of_another_table_does_not_silence_anyone() {
    let (db, mut listening) = setup().await;

    busy(&db, "died busy", "NULL", "now() - interval '1 second'").await;
    assert!(
        listening.notified_by(&db.client, INSERT_ONE).await,
        "a bridge whose busy mark ran out silences nobody"
    );

    busy(
        &db,
        "another table",
        "ARRAY['orders']",
        "now() + interval '1 hour'",
    )
    .await;
    assert!(
        listening.notified_by(&db.client, INSERT_ONE).await,
        "a busy bridge of another table does not claim this one's jobs"
    );

    // A transaction that began before the busy mark expired, and writes after: it sees the
    // mark as expired (the trigger compares with the clock, not with the transaction start).
    db.client
        .batch_execute("DELETE FROM benalsam_listeners")
        .await
        .expect("clear");
    busy(
        &db,
        "short",
        "NULL",
        "clock_timestamp() + interval '200 ms'",
    )
    .await;
    assert!(
        listening
            .notified_by(
                &db.client,
                &format!(
                    "BEGIN; SELECT pg_sleep_until((SELECT busy_until FROM benalsam_listeners) + interval '10 ms'); {INSERT_ONE}; COMMIT"
                )
            )
            .await,
        "an expired mark is expired for a transaction older than its expiry too"
    );
    db.drop().await;
}

#[tokio::test]
async fn notify_always_ignores_busy_bridges_and_notify_off_never_notifies() {
    let (db, mut listening) = setup().await;
    busy(&db, "all tables", "NULL", "now() + interval '1 hour'").await;
    let channel = listening.channel.clone();
    let attach = |options: &str| listings_triggers(&format!("'channel={channel}', {options}"));
    db.client
        .batch_execute(&attach("'notify=always'"))
        .await
        .expect("notify=always");
    assert!(listening.notified_by(&db.client, INSERT_ONE).await);

    db.client
        .batch_execute("DELETE FROM benalsam_listeners")
        .await
        .expect("nobody busy");
    db.client
        .batch_execute(&attach("'notify=off'"))
        .await
        .expect("notify=off");
    assert!(!listening.notified_by(&db.client, INSERT_ONE).await);
    db.drop().await;
}

#[tokio::test]
async fn every_role_may_read_the_busy_marks_and_none_may_write_them() {
    let db = TestSchema::new().await;
    let table = format!("{}.benalsam_listeners", db.name);
    for (privilege, expected) in [
        ("SELECT", true),
        ("INSERT", false),
        ("UPDATE", false),
        ("DELETE", false),
    ] {
        let granted: bool = db
            .client
            .query_one(
                "SELECT has_table_privilege('public', $1, $2)",
                &[&table, &privilege],
            )
            .await
            .expect("privilege")
            .get(0);
        assert_eq!(granted, expected, "{privilege} for PUBLIC");
    }
    let persistence: String = db
        .client
        .query_one(
            "SELECT relpersistence::text FROM pg_class WHERE oid = $1::text::regclass",
            &[&table],
        )
        .await
        .expect("persistence")
        .get(0);
    assert_eq!(persistence, "u", "unlogged: a crash empties it");
    db.drop().await;
}

fn stream_config(channel: &str, batch_size: usize) -> JobStreamConfig {
    let mut config = JobStreamConfig::default();
    config.wake = Wake::Listen {
        channel: channel.to_owned(),
    };
    config.batch_size = batch_size;
    // No poll within the test: whatever is claimed after the backlog was woken by NOTIFY.
    config.poll_interval = Duration::from_secs(3600);
    config
}

async fn next_batch(stream: &mut JobStream) -> Vec<Job> {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("a batch in time")
        .expect("the stream goes on")
}

type Batches = tokio::sync::mpsc::UnboundedReceiver<Vec<Job>>;

/// Runs the stream in a task that hands its batches over.
fn drain_in_background(mut stream: JobStream) -> (tokio::task::JoinHandle<()>, Batches) {
    let (tx, claimed) = tokio::sync::mpsc::unbounded_channel();
    let drain = tokio::spawn(async move {
        while let Some(batch) = stream.next().await {
            if tx.send(batch).is_err() {
                return;
            }
        }
    });
    (drain, claimed)
}

/// Receives batches until at least `jobs` jobs came; how many did.
async fn take(claimed: &mut Batches, jobs: usize) -> usize {
    let mut taken = 0;
    while taken < jobs {
        taken += tokio::time::timeout(PATIENCE, claimed.recv())
            .await
            .expect("the backlog drains")
            .expect("the stream goes on")
            .len();
    }
    taken
}

#[tokio::test]
async fn the_stream_is_busy_while_it_drains_and_a_change_after_it_went_idle_wakes_it() {
    let (db, mut listening) = setup().await;
    db.insert_listings(250).await;
    listening.catch_up(&db.client).await;

    let mut outbox = OutboxConfig::default();
    outbox.tables = Some(vec!["listings".to_owned()]);
    let outbox = db.outbox(outbox);
    let worker = outbox.config().worker_id.clone();
    let mut stream = JobStream::new(
        outbox,
        stream_config(&listening.channel, 10),
        CancellationToken::new(),
    )
    .expect("stream");
    let status = stream.status();

    // A full batch: more is waiting, the stream says it is busy, for its tables.
    assert_eq!(next_batch(&mut stream).await.len(), 10);
    assert_eq!(
        listener_rows(&db).await,
        vec![(worker.clone(), Some(vec!["listings".to_owned()]), true)]
    );
    assert!(status.snapshot().draining, "the status says so too");
    // Held busy for longer than this test can take (the stream renews or deletes it), so a
    // slow machine cannot let it run out before the write below.
    db.client
        .batch_execute("UPDATE benalsam_listeners SET busy_until = now() + interval '1 hour'")
        .await
        .expect("extend the busy mark");
    assert!(
        !listening.notified_by(&db.client, INSERT_ONE).await,
        "a write while the stream drains sends no NOTIFY"
    );

    // The rest, that job included, drained by a task; the stream then marks itself idle.
    let (drain, mut claimed) = drain_in_background(stream);
    let taken = 10 + take(&mut claimed, 241).await;
    assert_eq!(taken, 251, "every job once");
    until_idle(&db).await;
    assert!(!status.snapshot().draining, "idle again");

    // Idle: the next write notifies, and the stream (polling once an hour) claims it.
    until_listening(&status).await;
    assert!(listening.notified_by(&db.client, INSERT_ONE).await);
    let batch = tokio::time::timeout(PATIENCE, claimed.recv())
        .await
        .expect("the NOTIFY wakes the idle stream")
        .expect("the stream goes on");
    assert_eq!(batch.len(), 1);
    assert_eq!(
        db.statuses()
            .await
            .iter()
            .filter(|(_, s)| s == "pending")
            .count(),
        0
    );
    drain.abort();
    db.drop().await;
}

/// A steady trickle: a claim that finds two jobs or more but fewer than a batch keeps the stream busy,
/// so the writes that follow send no NOTIFY, and the stream comes back for them after its
/// linger by itself; the first claim that finds nothing marks it idle, and writers notify
/// again.
#[tokio::test]
async fn a_trickle_keeps_the_stream_busy_and_claimed_without_notify_until_a_claim_finds_nothing() {
    let (db, mut listening) = setup().await;
    let mut outbox = OutboxConfig::default();
    outbox.tables = Some(vec!["listings".to_owned()]);
    let outbox = db.outbox(outbox);
    let worker = outbox.config().worker_id.clone();
    // The default linger (50 ms); the stream is polled by hand, so it claims only when asked.
    let mut stream = JobStream::new(
        outbox,
        stream_config(&listening.channel, 10),
        CancellationToken::new(),
    )
    .expect("stream");
    let status = stream.status();

    // Two changes before the stream's first claim: both notify (nobody is busy). The claim
    // finds both, fewer than a batch: a trickle, so the stream stays busy.
    assert!(listening.notified_by(&db.client, INSERT_ONE).await);
    assert!(listening.notified_by(&db.client, INSERT_ONE).await);
    assert_eq!(next_batch(&mut stream).await.len(), 2);
    assert_eq!(
        listener_rows(&db).await,
        vec![(worker.clone(), Some(vec!["listings".to_owned()]), true)],
        "busy while the trickle lasts"
    );
    assert!(status.snapshot().draining, "the status says so too");
    // Held busy for longer than this test can take (the stream renews or deletes it), so a
    // slow machine cannot let it run out before the writes below.
    db.client
        .batch_execute("UPDATE benalsam_listeners SET busy_until = now() + interval '1 hour'")
        .await
        .expect("extend the busy mark");
    // The next changes send no NOTIFY, and the stream claims them after its linger by itself
    // (it polls once an hour).
    for _ in 0..2 {
        assert!(
            !listening.notified_by(&db.client, INSERT_ONE).await,
            "a write during a trickle sends no NOTIFY"
        );
    }
    assert_eq!(next_batch(&mut stream).await.len(), 2);

    // Nothing more: the next claim finds nothing, the stream goes idle, writers notify; a
    // lone change is claimed and leaves the stream idle.
    let (drain, mut claimed) = drain_in_background(stream);
    until_idle(&db).await;
    until_listening(&status).await;
    assert!(listening.notified_by(&db.client, INSERT_ONE).await);
    assert_eq!(take(&mut claimed, 1).await, 1);
    assert!(
        listener_rows(&db).await.is_empty(),
        "a lone change is no trickle"
    );
    assert_eq!(jobs(&db).await, 5);
    drain.abort();
    db.drop().await;
}

/// The race the design accepts (see the job stream's `Presence`): a writer reads "busy",
/// the stream goes idle, the writer commits without a NOTIFY. Its job is not lost: the next
/// write that notifies (or the poll) brings it.
#[tokio::test]
async fn a_writer_that_saw_the_stream_busy_and_commits_after_it_went_idle_is_claimed_with_the_next_change()
 {
    let (db, mut listening) = setup().await;
    db.insert_listings(20).await;
    listening.catch_up(&db.client).await;
    let mut stream = JobStream::new(
        db.outbox(OutboxConfig::default()),
        stream_config(&listening.channel, 10),
        CancellationToken::new(),
    )
    .expect("stream");
    let status = stream.status();
    assert_eq!(next_batch(&mut stream).await.len(), 10);
    db.client
        .batch_execute("UPDATE benalsam_listeners SET busy_until = now() + interval '1 hour'")
        .await
        .expect("extend the busy mark");

    // A writer that sees the stream busy and keeps its transaction open.
    let late = database_url().connect().await.expect("writer connects");
    late.batch_execute(&format!(
        "SET search_path TO {}; BEGIN; {INSERT_ONE}",
        db.name
    ))
    .await
    .expect("a write in an open transaction");

    let (drain, mut claimed) = drain_in_background(stream);
    take(&mut claimed, 10).await;
    until_idle(&db).await;
    assert!(
        !listening.notified_by(&late, "COMMIT").await,
        "it read the busy mark, so its commit wakes nobody"
    );

    until_listening(&status).await;
    assert!(listening.notified_by(&db.client, INSERT_ONE).await);
    let mut taken = 0;
    while taken < 2 {
        taken += tokio::time::timeout(PATIENCE, claimed.recv())
            .await
            .expect("the next NOTIFY brings both jobs")
            .expect("the stream goes on")
            .len();
    }
    assert_eq!(taken, 2);
    drain.abort();
    db.drop().await;
}

#[tokio::test]
async fn a_stream_that_stops_while_busy_clears_its_mark_and_one_without_adaptive_notify_never_marks()
 {
    let (db, _listening) = setup().await;
    db.insert_listings(30).await;

    let shutdown = CancellationToken::new();
    let mut stream = JobStream::new(
        db.outbox(OutboxConfig::default()),
        stream_config(&unique_name("ch"), 10),
        shutdown.clone(),
    )
    .expect("stream");
    assert_eq!(next_batch(&mut stream).await.len(), 10);
    let rows = listener_rows(&db).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, None, "a stream of every table marks every table");
    shutdown.cancel();
    assert!(
        tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("the stream ends")
            .is_none()
    );
    assert!(
        listener_rows(&db).await.is_empty(),
        "the mark goes with the stream"
    );

    let mut config = stream_config(&unique_name("ch"), 10);
    config.adaptive_notify = false;
    let mut stream = JobStream::new(
        db.outbox(OutboxConfig::default()),
        config,
        CancellationToken::new(),
    )
    .expect("stream");
    assert_eq!(next_batch(&mut stream).await.len(), 10);
    assert!(
        listener_rows(&db).await.is_empty(),
        "adaptive NOTIFY is off"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_database_migrated_by_the_previous_build_gets_migration_4_and_its_trigger_keeps_working()
{
    let mut client = database_url().connect().await.expect("PostgreSQL answers");
    // The checksums of migrations 1 to 3 as this build records them, from a fresh schema.
    let reference = unique_name("t_ref");
    OutboxConfig::in_schema(&reference)
        .migrate(&mut client, &[])
        .await
        .expect("reference schema");

    // What the previous build left: migrations 1 to 3 and the trigger of 0002.
    let schema = unique_name("t_old");
    let channel = unique_name("ch");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema};
             {LISTINGS_SQL};
             {}; {}; {};
             CREATE TABLE benalsam_schema_migrations
                 (LIKE {reference}.benalsam_schema_migrations INCLUDING ALL);
             INSERT INTO benalsam_schema_migrations
                 SELECT * FROM {reference}.benalsam_schema_migrations WHERE version <= 3;
             CREATE TRIGGER benalsam_sync_queue AFTER INSERT OR UPDATE OR DELETE ON listings
                 FOR EACH ROW EXECUTE FUNCTION add_to_sync_queue('ignore=view_count', 'channel={channel}');",
            include_str!("../db/0001_sync_queue.sql"),
            include_str!("../db/0002_sync_trigger.sql"),
            include_str!("../db/0003_backfill_progress.sql"),
        ))
        .await
        .expect("a schema as the previous build migrated it");
    let mut listening = Listening::new(&channel).await;
    assert!(listening.notified_by(&client, INSERT_ONE).await);

    let report = OutboxConfig::in_schema(&schema)
        .migrate(&mut client, &[EventType::listings()])
        .await
        .expect("migrating the old schema");
    assert_eq!(report.already_applied, vec![1, 2, 3]);
    assert_eq!(report.applied.first(), Some(&4), "{:?}", report.applied);

    // The row trigger of 0002 gave way to the statement triggers of migration 9, in the
    // migrating transaction.
    let triggers: Vec<String> = client
        .query(
            "SELECT tgname::text FROM pg_trigger
              WHERE tgrelid = to_regclass(format('%I.listings', $1::text)) ORDER BY 1",
            &[&schema],
        )
        .await
        .expect("the triggers")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        triggers,
        [
            "benalsam_sync_delete",
            "benalsam_sync_insert",
            "benalsam_sync_truncate",
            "benalsam_sync_update"
        ]
    );

    // The triggers (attached by migrate on the default channel) record and notify as
    // before, and adapt now.
    client
        .batch_execute(&format!(
            "SET search_path TO {schema};
             {}",
            listings_triggers(&format!("'ignore=view_count', 'channel={channel}'"))
        ))
        .await
        .expect("back on the test's channel");
    assert!(listening.notified_by(&client, INSERT_ONE).await);
    client
        .batch_execute(
            "INSERT INTO benalsam_listeners (listener, busy_until)
             VALUES ('busy', now() + interval '1 hour')",
        )
        .await
        .expect("a busy bridge");
    assert!(!listening.notified_by(&client, INSERT_ONE).await);
    let jobs: i64 = client
        .query_one("SELECT count(*) FROM elasticsearch_sync_queue", &[])
        .await
        .expect("jobs")
        .get(0);
    assert_eq!(
        jobs, 3,
        "every write is a job, before and after the migration"
    );

    client
        .batch_execute(&format!(
            "DROP SCHEMA {schema} CASCADE; DROP SCHEMA {reference} CASCADE"
        ))
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn a_stream_on_a_schema_without_the_busy_table_claims_as_before_and_says_why_it_cannot_mark()
{
    let db = TestSchema::new().await;
    db.insert_listings(30).await;
    // The bridge's side of a schema before migration 4 (whose trigger needs no such table).
    db.client
        .batch_execute("DROP TABLE benalsam_listeners")
        .await
        .expect("as before migration 4");
    let mut stream = JobStream::new(
        db.outbox(OutboxConfig::default()),
        stream_config(&unique_name("ch"), 10),
        CancellationToken::new(),
    )
    .expect("stream");
    let mut taken = 0;
    while taken < 30 {
        taken += next_batch(&mut stream).await.len();
    }
    let status = stream.status().snapshot();
    let (_, error) = status.last_error.expect("the failed mark is reported");
    assert!(error.contains("benalsam_listeners"), "{error}");
    assert!(error.contains("migrate"), "{error}");
    db.drop().await;
}
