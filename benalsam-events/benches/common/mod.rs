//! What the benchmarks share: a RabbitMQ vhost and a PostgreSQL schema of their own with the
//! topology and migrations in place, listings like the demo's, and their jobs as envelopes.
#![allow(dead_code)] // each benchmark uses a part

use std::time::SystemTime;

use benalsam_events::config::{AmqpUrl, DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL, DatabaseUrl};
use benalsam_events::envelope::Envelope;
use benalsam_events::job::{ClaimKind, Job};
use benalsam_events::routing::EventType;
use benalsam_events::topology::{Topology, TopologyConfig};
use benalsam_events::{amqp, migrate, postgres};

pub type BoxError = Box<dyn std::error::Error>;

/// A number from the environment, or `default`.
pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> Result<T, BoxError>
where
    T::Err: std::error::Error + 'static,
{
    Ok(std::env::var(name)
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(default))
}

pub struct BenchEnv {
    pub name: String,
    pub db_url: DatabaseUrl,
    pub url: AmqpUrl,
    pub client: tokio_postgres::Client,
    pub connection: lapin::Connection,
    http: reqwest::Client,
    mgmt: String,
    user: String,
    password: String,
}

impl BenchEnv {
    pub async fn new(prefix: &str) -> Result<Self, BoxError> {
        let db_url = DatabaseUrl::from_env_or(DEFAULT_DATABASE_URL)?;
        let base = AmqpUrl::from_env_or(DEFAULT_RABBITMQ_URL)?;
        let name = format!("{prefix}_{}", std::process::id());
        let http = reqwest::Client::new();
        let mgmt = format!(
            "http://{}:15672/api",
            base.url().host_str().unwrap_or("127.0.0.1")
        );
        let user = base.url().username().to_owned();
        let password = base.url().password().unwrap_or_default().to_owned();
        http.put(format!("{mgmt}/vhosts/{name}"))
            .basic_auth(&user, Some(&password))
            .send()
            .await?
            .error_for_status()?;
        http.put(format!("{mgmt}/permissions/{name}/{user}"))
            .basic_auth(&user, Some(&password))
            .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await?
            .error_for_status()?;
        let mut vhost = base.url().clone();
        vhost.set_path(&format!("/{name}"));
        let url: AmqpUrl = vhost.as_str().parse()?;
        let connection = amqp::connect(&url, "bench").await?;
        Topology::benalsam(&TopologyConfig::default())
            .declare(&connection)
            .await?;
        let mut client = postgres::connect(&db_url).await?;
        migrate::migrate(&mut client, &name).await?;
        client
            .batch_execute(&format!("SET search_path TO {name}"))
            .await?;
        Ok(Self {
            name,
            db_url,
            url,
            client,
            connection,
            http,
            mgmt,
            user,
            password,
        })
    }

    /// Writes `n` listings of the demo's size in one statement.
    pub async fn insert_listings(&self, n: i64) -> Result<(), BoxError> {
        self.client
            .execute(
                "INSERT INTO listings (user_id, title, description, category, status, latitude, longitude, attributes, location_city)
                 SELECT gen_random_uuid(), 'Satılık ikinci el bisiklet ' || i,
                        repeat('Az kullanılmış, bakımlı, faturalı. ', 8), 'spor', 'active', 41.0, 29.0,
                        '{\"renk\": \"kırmızı\", \"vites\": 21}', 'İstanbul'
                 FROM generate_series(1, $1::bigint) AS i",
                &[&n],
            )
            .await?;
        Ok(())
    }

    /// The envelopes of every job, as the bridge would publish them.
    pub async fn envelopes(&self) -> Result<Vec<Envelope>, BoxError> {
        let rows = self
            .client
            .query(
                "SELECT id, table_name, operation, record_id, change_data, created_at, traceparent
                 FROM elasticsearch_sync_queue ORDER BY id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let operation: String = r.get(2);
                let job = Job {
                    id: r.get(0),
                    table_name: r.get(1),
                    operation: operation.parse()?,
                    record_id: r.get(3),
                    change_data: r.get(4),
                    retry_count: 0,
                    created_at: r.get::<_, SystemTime>(5),
                    traceparent: r.get(6),
                    claim: ClaimKind::Fresh,
                };
                Ok(Envelope::new(&job, &EventType::listings().route(&job)))
            })
            .collect()
    }

    pub async fn cleanup(self) -> Result<(), BoxError> {
        self.client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await?;
        let _ = self.connection.close(200, "done".into()).await;
        self.http
            .delete(format!("{}/vhosts/{}", self.mgmt, self.name))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await?;
        Ok(())
    }
}
