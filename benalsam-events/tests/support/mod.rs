//! Shared helpers of the integration tests: connection settings of the local stack (or the
//! environment) and unique names, so tests run in parallel without seeing each other.
#![allow(dead_code)] // each test file uses a part of this module

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use benalsam_events::config::{AmqpUrl, DatabaseUrl, SearchUrl};

pub fn database_url() -> DatabaseUrl {
    DatabaseUrl::from_env().expect("DATABASE_URL is valid")
}

pub fn rabbitmq_url() -> AmqpUrl {
    AmqpUrl::from_env().expect("RABBITMQ_URL is valid")
}

pub fn search_url() -> SearchUrl {
    SearchUrl::from_env().expect("ELASTICSEARCH_URL is valid")
}

/// Whether the search engine has the `analysis-common` module (the Turkish analysis of the
/// listings mapping), as its nodes list their modules. Elasticsearch's integration-test zip
/// (`scripts/stack up --engine elasticsearch-8`) lacks it: there the listings event type of the
/// tests uses the built-in `standard` analyzer ([`builtin_analysis`]), and the tests of the
/// Turkish analysis check instead that the real mapping is refused naming the module. Asked
/// once per test binary, on a thread of its own (the callers may be inside a runtime).
pub fn has_analysis_common() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let client = search_url()
                    .client(std::time::Duration::from_secs(30))
                    .expect("search client");
                let response = client
                    .send(
                        benalsam_events::elasticsearch::http::Method::Get,
                        "/_nodes/plugins",
                        benalsam_events::elasticsearch::http::headers::HeaderMap::new(),
                        Some(&[("filter_path", "nodes.*.modules.name")]),
                        Option::<&[u8]>::None,
                        None,
                    )
                    .await
                    .expect("search node answers _nodes/plugins (is the stack up?)");
                let nodes: serde_json::Value = response.json().await.expect("JSON");
                let nodes = nodes["nodes"].as_object().expect("nodes in _nodes/plugins");
                // Every node must have it: a shard may land on any.
                !nodes.is_empty()
                    && nodes.values().all(|node| {
                        node["modules"].as_array().is_some_and(|modules| {
                            modules.iter().any(|m| m["name"] == "analysis-common")
                        })
                    })
            })
        })
        .join()
        .expect("the module check finished")
    })
}

/// `event_type` with the built-in `standard` analyzer in place of the library's
/// `benalsam_turkish` (which needs `analysis-common`) when the engine lacks that module;
/// unchanged otherwise.
pub fn builtin_analysis(mut event_type: benalsam_events::EventType) -> benalsam_events::EventType {
    if has_analysis_common() {
        return event_type;
    }
    let properties = event_type.document.properties();
    let names: Vec<String> = event_type
        .document
        .field_names()
        .map(str::to_owned)
        .collect();
    for name in names {
        let mapping = &properties[name.as_str()];
        if mapping["analyzer"] == "benalsam_turkish" {
            event_type.document = event_type.document.field(
                &name,
                benalsam_events::event_type::FieldType::Text {
                    analyzer: "standard".to_owned(),
                    raw: mapping["fields"]["raw"].is_object(),
                    copy_to: mapping["copy_to"].as_str().map(str::to_owned),
                },
            );
        }
    }
    event_type
}

/// A name no other test (in this run or an earlier one) uses: `<prefix>_<pid>_<n>_<micros>`,
/// lowercase, valid as a schema, queue or index name.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000_000)
        .unwrap_or_default();
    format!("{prefix}_{}_{n}_{micros}", std::process::id())
}

/// The seed's listings table: example schema, which the application (here, the test) owns.
pub const LISTINGS_SQL: &str = include_str!("../../../examples/sql/listings.sql");

/// A freshly migrated schema of its own, with the seed's listings table and its sync
/// trigger, so a test sees only its own listings and jobs.
pub struct TestSchema {
    pub name: String,
    pub client: tokio_postgres::Client,
}

