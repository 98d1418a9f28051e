//! Relations of relations and many-to-many against the real services: job posts with their
//! company, its industry and that industry's sector (three levels), and their tags through
//! post_tags (examples/joined_documents/jobs.toml). A change at every level re-indexes exactly
//! the posts that contain it, and crossed commits converge; a checker compares every document
//! of the index with the SQL view of it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use benalsam_events::bridge::BridgeSettings;
use benalsam_events::{EventType, OutboxConfig};
use serde_json::{Value, json};
use support::{
    Running, TestIndex, TestSchema, TestVhost, consumer_settings, database_url, eventually,
    search_url, unique_name,
};

const PATIENCE: Duration = Duration::from_secs(180);
const JOBS_SQL: &str = include_str!("../../examples/joined_documents/jobs.sql");
const JOBS_TOML: &str = include_str!("../../examples/joined_documents/jobs.toml");

/// A schema with the job board's tables, a vhost, the jobs event type with an index of its
/// own, and a bridge and a consumer running on them.
struct Board {
    db: TestSchema,
    vhost: TestVhost,
    index: TestIndex,
    jobs: EventType,
    bridge: Running,
    /// What the bridge was started with, to start another after a kill.
    bridge_settings: BridgeSettings,
    consumer: Option<Running>,
}

/// The jobs event type of the example, writing into `alias`.
fn jobs_type(alias: &str) -> EventType {
    let file = std::env::temp_dir().join(format!("{alias}.toml"));
    std::fs::write(&file, JOBS_TOML.replace("benalsam_jobs", alias)).expect("write the file");
    let jobs = EventType::from_file(&file)
        .expect("the jobs example is valid")
        .remove(0);
    let _ = std::fs::remove_file(&file);
    jobs
}

impl Board {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// The same with the bridge's settings adjusted (a small fan-out page, a short lease).
    async fn start_with(adjust: impl FnOnce(&mut BridgeSettings)) -> Self {
        let db = TestSchema::new().await;
        db.client
            .batch_execute(JOBS_SQL)
            .await
            .expect("the job board's tables");
        let vhost = TestVhost::new().await;
        let alias = unique_name("t");
        let jobs = jobs_type(&alias);
        let index = TestIndex {
            alias,
            client: search_url()
                .client(Duration::from_secs(30))
                .expect("search client"),
        };
        // The triggers before the first row (the bridge's own migration runs concurrently).
        let mut client = database_url().connect().await.expect("PostgreSQL");
        OutboxConfig::in_schema(&db.name)
            .migrate(&mut client, std::slice::from_ref(&jobs))
            .await
            .expect("migrate the jobs example");
        let mut settings = BridgeSettings::new(database_url(), vhost.url.clone());
        settings.outbox = OutboxConfig::in_schema(&db.name);
        settings.event_types = vec![jobs.clone()];
        settings.migrate = true;
        settings.heartbeat_interval = None;
        adjust(&mut settings);
        let bridge_settings = settings.clone();
        let bridge = Running::bridge(settings);
        let mut board = Self {
            db,
            vhost,
            index,
            jobs,
            bridge,
            bridge_settings,
            consumer: None,
        };
        board.start_consumer();
        board
    }

    fn start_consumer(&mut self) {
        let settings = consumer_settings(&self.db, &self.vhost.url, vec![self.jobs.clone()]);
        self.consumer = Some(Running::consumer(settings));
    }

    /// Kills the bridge where it stands: its task aborted, no clean shutdown, so the jobs it
    /// claimed keep their lease until it runs out. Start another before [`Board::stop`].
    async fn kill_bridge(&mut self) {
        self.bridge.kill().await;
    }

    /// Starts another bridge with the first one's settings.
    fn start_bridge(&mut self) {
        self.bridge = Running::bridge(self.bridge_settings.clone());
    }

