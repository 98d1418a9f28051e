//! TLS against the real services of `scripts/stack` (which always runs TLS beside the
//! plaintext ports): the whole pipeline with every certificate checked, libpq's `sslmode`
//! semantics, refused certificates (not retried, naming what to check) and settings that
//! cannot work. Everything comes from the variables of `scripts/stack env`.

mod support;

use std::time::{Duration, Instant};

use benalsam_events::bridge::{self, BridgeSettings};
use benalsam_events::consumer::{self, ConsumerSettings};
use benalsam_events::outbox::Wake;
use benalsam_events::{AmqpUrl, DatabaseUrl, Error, OutboxConfig, SearchUrl};
use serde_json::json;
use support::{TestIndex, TestSchema, TestVhost, free_port, query_path, tls_env, unique_name};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(90);

/// `DATABASE_TLS_URL` (verify-full against the stack's CA).
fn database_tls_url() -> DatabaseUrl {
    tls_env("DATABASE_TLS_URL")
        .parse()
        .expect("DATABASE_TLS_URL is valid")
}

/// `DATABASE_TLS_URL` with its query replaced by `query` (none when empty).
fn database_url_with(query: &str) -> DatabaseUrl {
    let mut url = database_tls_url().url().clone();
    url.set_query((!query.is_empty()).then_some(query));
    url.as_str().parse().expect("valid DATABASE_URL")
}

/// The search node that asks for a client certificate, with the stack's CA and client
/// certificate.
fn search_mtls_url() -> SearchUrl {
    tls_env("ELASTICSEARCH_MTLS_URL")
        .parse::<SearchUrl>()
        .expect("ELASTICSEARCH_MTLS_URL is valid")
        .with_ca(tls_env("BENALSAM_TLS_CA"))
        .with_client_certificate(
            tls_env("BENALSAM_TLS_CLIENT_CERT"),
            tls_env("BENALSAM_TLS_CLIENT_KEY"),
        )
}

/// A file that is a certificate, but not of the CA that signed the servers': trusting it
/// alone, no server certificate of the stack verifies.
fn wrong_ca() -> String {
    tls_env("BENALSAM_TLS_CLIENT_CERT")
}

