//! Shared helpers of the integration tests: connection settings of the local stack (or the
//! environment) and unique names, so tests run in parallel without seeing each other.
#![allow(dead_code)] // each test file uses a part of this module

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use benalsam_events::config::{
    AmqpUrl, DEFAULT_DATABASE_URL, DEFAULT_ELASTICSEARCH_URL, DEFAULT_RABBITMQ_URL, DatabaseUrl,
    SearchUrl,
};

pub fn database_url() -> DatabaseUrl {
    DatabaseUrl::from_env_or(DEFAULT_DATABASE_URL).expect("DATABASE_URL is valid")
}

pub fn rabbitmq_url() -> AmqpUrl {
    AmqpUrl::from_env_or(DEFAULT_RABBITMQ_URL).expect("RABBITMQ_URL is valid")
}

pub fn search_url() -> SearchUrl {
    SearchUrl::from_env_or(DEFAULT_ELASTICSEARCH_URL).expect("ELASTICSEARCH_URL is valid")
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

/// A freshly migrated schema of its own, so a test sees only its own listings and jobs.
pub struct TestSchema {
    pub name: String,
    pub client: tokio_postgres::Client,
}

impl TestSchema {
    pub async fn new() -> Self {
        let name = unique_name("t");
        let mut client = benalsam_events::postgres::connect(&database_url())
            .await
            .expect("PostgreSQL answers (is the stack up? scripts/stack up)");
        benalsam_events::migrate::migrate(&mut client, &name)
            .await
            .expect("migrations apply");
        client
            .batch_execute(&format!("SET search_path TO {name}"))
            .await
            .expect("search_path");
        Self { name, client }
    }

    /// An outbox over this schema.
    pub fn outbox(&self, config: benalsam_events::OutboxConfig) -> benalsam_events::Outbox {
        benalsam_events::Outbox::new(
            database_url(),
            benalsam_events::OutboxConfig {
                schema: self.name.clone(),
                ..config
            },
        )
        .expect("valid outbox config")
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

    /// Puts the listings trigger on its own NOTIFY channel, so notifications of other tests
    /// (same database, same default channel) cannot reach this one.
    pub async fn use_channel(&self, channel: &str) {
        self.client
            .batch_execute(&format!(
                "DROP TRIGGER listings_sync_queue ON listings;
                 CREATE TRIGGER listings_sync_queue
                     AFTER INSERT OR UPDATE OR DELETE ON listings
                     FOR EACH ROW EXECUTE FUNCTION add_to_sync_queue('ignore=view_count', 'channel={channel}');"
            ))
            .await
            .expect("re-create trigger");
    }

    pub async fn drop(self) {
        self.client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await
            .expect("drop schema");
    }
}
