//! Secrets never reach the output of the real binaries, against the real stack: not at
//! `RUST_LOG=trace` (the AMQP client logs its frames there, the one carrying the broker's
//! password included), not in the error about a malformed URL; and secrets can come from files
//! (`*_FILE`), refused beside the same setting given another way.

mod binaries;
#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use benalsam_events::OutboxConfig;
use binaries::{bridge_binary, consumer_binary, stop, wait_until};
use support::roles::TestRole;
use support::{TestIndex, TestSchema, TestVhost, free_port, search_url, unique_name};

const PATIENCE: Duration = Duration::from_secs(90);

/// The forms a secret may take in a log line: as text, and as the byte array a `Debug` of
/// its bytes prints (`[98, 101, ...]`, how lapin's trace lines showed the broker's password).
fn forms(secret: &str) -> [String; 2] {
    let bytes: Vec<String> = secret.bytes().map(|b| b.to_string()).collect();
    [secret.to_owned(), bytes.join(", ")]
}

fn assert_hidden(output: &str, secrets: &[&str]) {
    for secret in secrets {
        for form in forms(secret) {
            assert!(
                !output.contains(&form),
                "{form:?} is in the output:\n{output}"
            );
        }
    }
}

fn write_secret(dir: &Path, name: &str, value: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    // With the trailing line break an editor or `echo` leaves.
    std::fs::write(&path, format!("{value}\n")).expect("secret file");
    path
}