impl TestSchema {
    pub async fn new() -> Self {
        let name = unique_name("t");
        let mut client = database_url()
            .connect()
            .await
            .expect("PostgreSQL answers (is the stack up? scripts/stack up)");
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {name}; SET search_path TO {name}; {LISTINGS_SQL}"
            ))
            .await
            .expect("the listings table");
        let report = benalsam_events::OutboxConfig::in_schema(&name)
            .migrate(&mut client, &[benalsam_events::EventType::listings()])
            .await
            .expect("migrations apply");
        assert_eq!(report.triggers, vec!["listings".to_owned()]);
        Self { name, client }
    }

    /// An outbox over this schema.
    pub fn outbox(&self, config: benalsam_events::OutboxConfig) -> benalsam_events::Outbox {
        let mut config = config;
        config.schema = self.name.clone();
        benalsam_events::Outbox::new(database_url(), config).expect("valid outbox config")
    }

    /// Inserts `n` listings in one statement (one transaction); returns their ids in order.
    pub async fn insert_listings(&self, n: i64) -> Vec<String> {
        self.client
            .query(
                "INSERT INTO listings (user_id, title, description, category, status)
                 SELECT gen_random_uuid(), 'İlan ' || i, 'Açıklama ' || i, 'elektronik', 'active'
                 FROM generate_series(1, $1::bigint) AS i
                 RETURNING id::text",
                &[&n],
            )
            .await
            .expect("insert listings")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// The status of every job, by id.
    pub async fn statuses(&self) -> Vec<(i64, String)> {
        self.client
            .query(
                "SELECT id, status FROM elasticsearch_sync_queue ORDER BY id",
                &[],
            )
            .await
            .expect("read statuses")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Puts the listings triggers on their own NOTIFY channel, so notifications of other tests
    /// (same database, same default channel) cannot reach this one.
    pub async fn use_channel(&self, channel: &str) {
        self.client
            .batch_execute(&listings_triggers(&format!(
                "'ignore=view_count', 'channel={channel}'"
            )))
            .await
            .expect("re-create the triggers");
    }

    pub async fn drop(self) {
        self.client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await
            .expect("drop schema");
    }
}

/// The DDL that attaches the listings sync triggers as `migrate` does for a plain table (the
/// three statement triggers of migration 9, the row trigger of an earlier migrate dropped),
/// with the trigger `options` (SQL literals, comma-separated); for the schema on the
/// search_path.
pub fn listings_triggers(options: &str) -> String {
    format!(
        "DROP TRIGGER IF EXISTS benalsam_sync_queue ON listings;
         CREATE OR REPLACE TRIGGER benalsam_sync_insert AFTER INSERT ON listings
             REFERENCING NEW TABLE AS new_rows
             FOR EACH STATEMENT EXECUTE FUNCTION add_to_sync_queue_statement({options});
         CREATE OR REPLACE TRIGGER benalsam_sync_update AFTER UPDATE ON listings
             REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
             FOR EACH STATEMENT EXECUTE FUNCTION add_to_sync_queue_statement({options});
         CREATE OR REPLACE TRIGGER benalsam_sync_delete AFTER DELETE ON listings
             REFERENCING OLD TABLE AS old_rows
             FOR EACH STATEMENT EXECUTE FUNCTION add_to_sync_queue_statement({options});"
    )
}

/// The management API of the stack's RabbitMQ, with the credentials of `RABBITMQ_URL`.
pub fn management() -> (reqwest::Client, String, String, String) {
    let amqp = rabbitmq_url();
    let base = std::env::var("RABBITMQ_MANAGEMENT_URL").unwrap_or_else(|_| {
        format!(
            "http://{}:15672",
            amqp.url().host_str().unwrap_or("127.0.0.1")
        )
    });
    (
        reqwest::Client::new(),
        base,
        amqp.url().username().to_owned(),
        amqp.url().password().unwrap_or_default().to_owned(),
    )
}

/// A RabbitMQ virtual host of its own: the production names of exchanges and queues, seen
/// by this test only.
pub struct TestVhost {
    pub name: String,
    pub url: AmqpUrl,
}

impl TestVhost {
    pub async fn new() -> Self {
        let name = unique_name("t");
        let (http, base, user, password) = management();
        let created = http
            .put(format!("{base}/api/vhosts/{name}"))
            .basic_auth(&user, Some(&password))
            .send()
            .await
            .expect("RabbitMQ management API answers (is the stack up?)");
        assert!(
            created.status().is_success(),
            "create vhost: {}",
            created.status()
        );
        let granted = http
            .put(format!("{base}/api/permissions/{name}/{user}"))
            .basic_auth(&user, Some(&password))
            .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await
            .expect("grant permissions");
        assert!(
            granted.status().is_success(),
            "permissions: {}",
            granted.status()
        );
        let mut url = rabbitmq_url().url().clone();
        url.set_path(&format!("/{name}"));
        let url = url.as_str().parse().expect("vhost url");
        Self { name, url }
    }

    /// Imports a definitions file into this vhost.
    pub async fn import_definitions(&self, definitions: &serde_json::Value) {
        let (http, base, user, password) = management();
        let response = http
            .post(format!("{base}/api/definitions/{}", self.name))
            .basic_auth(&user, Some(&password))
            .json(definitions)
            .send()
            .await
            .expect("import definitions");
        assert!(
            response.status().is_success(),
            "import: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }

    pub async fn drop(self) {
        let (http, base, user, password) = management();
        let _ = http
            .delete(format!("{base}/api/vhosts/{}", self.name))
            .basic_auth(&user, Some(&password))
            .send()
            .await;
    }
}

/// Takes every message `queue` holds, acking them, until it is empty. Deterministic: call
/// it once whatever fills the queue has finished (the publisher closed, its confirms in), and
/// it returns exactly what the queue held, duplicates included.
pub async fn drain_queue(url: &AmqpUrl, queue: &str) -> Vec<lapin::message::Delivery> {
    let connection = url.connect("test drain").await.expect("connect to drain");
    let channel = connection.create_channel().await.expect("channel");
    let mut deliveries = Vec::new();
    while let Some(message) = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        deliveries.push(message.delivery);
    }
    let _ = connection.close(200, "drained".into()).await;
    deliveries
}

/// A TCP relay in front of a service whose connections the test can cut, and which it can
/// take down and bring back, as a network failure or a stopped server would look to the
/// client, without touching the service other tests share.
pub struct Relay {
    pub port: u16,
    cut: tokio::sync::broadcast::Sender<()>,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let (cut, _) = tokio::sync::broadcast::channel::<()>(4);
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cuts, is_up) = (cut.clone(), std::sync::Arc::clone(&up));
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !is_up.load(Ordering::SeqCst) {
                    drop(inbound); // refused, as a stopped server would
                    continue;
                }
                let mut cut_rx = cuts.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.recv() => {}
                    }
                });
            }
        });
        Self {
            port,
            cut,
            up,
            task,
        }
    }

    /// A relay to the broker of `target`; returns it and the URL to connect through it.
    pub async fn amqp(target: &AmqpUrl) -> (Self, AmqpUrl) {
        let upstream = format!(
            "{}:{}",
            target.url().host_str().unwrap_or("127.0.0.1"),
            target.url().port().unwrap_or(5672)
        );
        let relay = Self::start(upstream).await;
        let mut url = target.url().clone();
        url.set_port(Some(relay.port)).expect("port");
        (relay, url.as_str().parse().expect("relay url"))
    }

    /// A relay to the search node; returns it and the URL to connect through it.
    pub async fn search() -> (Self, SearchUrl) {
        let target = search_url();
        let upstream = format!(
            "{}:{}",
            target.url().host_str().unwrap_or("127.0.0.1"),
            target.url().port().unwrap_or(9200)
        );
        let relay = Self::start(upstream).await;
        // The node's scheme, user and host name (an https:// node's TLS passes through the
        // relay, and its certificate names the host), on the relay's port.
        let mut url = target.url().clone();
        url.set_port(Some(relay.port)).expect("a port");
        (relay, with_search_ca(url.as_str()))
    }

    /// Cuts every relayed connection; returns how many there were.
    pub fn cut(&self) -> usize {
        self.cut.send(()).unwrap_or(0)
    }

    /// Takes the service away (cutting connections and refusing new ones) or brings it back.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            self.cut();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listings index of its own (its alias is unique), created by the library's bootstrap.
