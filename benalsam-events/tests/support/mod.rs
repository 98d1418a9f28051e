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
