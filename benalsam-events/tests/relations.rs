//! Joined documents against the real services: listings with their seller, category and
//! photos (examples/joined_documents), kept right when those tables change, whatever the
//! order of commits and deliveries.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use benalsam_events::bridge::BridgeSettings;
use benalsam_events::elasticsearch::http::Method;
use benalsam_events::{EventType, OutboxConfig};
use serde_json::{Value, json};
use support::{
    Running, TestIndex, TestSchema, TestVhost, against_sql, consumer_settings, database_url,
    eventually, free_port, healthy, publish, sample, scrape, search_url, unique_name,
};

const PATIENCE: Duration = Duration::from_secs(180);
const MARKETPLACE_SQL: &str = include_str!("../../examples/joined_documents/marketplace.sql");
const JOINED_TOML: &str = include_str!("../../examples/joined_documents/listings.toml");

/// A schema with the marketplace tables, a vhost, the joined listings event type with an
/// index of its own, and a bridge and a consumer running on them.
struct Joined {
    db: TestSchema,
    vhost: TestVhost,
    index: TestIndex,
    listings: EventType,
    /// The bridge's health and metrics port.
    port: u16,
    bridge: Running,
    /// The bridge's settings, to start another one.
    bridge_settings: BridgeSettings,
    consumer: Option<Running>,
}

impl Joined {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Like [`Joined::start`], with the bridge's settings changed by `adjust` first.
    async fn start_with(adjust: impl FnOnce(&mut BridgeSettings)) -> Self {
        let db = TestSchema::new().await;
        db.client
            .batch_execute(MARKETPLACE_SQL)
            .await
            .expect("the marketplace tables");
        let vhost = TestVhost::new().await;
        let alias = unique_name("t");
        let file = std::env::temp_dir().join(format!("{alias}.toml"));
        std::fs::write(
            &file,
            JOINED_TOML.replace("benalsam_listings_joined", &alias),
        )
        .expect("write the event-type file");
        let mut listings = EventType::from_file(&file)
            .expect("the joined example is valid")
            .remove(0);
        listings.index.alias.clone_from(&alias);
        let _ = std::fs::remove_file(&file);
        let index = TestIndex {
            alias,
            client: search_url()
                .client(Duration::from_secs(30))
                .expect("search client"),
        };
        let mut settings = BridgeSettings::new(database_url(), vhost.url.clone());
        settings.outbox = OutboxConfig::in_schema(&db.name);
        settings.event_types = vec![listings.clone()];
        settings.migrate = true;
        settings.heartbeat_interval = None;
        let port = free_port();
        settings.health_addr = Some(([127, 0, 0, 1], port).into());
        adjust(&mut settings);
        let bridge_settings = settings.clone();
        let bridge = Running::bridge(settings);
        let mut joined = Self {
            db,
            vhost,
            index,
            listings,
            port,
            bridge,
            bridge_settings,
            consumer: None,
        };
        joined.start_consumer();
        joined
    }

    fn start_consumer(&mut self) {
        let settings = consumer_settings(&self.db, &self.vhost.url, vec![self.listings.clone()]);
        self.consumer = Some(Running::consumer(settings));
    }