async fn uses_tls(url: &DatabaseUrl) -> bool {
    let client = url.connect().await.expect("connects");
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

/// Checks what every refused certificate must be: a configuration error naming `setting`,
/// never retried, whose message says what to check (`words`).
fn assert_refused(error: &Error, setting: &str, words: &[&str]) {
    let text = error.to_string();
    assert!(!error.is_retryable(), "not retryable: {text}");
    assert!(error.is_config(), "a configuration error: {text}");
    assert_eq!(error.setting(), Some(setting), "{text}");
    for word in words {
        assert!(text.contains(word), "{word:?} in: {text}");
    }
    assert!(!text.contains("benalsam123"), "no password: {text}");
}

#[tokio::test]
async fn the_pipeline_runs_with_every_connection_over_verified_tls() {
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    let channel = unique_name("tls");
    db.use_channel(&channel).await;
    let database_url = database_tls_url();
    let rabbitmq_url = vhost.tls_url();
    assert_eq!(rabbitmq_url.url().scheme(), "amqps");
    let search_url = search_mtls_url();

    let mut outbox = OutboxConfig::in_schema(&db.name);
    outbox.notify_channel.clone_from(&channel);
    let mut bridge = BridgeSettings::new(database_url.clone(), rabbitmq_url.clone());
    bridge.outbox = outbox.clone();
    bridge.event_types = vec![index.event_type()];
    // The LISTEN connection too: it is opened through the same helper.
    bridge.stream.wake = Wake::Listen { channel };
    bridge.stream.poll_interval = Duration::from_millis(200);
    let mut consumer = ConsumerSettings::new(database_url, rabbitmq_url, search_url);
    consumer.outbox = outbox;
    consumer.event_types = vec![index.event_type()];

    let shutdown = CancellationToken::new();
    let services = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let (bridge, consumer) = tokio::join!(
                bridge::run(bridge, shutdown.clone()),
                consumer::run(consumer, shutdown)
            );
            bridge.and(consumer)
        }
    });

    let mut expected = db.insert_listings(25).await;
    expected.sort();
    let started = Instant::now();
    loop {
        let completed = db.count("completed").await;
        if completed == 25 && index.search(json!({"match_all": {}})).await == expected {
            break;
        }
        assert!(
            !services.is_finished(),
            "the services stopped early: {:?}",
            services.await
        );
        assert!(
            started.elapsed() < PATIENCE,
            "jobs completed: {completed} of 25; statuses {:?}",
            db.statuses().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The broker's view: every connection of the services came over TLS. Its list lags
    // the connections a little.
    let connections = loop {
        let connections = vhost.connections_over_tls().await;
        if connections.len() >= 2 || started.elapsed() > PATIENCE {
            break connections;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(connections.len() >= 2, "{connections:?}");
    assert!(connections.iter().all(|tls| *tls), "{connections:?}");

    shutdown.cancel();
    tokio::time::timeout(PATIENCE, services)
        .await
        .expect("the services stop")
        .expect("no panic")
        .expect("no error");
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}

#[tokio::test]
async fn prefer_and_no_sslmode_use_tls_when_offered_and_disable_does_not() {
    let ca = query_path(&tls_env("BENALSAM_TLS_CA"));
    assert!(uses_tls(&database_url_with("")).await, "no sslmode: prefer");
    assert!(uses_tls(&database_url_with("sslmode=prefer")).await);
    assert!(uses_tls(&database_url_with("sslmode=require")).await);
    assert!(
        uses_tls(&database_url_with(&format!(
            "sslmode=verify-ca&sslrootcert={ca}"
        )))
        .await
    );
    assert!(uses_tls(&database_tls_url()).await, "verify-full");
    assert!(!uses_tls(&database_url_with("sslmode=disable")).await);
    // Parameters of tokio-postgres' own still reach it beside ours.
    let named = database_url_with(&format!(
        "application_name=tls+test&sslmode=verify-full&sslrootcert={ca}"
    ));
    let client = named.connect().await.expect("connects");
    let name: String = client
        .query_one("SHOW application_name", &[])
        .await
        .expect("application_name")
        .get(0);
    assert_eq!(name, "tls+test");
}

#[tokio::test]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    // The server's address under a name its certificate does not hold: tokio-postgres
    // connects to hostaddr and checks the certificate against the URL's host.
    let tls_url = database_tls_url();
    let host = tls_url.url().host_str().expect("host").to_owned();
    let port = tls_url.url().port().unwrap_or(5432);
    let address = tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("resolves")
        .min_by_key(|a| !a.is_ipv4())
        .expect("an address");
    let ca = query_path(&tls_env("BENALSAM_TLS_CA"));
    let under_other_name = |mode: &str| -> DatabaseUrl {
        let mut url = tls_url.url().clone();
        url.set_host(Some("not-in-the-certificate.invalid"))
            .expect("host");
        url.set_query(Some(&format!(
            "hostaddr={}&sslmode={mode}&sslrootcert={ca}",
            address.ip()
        )));
        url.as_str().parse().expect("valid")
    };
    let error = under_other_name("verify-full")
        .connect()
        .await
        .expect_err("the name is not in the certificate");
    assert_refused(
        &error,
        "DATABASE_URL",
        &["PostgreSQL", "sslrootcert", "name"],
    );
    assert!(uses_tls(&under_other_name("verify-ca")).await);
}

#[tokio::test]
async fn a_server_certificate_of_another_ca_is_refused_and_not_retried() {
    let wrong = query_path(&wrong_ca());
    for query in [
        format!("sslmode=verify-full&sslrootcert={wrong}"),
        format!("sslmode=verify-ca&sslrootcert={wrong}"),
        // libpq's rule: require with a CA file checks the chain.
        format!("sslmode=require&sslrootcert={wrong}"),
    ] {
        let error = database_url_with(&query).connect().await.expect_err(&query);
        assert_refused(
            &error,
            "DATABASE_URL",
            &["PostgreSQL", "sslrootcert", "UnknownIssuer"],
        );
    }

    // RabbitMQ: the wrong CA, and none (the stack's CA is no public one).
    let vhost = TestVhost::new().await;
    let mut url = vhost.tls_url().url().clone();
    url.set_query(Some(&format!("cacertfile={wrong}")));
    for url in [url.to_string(), {
        url.set_query(None);
        url.to_string()
    }] {
        let amqps: AmqpUrl = url.parse().expect("valid");
        let error = amqps.connect("test wrong ca").await.expect_err("refused");
        assert_refused(
            &error,
            "RABBITMQ_URL",
            &["RabbitMQ", "cacertfile", "UnknownIssuer"],
        );
    }
    vhost.drop().await;

    // Search: the wrong CA, and none.
    let node: SearchUrl = tls_env("ELASTICSEARCH_TLS_URL").parse().expect("valid");
    for url in [node.clone().with_ca(wrong_ca()), node] {
        let client = url.client(Duration::from_secs(10)).expect("client");
        let error = TestIndex::listings(&unique_name("t"))
            .ensure_index(&client)
            .await
            .expect_err("refused");
        assert_refused(
            &error,
            "ELASTICSEARCH_CA",
            &["Elasticsearch", "ELASTICSEARCH_CA"],
        );
    }
}

#[tokio::test]
async fn a_node_that_asks_for_a_client_certificate_gets_one() {
    let alias = unique_name("t");
    let with = search_mtls_url()
        .client(Duration::from_secs(10))
        .expect("client");
    TestIndex::listings(&alias)
        .ensure_index(&with)
        .await
        .expect("mutual TLS");

    let without: SearchUrl = tls_env("ELASTICSEARCH_MTLS_URL")
        .parse::<SearchUrl>()
        .expect("valid")
        .with_ca(tls_env("BENALSAM_TLS_CA"));
    let client = without.client(Duration::from_secs(10)).expect("client");
    let error = TestIndex::listings(&alias)
        .ensure_index(&client)
        .await
        .expect_err("no client certificate");
    // TLS 1.3: the relay's refusal arrives as an alert after the handshake, with the request.
    assert_refused(
        &error,
        "ELASTICSEARCH_CLIENT_CERT",
        &["ELASTICSEARCH_CLIENT_CERT", "CertificateRequired"],
    );
    TestIndex {
        alias,
        client: with,
    }
    .drop()
    .await;
}

#[tokio::test]
async fn amqps_with_a_client_certificate_connects() {
    let vhost = TestVhost::new().await;
    let mut url = vhost.tls_url().url().clone();
    let query = format!(
        "{}&certfile={}&keyfile={}&heartbeat=30",
        url.query().unwrap_or_default(),
        query_path(&tls_env("BENALSAM_TLS_CLIENT_CERT")),
        query_path(&tls_env("BENALSAM_TLS_CLIENT_KEY")),
    );
    url.set_query(Some(&query));
    let amqps: AmqpUrl = url.as_str().parse().expect("valid");
    let connection = amqps
        .connect("test client certificate")
        .await
        .expect("connects over TLS");
    assert!(connection.status().connected());
    let _ = connection.close(200, "done".into()).await;
    vhost.drop().await;
}

#[tokio::test]
async fn settings_that_cannot_work_are_configuration_errors_naming_them() {
    let config_error = |error: Error, setting: &str, words: &[&str]| {
        let text = error.to_string();
        assert!(error.is_config() && !error.is_retryable(), "{text}");
        assert_eq!(error.setting(), Some(setting), "{text}");
        for word in words {
            assert!(text.contains(word), "{word:?} in: {text}");
        }
    };
    let base = database_tls_url().url().clone();
    let with = |query: &str| {
        let mut url = base.clone();
        url.set_query(Some(query));
        url.to_string()
    };

    // Refused as the URL is read.
    let error = with("sslmode=verify-full")
        .parse::<DatabaseUrl>()
        .expect_err("no CA");
    config_error(error, "DATABASE_URL", &["verify-full", "sslrootcert"]);
    let error = with("sslmode=allow")
        .parse::<DatabaseUrl>()
        .expect_err("allow");
    config_error(error, "DATABASE_URL", &["allow"]);
    let error = with("sslcert=%2Fc.pem")
        .parse::<DatabaseUrl>()
        .expect_err("no key");
    config_error(error, "DATABASE_URL", &["sslkey"]);

    // Refused as the connection is opened: the files are read then.
    let missing = format!("/nonexistent/{}/ca.pem", unique_name("d"));
    let url: DatabaseUrl = with(&format!(
        "sslmode=verify-full&sslrootcert={}",
        query_path(&missing)
    ))
    .parse()
    .expect("valid until the file is read");
    let error = url.connect().await.expect_err("no such file");
    config_error(error, "DATABASE_URL", &["sslrootcert", &missing]);

    let mut amqps = url::Url::parse(&tls_env("RABBITMQ_TLS_URL")).expect("url");
    amqps.set_query(Some(&format!("cacertfile={}", query_path(&missing))));
    let amqps: AmqpUrl = amqps.as_str().parse().expect("valid");
    let error = amqps.connect("test").await.expect_err("no such file");
    config_error(error, "RABBITMQ_URL", &["cacertfile", &missing]);
    let error = "amqp://u:p@localhost:5672/%2f?cacertfile=%2Fca.pem"
        .parse::<AmqpUrl>()
        .expect_err("TLS files on a plaintext URL");
    config_error(error, "RABBITMQ_URL", &["amqps://"]);

    let node: SearchUrl = tls_env("ELASTICSEARCH_TLS_URL").parse().expect("valid");
    let error = node
        .clone()
        .with_ca(&missing)
        .client(Duration::from_secs(1))
        .expect_err("no such file");
    config_error(error, "ELASTICSEARCH_CA", &[&missing]);
    let error = (node.with_client_certificate(tls_env("BENALSAM_TLS_CLIENT_CERT"), &missing))
        .client(Duration::from_secs(1))
        .expect_err("no such key");
    config_error(error, "ELASTICSEARCH_CLIENT_KEY", &[&missing]);
    let plain: SearchUrl = "http://127.0.0.1:9200".parse().expect("valid");
    let error = plain
        .with_ca(tls_env("BENALSAM_TLS_CA"))
        .client(Duration::from_secs(1))
        .expect_err("a CA for http");
    config_error(error, "ELASTICSEARCH_CA", &["https://"]);
}

#[tokio::test]
async fn a_tls_service_that_is_down_stays_retryable() {
    let ca = query_path(&tls_env("BENALSAM_TLS_CA"));
    let port = free_port();

    let mut url = database_tls_url().url().clone();
    url.set_port(Some(port)).expect("port");
    let url: DatabaseUrl = url.as_str().parse().expect("valid");
    let error = url.connect().await.expect_err("nothing listens");
    assert!(error.is_retryable() && !error.is_config(), "{error}");

    let mut amqps = url::Url::parse(&tls_env("RABBITMQ_TLS_URL")).expect("url");
    amqps.set_port(Some(port)).expect("port");
    amqps.set_query(Some(&format!("cacertfile={ca}")));
    let amqps: AmqpUrl = amqps.as_str().parse().expect("valid");
    let error = amqps.connect("test").await.expect_err("nothing listens");
    assert!(error.is_retryable() && !error.is_config(), "{error}");

    let mut node = url::Url::parse(&tls_env("ELASTICSEARCH_TLS_URL")).expect("url");
    node.set_port(Some(port)).expect("port");
    let node: SearchUrl = node.as_str().parse().expect("valid");
    let client = node
        .with_ca(tls_env("BENALSAM_TLS_CA"))
        .client(Duration::from_secs(5))
        .expect("client");
    let error = TestIndex::listings(&unique_name("t"))
        .ensure_index(&client)
        .await
        .expect_err("nothing listens");
    assert!(error.is_retryable() && !error.is_config(), "{error}");
}