pub struct TestIndex {
    pub alias: String,
    pub client: benalsam_events::elasticsearch::Elasticsearch,
}

impl TestIndex {
    pub async fn new() -> Self {
        let alias = unique_name("t");
        let client = search_url()
            .client(std::time::Duration::from_secs(30))
            .expect("search client");
        Self::listings(&alias)
            .ensure_index(&client)
            .await
            .expect("index bootstrap (is the stack up?)");
        Self { alias, client }
    }

    /// The listings event type, indexed into `alias`.
    pub fn listings(alias: &str) -> benalsam_events::EventType {
        let mut listings = builtin_analysis(benalsam_events::EventType::listings());
        alias.clone_into(&mut listings.index.alias);
        listings
    }

    /// The listings event type, indexed into this index.
    pub fn event_type(&self) -> benalsam_events::EventType {
        Self::listings(&self.alias)
    }

    async fn call(
        &self,
        method: benalsam_events::elasticsearch::http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let mut headers = benalsam_events::elasticsearch::http::headers::HeaderMap::new();
        headers.insert(
            benalsam_events::elasticsearch::http::headers::CONTENT_TYPE,
            benalsam_events::elasticsearch::http::headers::HeaderValue::from_static(
                "application/json",
            ),
        );
        let body = body.map(|b| b.to_string());
        let response = self
            .client
            .send(method, path, headers, Option::<&()>::None, body, None)
            .await
            .expect("search node answers");
        response.json().await.unwrap_or(serde_json::Value::Null)
    }