    async fn stop_consumer(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            consumer.stop().await;
        }
    }

    async fn sql(&self, sql: &str) {
        self.db.client.batch_execute(sql).await.expect(sql);
    }

    async fn id(&self, sql: &str) -> String {
        self.db
            .client
            .query_one(&format!("{sql} RETURNING id::text"), &[])
            .await
            .expect(sql)
            .get(0)
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db.client.query_one(sql, &[]).await.expect(sql).get(0)
    }

    /// Every job is done: nothing pending, processing or sent.
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

    /// The largest job id so far.
    async fn mark(&self) -> i64 {
        self.count("SELECT coalesce(max(id), 0) FROM elasticsearch_sync_queue")
            .await
    }

    /// Runs `change`, waits until every job is done, and answers the posts it re-indexed
    /// (REBUILD jobs after it).
    async fn rebuilt_by(&self, change: &str) -> BTreeSet<String> {
        let mark = self.mark().await;
        self.sql(change).await;
        self.settled().await;
        self.db
            .client
            .query(
                "SELECT record_id FROM elasticsearch_sync_queue WHERE operation = 'REBUILD' AND id > $1",
                &[&mark],
            )
            .await
            .expect("rebuild jobs")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// The SQL view of every searchable post, as the checker compares it (written here
    /// independently of the library's read).
    async fn sql_view(&self) -> BTreeMap<String, Value> {
        self.db
            .client
            .query(
                "SELECT p.id::text, jsonb_build_object(
                        'title', p.title, 'company', c.name, 'industry', i.name, 'sector', s.name,
                        'tags', coalesce((SELECT jsonb_agg(t.name ORDER BY pt.position, pt.tag_id)
                                            FROM post_tags pt JOIN tags t ON t.id = pt.tag_id
                                           WHERE pt.post_id = p.id), '[]'::jsonb),
                        'open_applications', (SELECT count(*) FROM applications a
                                               WHERE a.post_id = p.id AND a.status = 'open'),
                        'last_applied_at', (SELECT to_jsonb(max(a.created_at)) FROM applications a
                                             WHERE a.post_id = p.id))
                   FROM job_posts p
                   LEFT JOIN companies c ON c.id = p.company_id
                   LEFT JOIN industries i ON i.id = c.industry_id
                   LEFT JOIN sectors s ON s.id = i.sector_id
                  WHERE p.status = 'open'",
                &[],
            )
            .await
            .expect("the SQL view")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Waits until the index holds exactly the SQL view: 0 missing, 0 extra, 0 stale.
    async fn converged(&self, what: &str) {
        eventually(PATIENCE, what, || async {
            let want = self.sql_view().await;
            let have: BTreeMap<String, Value> = self
                .index
                .documents()
                .await
                .into_iter()
                .map(|(id, doc)| (id, projection(&doc)))
                .collect();
            let missing = want.keys().filter(|k| !have.contains_key(*k)).count();
            let extra = have.keys().filter(|k| !want.contains_key(*k)).count();
            let stale: Vec<_> = want
                .iter()
                .filter(|(k, v)| have.get(*k).is_some_and(|h| h != *v))
                .map(|(k, v)| format!("{k}: want {v}, have {}", have[k]))
                .collect();
            if missing + extra + stale.len() == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{missing} missing, {extra} extra, {} stale: {stale:?}",
                    stale.len()
                ))
            }
        })
        .await;
    }

    /// The document of post `id`, once `ok` holds for it.
    async fn doc_until(&self, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        eventually(PATIENCE, what, || async {
            match self.index.get(id).await.map(|d| d["_source"].clone()) {
                Some(doc) if ok(&doc) => Ok(doc),
                other => Err(format!("post {id}: {other:?}")),
            }
        })
        .await
    }

    async fn stop(mut self) {
        self.stop_consumer().await;
        self.bridge.stop().await;
        self.index.drop().await;
        self.vhost.drop().await;
        self.db.drop().await;
    }
}

/// What the checker compares of a document: the fields of every level, and the tag names.
fn projection(doc: &Value) -> Value {
    let company = &doc["company"];
    let tags: Vec<Value> = doc["tags"]
        .as_array()
        .map(|tags| tags.iter().map(|t| t["name"].clone()).collect())
        .unwrap_or_default();
    json!({
        "title": doc["title"],
        "company": company["name"],
        "industry": company["industry"]["name"],
        "sector": company["industry"]["sector"]["name"],
        "tags": tags,
        "open_applications": doc["open_applications"],
        "last_applied_at": doc["last_applied_at"],
    })
}

fn sector(doc: &Value) -> &Value {
    &doc["company"]["industry"]["sector"]["name"]
}

fn set(ids: &[&String]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).clone()).collect()
}

