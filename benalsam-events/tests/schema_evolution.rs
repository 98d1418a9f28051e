//! Schema evolution against the real services: a field added inside a relation reaches the
//! live mapping at the consumer's start; an analyzer changed on a live index is rolled out by
//! `reindex` under continuous writes, with nothing lost or stale; a reindex killed mid-way is
//! finished by a rerun, and a second one at the same time is refused.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use benalsam_events::bridge::{self, BridgeSettings};
use benalsam_events::consumer::{self, ConsumerSettings};
use benalsam_events::elasticsearch::http::Method;
use benalsam_events::event_type::FieldType;
use benalsam_events::search::{self, SearchNodes};
use benalsam_events::{EventType, OutboxConfig};
use serde_json::{Value, json};
use support::{
    TestIndex, TestSchema, TestVhost, database_url, eventually, free_port, search_url, unique_name,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(240);
const MARKETPLACE_SQL: &str = include_str!("../../examples/joined_documents/marketplace.sql");
const JOINED_TOML: &str = include_str!("../../examples/joined_documents/listings.toml");

type Task = (CancellationToken, JoinHandle<benalsam_events::Result<()>>);

/// A schema, a vhost, an index alias, and a bridge and a consumer running on them.
struct Pipeline {
    db: TestSchema,
    vhost: TestVhost,
    index: TestIndex,
    bridge: Task,
    consumer: Option<Task>,
    /// The consumer's health port.
    port: u16,
}

impl Pipeline {
    async fn start(db: TestSchema, event_type: &EventType) -> Self {
        let vhost = TestVhost::new().await;
        let mut settings = BridgeSettings::new(database_url(), vhost.url.clone());
        settings.outbox = OutboxConfig::in_schema(&db.name);
        settings.event_types = vec![event_type.clone()];
        settings.migrate = true;
        settings.heartbeat_interval = None;
        let shutdown = CancellationToken::new();
        let bridge = tokio::spawn(bridge::run(settings, shutdown.clone()));
        let index = TestIndex {
            alias: event_type.index.alias.clone(),
            client: search_url()
                .client(Duration::from_secs(30))
                .expect("client"),
        };
        let mut pipeline = Self {
            db,
            vhost,
            index,
            bridge: (shutdown, bridge),
            consumer: None,
            port: free_port(),
        };
        pipeline.start_consumer(event_type);
        pipeline
    }

    fn start_consumer(&mut self, event_type: &EventType) {
        let mut settings =
            ConsumerSettings::new(database_url(), self.vhost.url.clone(), search_url());
        settings.outbox = OutboxConfig::in_schema(&self.db.name);
        settings.event_types = vec![event_type.clone()];
        settings.heartbeat_interval = None;
        self.port = free_port();
        settings.health_addr = Some(([127, 0, 0, 1], self.port).into());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consumer::run(settings, shutdown.clone()));
        self.consumer = Some((shutdown, task));
    }

    async fn stop_consumer(&mut self) {
        if let Some((shutdown, task)) = self.consumer.take() {
            shutdown.cancel();
            task.await
                .expect("consumer task")
                .expect("consumer stops cleanly");
        }
    }

    fn outbox(&self) -> benalsam_events::Outbox {
        self.db.outbox(OutboxConfig::default())
    }

    /// The search node, as the reindex command reaches it.
    fn nodes(&self) -> SearchNodes {
        SearchNodes::from(self.index.client.clone())
    }

    /// A request to the search node; its status and JSON answer.
    async fn call(&self, method: Method, path: &str) -> (u16, Value) {
        let response = self
            .index
            .client
            .send(
                method,
                path,
                benalsam_events::elasticsearch::http::headers::HeaderMap::new(),
                Option::<&()>::None,
                Option::<&[u8]>::None,
                None,
            )
            .await
            .expect("search node answers");
        let status = response.status_code().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until no job is on its way; then no job may have failed (a dead letter).
    async fn settled(&self) {
        eventually(PATIENCE, "every job settled", || async {
            let row = self
                .db
                .client
                .query_one(
                    "SELECT count(*) FILTER (WHERE status NOT IN ('completed', 'failed')),
                            count(*) FILTER (WHERE status = 'failed')
                     FROM elasticsearch_sync_queue",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            let (live, failed): (i64, i64) = (row.get(0), row.get(1));
            if live == 0 {
                Ok(failed)
            } else {
                Err(format!("{live} jobs on their way, {failed} failed"))
            }
        })
        .await;
        let failed = self
            .db
            .client
            .query(
                "SELECT id, error_message FROM elasticsearch_sync_queue WHERE status = 'failed'",
                &[],
            )
            .await
            .expect("failed jobs");
        let failed: Vec<(i64, Option<String>)> =
            failed.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert!(failed.is_empty(), "no dead letter: {failed:?}");
    }

    /// The listings the index should hold (active), title by id.
    async fn active_titles(&self) -> BTreeMap<String, String> {
        self.db
            .client
            .query(
                "SELECT id::text, title FROM listings WHERE status = 'active'",
                &[],
            )
            .await
            .expect("listings")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Lost (an active row without its document, or with another title) and stale (a
    /// document of no active row) documents.
    async fn lost_and_stale(&self) -> (Vec<String>, Vec<String>) {
        let rows = self.active_titles().await;
        let docs = self.index.documents().await;
        let lost = rows
            .iter()
            .filter(|(id, title)| docs.get(*id).is_none_or(|d| d["title"] != **title))
            .map(|(id, _)| id.clone())
            .collect();
        let stale = docs
            .keys()
            .filter(|id| !rows.contains_key(*id))
            .cloned()
            .collect();
        (lost, stale)
    }

    /// The indexes behind the alias.
    async fn stop(mut self) {
        self.stop_consumer().await;
        self.bridge.0.cancel();
        self.bridge
            .1
            .await
            .expect("bridge task")
            .expect("bridge stops cleanly");
        self.index.drop().await;
        self.vhost.drop().await;
        self.db.drop().await;
    }
}

/// The seed's listings into `alias`, and the same with `title` analyzed by `simple` (a
/// change the live index cannot take).
fn listings_and_changed(alias: &str) -> (EventType, EventType) {
    let before = TestIndex::listings(alias);
    let title = &before.document.properties()["title"];
    let after_document = before.document.clone().field(
        "title",
        FieldType::Text {
            analyzer: "simple".to_owned(),
            raw: title["fields"]["raw"].is_object(),
            copy_to: title["copy_to"].as_str().map(str::to_owned),
        },
    );
    let mut after = before.clone();
    after.document = after_document;
    (before, after)
}

async fn wait_for_documents(pipeline: &Pipeline, n: usize) {
    eventually(PATIENCE, "the listings indexed", || async {
        let (lost, stale) = pipeline.lost_and_stale().await;
        let docs = pipeline.index.documents().await.len();
        if lost.is_empty() && stale.is_empty() && docs == n {
            Ok(())
        } else {
            Err(format!("{docs} documents, {} lost", lost.len()))
        }
    })
    .await;
}

#[tokio::test]
async fn a_field_added_to_a_relation_reaches_the_live_mapping_and_no_document_dead_letters() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(MARKETPLACE_SQL)
        .await
        .expect("the marketplace tables");
    let alias = unique_name("t");
    let load = |toml: &str| {
        let file = std::env::temp_dir().join(format!("{}.toml", unique_name("evolve")));
        std::fs::write(&file, toml.replace("benalsam_listings_joined", &alias)).expect("write");
        let event_type = EventType::from_file(&file).expect("valid").remove(0);
        let _ = std::fs::remove_file(&file);
        support::builtin_analysis(event_type)
    };
    let before = load(JOINED_TOML);
    // The file after the change: the seller's email goes into every document too.
    let with_email = JOINED_TOML.replacen(
        "fields.rating = { type = \"double\" }",
        "fields.rating = { type = \"double\" }\nfields.email = { type = \"keyword\" }",
        1,
    );
    assert_ne!(with_email, JOINED_TOML);
    let after = load(&with_email);
    let mut pipeline = Pipeline::start(db, &before).await;
    let user: String = pipeline
        .db
        .client
        .query_one(
            "INSERT INTO users (display_name, rating, email) VALUES ('Ayşe', 4.5, 'ayse@example.com') RETURNING id::text",
            &[],
        )
        .await
        .expect("user")
        .get(0);
    pipeline
        .db
        .client
        .execute(
            "INSERT INTO listings (user_id, title, category, status)
             SELECT $1::text::uuid, 'İlan ' || i, 'elektronik', 'active' FROM generate_series(1, 5) i",
            &[&user],
        )
        .await
        .expect("listings");
    eventually(
        PATIENCE,
        "the listings indexed with their seller",
        || async {
            let docs = pipeline.index.documents().await;
            let with_seller = docs
                .values()
                .filter(|d| d["seller"]["display_name"] == "Ayşe")
                .count();
            if with_seller == 5 {
                Ok(())
            } else {
                Err(format!("{with_seller} of 5"))
            }
        },
    )
    .await;

    // The file changes; the consumer restarts with it.
    pipeline.stop_consumer().await;
    pipeline.start_consumer(&after);
    eventually(PATIENCE, "seller.email in the live mapping", || async {
        let (_, mapping) = pipeline
            .call(Method::Get, &format!("/{}/_mapping", pipeline.index.alias))
            .await;
        let found = mapping.as_object().is_some_and(|indices| {
            indices.values().all(|index| {
                index["mappings"]["properties"]["seller"]["properties"]["email"]["type"]
                    == "keyword"
            })
        });
        if found {
            Ok(())
        } else {
            Err(mapping.to_string())
        }
    })
    .await;
    // The mapping is evolved during start-up; the health check answers 200 once the
    // indexer runs after it (503 "starting" before), so it is waited for, not read once.
    let path = "/api/v1/health/elasticsearch-service";
    eventually(
        PATIENCE,
        "the consumer healthy after its restart",
        || async {
            let response = reqwest::get(format!("http://127.0.0.1:{}{path}", pipeline.port))
                .await
                .map_err(|e| e.to_string())?;
            if response.status() == 200 {
                Ok(())
            } else {
                Err(format!(
                    "{}: {:?}",
                    response.status(),
                    response.text().await
                ))
            }
        },
    )
    .await;
    let health = support::healthy(pipeline.port, path, "elasticsearch-service").await;
    assert_eq!(health["details"]["reindexNeeded"], json!([]), "{health}");

    // A change of the seller rewrites its documents, now with the new field.
    pipeline
        .db
        .client
        .execute(
            "UPDATE users SET display_name = 'Ayşe Yılmaz' WHERE id = $1::text::uuid",
            &[&user],
        )
        .await
        .expect("rename");
    eventually(PATIENCE, "every document with the new field", || async {
        let docs = pipeline.index.documents().await;
        let done = docs
            .values()
            .filter(|d| {
                d["seller"]["display_name"] == "Ayşe Yılmaz"
                    && d["seller"]["email"] == "ayse@example.com"
            })
            .count();
        if done == 5 {
            Ok(())
        } else {
            Err(format!("{done} of 5: {docs:?}"))
        }
    })
    .await;
    pipeline.settled().await;
    let found = pipeline
        .index
        .search(json!({ "term": { "seller.email": "ayse@example.com" } }))
        .await;
    assert_eq!(found.len(), 5, "the new field is searchable");
    pipeline.stop().await;
}

/// Inserts, edits, deletes and moves listings out of and into the index, a few every
/// iteration, until `stop`.
async fn writer(schema: String, stop: CancellationToken, rounds: Arc<AtomicU64>) {
    let client = database_url().connect().await.expect("writer connects");
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .await
        .expect("search_path");
    let random = "(SELECT id FROM listings ORDER BY random() LIMIT 1)";
    let statements = [
        "INSERT INTO listings (user_id, title, description, category, status)
         SELECT gen_random_uuid(), 'Yeni ilan ' || md5(random()::text), 'Açıklama', 'elektronik', 'active'
         FROM generate_series(1, 2)"
            .to_owned(),
        format!("UPDATE listings SET title = 'Başlık ' || md5(random()::text) WHERE id = {random}"),
        format!("DELETE FROM listings WHERE id = {random}"),
        format!(
            "UPDATE listings SET status = CASE status WHEN 'active' THEN 'sold' ELSE 'active' END WHERE id = {random}"
        ),
    ];
    while !stop.is_cancelled() {
        for statement in &statements {
            client.batch_execute(statement).await.expect(statement);
        }
        rounds.fetch_add(1, Ordering::Relaxed);
        // Pacing, so the writes spread over the whole reindex.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_analyzer_changed_under_writes_is_reindexed_with_nothing_lost_or_stale() {
    let db = TestSchema::new().await;
    let alias = unique_name("t");
    let (before, after) = listings_and_changed(&alias);
    db.insert_listings(1000).await;
    let mut pipeline = Pipeline::start(db, &before).await;
    wait_for_documents(&pipeline, 1000).await;

    // The consumer starts with the changed file: it says a reindex is needed, and goes on.
    pipeline.stop_consumer().await;
    pipeline.start_consumer(&after);
    let health = eventually(PATIENCE, "the health answer names the change", || async {
        let answer = reqwest::get(format!(
            "http://127.0.0.1:{}/api/v1/health/elasticsearch-service",
            pipeline.port
        ))
        .await
        .map_err(|e| e.to_string())?
        .json::<Value>()
        .await
        .map_err(|e| e.to_string())?;
        let named = answer["details"]["reindexNeeded"]
            .as_array()
            .is_some_and(|lines| {
                lines
                    .iter()
                    .any(|l| l.as_str().is_some_and(|l| l.contains("title: analyzer")))
            });
        if named {
            Ok(answer)
        } else {
            Err(answer.to_string())
        }
    })
    .await;
    assert_eq!(
        health["healthy"], true,
        "a needed reindex is not a failure: {health}"
    );

    let stop = CancellationToken::new();
    let rounds = Arc::new(AtomicU64::new(0));
    let writes = tokio::spawn(writer(
        pipeline.db.name.clone(),
        stop.clone(),
        rounds.clone(),
    ));
    let started = Instant::now();
    let outcome = search::reindex(&pipeline.outbox(), &pipeline.nodes(), &after, 50, |line| {
        eprintln!("reindex: {line}");
    })
    .await
    .expect("the reindex finishes");
    assert_eq!(outcome.new_index, format!("{alias}_v2"));
    eprintln!("reindexed in {:?}", started.elapsed());
    let during = rounds.load(Ordering::Relaxed);
    // More writes after the swap, through the alias only: until a few more rounds are in.
    eventually(PATIENCE, "writes after the swap", || async {
        let now = rounds.load(Ordering::Relaxed);
        if now >= during + 5 {
            Ok(())
        } else {
            Err(format!("{now} rounds"))
        }
    })
    .await;
    stop.cancel();
    writes.await.expect("writer");
    eprintln!(
        "{during} rounds of writes during the reindex, {} in all",
        rounds.load(Ordering::Relaxed)
    );
    assert!(
        during > 5,
        "the writer ran during the reindex: {during} rounds"
    );

    pipeline.settled().await;
    let (lost, stale) = pipeline.lost_and_stale().await;
    assert!(
        lost.is_empty() && stale.is_empty(),
        "lost {lost:?}, stale {stale:?}"
    );
    assert_eq!(
        pipeline.index.behind_alias().await,
        vec![format!("{alias}_v2")]
    );
    let (status, _) = pipeline.call(Method::Head, &format!("/{alias}_v1")).await;
    assert_eq!(status, 404, "the old index is deleted");
    let (_, mapping) = pipeline
        .call(Method::Get, &format!("/{alias}_v2/_mapping"))
        .await;
    assert_eq!(
        mapping[format!("{alias}_v2")]["mappings"]["properties"]["title"]["analyzer"],
        "simple"
    );
    let record: i64 = pipeline
        .db
        .client
        .query_one("SELECT count(*) FROM benalsam_reindex", &[])
        .await
        .expect("reindex record")
        .get(0);
    assert_eq!(record, 0, "the reindex record is removed");
    pipeline.stop().await;
}

#[tokio::test]
async fn a_reindex_killed_mid_way_is_finished_by_a_rerun_and_a_concurrent_one_refused() {
    let db = TestSchema::new().await;
    let alias = unique_name("t");
    let (before, after) = listings_and_changed(&alias);
    db.insert_listings(400).await;
    let pipeline = Pipeline::start(db, &before).await;
    wait_for_documents(&pipeline, 400).await;

    // Another session holds the table's reindex lock, as a running reindex does.
    let other = database_url().connect().await.expect("connect");
    let key = format!("benalsam_reindex:{}:listings", pipeline.db.name);
    other
        .query_one("SELECT pg_advisory_lock(hashtext($1))", &[&key])
        .await
        .expect("lock");
    let refused = search::reindex(&pipeline.outbox(), &pipeline.nodes(), &after, 20, |_| {})
        .await
        .expect_err("a concurrent reindex is refused");
    assert!(refused.is_reindex_refused(), "{refused}");
    assert!(refused.to_string().contains("another reindex"), "{refused}");
    drop(other);

    // Killed after its first backfill batch.
    let killed = tokio::sync::Notify::new();
    let (outbox, nodes) = (pipeline.outbox(), pipeline.nodes());
    let run = search::reindex(&outbox, &nodes, &after, 20, |line| {
        if line.starts_with("enqueued") {
            killed.notify_one();
        }
    });
    tokio::select! {
        result = run => panic!("the reindex was to be killed mid-way: {result:?}"),
        () = killed.notified() => {}
    }
    let phase: String = pipeline
        .db
        .client
        .query_one("SELECT phase FROM benalsam_reindex", &[])
        .await
        .expect("the record stays")
        .get(0);
    assert_eq!(phase, "backfilling");

    // The rerun (once the killed session's lock is gone) continues and finishes.
    let outcome = eventually(PATIENCE, "the rerun finishes", || async {
        search::reindex(&pipeline.outbox(), &pipeline.nodes(), &after, 20, |line| {
            eprintln!("rerun: {line}");
        })
        .await
        .map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(outcome.resumed_from.as_deref(), Some("backfilling"));
    pipeline.settled().await;
    let (lost, stale) = pipeline.lost_and_stale().await;
    assert!(
        lost.is_empty() && stale.is_empty(),
        "lost {lost:?}, stale {stale:?}"
    );
    assert_eq!(pipeline.index.documents().await.len(), 400);
    assert_eq!(
        pipeline.index.behind_alias().await,
        vec![format!("{alias}_v2")]
    );
    let (status, _) = pipeline.call(Method::Head, &format!("/{alias}_v1")).await;
    assert_eq!(status, 404, "the old index is deleted");
    pipeline.stop().await;
}

/// The joined example from its file, into `alias` (built-in analysis where the engine lacks
/// the Turkish one), after `edit` of the file's text.
fn joined(alias: &str, edit: impl Fn(&str) -> String) -> EventType {
    let file = std::env::temp_dir().join(format!("{}.toml", unique_name("joined")));
    let text = edit(JOINED_TOML).replace("benalsam_listings_joined", alias);
    std::fs::write(&file, text).expect("write");
    let event_type = EventType::from_file(&file).expect("valid").remove(0);
    let _ = std::fs::remove_file(&file);
    support::builtin_analysis(event_type)
}

/// Whether every active listing's document names its seller as the database does, and no
/// other document is in the index.
async fn sellers_converged(pipeline: &Pipeline) -> Result<(), String> {
    let rows = pipeline
        .db
        .client
        .query(
            "SELECT l.id::text, u.display_name FROM listings l JOIN users u ON u.id = l.user_id
             WHERE l.status = 'active'",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let want: BTreeMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let docs = pipeline.index.documents().await;
    let wrong = want
        .iter()
        .filter(|(id, name)| {
            docs.get(*id)
                .is_none_or(|d| d["seller"]["display_name"] != **name)
        })
        .count();
    let stale = docs.keys().filter(|id| !want.contains_key(*id)).count();
    if wrong == 0 && stale == 0 {
        Ok(())
    } else {
        Err(format!(
            "{wrong} wrong or missing, {stale} stale of {}",
            want.len()
        ))
    }
}

#[tokio::test]
async fn a_joined_event_type_is_reindexed_while_its_related_rows_change() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(MARKETPLACE_SQL)
        .await
        .expect("the marketplace tables");
    let alias = unique_name("t");
    let before = joined(&alias, str::to_owned);
    // The seller's rating becomes a keyword: a type change.
    let after = joined(&alias, |text| {
        let changed = text.replacen(
            "fields.rating = { type = \"double\" }",
            "fields.rating = { type = \"keyword\", column = \"rating\" }",
            1,
        );
        assert_ne!(changed, text);
        changed
    });
    db.client
        .batch_execute(
            "INSERT INTO users (display_name, rating) SELECT 'Satıcı ' || i, 3.5 FROM generate_series(1, 5) i;
             INSERT INTO listings (user_id, title, category, status)
             SELECT u.id, 'İlan ' || i, 'elektronik', 'active'
             FROM generate_series(1, 40) i, users u",
        )
        .await
        .expect("users and listings");
    let mut pipeline = Pipeline::start(db, &before).await;
    eventually(PATIENCE, "the joined documents indexed", || {
        sellers_converged(&pipeline)
    })
    .await;

    pipeline.stop_consumer().await;
    pipeline.start_consumer(&after);
    // Renames of sellers (fanned out to their listings) and new listings, during the reindex.
    let stop = CancellationToken::new();
    let schema = pipeline.db.name.clone();
    let writes = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = database_url().connect().await.expect("writer connects");
            client
                .batch_execute(&format!("SET search_path TO {schema}"))
                .await
                .expect("search_path");
            let mut rounds = 0_u64;
            while !stop.is_cancelled() {
                client
                    .batch_execute(
                        "UPDATE users SET display_name = 'Satıcı ' || md5(random()::text)
                         WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1);
                         INSERT INTO listings (user_id, title, category, status)
                         SELECT id, 'Yeni', 'elektronik', 'active' FROM users ORDER BY random() LIMIT 1",
                    )
                    .await
                    .expect("writes");
                rounds += 1;
                // Pacing, so the writes spread over the reindex.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            rounds
        })
    };
    search::reindex(&pipeline.outbox(), &pipeline.nodes(), &after, 50, |line| {
        eprintln!("reindex: {line}");
    })
    .await
    .expect("the reindex finishes");
    stop.cancel();
    let rounds = writes.await.expect("writer");
    assert!(
        rounds > 2,
        "the writer ran during the reindex: {rounds} rounds"
    );

    eventually(
        PATIENCE,
        "the joined documents converge on the new index",
        || sellers_converged(&pipeline),
    )
    .await;
    pipeline.settled().await;
    assert_eq!(
        pipeline.index.behind_alias().await,
        vec![format!("{alias}_v2")]
    );
    let (_, mapping) = pipeline
        .call(Method::Get, &format!("/{alias}_v2/_mapping"))
        .await;
    assert_eq!(
        mapping[format!("{alias}_v2")]["mappings"]["properties"]["seller"]["properties"]["rating"]
            ["type"],
        "keyword"
    );
    pipeline.stop().await;
}