    /// The document with `id`, if the index has it (after a refresh).
    pub async fn get(&self, id: &str) -> Option<serde_json::Value> {
        let answer = self
            .call(
                benalsam_events::elasticsearch::http::Method::Get,
                &format!("/{}/_doc/{id}", self.alias),
                None,
            )
            .await;
        (answer["found"] == true).then_some(answer)
    }

    /// Ids of the documents matching a query, after a refresh.
    pub async fn search(&self, query: serde_json::Value) -> Vec<String> {
        self.call(
            benalsam_events::elasticsearch::http::Method::Post,
            &format!("/{}/_refresh", self.alias),
            None,
        )
        .await;
        let answer = self
            .call(
                benalsam_events::elasticsearch::http::Method::Post,
                &format!("/{}/_search", self.alias),
                Some(serde_json::json!({ "query": query, "size": 10000, "_source": false })),
            )
            .await;
        let mut ids: Vec<String> = answer["hits"]["hits"]
            .as_array()
            .map(|hits| {
                hits.iter()
                    .filter_map(|h| h["_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// The `_source` of every document, by id, after a refresh (up to 10,000).
    pub async fn documents(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        self.call(
            benalsam_events::elasticsearch::http::Method::Post,
            &format!("/{}/_refresh", self.alias),
            None,
        )
        .await;
        let answer = self
            .call(
                benalsam_events::elasticsearch::http::Method::Post,
                &format!("/{}/_search", self.alias),
                Some(serde_json::json!({ "query": { "match_all": {} }, "size": 10000 })),
            )
            .await;
        answer["hits"]["hits"]
            .as_array()
            .map(|hits| {
                hits.iter()
                    .filter_map(|h| Some((h["_id"].as_str()?.to_owned(), h["_source"].clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Changes index settings (e.g. to provoke a mapping error).
    pub async fn put_settings(&self, settings: serde_json::Value) {
        let answer = self
            .call(
                benalsam_events::elasticsearch::http::Method::Put,
                &format!("/{}/_settings", self.alias),
                Some(settings),
            )
            .await;
        assert_eq!(answer["acknowledged"], true, "{answer}");
    }

    /// The indexes the alias points at, sorted (none when it does not exist).
    pub async fn behind_alias(&self) -> Vec<String> {
        let answer = self
            .call(
                benalsam_events::elasticsearch::http::Method::Get,
                &format!("/_alias/{}", self.alias),
                None,
            )
            .await;
        let mut indexes: Vec<String> = answer
            .as_object()
            .map(|o| {
                o.keys()
                    .filter(|k| *k != "error" && *k != "status")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        indexes.sort();
        indexes
    }

    /// Deletes every version of the index (`<alias>_v<N>`: a reindex makes the next).
    pub async fn drop(self) {
        let versions = self
            .call(
                benalsam_events::elasticsearch::http::Method::Get,
                &format!("/_cat/indices/{}_v*?format=json&h=index", self.alias),
                None,
            )
            .await;
        let names = versions
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|row| row["index"].as_str());
        for index in names {
            self.call(
                benalsam_events::elasticsearch::http::Method::Delete,
                &format!("/{index}"),
                None,
            )
            .await;
        }
    }
}

impl TestSchema {
    /// The jobs recorded under `table`: operation, record id and `change_data`, by record
    /// and, within one, in job order.
    pub async fn jobs_by_record(&self, table: &str) -> Vec<(String, String, serde_json::Value)> {
        self.client
            .query(
                "SELECT operation, record_id, change_data FROM elasticsearch_sync_queue
                  WHERE table_name = $1 ORDER BY record_id, id",
                &[&table],
            )
            .await
            .expect("jobs")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// How many jobs are in `status`.
    pub async fn count(&self, status: &str) -> i64 {
        self.client
            .query_one(
                "SELECT count(*) FROM elasticsearch_sync_queue WHERE status = $1",
                &[&status],
            )
            .await
            .expect("count")
            .get(0)
    }
}

/// The bridge in-process (job stream into publisher) on a schema and vhost, until the token
/// is cancelled; the task returns once the publisher has drained.
pub fn spawn_bridge(
    db: &TestSchema,
    url: &AmqpUrl,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Result<(), benalsam_events::Error>>,
) {
    use futures::StreamExt;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let outbox = db.outbox(benalsam_events::OutboxConfig::default());
    let mut config = benalsam_events::JobStreamConfig::default();
    config.wake = benalsam_events::outbox::Wake::PollOnly;
    config.poll_interval = std::time::Duration::from_millis(100);
    let jobs =
        benalsam_events::JobStream::new(outbox.clone(), config, shutdown.clone()).expect("stream");
    let publisher = benalsam_events::Publisher::new(
        url.clone(),
        outbox,
        vec![benalsam_events::EventType::listings()],
        benalsam_events::PublisherConfig::default(),
    );
    let task = tokio::spawn(
        jobs.flat_map(futures::stream::iter)
            .map(Ok)
            .forward(publisher),
    );
    (shutdown, task)
}

/// The same outcome for each of `ids`, as [`benalsam_events::Settle::settle`] takes them.
pub fn reports(
    ids: &[i64],
    outcome: benalsam_events::Outcome,
) -> Vec<(i64, benalsam_events::Outcome)> {
    ids.iter().map(|id| (*id, outcome.clone())).collect()
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A broker URL listing `urls` in order (the form of a multi-node `RABBITMQ_URL`).
pub fn amqp_list(urls: &[&AmqpUrl]) -> AmqpUrl {
    urls.iter()
        .map(|u| u.expose())
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .expect("a valid list")
}

/// `target` on a local port nothing listens on: a broker node that is down.
pub fn dead_amqp(target: &AmqpUrl) -> AmqpUrl {
    let mut url = target.url().clone();
    url.set_host(Some("127.0.0.1")).expect("host");
    url.set_port(Some(free_port())).expect("port");
    url.as_str().parse().expect("dead url")
}

/// A search URL listing `urls` in order (the form of a multi-node `ELASTICSEARCH_URL`).
pub fn search_list(urls: &[&SearchUrl]) -> SearchUrl {
    with_search_ca(
        &urls
            .iter()
            .map(|u| u.expose())
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// A search URL with the CA of `ELASTICSEARCH_CA` (a node with security on, whose certificate
/// the stack's CA signed), as `search_url()` has it.
pub fn with_search_ca(url: &str) -> SearchUrl {
    let url: SearchUrl = url.parse().expect("a valid search URL");
    match std::env::var_os("ELASTICSEARCH_CA").filter(|v| !v.is_empty()) {
        Some(ca) => url.with_ca(ca),
        None => url,
    }
}

/// A search node on a local port nothing listens on: a node that is down.
pub fn dead_search() -> SearchUrl {
    // Of the live node's scheme: a list mixes no schemes.
    let mut url = search_url().url().clone();
    url.set_port(Some(free_port())).expect("a port");
    with_search_ca(url.as_str())
}

/// Waits for a child process to exit, at most a minute.
pub async fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the process exits in time"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM to a child process.
pub fn terminate(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Scrapes `GET /metrics` on `port` and parses it with a real exposition-format parser.
pub async fn scrape(port: u16) -> prometheus_parse::Scrape {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("body");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus exposition text")
}

/// The value of a counter or gauge sample named `name` whose labels include `labels`
/// (summed over the other labels).
pub fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

/// Fetches a health endpoint and checks what every answer must be: 200, JSON of the shape
/// `{timestamp, service, healthy, message, details}` naming `service`, healthy, and without
/// the stack's password. Returns the answer.
pub async fn healthy(port: u16, path: &str, service: &str) -> serde_json::Value {
    let response = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .expect("health answers");
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, 200, "{path}: {text}");
    assert!(
        !text.contains("benalsam123"),
        "no password in {path}: {text}"
    );
    let body: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(body["service"], service);
    assert_eq!(body["healthy"], true, "{body}");
    assert!(body["timestamp"].is_string() && body["message"].is_string());
    assert!(body["details"].is_object());
    body
}

/// A variable of `scripts/stack env` that the TLS tests need (`DATABASE_TLS_URL`,
/// `BENALSAM_TLS_CA`, ...).
pub fn tls_env(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            panic!("{name} is not set: start the stack (scripts/stack up) and eval \"$(scripts/stack env)\"")
        })
}

/// A file path as a URL query value (`sslrootcert=`, `cacertfile=`): percent-encoded.
pub fn query_path(path: &str) -> String {
    percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl TestVhost {
    /// This virtual host through the broker's TLS listener (`RABBITMQ_TLS_URL`), its
    /// certificate checked against the stack's CA (`BENALSAM_TLS_CA`).
    pub fn tls_url(&self) -> AmqpUrl {
        let mut url = url::Url::parse(&tls_env("RABBITMQ_TLS_URL")).expect("RABBITMQ_TLS_URL");
        url.set_path(&format!("/{}", self.name));
        url.set_query(Some(&format!(
            "cacertfile={}",
            query_path(&tls_env("BENALSAM_TLS_CA"))
        )));
        url.as_str().parse().expect("amqps vhost url")
    }

    /// Whether each connection to this virtual host uses TLS, as the broker sees it.
    pub async fn connections_over_tls(&self) -> Vec<bool> {
        let (http, base, user, password) = management();
        let answer: serde_json::Value = http
            .get(format!("{base}/api/vhosts/{}/connections", self.name))
            .basic_auth(&user, Some(&password))
            .send()
            .await
            .expect("RabbitMQ management API answers")
            .json()
            .await
            .expect("connections as JSON");
        answer
            .as_array()
            .map(|connections| connections.iter().map(|c| c["ssl"] == true).collect())
            .unwrap_or_default()
    }
}

/// Waits until `check` gives `Ok`, looking every 100 ms, or fails the test with `what` and
/// the last state after `patience`: for conditions on what a user sees, never on time.
pub async fn eventually<T, F, Fut>(patience: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let started = std::time::Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(state) => assert!(
                started.elapsed() < patience,
                "{what}: not within {patience:?}; {state}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits until `done()` holds, looking every few milliseconds, and fails naming `what` (and
/// what `state()` says then) after 90 s: for conditions on a live status, never on time.
pub async fn until<S: std::fmt::Debug>(
    what: &str,
    mut done: impl FnMut() -> bool,
    state: impl Fn() -> S,
) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(90),
            "{what}: {:?}",
            state()
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Publishes `envelope` to `benalsam.listings` with publisher confirms, as any broker client
/// with write permission could (a forgery, in the tests that use it).
/// Publishes `envelope` to the listings exchange as the user of `url`, waiting for the
/// broker's confirm; the broker's refusal as text.
pub async fn publish(
    url: &AmqpUrl,
    envelope: &benalsam_events::Envelope<'_>,
) -> Result<(), String> {
    let connection = url
        .connect("test publisher")
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let confirm = channel
        .basic_publish(
            "benalsam.listings".into(),
            envelope.routing_key.as_ref().into(),
            lapin::options::BasicPublishOptions::default(),
            &envelope.to_bytes(),
            envelope.properties("test", None),
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let _ = connection.close(200, "ok".into()).await;
    if confirm.is_ack() {
        Ok(())
    } else {
        Err(format!("not confirmed: {confirm:?}"))
    }
}

/// Checks that every setting of `binary`'s `run` subcommand, given before the subcommand,
/// is refused with an error naming `run` and showing where it goes (and never starts the
/// service): what an operator sees after `benalsam-bridge --migrate`.
pub fn misplaced_run_settings_are_explained(binary: &str) {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(binary)
            .args(args)
            .output()
            .expect("the binary runs");
        assert!(out.status.success(), "{args:?}: {out:?}");
        long_flags(&String::from_utf8_lossy(&out.stdout))
    };
    let (top, run) = (help(&["--help"]), help(&["run", "--help"]));
    let run_only: Vec<&String> = run.iter().filter(|f| !top.contains(f)).collect();
    assert!(run_only.len() >= 5, "run has its own settings: {run:?}");
    for flag in run_only {
        let out = std::process::Command::new(binary)
            .arg(flag)
            .arg("x")
            .env_clear()
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("`{flag}` is a setting of `run`"))
                && stderr.contains(&format!("run {flag}")),
            "{flag}: {stderr}"
        );
    }
}

/// The long flags (`--name`) a `--help` text lists.
fn long_flags(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            // `-v, --verbose` or `--verbose`
            let line = match line.split_once(", --") {
                Some((short, rest)) if short.len() == 2 && short.starts_with('-') => rest,
                _ => line.strip_prefix("--")?,
            };
            let name = line.split([' ', '=', '[', '<']).next()?;
            (!name.is_empty() && name != "help" && name != "version").then(|| format!("--{name}"))
        })
        .collect()
}
/// PostgreSQL roles of the tests (least privilege), created by the superuser.
pub mod roles;

/// How an index differs from the SQL view of its documents ([`against_sql`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Divergence {
    /// Rows the database says must be in the index, and are not.
    pub missing: Vec<String>,
    /// Documents in the index that the database says must not be there.
    pub extra: Vec<String>,
    /// Documents whose fields differ from what the database says now.
    pub stale: Vec<String>,
}

impl Divergence {
    pub fn is_none(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.stale.is_empty()
    }
}

/// Compares every document of `index` with what `Outbox::document` builds from the rows
/// now (the SQL view of each document, relations included), for every key of
/// `event_type`'s table; `job_id` and `indexed_at` are left out (when, not what).
pub async fn against_sql(
    outbox: &benalsam_events::Outbox,
    client: &tokio_postgres::Client,
    event_type: &benalsam_events::EventType,
    index: &TestIndex,
) -> Divergence {
    use benalsam_events::relations::Verdict;
    let keys: Vec<String> = client
        .query(
            &format!("SELECT {}::text FROM {}", event_type.key, event_type.table),
            &[],
        )
        .await
        .expect("the table's keys")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let strip = |mut doc: serde_json::Value| {
        if let Some(map) = doc.as_object_mut() {
            map.remove("job_id");
            map.remove("indexed_at");
        }
        doc
    };
    let mut indexed = index.documents().await;
    let mut found = Divergence::default();
    for key in keys {
        let preview = outbox
            .document(event_type, &key)
            .await
            .expect("the SQL view of a document");
        let have = indexed.remove(&key).map(strip);
        match (preview.verdict, have) {
            (Verdict::Kept { document, .. }, Some(have)) if strip(document.clone()) != have => {
                found.stale.push(key);
            }
            (Verdict::Kept { .. }, None) => found.missing.push(key),
            (Verdict::Kept { .. }, Some(_)) => {}
            (_, Some(_)) => found.extra.push(key),
            (_, None) => {}
        }
    }
    found.extra.extend(indexed.into_keys());
    found
}

/// A service of the library (`bridge::run`, `consumer::run`) running in this process until
/// [`Running::stop`], which checks that it stopped cleanly.
pub struct Running {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), benalsam_events::Error>>,
    what: &'static str,
}

impl Running {
    /// The bridge with `settings`.
    pub fn bridge(settings: benalsam_events::bridge::BridgeSettings) -> Self {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(benalsam_events::bridge::run(settings, shutdown.clone()));
        Self {
            shutdown,
            task,
            what: "bridge",
        }
    }

    /// The consumer with `settings`.
    pub fn consumer(settings: benalsam_events::consumer::ConsumerSettings) -> Self {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(benalsam_events::consumer::run(settings, shutdown.clone()));
        Self {
            shutdown,
            task,
            what: "consumer",
        }
    }

    /// Kills it (no stop: whatever it holds stays as it was) and waits for its end.
    pub async fn kill(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// Stops it and waits for its end.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let what = self.what;
        self.task
            .await
            .unwrap_or_else(|e| panic!("the {what} task: {e}"))
            .unwrap_or_else(|e| panic!("the {what} stops cleanly: {e}"));
    }
}

/// Settings of a consumer of `db`'s outbox and `vhost` for `event_types`, without heartbeats.
pub fn consumer_settings(
    db: &TestSchema,
    vhost: &AmqpUrl,
    event_types: Vec<benalsam_events::EventType>,
) -> benalsam_events::consumer::ConsumerSettings {
    let mut settings = benalsam_events::consumer::ConsumerSettings::new(
        database_url(),
        vhost.clone(),
        search_url(),
    );
    settings.outbox = benalsam_events::OutboxConfig::in_schema(&db.name);
    settings.event_types = event_types;
    settings.heartbeat_interval = None;
    settings
}