/// A second connection in the test's schema, for transactions held open.
async fn other_connection(board: &Board) -> tokio_postgres::Client {
    let other = database_url().connect().await.expect("a second connection");
    other
        .batch_execute(&format!("SET search_path TO {}", board.db.name))
        .await
        .expect("search path");
    other
}

/// Sectors, industries, companies, posts and tags: what every test starts from.
struct Seed {
    sectors: [String; 2],
    industries: [String; 3],
    companies: [String; 3],
    /// p[0], p[1] at companies[0]; p[2] at companies[1]; p[3] at companies[2]; p[4] is
    /// closed (not searchable), at companies[0].
    posts: [String; 5],
    tags: [String; 2],
}

async fn seed(t: &Board) -> Seed {
    let sectors = [
        t.id("INSERT INTO sectors (name) VALUES ('Tech')").await,
        t.id("INSERT INTO sectors (name) VALUES ('Health')").await,
    ];
    let industry = |name: &str, sector: &str| {
        format!("INSERT INTO industries (name, sector_id) VALUES ('{name}', {sector})")
    };
    let industries = [
        t.id(&industry("Software", &sectors[0])).await,
        t.id(&industry("Hardware", &sectors[0])).await,
        t.id(&industry("Clinics", &sectors[1])).await,
    ];
    let company = |name: &str, industry: &str| {
        format!("INSERT INTO companies (name, industry_id) VALUES ('{name}', {industry})")
    };
    let companies = [
        t.id(&company("Acme", &industries[0])).await,
        t.id(&company("Boltworks", &industries[1])).await,
        t.id(&company("Care Co", &industries[2])).await,
    ];
    let post = |title: &str, company: &str, status: &str| {
        format!(
            "INSERT INTO job_posts (title, company_id, status) VALUES ('{title}', {company}, '{status}')"
        )
    };
    let posts = [
        t.id(&post("Rust engineer", &companies[0], "open")).await,
        t.id(&post("Go engineer", &companies[0], "open")).await,
        t.id(&post("Board designer", &companies[1], "open")).await,
        t.id(&post("Nurse", &companies[2], "open")).await,
        t.id(&post("Old post", &companies[0], "closed")).await,
    ];
    let tags = [
        t.id("INSERT INTO tags (name) VALUES ('remote')").await,
        t.id("INSERT INTO tags (name) VALUES ('senior')").await,
    ];
    t.sql(&format!(
        "INSERT INTO post_tags (post_id, tag_id, position) VALUES
           ({p0}, {t0}, 1), ({p2}, {t0}, 1), ({p0}, {t1}, 0), ({p3}, {t1}, 0), ({p4}, {t0}, 0)",
        p0 = posts[0],
        p2 = posts[2],
        p3 = posts[3],
        p4 = posts[4],
        t0 = tags[0],
        t1 = tags[1],
    ))
    .await;
    t.settled().await;
    t.converged("the seed indexed").await;
    Seed {
        sectors,
        industries,
        companies,
        posts,
        tags,
    }
}