    async fn stop_consumer(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            consumer.stop().await;
        }
    }

    async fn sql(&self, sql: &str) {
        self.db.client.batch_execute(sql).await.expect(sql);
    }

    async fn value(&self, sql: &str) -> String {
        self.db.client.query_one(sql, &[]).await.expect(sql).get(0)
    }

    async fn user(&self, name: &str, rating: &str) -> String {
        self.value(&format!(
            "INSERT INTO users (display_name, rating, email) VALUES ('{name}', {rating}, 'x@example.com') RETURNING id::text"
        ))
        .await
    }

    async fn listing(&self, user: &str, title: &str, status: &str) -> String {
        self.value(&format!(
            "INSERT INTO listings (user_id, title, category, status) VALUES ('{user}', '{title}', 'elektronik', '{status}') RETURNING id::text"
        ))
        .await
    }

    /// The document's source, after a refresh; `None` while absent.
    async fn doc(&self, id: &str) -> Option<Value> {
        self.index.get(id).await.map(|d| d["_source"].clone())
    }

    /// Waits until the document of `id` satisfies `ok`.
    async fn doc_until(&self, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        eventually(PATIENCE, what, || async {
            match self.doc(id).await {
                Some(doc) if ok(&doc) => Ok(doc),
                other => Err(format!("document {id}: {other:?}")),
            }
        })
        .await
    }

    /// Every job in the live states is done: nothing pending, processing or sent.
    async fn settled(&self) {
        eventually(PATIENCE, "every job completed", || async {
            let live: i64 = self
                .db
                .client
                .query_one(
                    "SELECT count(*) FROM elasticsearch_sync_queue WHERE status <> 'completed'",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if live == 0 {
                Ok(())
            } else {
                Err(format!("{live} jobs not completed"))
            }
        })
        .await;
    }

    /// Record ids of the REBUILD jobs.
    async fn rebuilt(&self) -> BTreeSet<String> {
        self.db
            .client
            .query(
                "SELECT record_id FROM elasticsearch_sync_queue WHERE operation = 'REBUILD'",
                &[],
            )
            .await
            .expect("rebuild jobs")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Documents matching `query`, after a refresh.
    async fn count(&self, query: Value) -> u64 {
        let send = |method, path: String, body: Option<String>| {
            let mut headers = benalsam_events::elasticsearch::http::headers::HeaderMap::new();
            headers.insert(
                benalsam_events::elasticsearch::http::headers::CONTENT_TYPE,
                benalsam_events::elasticsearch::http::headers::HeaderValue::from_static(
                    "application/json",
                ),
            );
            let client = self.index.client.clone();
            async move {
                client
                    .send(method, &path, headers, Option::<&()>::None, body, None)
                    .await
                    .expect("search node answers")
                    .json::<Value>()
                    .await
                    .unwrap_or(Value::Null)
            }
        };
        let alias = &self.index.alias;
        send(Method::Post, format!("/{alias}/_refresh"), None).await;
        let answer = send(
            Method::Post,
            format!("/{alias}/_count"),
            Some(json!({ "query": query }).to_string()),
        )
        .await;
        answer["count"].as_u64().unwrap_or(0)
    }

    async fn stop(mut self) {
        self.stop_consumer().await;
        self.bridge.stop().await;
        self.index.drop().await;
        self.vhost.drop().await;
        self.db.drop().await;
    }
}

fn seller_name(doc: &Value) -> Option<&str> {
    doc["seller"]["display_name"].as_str()
}

#[tokio::test]
async fn a_parent_change_reindexes_exactly_its_documents_and_an_untaken_column_nothing() {
    let t = Joined::start().await;
    t.sql("INSERT INTO categories VALUES ('elektronik', 'Elektronik', 'Electronics')")
        .await;
    let (ayse, bora) = (t.user("Ayşe", "4.5").await, t.user("Bora", "3.0").await);
    let mut ayses = Vec::new();
    for i in 0..3 {
        ayses.push(t.listing(&ayse, &format!("Telefon {i}"), "active").await);
    }
    let draft = t.listing(&ayse, "Taslak", "draft").await;
    let boras = [
        t.listing(&bora, "Bisiklet", "active").await,
        t.listing(&bora, "Kask", "active").await,
    ];
    let first = t
        .doc_until(&ayses[0], "Ayşe's first listing indexed", |d| {
            seller_name(d) == Some("Ayşe")
        })
        .await;
    assert_eq!(first["seller"]["rating"], 4.5);
    assert_eq!(first["category_info"]["name"], "Elektronik");
    assert_eq!(first["photos"], json!([]));
    let mut bora_versions = Vec::new();
    for id in &boras {
        let doc = t
            .doc_until(id, "Bora's listings indexed", |d| {
                seller_name(d) == Some("Bora")
            })
            .await;
        bora_versions.push(doc["job_id"].clone());
    }
    t.settled().await;
    assert!(t.rebuilt().await.is_empty(), "no related change yet");

    // A column no document takes: no job at all.
    t.sql(&format!(
        "UPDATE users SET email = 'new@example.com', last_seen_at = now() WHERE id = '{ayse}'"
    ))
    .await;
    t.sql(&format!(
        "UPDATE users SET display_name = 'Ayşe Yılmaz' WHERE id = '{ayse}'"
    ))
    .await;
    for id in &ayses {
        t.doc_until(id, "the rename reached Ayşe's listings", |d| {
            seller_name(d) == Some("Ayşe Yılmaz")
        })
        .await;
    }
    t.settled().await;
    let relation_jobs = t
        .value("SELECT count(*)::text FROM elasticsearch_sync_queue WHERE table_name = 'listings#seller'")
        .await;
    assert_eq!(relation_jobs, "1", "the email change enqueued nothing");
    // The draft is skipped: the status policy keeps it out of the index whatever its
    // seller is called, and a REBUILD job would only delete what is not there.
    let expected: BTreeSet<String> = ayses.iter().cloned().collect();
    assert_eq!(
        t.rebuilt().await,
        expected,
        "exactly Ayşe's searchable listings, no job for the draft"
    );
    assert!(
        t.doc(&draft).await.is_none(),
        "a draft stays out of the index"
    );
    for (id, version) in boras.iter().zip(&bora_versions) {
        let doc = t.doc(id).await.expect("Bora's listing");
        assert_eq!(&doc["job_id"], version, "Bora's listings were not touched");
    }
    // The seller's name is searchable through the combined field.
    let found = t.count(json!({"match": {"search_text": "Yılmaz"}})).await;
    assert_eq!(found, 3);
    t.stop().await;
}

#[tokio::test]
async fn child_rows_added_changed_moved_and_removed() {
    let t = Joined::start().await;
    let user = t.user("Cem", "5.0").await;
    let (one, two) = (
        t.listing(&user, "Kamera", "active").await,
        t.listing(&user, "Lens", "active").await,
    );
    let urls = |doc: &Value| -> Vec<String> {
        doc["photos"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter_map(|x| x["url"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    t.sql(&format!(
        "INSERT INTO listing_images (listing_id, url, position) VALUES ('{one}', 'b.jpg', 2), ('{one}', 'a.jpg', 1)"
    ))
    .await;
    t.doc_until(&one, "photos added, in order", |d| {
        urls(d) == ["a.jpg", "b.jpg"]
    })
    .await;
    t.sql(&format!(
        "UPDATE listing_images SET position = 0 WHERE listing_id = '{one}' AND url = 'b.jpg'"
    ))
    .await;
    t.doc_until(&one, "a photo moved first", |d| {
        urls(d) == ["b.jpg", "a.jpg"]
    })
    .await;
    t.sql(&format!(
        "INSERT INTO listing_images (listing_id, url, position) VALUES ('{one}', 'c.jpg', 3), ('{one}', 'd.jpg', 4)"
    ))
    .await;
    t.doc_until(&one, "at most three photos", |d| {
        urls(d) == ["b.jpg", "a.jpg", "c.jpg"]
    })
    .await;
    // A photo moved to the other listing changes both documents.
    t.sql(&format!(
        "UPDATE listing_images SET listing_id = '{two}' WHERE url = 'b.jpg'"
    ))
    .await;
    t.doc_until(&two, "the moved photo arrived", |d| urls(d) == ["b.jpg"])
        .await;
    t.doc_until(&one, "the moved photo left", |d| {
        urls(d) == ["a.jpg", "c.jpg", "d.jpg"]
    })
    .await;
    t.sql(&format!(
        "DELETE FROM listing_images WHERE listing_id = '{one}'"
    ))
    .await;
    t.doc_until(&one, "every photo removed", |d| urls(d).is_empty())
        .await;
    t.settled().await;
    t.stop().await;
}

#[tokio::test]
async fn a_deleted_parent_leaves_its_documents_without_it() {
    let t = Joined::start().await;
    t.sql("INSERT INTO categories VALUES ('elektronik', 'Elektronik', 'Electronics')")
        .await;
    let user = t.user("Deniz", "2.5").await;
    let id = t.listing(&user, "Saat", "active").await;
    t.doc_until(&id, "indexed with its seller and category", |d| {
        seller_name(d) == Some("Deniz") && d["category_info"]["name"] == "Elektronik"
    })
    .await;
    t.sql(&format!("DELETE FROM users WHERE id = '{user}'"))
        .await;
    t.sql("DELETE FROM categories WHERE slug = 'elektronik'")
        .await;
    let doc = t
        .doc_until(&id, "the seller and category gone from the document", |d| {
            d.get("seller").is_none() && d.get("category_info").is_none()
        })
        .await;
    assert_eq!(doc["title"], "Saat", "the listing itself stays searchable");
    t.settled().await;
    t.stop().await;
}

/// A listing edit and a seller rename, each committed while the other is open, in both
/// orders; then both again with the consumer away (delayed delivery, a backlog read at
/// once). Versioned by job id, the first order would lose the edit: the rename's REBUILD
/// jobs get larger ids than the edit's job, though the edit commits later.
#[tokio::test]
async fn a_listing_edit_and_a_seller_rename_converge_in_both_commit_orders() {
    let mut t = Joined::start().await;
    let user = t.user("Ece", "4.0").await;
    let id = t.listing(&user, "Masa v0", "active").await;
    t.doc_until(&id, "indexed", |d| seller_name(d) == Some("Ece"))
        .await;
    let mut other = database_url().connect().await.expect("a second connection");
    other
        .batch_execute(&format!("SET search_path TO {}", t.db.name))
        .await
        .expect("search path");

    // Order 1: the edit begins first and commits last.
    let edit = other.transaction().await.expect("begin");
    edit.batch_execute(&format!(
        "UPDATE listings SET title = 'Masa v1' WHERE id = '{id}'"
    ))
    .await
    .expect("edit");
    t.sql(&format!(
        "UPDATE users SET display_name = 'Ece 1' WHERE id = '{user}'"
    ))
    .await;
    t.doc_until(&id, "the rename read while the edit is open", |d| {
        seller_name(d) == Some("Ece 1") && d["title"] == "Masa v0"
    })
    .await;
    edit.commit().await.expect("commit the edit");
    t.doc_until(&id, "order 1 converged", |d| {
        seller_name(d) == Some("Ece 1") && d["title"] == "Masa v1"
    })
    .await;

    // Order 2: the rename begins first and commits last.
    let rename = other.transaction().await.expect("begin");
    rename
        .batch_execute(&format!(
            "UPDATE users SET display_name = 'Ece 2' WHERE id = '{user}'"
        ))
        .await
        .expect("rename");
    t.sql(&format!(
        "UPDATE listings SET title = 'Masa v2' WHERE id = '{id}'"
    ))
    .await;
    t.doc_until(&id, "the edit read while the rename is open", |d| {
        seller_name(d) == Some("Ece 1") && d["title"] == "Masa v2"
    })
    .await;
    rename.commit().await.expect("commit the rename");
    t.doc_until(&id, "order 2 converged", |d| {
        seller_name(d) == Some("Ece 2") && d["title"] == "Masa v2"
    })
    .await;
    t.settled().await;

    // Delayed delivery: both orders again while no consumer reads, then one backlog.
    t.stop_consumer().await;
    let edit = other.transaction().await.expect("begin");
    edit.batch_execute(&format!(
        "UPDATE listings SET title = 'Masa v3' WHERE id = '{id}'"
    ))
    .await
    .expect("edit");
    t.sql(&format!(
        "UPDATE users SET display_name = 'Ece 3' WHERE id = '{user}'"
    ))
    .await;
    edit.commit().await.expect("commit");
    let rename = other.transaction().await.expect("begin");
    rename
        .batch_execute(&format!(
            "UPDATE users SET display_name = 'Ece 4' WHERE id = '{user}'"
        ))
        .await
        .expect("rename");
    t.sql(&format!(
        "UPDATE listings SET title = 'Masa v4' WHERE id = '{id}'"
    ))
    .await;
    rename.commit().await.expect("commit");
    eventually(PATIENCE, "every job published while the consumer is away", || async {
        let waiting = t
            .value("SELECT count(*)::text FROM elasticsearch_sync_queue WHERE status IN ('pending', 'processing')")
            .await;
        if waiting == "0" { Ok(()) } else { Err(format!("{waiting} not yet sent")) }
    })
    .await;
    t.start_consumer();
    t.doc_until(&id, "the backlog converged", |d| {
        seller_name(d) == Some("Ece 4") && d["title"] == "Masa v4"
    })
    .await;
    t.settled().await;
    t.stop().await;
}

/// A seller with 20,000 listings renamed: every document follows, in pages, with one
/// related job. The time is printed for the record; BENCHMARKS.md has the measured figures
/// (benches/fanout.rs), a test asserts no speed.
#[tokio::test]
async fn a_fan_out_of_twenty_thousand_documents() {
    const N: i64 = 20_000;
    let t = Joined::start().await;
    let user = t.user("Fikret", "4.9").await;
    t.db
        .client
        .execute(
            "INSERT INTO listings (user_id, title, category, status)
             SELECT $1::text::uuid, 'İlan ' || i, 'elektronik', 'active' FROM generate_series(1, $2::bigint) i",
            &[&user, &N],
        )
        .await
        .expect("insert the listings");
    let by = |name: &str| json!({"term": {"seller.display_name.raw": name}});
    eventually(PATIENCE, "every listing indexed", || async {
        let n = t.count(by("Fikret")).await;
        if n == N as u64 {
            Ok(())
        } else {
            Err(format!("{n} indexed"))
        }
    })
    .await;
    t.settled().await;
    let started = Instant::now();
    t.sql(&format!(
        "UPDATE users SET display_name = 'Fikret Bey' WHERE id = '{user}'"
    ))
    .await;
    eventually(PATIENCE, "every listing shows the new name", || async {
        let n = t.count(by("Fikret Bey")).await;
        if n == N as u64 {
            Ok(())
        } else {
            Err(format!("{n} renamed"))
        }
    })
    .await;
    let took = started.elapsed();
    eprintln!(
        "fan-out of {N} documents: rename committed → all searchable in {:.1} s ({:.0} documents/s)",
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64()
    );
    assert_eq!(t.count(by("Fikret")).await, 0);
    assert_eq!(t.rebuilt().await.len(), N as usize);
    t.settled().await;
    // Visible to the operator: the bridge's health and metrics count the fan-out.
    let health = healthy(
        t.port,
        "/api/v1/health/database-trigger-bridge",
        "database-trigger-bridge",
    )
    .await;
    let fan_out = &health["details"]["fanOut"];
    assert_eq!(fan_out["changesDone"], 1, "{health}");
    assert_eq!(fan_out["documentsQueued"], N, "{health}");
    assert_eq!(fan_out["current"], Value::Null);
    let metrics = scrape(t.port).await;
    let relation = [("relation", "listings#seller")];
    assert_eq!(
        sample(&metrics, "benalsam_fanout_documents_total", &relation),
        N as f64
    );
    assert_eq!(
        sample(&metrics, "benalsam_fanout_changes_total", &relation),
        1.0
    );
    t.stop().await;
}

/// The status and whether a page was written, of the fan-out job of a seller's rename.
async fn fan_out_job(t: &Joined, user: &str) -> Result<(String, bool), String> {
    t.db.client
        .query_opt(
            "SELECT status, change_data ? 'fanout' FROM elasticsearch_sync_queue
             WHERE table_name = 'listings#seller' AND record_id = $1",
            &[&user],
        )
        .await
        .map_err(|e| e.to_string())?
        .map(|r| (r.get(0), r.get(1)))
        .ok_or_else(|| "no fan-out job yet".to_owned())
}

/// Two sellers renamed one after the other, the first with many listings: the second's few
/// listings do not wait for the first's whole fan-out (the bridge interleaves the pages of
/// the changes it fans out), and every REBUILD job is dated by its seller's rename, so the
/// consumer's latency of a joined change counts from the related row's commit.
#[tokio::test]
async fn a_small_fan_out_finishes_while_a_big_one_is_still_paging() {
    const BIG: i64 = 3_000;
    // Pages of 100: the big fan-out is 30 pages, each written only once the consumer has
    // indexed all but two pages of the ones before.
    let t = Joined::start_with(|s| s.fanout_page = 100).await;
    t.sql("INSERT INTO categories VALUES ('elektronik', 'Elektronik', 'Electronics')")
        .await;
    let (big, small) = (t.user("Büyük", "4.0").await, t.user("Küçük", "3.0").await);
    t.db.client
        .execute(
            "INSERT INTO listings (user_id, title, category, status)
             SELECT $1::text::uuid, 'İlan ' || i, 'elektronik', 'active' FROM generate_series(1, $2::bigint) i",
            &[&big, &BIG],
        )
        .await
        .expect("insert the listings");
    let mut smalls = Vec::new();
    for i in 0..3 {
        smalls.push(t.listing(&small, &format!("Kask {i}"), "active").await);
    }
    let by = |name: &str| json!({"term": {"seller.display_name.raw": name}});
    eventually(PATIENCE, "every listing indexed", || async {
        let n = t.count(by("Büyük")).await;
        if n == BIG as u64 {
            Ok(())
        } else {
            Err(format!("{n} indexed"))
        }
    })
    .await;
    t.settled().await;

    t.sql(&format!(
        "UPDATE users SET display_name = 'Büyük Mağaza' WHERE id = '{big}'"
    ))
    .await;
    eventually(PATIENCE, "the big fan-out under way", || async {
        match fan_out_job(&t, &big).await? {
            (status, true) if status == "processing" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    t.sql(&format!(
        "UPDATE users SET display_name = 'Küçük Dükkan' WHERE id = '{small}'"
    ))
    .await;
    eventually(PATIENCE, "the small fan-out completed", || async {
        match fan_out_job(&t, &small).await? {
            (status, _) if status == "completed" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    for id in &smalls {
        t.doc_until(id, "the small rename searchable", |d| {
            seller_name(d) == Some("Küçük Dükkan")
        })
        .await;
    }
    eventually(PATIENCE, "every big listing renamed", || async {
        let n = t.count(by("Büyük Mağaza")).await;
        if n == BIG as u64 {
            Ok(())
        } else {
            Err(format!("{n} renamed"))
        }
    })
    .await;
    t.settled().await;
    let undated = t
        .value(
            "SELECT count(*)::text FROM elasticsearch_sync_queue d JOIN listings l ON l.id::text = d.record_id
             WHERE d.operation = 'REBUILD' AND d.created_at IS DISTINCT FROM
               (SELECT r.created_at FROM elasticsearch_sync_queue r
                WHERE r.table_name = 'listings#seller' AND r.record_id = l.user_id::text)",
        )
        .await;
    assert_eq!(undated, "0", "every REBUILD job carries its rename's time");
    // From the queue's own times, not a snapshot that a slow poller could miss: the small
    // rename's documents were indexed before the big fan-out wrote its last page.
    let interleaved = t
        .value(&format!(
            "SELECT ((SELECT max(d.completed_at) FROM elasticsearch_sync_queue d
                      JOIN listings l ON l.id::text = d.record_id
                      WHERE d.operation = 'REBUILD' AND l.user_id = '{small}')
                   < (SELECT completed_at FROM elasticsearch_sync_queue
                      WHERE table_name = 'listings#seller' AND record_id = '{big}'))::text"
        ))
        .await;
    assert_eq!(
        interleaved, "true",
        "the small rename was indexed while the big fan-out still paged"
    );
    assert_eq!(t.rebuilt().await.len(), BIG as usize + smalls.len());
    t.stop().await;
}

#[tokio::test]
async fn a_wrong_foreign_key_stops_start_up_naming_the_file_and_the_key() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(MARKETPLACE_SQL)
        .await
        .expect("the marketplace tables");
    let dir = std::env::temp_dir();
    let check = |name: &str, toml: String| {
        let path = dir.join(name);
        std::fs::write(&path, toml).expect("write");
        path
    };
    let typo = check(
        &format!("{}-typo.toml", db.name),
        JOINED_TOML.replace(
            "foreign_key = [\"user_id\"]",
            "foreign_key = [\"user_idd\"]",
        ),
    );
    let err = migrate(&db, &typo).await;
    assert!(
        err.contains("-typo.toml:")
            && err.contains("relations.seller.foreign_key")
            && err.contains("user_idd"),
        "{err}"
    );
    let mistyped = check(
        &format!("{}-type.toml", db.name),
        JOINED_TOML.replace(
            "references = [\"id\"]              # columns of users",
            "references = [\"display_name\"] #",
        ),
    );
    let err = migrate(&db, &mistyped).await;
    assert!(
        err.contains("relations.seller.foreign_key") && err.contains("same type"),
        "{err}"
    );
    let _ = std::fs::remove_file(typo);
    let _ = std::fs::remove_file(mistyped);
    db.drop().await;
}

/// A broker client that names a fan-out in progress (its job is `processing`, held by a
/// bridge) cannot touch it: the delivery is dead-lettered as unverified and the job stays
/// as it was. Before, the consumer failed the job and its documents kept the old name.
#[tokio::test]
async fn a_forged_delivery_naming_a_fan_out_touches_nothing() {
    let t = Joined::start().await;
    // A fan-out another bridge holds for an hour.
    let job: i64 = t
        .db
        .client
        .query_one(
            "INSERT INTO elasticsearch_sync_queue
                 (table_name, operation, record_id, change_data, status, locked_until, locked_by)
             VALUES ('listings#seller', 'UPDATE', 'u1', '{\"fanout\": {\"tuple\": 0, \"after\": null}}',
                     'processing', now() + interval '1 hour', 'another bridge')
             RETURNING id",
            &[],
        )
        .await
        .expect("a fan-out in progress")
        .get(0);
    // The bridge has declared the topology once a listing went through.
    let user = t.user("Hakan", "4.0").await;
    let id = t.listing(&user, "Sandalye", "active").await;
    t.doc_until(&id, "the pipeline runs", |d| {
        seller_name(d) == Some("Hakan")
    })
    .await;
    let forged = benalsam_events::Envelope::decode(
        json!({
            "messageId": format!("job_{job}"), "jobId": job, "schemaVersion": 1,
            "routingKey": "listing.update", "table": "listings#seller", "operation": "UPDATE",
            "recordId": "u1", "changeData": {"old": {}, "new": {}},
            "occurredAt": "2026-11-28T00:00:00Z"
        })
        .to_string()
        .as_bytes(),
    )
    .expect("well-formed");
    publish(&t.vhost.url, &forged)
        .await
        .expect("the administrator may publish");
    let dlq = benalsam_events::consume::DeadLetterQueue::new(
        t.vhost.url.clone(),
        "elasticsearch.sync.dlq",
    );
    let letter = eventually(PATIENCE, "the forgery dead-lettered", || async {
        let letters = dlq.list(10).await.map_err(|e| e.to_string())?;
        letters
            .into_iter()
            .find(|l| l.job_id == Some(job))
            .ok_or_else(|| "no dead letter yet".to_owned())
    })
    .await;
    assert_eq!(letter.kind.as_deref(), Some("unverified"), "{letter:?}");
    let row =
        t.db.client
            .query_one(
                "SELECT status, retry_count, locked_by FROM elasticsearch_sync_queue WHERE id = $1",
                &[&job],
            )
            .await
            .expect("the job");
    let (status, retries, holder): (String, i32, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (status.as_str(), retries, holder.as_str()),
        ("processing", 0, "another bridge")
    );
    t.stop().await;
}

/// A relation taken out of the file loses its trigger at the next `migrate`, and the jobs
/// it left waiting go with it: nothing records changes that nobody would claim.
#[tokio::test]
async fn a_removed_relation_loses_its_trigger_and_its_waiting_jobs() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(MARKETPLACE_SQL)
        .await
        .expect("the marketplace tables");
    let file = std::env::temp_dir().join(format!("{}-joined.toml", db.name));
    std::fs::write(&file, JOINED_TOML).expect("write");
    let joined = EventType::from_file(&file).expect("valid");
    let config = OutboxConfig::in_schema(&db.name);
    let mut client = database_url().connect().await.expect("PostgreSQL");
    config
        .migrate(&mut client, &joined)
        .await
        .expect("migrate with three relations");
    db.client
        .batch_execute("INSERT INTO users (display_name) VALUES ('Gül')")
        .await
        .expect("a seller");
    let jobs = |table: &'static str| {
        let client = &db.client;
        async move {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM elasticsearch_sync_queue WHERE table_name = $1",
                    &[&table],
                )
                .await
                .expect("count")
                .get(0);
            n
        }
    };
    assert_eq!(jobs("listings#seller").await, 1);

    let mut fewer = joined.clone();
    fewer[0].relations.retain(|r| r.name != "seller");
    let report = config
        .migrate(&mut client, &fewer)
        .await
        .expect("migrate without the seller");
    let mut removed = report.removed_triggers.clone();
    removed.sort();
    assert_eq!(
        removed,
        vec![
            format!("{}.users.benalsam_listings_seller", db.name),
            format!("{}.users.truncate_listings_seller", db.name),
        ],
        "its row trigger and its TRUNCATE trigger"
    );
    assert_eq!(jobs("listings#seller").await, 0, "its waiting job is gone");
    db.client
        .batch_execute("UPDATE users SET display_name = 'Gül Ş.'")
        .await
        .expect("rename");
    assert_eq!(
        jobs("listings#seller").await,
        0,
        "no trigger records it any more"
    );
    let again = config
        .migrate(&mut client, &fewer)
        .await
        .expect("migrate again");
    assert!(again.removed_triggers.is_empty());
    let _ = std::fs::remove_file(file);
    db.drop().await;
}

async fn migrate(db: &TestSchema, file: &Path) -> String {
    let types = EventType::from_file(file).expect("the file parses");
    let mut client = database_url().connect().await.expect("PostgreSQL");
    OutboxConfig::in_schema(&db.name)
        .migrate(&mut client, &types)
        .await
        .expect_err("a relation that the catalog refuses")
        .to_string()
}

impl Joined {
    /// Waits until every document equals its SQL view: 0 missing, 0 extra, 0 stale.
    async fn converged(&self, what: &str) {
        let outbox = self.db.outbox(OutboxConfig::in_schema(&self.db.name));
        eventually(PATIENCE, what, || async {
            let found = against_sql(&outbox, &self.db.client, &self.listings, &self.index).await;
            if found.is_none() {
                Ok(())
            } else {
                Err(format!("{found:?}"))
            }
        })
        .await;
    }

    /// Kills the bridge (no stop: its claims stay leased until the lease runs out) and
    /// starts another one.
    async fn kill_and_restart_bridge(&mut self) {
        self.bridge.kill().await;
        let mut settings = self.bridge_settings.clone();
        settings.health_addr = Some(([127, 0, 0, 1], free_port()).into());
        self.bridge = Running::bridge(settings);
    }
}

/// Listings of two sellers (a third in a category without a row, a fifth drafts), with photos; every
/// document indexed with its relations.
async fn truncate_fixture(t: &Joined, per_seller: i64) -> Vec<String> {
    t.sql("INSERT INTO categories VALUES ('elektronik', 'Elektronik', 'Electronics')")
        .await;
    let mut ids = Vec::new();
    for name in ["Gül", "Hakan"] {
        let user = t.user(name, "4.0").await;
        let rows = t
            .db
            .client
            .query(
                "INSERT INTO listings (user_id, title, category, status)
                 SELECT $1::text::uuid, 'İlan ' || i, CASE WHEN i % 3 = 0 THEN 'diger' ELSE 'elektronik' END,
                        CASE WHEN i % 5 = 0 THEN 'draft' ELSE 'active' END
                 FROM generate_series(1, $2::bigint) i RETURNING id::text",
                &[&user, &per_seller],
            )
            .await
            .expect("insert the listings");
        ids.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    }
    t.sql(
        "INSERT INTO listing_images (listing_id, url, position)
         SELECT id, 'p' || id || '.jpg', 1 FROM listings",
    )
    .await;
    t.converged("every listing indexed with its seller, category and photos")
        .await;
    t.settled().await;
    ids
}

/// A TRUNCATE of a parent's table and of a children's table: every document is rebuilt
/// without the related part, exactly as the SQL view has it (before, the documents kept
/// their seller and photos until a manual backfill).
#[tokio::test]
async fn a_truncate_of_a_related_table_rebuilds_every_document_that_joined_it() {
    let t = Joined::start().await;
    let ids = truncate_fixture(&t, 15).await;
    let with_seller = t
        .count(json!({"exists": {"field": "seller.display_name"}}))
        .await;
    assert!(with_seller > 0);

    t.sql("TRUNCATE users").await;
    t.converged("every document rebuilt without its seller")
        .await;
    assert_eq!(
        t.count(json!({"exists": {"field": "seller.display_name"}}))
            .await,
        0
    );
    t.settled().await;
    let truncations = t
        .value(
            "SELECT count(*)::text FROM elasticsearch_sync_queue
             WHERE table_name = 'listings#seller' AND operation = 'TRUNCATE'",
        )
        .await;
    assert_eq!(truncations, "1", "one job for the statement");

    t.sql("TRUNCATE listing_images").await;
    t.converged("every document rebuilt without its photos")
        .await;
    assert_eq!(t.count(json!({"exists": {"field": "photos.url"}})).await, 0);
    // A parent's truncate leaves out the documents whose foreign key is null.
    t.sql("TRUNCATE categories").await;
    t.converged("every document rebuilt without its category")
        .await;
    t.settled().await;
    assert!(!ids.is_empty());
    t.stop().await;
}

/// A bridge killed while it pages through a truncate's documents: the next one resumes
/// the fan-out after its last page, and every document converges.
#[tokio::test]
async fn a_truncate_fan_out_resumes_after_the_bridge_is_killed() {
    let mut t = Joined::start_with(|s| {
        s.fanout_page = 20;
        s.outbox.lease = Duration::from_secs(3);
    })
    .await;
    truncate_fixture(&t, 150).await;
    t.stop_consumer().await;
    t.sql("TRUNCATE listing_images").await;
    eventually(PATIENCE, "the truncate's fan-out under way", || async {
        let row =
            t.db.client
                .query_opt(
                    "SELECT status, change_data ? 'fanout' FROM elasticsearch_sync_queue
                 WHERE table_name = 'listings#photos' AND operation = 'TRUNCATE'",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
        match row.map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1))) {
            Some((status, true)) if status == "processing" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    t.kill_and_restart_bridge().await;
    t.start_consumer();
    t.converged("every document rebuilt without its photos after the kill")
        .await;
    t.settled().await;
    let done = t
        .value(
            "SELECT status || ' ' || coalesce(change_data::text, '') FROM elasticsearch_sync_queue
             WHERE table_name = 'listings#photos' AND operation = 'TRUNCATE'",
        )
        .await;
    assert!(done.starts_with("completed"), "{done}");
    t.stop().await;
}
