//! What the benchmarks share: a RabbitMQ vhost and a PostgreSQL schema of their own with the
//! topology and migrations in place, listings like the demo's, and their jobs as envelopes.
#![allow(dead_code)] // each benchmark uses a part

use benalsam_events::publish::TopologyConfig;
use benalsam_events::{
    Action, AmqpUrl, DatabaseUrl, Envelope, EventType, Outbox, OutboxConfig, Outcome, Settle,
    Topology, connect,
};

/// The listings event type, indexed into `alias`.
#[allow(dead_code)] // not every bench uses it
pub fn listings(alias: &str) -> benalsam_events::EventType {
    let mut listings = benalsam_events::EventType::listings();
    alias.clone_into(&mut listings.index.alias);
    listings
}

/// The example schema of the seed's listings table.
pub const LISTINGS_SQL: &str = include_str!("../../../examples/sql/listings.sql");

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
        let db_url = DatabaseUrl::from_env()?;
        let base = AmqpUrl::from_env()?;
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
        let connection = connect::amqp(&url, "bench").await?;
        Topology::benalsam(&TopologyConfig::default())
            .declare(&connection)
            .await?;
        let mut client = connect::postgres(&db_url).await?;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {name}; SET search_path TO {name}; {LISTINGS_SQL}"
            ))
            .await?;
        benalsam_events::outbox::migrate(
            &mut client,
            &benalsam_events::OutboxConfig::in_schema(&name),
            &[benalsam_events::EventType::listings()],
        )
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

    /// The envelopes of every pending job, as the bridge would publish them. The jobs are
    /// claimed to read them and given back, so they stay pending.
    pub async fn envelopes(&self) -> Result<Vec<Envelope<'static>>, BoxError> {
        let outbox = Outbox::new(self.db_url.clone(), OutboxConfig::in_schema(&self.name))?;
        let jobs = outbox.claim(usize::MAX).await?;
        let envelopes = jobs
            .iter()
            .map(|job| Envelope::decode(&Envelope::of(job, &EventType::listings()).to_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let released: Vec<(i64, Outcome)> =
            jobs.iter().map(|j| (j.id, Outcome::Released)).collect();
        outbox.settle(&released).await?;
        Ok(envelopes)
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

/// A `_bulk` body of `actions` with their external versions, encoded here rather than by the
/// library: the raw baseline must not share the code it is measured against.
pub fn bulk_body(actions: &[(Action, i64)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (action, version) in actions {
        let (verb, index, id, document) = match action {
            Action::Index {
                index,
                id,
                document,
            } => ("index", index, id, Some(document)),
            Action::Delete { index, id } => ("delete", index, id, None),
            _ => continue,
        };
        let meta = serde_json::json!({ verb: {
            "_index": index, "_id": id, "version": version, "version_type": "external"
        }});
        body.extend_from_slice(meta.to_string().as_bytes());
        body.push(b'\n');
        if let Some(document) = document {
            body.extend_from_slice(document.to_string().as_bytes());
            body.push(b'\n');
        }
    }
    body
}

/// Raw `_bulk` of `items` into their index with a bare client: requests of `size`, their
/// bodies encoded beforehand, `concurrency` in flight; documents per second.
pub async fn raw_bulk(
    es: &benalsam_events::elasticsearch::Elasticsearch,
    items: &[(Action, i64)],
    size: usize,
    concurrency: usize,
) -> Result<f64, BoxError> {
    use benalsam_events::elasticsearch::http::Method;
    use benalsam_events::elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
    use futures::StreamExt;

    let bodies: Vec<Vec<u8>> = items.chunks(size.max(1)).map(bulk_body).collect();
    let started = std::time::Instant::now();
    let mut answers = futures::stream::iter(bodies)
        .map(|body| async move {
            let mut headers = HeaderMap::new();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            );
            let answer: serde_json::Value = es
                .send(
                    Method::Post,
                    "/_bulk",
                    headers,
                    Option::<&()>::None,
                    Some(body),
                    None,
                )
                .await?
                .json()
                .await?;
            Ok::<_, BoxError>(answer)
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(answer) = answers.next().await {
        let answer = answer?;
        if answer["errors"] != false {
            return Err(format!(
                "raw bulk had errors: {}",
                answer.to_string().chars().take(300).collect::<String>()
            )
            .into());
        }
    }
    Ok(items.len() as f64 / started.elapsed().as_secs_f64())
}