#[tokio::test]
async fn a_change_at_each_level_reindexes_exactly_the_posts_that_contain_it() {
    let t = Board::start().await;
    let s = seed(&t).await;
    let p = &s.posts;
    let first = t
        .doc_until(&p[0], "the first post", |d| sector(d) == "Tech")
        .await;
    assert_eq!(
        first["company"],
        json!({"name": "Acme", "industry": {"name": "Software", "sector": {"name": "Tech"}}})
    );
    assert_eq!(
        first["tags"],
        json!([{"name": "senior"}, {"name": "remote"}]),
        "flattened, in position order"
    );

    // Columns no document takes: no job at all.
    let before = t
        .count("SELECT count(*) FROM elasticsearch_sync_queue WHERE table_name LIKE 'job_posts#%'")
        .await;
    assert!(
        t.rebuilt_by(&format!(
            "UPDATE companies SET billing_email = 'x@example.com' WHERE id = {}",
            s.companies[0]
        ))
        .await
        .is_empty()
    );
    let after = t
        .count("SELECT count(*) FROM elasticsearch_sync_queue WHERE table_name LIKE 'job_posts#%'")
        .await;
    assert_eq!(before, after, "an untaken column enqueues nothing");

    // Level 1, 2, 3: the posts under the changed row, never the closed one.
    let cases = [
        (
            format!(
                "UPDATE companies SET name = 'Acme Inc' WHERE id = {}",
                s.companies[0]
            ),
            set(&[&p[0], &p[1]]),
        ),
        (
            format!(
                "UPDATE industries SET name = 'Software & IT' WHERE id = {}",
                s.industries[0]
            ),
            set(&[&p[0], &p[1]]),
        ),
        (
            format!(
                "UPDATE sectors SET name = 'Technology' WHERE id = {}",
                s.sectors[0]
            ),
            set(&[&p[0], &p[1], &p[2]]),
        ),
        // An industry moved to another sector: its posts, which now show the other sector.
        (
            format!(
                "UPDATE industries SET sector_id = {} WHERE id = {}",
                s.sectors[0], s.industries[2]
            ),
            set(&[&p[3]]),
        ),
        // Many-to-many: a tag rename re-indexes the posts that carry it; a link added or
        // removed, its one post.
        (
            format!(
                "UPDATE tags SET name = 'remote-ok' WHERE id = {}",
                s.tags[0]
            ),
            set(&[&p[0], &p[2]]),
        ),
        (
            format!(
                "INSERT INTO post_tags (post_id, tag_id) VALUES ({}, {})",
                p[1], s.tags[1]
            ),
            set(&[&p[1]]),
        ),
        (
            format!(
                "DELETE FROM post_tags WHERE post_id = {} AND tag_id = {}",
                p[0], s.tags[0]
            ),
            set(&[&p[0]]),
        ),
    ];
    for (change, expected) in cases {
        assert_eq!(t.rebuilt_by(&change).await, expected, "{change}");
        t.converged(&change).await;
    }
    let nurse = t.index.get(&p[3]).await.expect("the nurse post")["_source"].clone();
    assert_eq!(sector(&nurse), "Technology");
    assert_eq!(
        t.count("SELECT count(*) FROM elasticsearch_sync_queue WHERE table_name = 'job_posts#company.industry.sector' AND operation = 'UPDATE'")
            .await,
        1,
        "one job for the sector rename, whatever the number of posts"
    );
    t.stop().await;
}

/// At the deepest level: a sector rename and a move of a company into that sector (a change
/// of the path itself), each committed while the other is open, in both orders. Then a tag
/// rename and a new link to that tag, crossed the same way.
#[tokio::test]
async fn crossed_commits_at_the_deepest_level_and_through_a_join_table_converge() {
    let t = Board::start().await;
    let s = seed(&t).await;
    let nurse = &s.posts[3];
    let mut other = other_connection(&t).await;

    // Order 1: the move begins first and commits last. The rename's fan-out cannot see the
    // nurse post under Tech; the move's own fan-out reads it after both.
    let tx = other.transaction().await.expect("begin");
    tx.batch_execute(&format!(
        "UPDATE companies SET industry_id = {} WHERE id = {}",
        s.industries[0], s.companies[2]
    ))
    .await
    .expect("move");
    t.sql(&format!(
        "UPDATE sectors SET name = 'Tech 1' WHERE id = {}",
        s.sectors[0]
    ))
    .await;
    t.doc_until(&s.posts[0], "the rename read while the move is open", |d| {
        sector(d) == "Tech 1"
    })
    .await;
    assert_eq!(
        sector(&t.index.get(nurse).await.expect("nurse")["_source"]),
        "Health"
    );
    tx.commit().await.expect("commit the move");
    t.settled().await;
    t.converged("order 1 converged").await;
    let doc = t.index.get(nurse).await.expect("nurse")["_source"].clone();
    assert_eq!(sector(&doc), "Tech 1");

    // Order 2: the rename begins first and commits last; the company moves back meanwhile,
    // and another moves in.
    let tx = other.transaction().await.expect("begin");
    tx.batch_execute(&format!(
        "UPDATE sectors SET name = 'Tech 2' WHERE id = {}",
        s.sectors[0]
    ))
    .await
    .expect("rename");
    t.sql(&format!(
        "UPDATE companies SET industry_id = {} WHERE id = {};
         UPDATE industries SET sector_id = {} WHERE id = {}",
        s.industries[2], s.companies[2], s.sectors[1], s.industries[1]
    ))
    .await;
    t.doc_until(nurse, "the move read while the rename is open", |d| {
        sector(d) == "Health"
    })
    .await;
    tx.commit().await.expect("commit the rename");
    t.settled().await;
    t.converged("order 2 converged").await;

    // Through the join table: a tag rename and a new link to the tag, crossed.
    let board_designer = &s.posts[2];
    let tx = other.transaction().await.expect("begin");
    tx.batch_execute(&format!(
        "INSERT INTO post_tags (post_id, tag_id) VALUES ({}, {})",
        s.posts[1], s.tags[1]
    ))
    .await
    .expect("link");
    t.sql(&format!(
        "UPDATE tags SET name = 'senior 1' WHERE id = {}",
        s.tags[1]
    ))
    .await;
    t.doc_until(nurse, "the tag rename read while the link is open", |d| {
        d["tags"] == json!([{"name": "senior 1"}])
    })
    .await;
    tx.commit().await.expect("commit the link");
    t.settled().await;
    t.converged("links, order 1 converged").await;

    let tx = other.transaction().await.expect("begin");
    tx.batch_execute(&format!(
        "UPDATE tags SET name = 'senior 2' WHERE id = {}",
        s.tags[1]
    ))
    .await
    .expect("rename");
    t.sql(&format!(
        "INSERT INTO post_tags (post_id, tag_id) VALUES ({}, {})",
        board_designer, s.tags[1]
    ))
    .await;
    t.doc_until(
        board_designer,
        "the link read while the rename is open",
        |d| d["tags"] == json!([{"name": "senior 1"}, {"name": "remote"}]),
    )
    .await;
    tx.commit().await.expect("commit the rename");
    t.settled().await;
    t.converged("links, order 2 converged").await;
    let doc = t.index.get(board_designer).await.expect("post")["_source"].clone();
    assert_eq!(
        doc["tags"],
        json!([{"name": "senior 2"}, {"name": "remote"}])
    );
    t.stop().await;
}

