//! A person's mistakes in an event-type file, through the stock binaries as processes against
//! the real stack: each column the file names that the table lacks (key, status_column,
//! ignore, a field's column, a geo point's lat, a relation's order_by, foreign_key and field)
//! stops `benalsam-bridge migrate`, and the start of both binaries, naming the file, the line
//! and the key, before anything is attached, claimed or consumed.

mod binaries;
#[path = "../../benalsam-events/tests/cases/mistakes.rs"]
mod cases;
#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use binaries::{bridge_binary, consumer_binary};
use cases::{MISTAKES, TABLES, with_mistake};
use support::{TestSchema, TestVhost, database_url, free_port, search_url};

/// A binary of the test's deployment with `config` as its event-type file.
fn command(binary: PathBuf, db: &TestSchema, vhost: &TestVhost, config: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .env("DATABASE_URL", database_url().expose())
        .env("BENALSAM_SCHEMA", &db.name)
        .env("RABBITMQ_URL", vhost.url.expose())
        .env("ELASTICSEARCH_URL", search_url().expose())
        .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("BENALSAM_CONFIG", config)
        .env("RUST_LOG", "warn");
    command
}

/// Runs a command to its end, or kills it after a minute (a binary that accepted the file
/// would run on): whether it failed, and what it wrote to stderr.
fn refused(command: &mut Command) -> (bool, String) {
    let (status, text) = binaries::run_bounded(command);
    (status.is_some_and(|s| !s.success()), text)
}

#[tokio::test]
async fn each_column_mistake_stops_migrate_and_the_start_of_both_binaries_naming_file_line_and_key()
{
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    db.client
        .batch_execute(&format!("SET search_path TO {}; {TABLES}", db.name))
        .await
        .expect("the application's tables");
    let (good, _) = with_mistake("", "");
    let (failed, err) = refused(command(bridge_binary(), &db, &vhost, &good).arg("migrate"));
    assert!(!failed, "the file without a mistake migrates: {err}");
    for (from, to, key) in MISTAKES {
        let (path, line) = with_mistake(from, to);
        let place = format!("{}:{line}: ", path.display());
        for (binary, args) in [
            (bridge_binary(), &["migrate"][..]),
            (bridge_binary(), &["run"][..]),
            (consumer_binary(), &["run"][..]),
        ] {
            let shown = format!("{} {}", binary.display(), args.join(" "));
            let (failed, err) = refused(command(binary, &db, &vhost, &path).args(args));
            assert!(failed, "{shown} refuses {key}: {err}");
            assert!(
                err.contains(&place) && err.contains(key) && err.contains("has no column"),
                "{shown}: file, line {line} and {key}: {err}"
            );
        }
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(good);
    db.drop().await;
    vhost.drop().await;
}