#[tokio::test]
async fn at_trace_level_no_password_is_logged_and_secrets_come_from_files() {
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    let (bridge_role, consumer_role) = (TestRole::new("b").await, TestRole::new("c").await);
    let grants = OutboxConfig::in_schema(&db.name)
        .grants(
            &[index.event_type()],
            Some(&bridge_role.name),
            Some(&consumer_role.name),
        )
        .expect("grants");
    db.client.batch_execute(&grants).await.expect("grants");
    let dir = std::env::temp_dir().join(unique_name("secrets"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The search node ignores credentials it does not check; they travel in every request.
    let search_password = "Sx9searchsecret";
    let mut search = search_url().url().clone();
    search.set_username("elastic").expect("user");
    search
        .set_password(Some(search_password))
        .expect("password");
    let broker_password = vhost
        .url
        .url()
        .password()
        .expect("a broker password")
        .to_owned();

    let spawn = |binary, role: &TestRole, log: &str, port: u16, files: bool| {
        let mut command = Command::new(binary);
        command
            .env_remove("DATABASE_URL")
            .env_remove("RABBITMQ_URL")
            .env_remove("ELASTICSEARCH_URL")
            .env("BENALSAM_SCHEMA", &db.name)
            .env("BENALSAM_INDEX", &index.alias)
            .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "trace")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(log)).expect("log"));
        let settings = [
            ("DATABASE_URL", role.url().expose().to_owned()),
            ("RABBITMQ_URL", vhost.url.expose().to_owned()),
            ("ELASTICSEARCH_URL", search.as_str().to_owned()),
        ];
        for (name, value) in settings {
            if files {
                let file = write_secret(&dir, &format!("{log}.{name}"), &value);
                command.env(format!("{name}_FILE"), file);
            } else {
                command.env(name, value);
            }
        }
        command
    };
    let (bridge_port, consumer_port) = (free_port(), free_port());
    let bridge: binaries::Guarded = spawn(
        bridge_binary(),
        &bridge_role,
        "bridge.log",
        bridge_port,
        false,
    )
    .spawn()
    .expect("bridge starts")
    .into();
    // The consumer takes all three URLs from files.
    let consumer: binaries::Guarded = spawn(
        consumer_binary(),
        &consumer_role,
        "consumer.log",
        consumer_port,
        true,
    )
    .spawn()
    .expect("consumer starts")
    .into();
    for port in [bridge_port, consumer_port] {
        wait_until(port, "/readyz", PATIENCE, |status, _| status == 200).await;
    }
    // A listing through the whole path: the consumer read every URL from its file.
    let ids = db.insert_listings(1).await;
    let started = std::time::Instant::now();
    while index.get(&ids[0]).await.is_none() {
        assert!(started.elapsed() < PATIENCE, "the listing was not indexed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(bridge);
    stop(consumer);

    for log in ["bridge.log", "consumer.log"] {
        let text = std::fs::read_to_string(dir.join(log)).expect("log");
        assert!(text.contains(" TRACE "), "{log} is a trace-level log");
        assert_hidden(
            &text,
            &[
                &broker_password,
                search_password,
                bridge_role.password(),
                consumer_role.password(),
            ],
        );
    }

    let _ = std::fs::remove_dir_all(&dir);
    bridge_role.drop().await;
    consumer_role.drop().await;
    index.drop().await;
    vhost.drop().await;
    db.drop().await;
}

/// Runs `benalsam-bridge status` (the bridge's quickest command that connects) with `env`;
/// its exit success and its whole output.
fn bridge_status(env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    run(bridge_binary(), &["status"], env, args)
}

/// Runs `binary` with `command` then `args`, `env` added to an environment without the URLs.
fn run(
    binary: std::path::PathBuf,
    command: &[&str],
    env: &[(&str, &str)],
    args: &[&str],
) -> (bool, String) {
    let mut command_line = Command::new(binary);
    let command = command_line
        .args(command)
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("RABBITMQ_URL")
        .env_remove("ELASTICSEARCH_URL")
        .env("RUST_LOG", "trace");
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().expect("the bridge runs");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn a_malformed_url_is_refused_without_its_password() {
    const SECRET: &str = "Mx7malformed";
    // The consumer reads the search URL (its dead-letter tools connect to the broker only).
    let binary = |setting: &str| {
        if setting == "ELASTICSEARCH_URL" {
            (consumer_binary(), vec!["dlq", "list", "--queue", "none"])
        } else {
            (bridge_binary(), vec!["status"])
        }
    };
    for (setting, value) in [
        (
            "DATABASE_URL",
            format!("postgres:/app:{SECRET}@db/benalsam"),
        ),
        (
            "DATABASE_URL",
            format!("postgres//app:{SECRET}@db/benalsam"),
        ),
        ("DATABASE_URL", format!("app:{SECRET}@db/benalsam")),
        (
            "DATABASE_URL",
            format!("postgres://app:{SECRET}@[db/benalsam"),
        ),
        ("DATABASE_URL", format!("postgres://app:{SECRET}")),
        (
            "DATABASE_URL",
            format!("host=db user=app password={SECRET} dbname=x"),
        ),
        ("DATABASE_URL", format!("host=db password='{SECRET}'")),
        ("RABBITMQ_URL", format!("amqp:/app:{SECRET}@mq")),
        (
            "RABBITMQ_URL",
            format!("amqp://app:{SECRET}@mq:notaport/%2f"),
        ),
        ("ELASTICSEARCH_URL", format!("http://app:{SECRET}@es:92x0")),
    ] {
        let (program, command) = binary(setting);
        let (ok, output) = run(program.clone(), &command, &[(setting, &value)], &[]);
        assert!(!ok, "{value} was accepted");
        assert!(
            output.contains(setting),
            "the error names {setting}: {output}"
        );
        assert_hidden(&output, &[SECRET]);
        // The same value from a file, and as a flag.
        let dir = std::env::temp_dir().join(unique_name("malformed"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = write_secret(&dir, "value", &value);
        let file_variable = format!("{setting}_FILE");
        let (ok, output) = run(
            program.clone(),
            &command,
            &[(&file_variable, file.to_str().expect("a UTF-8 path"))],
            &[],
        );
        assert!(!ok, "{value} from a file was accepted");
        assert_hidden(&output, &[SECRET]);
        let flag = format!("--{}", setting.to_lowercase().replace('_', "-"));
        let (ok, output) = run(program, &command, &[], &[&flag, &value]);
        assert!(!ok, "{value} as a flag was accepted");
        assert_hidden(&output, &[SECRET]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test]
async fn a_secret_file_is_read_and_refused_beside_the_same_setting() {
    let db = TestSchema::new().await;
    let dir = std::env::temp_dir().join(unique_name("files"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let url = support::database_url().expose().to_owned();
    let file = write_secret(&dir, "database-url", &url);
    let file = file.to_str().expect("a UTF-8 path");
    let schema = ["--schema", db.name.as_str()];

    let (ok, output) = bridge_status(&[("DATABASE_URL_FILE", file)], &schema);
    assert!(ok, "status with DATABASE_URL_FILE: {output}");

    // Given twice: as the variable and as a file, or as the flag and as a file.
    let (ok, output) = bridge_status(
        &[("DATABASE_URL_FILE", file), ("DATABASE_URL", &url)],
        &schema,
    );
    assert!(
        !ok && output.contains("DATABASE_URL_FILE") && output.contains("DATABASE_URL is given too"),
        "{output}"
    );
    let with_flag = [schema[0], schema[1], "--database-url", &url];
    let (ok, output) = bridge_status(&[("DATABASE_URL_FILE", file)], &with_flag);
    assert!(
        !ok && output.contains("--database-url is given too"),
        "{output}"
    );

    // A file that cannot be read is named, with the reason.
    let missing = dir.join("nowhere");
    let missing = missing.to_str().expect("a UTF-8 path");
    let (ok, output) = bridge_status(&[("DATABASE_URL_FILE", missing)], &schema);
    assert!(
        !ok && output.contains(missing) && output.contains("not found"),
        "{output}"
    );
    // An empty one too.
    let empty = write_secret(&dir, "empty", "");
    let empty = empty.to_str().expect("a UTF-8 path");
    let (ok, output) = bridge_status(&[("DATABASE_URL_FILE", empty)], &schema);
    assert!(!ok && output.contains("is empty"), "{output}");

    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}