/// Delayed delivery: the crossed commits of the deepest level and of a link again while no
/// consumer reads, then one backlog read at once.
#[tokio::test]
async fn crossed_commits_at_depth_converge_with_the_consumer_away() {
    let mut t = Board::start().await;
    let s = seed(&t).await;
    t.stop_consumer().await;
    let mut other = other_connection(&t).await;
    let crossings = [
        (
            format!(
                "UPDATE companies SET industry_id = {} WHERE id = {}",
                s.industries[0], s.companies[2]
            ),
            format!(
                "UPDATE sectors SET name = 'Tech 3' WHERE id = {}",
                s.sectors[0]
            ),
        ),
        (
            format!(
                "UPDATE sectors SET name = 'Tech 4' WHERE id = {}",
                s.sectors[0]
            ),
            format!(
                "UPDATE industries SET sector_id = {} WHERE id = {}",
                s.sectors[0], s.industries[2]
            ),
        ),
        (
            format!(
                "INSERT INTO post_tags (post_id, tag_id) VALUES ({}, {})",
                s.posts[1], s.tags[1]
            ),
            format!("UPDATE tags SET name = 'senior 3' WHERE id = {}", s.tags[1]),
        ),
        (
            format!("UPDATE tags SET name = 'senior 4' WHERE id = {}", s.tags[1]),
            format!(
                "DELETE FROM post_tags WHERE post_id = {} AND tag_id = {}",
                s.posts[3], s.tags[1]
            ),
        ),
    ];
    for (held, committed) in &crossings {
        let tx = other.transaction().await.expect("begin");
        tx.batch_execute(held).await.expect("held change");
        t.sql(committed).await;
        tx.commit().await.expect("commit");
    }
    eventually(PATIENCE, "every job published while the consumer is away", || async {
        let waiting = t
            .count("SELECT count(*) FROM elasticsearch_sync_queue WHERE status IN ('pending', 'processing')")
            .await;
        if waiting == 0 { Ok(()) } else { Err(format!("{waiting} not yet sent")) }
    })
    .await;
    t.start_consumer();
    t.settled().await;
    t.converged("the backlog converged").await;
    let nurse = t.index.get(&s.posts[3]).await.expect("nurse")["_source"].clone();
    assert_eq!(sector(&nurse), "Tech 4");
    assert_eq!(nurse["tags"], json!([]));
    t.stop().await;
}

/// Aggregates over children: a count filtered by status and the newest application's date
/// follow inserts, filter-column changes and deletes of applications, re-indexing only the
/// post concerned (and nothing for an untaken column); crossed with a move of an application
/// to another post, in both orders.
#[tokio::test]
async fn aggregates_follow_their_children_and_their_filter() {
    let t = Board::start().await;
    let s = seed(&t).await;
    let (p0, p1) = (&s.posts[0], &s.posts[1]);
    let open =
        |post: &str| format!("INSERT INTO applications (post_id, status) VALUES ({post}, 'open')");
    let first = t.id(&open(p0)).await;
    let second = t.id(&open(p0)).await;
    t.settled().await;
    let doc = t
        .doc_until(p0, "two open applications", |d| d["open_applications"] == 2)
        .await;
    assert!(doc["last_applied_at"].is_string(), "{doc}");
    t.converged("applications counted").await;
    let cases = [
        (
            format!("UPDATE applications SET cover_note = 'hello' WHERE id = {first}"),
            BTreeSet::new(),
        ),
        (
            format!("UPDATE applications SET status = 'rejected' WHERE id = {first}"),
            set(&[p0]),
        ),
        (
            format!("DELETE FROM applications WHERE id = {second}"),
            set(&[p0]),
        ),
        // Moved to another post: both posts.
        (
            format!("UPDATE applications SET post_id = {p1}, status = 'open' WHERE id = {first}"),
            set(&[p0, p1]),
        ),
    ];
    for (change, expected) in cases {
        assert_eq!(t.rebuilt_by(&change).await, expected, "{change}");
        t.converged(&change).await;
    }
    let doc = t.index.get(p0).await.expect("post")["_source"].clone();
    assert_eq!(doc["open_applications"], 0);
    assert!(
        doc.get("last_applied_at").is_none(),
        "no application: no date"
    );

    // Crossed: an application moved back while a new one is inserted, in both orders.
    let mut other = other_connection(&t).await;
    for (held, committed) in [
        (
            format!("UPDATE applications SET post_id = {p0} WHERE id = {first}"),
            open(p1),
        ),
        (
            open(p0),
            format!("UPDATE applications SET post_id = {p1} WHERE id = {first}"),
        ),
    ] {
        let tx = other.transaction().await.expect("begin");
        tx.batch_execute(&held).await.expect("held change");
        t.sql(&committed).await;
        t.settled().await;
        tx.commit().await.expect("commit");
        t.settled().await;
        t.converged(&format!("{held} / {committed}")).await;
    }
    t.stop().await;
}

/// `migrate` attaches a trigger to every table of the tree, and drops exactly the one of a
/// relation no longer declared (with its waiting jobs), at any level.
#[tokio::test]
async fn migrate_attaches_every_level_and_drops_exactly_a_removed_one() {
    let db = TestSchema::new().await;
    db.client.batch_execute(JOBS_SQL).await.expect("tables");
    let jobs = vec![jobs_type("benalsam_jobs")];
    let config = OutboxConfig::in_schema(&db.name);
    let mut client = database_url().connect().await.expect("PostgreSQL");
    let report = config.migrate(&mut client, &jobs).await.expect("migrate");
    assert_eq!(
        report.triggers,
        [
            "job_posts",
            "companies",
            "industries",
            "sectors",
            "applications",
            "applications",
            "post_tags",
            "tags"
        ]
    );
    assert_eq!(
        triggers(&db).await,
        [
            "applications.benalsam_jobs_last_applied_at",
            "applications.benalsam_jobs_open_applications",
            "companies.benalsam_jobs_company",
            "industries.benalsam_jobs_company.industry",
            "post_tags.benalsam_jobs_tags",
            "sectors.benalsam_jobs_company.industry.sector",
            "tags.benalsam_jobs_tags.tag",
        ]
    );
    db.client
        .batch_execute("INSERT INTO sectors (name) VALUES ('Tech')")
        .await
        .expect("a sector");
    let mut fewer = jobs.clone();
    fewer[0].relations[0].relations[0].relations.clear();
    let report = config.migrate(&mut client, &fewer).await.expect("migrate");
    // The relation's row trigger and its TRUNCATE trigger go together.
    assert_eq!(
        report.removed_triggers,
        [
            format!("{}.sectors.benalsam_jobs_company.industry.sector", db.name),
            format!("{}.sectors.truncate_jobs_company.industry.sector", db.name),
        ]
    );
    let waiting: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE table_name = 'job_posts#company.industry.sector'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        waiting, 0,
        "the removed relation's waiting job went with it"
    );
    assert_eq!(triggers(&db).await.len(), 6);
    let again = config.migrate(&mut client, &fewer).await.expect("again");
    assert!(again.removed_triggers.is_empty());

    // A column the catalog lacks, three levels down: named with the file's line.
    let file = std::env::temp_dir().join(format!("{}-jobs.toml", db.name));
    std::fs::write(
        &file,
        JOBS_TOML.replace(
            "foreign_key = [\"sector_id\"]",
            "foreign_key = [\"sector\"]",
        ),
    )
    .expect("write");
    let wrong = EventType::from_file(&file).expect("parses");
    let err = config
        .migrate(&mut client, &wrong)
        .await
        .expect_err("no column sector")
        .to_string();
    let _ = std::fs::remove_file(&file);
    assert!(
        err.contains("relations.company.relations.industry.relations.sector.foreign_key")
            && err.contains("sector"),
        "{err}"
    );
    db.drop().await;
}

/// The relation triggers of the jobs event type in the schema of `db`: `table.trigger`.
async fn triggers(db: &TestSchema) -> Vec<String> {
    db.client
        .query(
            "SELECT c.relname || '.' || t.tgname FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND t.tgname LIKE 'benalsam_jobs_%' ORDER BY 1",
            &[&db.name],
        )
        .await
        .expect("triggers")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A sector of 9,000 posts (three levels down; the checker reads at most 10,000 documents) and a tag on all of them renamed: every
/// document follows, one job each. The times are printed for the record (a test asserts no
/// speed); docs/relations.md has the figures.
#[tokio::test]
async fn a_sector_and_a_tag_of_nine_thousand_posts() {
    let t = Board::start().await;
    let s = seed(&t).await;
    t.sql(&format!(
        "INSERT INTO job_posts (title, company_id)
           SELECT 'Post ' || i, {} FROM generate_series(1, 9000) AS i;
         INSERT INTO post_tags (post_id, tag_id)
           SELECT id, {} FROM job_posts ON CONFLICT DO NOTHING",
        s.companies[1], s.tags[1]
    ))
    .await;
    t.settled().await;
    t.converged("nine thousand posts indexed").await;
    for (what, change) in [
        (
            "sector rename (three levels down)",
            format!(
                "UPDATE sectors SET name = 'Tech 2' WHERE id = {}",
                s.sectors[0]
            ),
        ),
        (
            "tag rename (through post_tags)",
            format!("UPDATE tags SET name = 'senior 2' WHERE id = {}", s.tags[1]),
        ),
    ] {
        let started = std::time::Instant::now();
        let rebuilt = t.rebuilt_by(&change).await;
        t.converged(what).await;
        println!(
            "{what}: {} posts re-indexed in {:.1} s",
            rebuilt.len(),
            started.elapsed().as_secs_f64()
        );
        assert!(rebuilt.len() > 9_000, "{what}: {}", rebuilt.len());
    }
    t.stop().await;
}

/// A sector rename three levels above a few hundred posts, fanned out in pages of 50: the
/// bridge is killed after its first pages are written and before the last, and another
/// bridge finishes the fan-out from the progress the job recorded. Every post ends equal to
/// its SQL view, and the pages written before the kill are not written again.
#[tokio::test]
async fn a_fan_out_at_depth_resumes_after_the_bridge_is_killed() {
    const PAGE: i64 = 50;
    let mut t = Board::start_with(|s| {
        s.fanout_page = PAGE as usize;
        // The killed bridge's claim on the rename's job runs out soon.
        s.outbox.lease = Duration::from_secs(3);
    })
    .await;
    let s = seed(&t).await;
    // 420 posts in the sector, spread over two companies of two of its industries.
    t.sql(&format!(
        "INSERT INTO job_posts (title, company_id)
           SELECT 'Post ' || i, CASE WHEN i % 2 = 0 THEN {} ELSE {} END
           FROM generate_series(1, 420) AS i",
        s.companies[0], s.companies[1]
    ))
    .await;
    t.settled().await;
    t.converged("the posts indexed").await;
    let in_sector = t
        .count(&format!(
            "SELECT count(*) FROM job_posts p JOIN companies c ON c.id = p.company_id
               JOIN industries i ON i.id = c.industry_id
              WHERE i.sector_id = {} AND p.status = 'open'",
            s.sectors[0]
        ))
        .await;
    // Only searchable posts are fanned out (the closed one of the seed is not in the index).
    assert!(in_sector > 8 * PAGE, "{in_sector} posts in the sector");

    // With the consumer away no REBUILD job is indexed, so after its first page the fan-out
    // waits for room: the kill lands between pages, with some written and most not.
    t.stop_consumer().await;
    let mark = t.mark().await;
    t.sql(&format!(
        "UPDATE sectors SET name = 'Tech 2' WHERE id = {}",
        s.sectors[0]
    ))
    .await;
    let rebuilds = format!(
        "SELECT count(*) FROM elasticsearch_sync_queue WHERE operation = 'REBUILD' AND id > {mark}"
    );
    let unsent = format!(
        "SELECT count(*) FROM elasticsearch_sync_queue
          WHERE operation = 'REBUILD' AND id > {mark} AND status <> 'sent'"
    );
    // Under way: its progress recorded, and its first page's jobs published (sent, so a
    // fan-out started over would not find them pending and would write them again).
    eventually(PATIENCE, "the sector's fan-out under way", || async {
        let row =
            t.db.client
                .query_opt(
                    "SELECT status, change_data ? 'fanout' FROM elasticsearch_sync_queue
                 WHERE table_name = 'job_posts#company.industry.sector' AND id > $1",
                    &[&mark],
                )
                .await
                .map_err(|e| e.to_string())?;
        let mut counts = [0i64; 2];
        for (count, sql) in counts.iter_mut().zip([&rebuilds, &unsent]) {
            *count =
                t.db.client
                    .query_one(sql.as_str(), &[])
                    .await
                    .map_err(|e| e.to_string())?
                    .get(0);
        }
        let [written, unsent] = counts;
        match row.map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1))) {
            // A page of 50 rows may keep fewer: the closed post is in no page's REBUILD jobs.
            Some((status, true)) if status == "processing" && written > 0 && unsent == 0 => Ok(()),
            other => Err(format!(
                "{other:?}, {written} REBUILD jobs, {unsent} of them not sent"
            )),
        }
    })
    .await;
    let before_kill = t.count(&rebuilds).await;
    assert!(
        before_kill < in_sector,
        "the fan-out must be cut short: {before_kill} of {in_sector} written"
    );
    t.kill_bridge().await;
    // Killed means all of it: nothing of the killed bridge renews its claim on the rename's
    // job (a fan-out left running would), so the claim runs out for another bridge to take.
    eventually(PATIENCE, "the killed bridge's claim run out", || async {
        let held: bool =
            t.db.client
                .query_one(
                    "SELECT coalesce(locked_until > now(), false) FROM elasticsearch_sync_queue
                  WHERE table_name = 'job_posts#company.industry.sector' AND id > $1",
                    &[&mark],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
        if held {
            Err("the rename's job is still claimed".to_owned())
        } else {
            Ok(())
        }
    })
    .await;
    t.start_bridge();
    t.start_consumer();
    t.converged("every post of the sector renamed after the kill")
        .await;
    t.settled().await;
    let done: String =
        t.db.client
            .query_one(
                "SELECT status FROM elasticsearch_sync_queue
             WHERE table_name = 'job_posts#company.industry.sector' AND id > $1",
                &[&mark],
            )
            .await
            .expect("the rename's job")
            .get(0);
    assert_eq!(done, "completed");
    // Resumed, not restarted: every post of the sector rebuilt exactly once. A page and
    // its progress commit together, and the kill came while the fan-out waited for room,
    // so the new bridge starts after the last page written.
    let written = t.count(&rebuilds).await;
    let distinct = t
        .count(&format!(
            "SELECT count(DISTINCT record_id) FROM elasticsearch_sync_queue
              WHERE operation = 'REBUILD' AND id > {mark}"
        ))
        .await;
    println!("{before_kill} of {in_sector} posts written before the kill, {written} after");
    assert_eq!(distinct, in_sector, "every post of the sector rebuilt");
    assert_eq!(
        written, in_sector,
        "a post rebuilt twice: the fan-out started over instead of resuming"
    );
    t.stop().await;
}
