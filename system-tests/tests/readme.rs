//! The README's walkthroughs, run as written: "Add a table by configuration" and "Documents
//! joined from related tables". The commands are read from README.md (its inline code that
//! starts with `benalsam-bridge` or `benalsam-consumer`) and run with the real binaries, their
//! arguments unchanged, in a folder that holds the files under the names the commands give;
//! the TOML the README shows is checked against the shipped files. So a README that tells a
//! newcomer something the binaries refuse, or a file that drifted from the README, fails here.
//!
//! Each test has its own schema, virtual host and indices; the shipped files are used with one
//! change only, the index aliases (the defaults would be shared by every run).

mod binaries;
#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use binaries::{Guarded, bridge_binary, consumer_binary, stop};
use serde_json::json;
use support::{
    TestIndex, TestSchema, TestVhost, database_url, free_port, management, search_url, tls_env,
    unique_name,
};

const README: &str = include_str!("../../README.md");
const EXAMPLE: &str = include_str!("../../examples/config/benalsam.toml");
const INVENTORY_SQL: &str = include_str!("../../examples/new_event_type/inventory_items.sql");
const INVENTORY_TOML: &str = include_str!("../../examples/new_event_type/inventory_items.toml");
const JOINED_TOML: &str = include_str!("../../examples/joined_documents/listings.toml");
const MARKETPLACE_SQL: &str = include_str!("../../examples/joined_documents/marketplace.sql");
const PATIENCE: Duration = Duration::from_secs(120);
/// The password `scripts/stack` gives the component users.
const COMPONENT_PASSWORD: &str = "benalsam123";

/// The text of the README section titled `title` (a `## ` heading), up to the next one.
fn section(title: &str) -> &'static str {
    let heading = format!("\n## {title}\n");
    let start = README
        .find(&heading)
        .unwrap_or_else(|| panic!("README.md has no section \"## {title}\""));
    let body = &README[start + heading.len()..];
    body.find("\n## ").map_or(body, |end| &body[..end])
}

/// The fenced ```toml blocks of a section, without the indentation of a list item.
fn toml_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        match &mut current {
            None if trimmed == "```toml" => {
                current = Some((line.len() - trimmed.len(), String::new()))
            }
            Some(_) if trimmed == "```" => blocks.extend(current.take().map(|(_, b)| b)),
            Some((indent, block)) => {
                block.push_str(line.get(*indent..).unwrap_or(""));
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// The inline code of a section outside its fenced blocks, whitespace (line breaks) folded.
fn inline_code(text: &str) -> Vec<String> {
    let mut prose = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    prose
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|span| span.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// The command lines of a section: its inline code that runs one of the binaries.
fn commands(text: &str) -> Vec<Vec<String>> {
    inline_code(text)
        .iter()
        .filter(|span| {
            span.starts_with("benalsam-bridge ") || span.starts_with("benalsam-consumer ")
        })
        .map(|span| span.split(' ').map(str::to_owned).collect())
        .collect()
}

/// The one command of `all` for `program` whose words include `word`, e.g. the bridge's
/// `migrate`.
fn command<'a>(all: &'a [Vec<String>], program: &str, word: &str) -> &'a [String] {
    let found: Vec<&Vec<String>> = all
        .iter()
        .filter(|c| c[0] == program && c.iter().any(|w| w == word))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "the README should give one `{program} … {word}` command in this walkthrough; it gives {all:?}"
    );
    found[0]
}

/// Asserts that the section still says `quoted` (as inline code), for a claim the test checks.
fn claims(text: &str, quoted: &str) {
    assert!(
        inline_code(text).iter().any(|span| span == quoted),
        "the README no longer says `{quoted}` here"
    );
}

/// The binaries as the README's commands name them, run in `dir` against the test's schema.
struct Walkthrough {
    dir: PathBuf,
    schema: String,
    logs: Vec<PathBuf>,
}

impl Walkthrough {
    fn new(schema: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name("readme"));
        std::fs::create_dir_all(&dir).expect("a folder for the walkthrough");
        Self {
            dir,
            schema: schema.to_owned(),
            logs: Vec::new(),
        }
    }

    /// Writes a file of the walkthrough under the path the README's commands give.
    fn write(&self, path: &str, text: &str) {
        let path = self.dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("folder");
        }
        std::fs::write(path, text).expect("write a walkthrough file");
    }

    /// The README's command line `words` as a process: its program is the binary built here,
    /// its arguments are the README's, unchanged.
    fn command(&self, words: &[String], rabbitmq: &str) -> Command {
        let binary = match words[0].as_str() {
            "benalsam-bridge" => bridge_binary(),
            "benalsam-consumer" => consumer_binary(),
            other => panic!("the README's command runs {other}, not one of the binaries"),
        };
        let mut command = Command::new(binary);
        command
            .args(&words[1..])
            .current_dir(&self.dir)
            .env("DATABASE_URL", database_url().expose())
            .env("BENALSAM_SCHEMA", &self.schema)
            .env("RABBITMQ_URL", rabbitmq)
            .env("ELASTICSEARCH_URL", search_url().expose())
            .env("BENALSAM_POLL_INTERVAL", "200ms")
            .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("RUST_LOG", "warn")
            .env_remove("BENALSAM_CONFIG")
            .env_remove("BENALSAM_INDEX");
        command
    }

    /// Runs a command to its end; it must succeed. Returns its standard output.
    fn run(&self, words: &[String], rabbitmq: &str) -> String {
        let out = self.output(words, rabbitmq);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "the README's `{}` failed:\n{stdout}{stderr}",
            words.join(" ")
        );
        format!("{stdout}{stderr}")
    }

    fn output(&self, words: &[String], rabbitmq: &str) -> Output {
        self.command(words, rabbitmq)
            .output()
            .expect("the binary runs")
    }

    /// Starts a service; its log is kept for the diagnosis of a failure. Returns it with the
    /// port of its health endpoints.
    fn start(&mut self, words: &[String], rabbitmq: &str) -> (Guarded, u16) {
        let port = free_port();
        let log = self
            .dir
            .join(format!("{}-{}.log", words[0], self.logs.len()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = self
            .command(words, rabbitmq)
            .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("the binary starts");
        self.logs.push(log);
        (child.into(), port)
    }

    /// The end of each service's log.
    fn logs(&self) -> String {
        self.logs
            .iter()
            .map(|log| {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {}:\n{}\n", log.display(), tail.join("\n"))
            })
            .collect()
    }

    /// Waits until `done`, for at most PATIENCE; fails with the services' logs.
    async fn wait_for(&self, what: &str, mut done: impl AsyncFnMut() -> bool) {
        let started = Instant::now();
        while !done().await {
            assert!(
                started.elapsed() < PATIENCE,
                "waited too long for {what}; the services' logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until a service answers /readyz with 200; fails at once when it has exited.
    async fn ready(&self, service: &mut Guarded, port: u16) {
        self.wait_for("a service ready", async || {
            if let Ok(Some(status)) = service.try_wait() {
                panic!("a service exited ({status}); the logs:\n{}", self.logs());
            }
            reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }
}

impl Drop for Walkthrough {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Gives the component `user` exactly these permissions on the test's vhost; returns `url`
/// with that user (and its password).
async fn grant(vhost: &TestVhost, line: &str, url: &url::Url) -> String {
    let fields: Vec<&str> = line.split('\t').collect();
    let [user, configure, write, read] = fields[..] else {
        panic!(
            "`topology --permissions` printed {line:?}, not user<TAB>configure<TAB>write<TAB>read"
        );
    };
    let (http, base, admin, password) = management();
    let granted = http
        .put(format!("{base}/api/permissions/{}/{user}", vhost.name))
        .basic_auth(&admin, Some(&password))
        .json(&json!({ "configure": configure, "write": write, "read": read }))
        .send()
        .await
        .expect("management API");
    assert!(
        granted.status().is_success(),
        "permissions of {user} (does scripts/stack create it?): {}",
        granted.status()
    );
    let mut url = url.clone();
    url.set_path(&format!("/{}", vhost.name));
    url.set_username(user).expect("user");
    url.set_password(Some(COMPONENT_PASSWORD))
        .expect("password");
    url.to_string()
}

/// Whether the test's vhost has an exchange or a queue of that name.
async fn on_broker(vhost: &TestVhost, kind: &str, name: &str) -> bool {
    let (http, base, admin, password) = management();
    http.get(format!("{base}/api/{kind}/{}/{name}", vhost.name))
        .basic_auth(&admin, Some(&password))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Jobs of `table` (a table, or `<event type>#<relation>`) by status.
async fn jobs(db: &TestSchema, table: &str, status: &str) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE table_name = $1 AND status = $2",
            &[&table, &status],
        )
        .await
        .expect("count")
        .get(0)
}

/// Jobs that are not completed yet (or failed).
async fn open_jobs(db: &TestSchema) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE status <> 'completed'",
            &[],
        )
        .await
        .expect("count")
        .get(0)
}

fn with_alias(text: &str, from: &str, to: &str) -> String {
    let replaced = text.replace(&format!("alias = \"{from}\""), &format!("alias = \"{to}\""));
    assert_ne!(replaced, text, "the file names the alias {from}");
    replaced
}

#[tokio::test]
async fn add_a_table_by_configuration_runs_as_the_readme_says() {
    let text = section("Add a table by configuration");

    // The files are the ones the README shows and counts.
    let blocks = toml_blocks(text);
    assert_eq!(blocks.len(), 1, "one TOML block in the walkthrough");
    assert_eq!(
        blocks[0], INVENTORY_TOML,
        "the README's TOML is examples/new_event_type/inventory_items.toml"
    );
    let entry: String = blocks[0].lines().map(|l| format!("{l}\n")).collect();
    assert!(
        EXAMPLE.contains(&entry),
        "examples/config/benalsam.toml holds this entry, as the README says"
    );
    for (count, what, file) in [
        (INVENTORY_SQL.lines().count(), "SQL", "inventory_items.sql"),
        (
            INVENTORY_TOML.lines().count(),
            "TOML",
            "inventory_items.toml",
        ),
    ] {
        assert!(
            text.contains(&format!("({count} lines of {what}, `{file}`)")),
            "the README counts the lines of {file}: {count}"
        );
    }

    let all = commands(text);
    let migrate = command(&all, "benalsam-bridge", "migrate");
    let bridge_run = command(&all, "benalsam-bridge", "run");
    let consumer_run = command(&all, "benalsam-consumer", "run");
    let backfill = command(&all, "benalsam-bridge", "backfill");
    let permissions = command(&all, "benalsam-bridge", "topology");
    let pipe = permissions
        .iter()
        .position(|w| w == "|")
        .expect("the permissions are piped into scripts/stack");
    assert_eq!(
        permissions[pipe + 1..],
        ["scripts/stack", "permissions", "-"],
        "the README pipes the permissions into `scripts/stack permissions -`"
    );
    let permissions = &permissions[..pipe];

    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    let listings = unique_name("t");
    let inventory = format!("{listings}_inventory");
    // The shipped file with the test's own aliases, under the name the commands give.
    let mut walk = Walkthrough::new(&db.name);
    walk.write(
        "benalsam.toml",
        &format!(
            "{}\n[event_type.index]\nalias = \"{inventory}\"\n",
            with_alias(EXAMPLE, "benalsam_listings", &listings)
        ),
    );

    // 1. The application's table, with rows from before the trigger.
    db.client
        .batch_execute(&format!(
            "{INVENTORY_SQL};
             INSERT INTO inventory_items (sku, name, state, warehouse) VALUES
                 ('SKU-1', 'Demlik', 'stocked', 'Gebze'),
                 ('SKU-2', 'Çay bardakları', 'backorder', 'İzmir'),
                 ('SKU-3', 'Kaşık', 'discontinued', 'Ankara');"
        ))
        .await
        .expect("the table of examples/new_event_type");

    // The broker users get the file's permissions, as `scripts/stack permissions -` gives
    // them on vhost / (here on the test's vhost): the binaries run as those users, the bridge
    // over TLS with RABBITMQ_TLS_URL as `scripts/stack env` prints it (its CA included).
    let plain = walk.run(permissions, vhost.url.expose());
    let lines: Vec<&str> = plain.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "a line per component user: {plain}");
    let tls = url::Url::parse(&tls_env("RABBITMQ_TLS_URL")).expect("RABBITMQ_TLS_URL is a URL");
    let bridge_url = grant(&vhost, lines[0], &tls).await;
    let consumer_url = grant(&vhost, lines[1], vhost.url.url()).await;
    assert!(bridge_url.contains("benalsam-bridge") && consumer_url.contains("benalsam-consumer"));

    // 3. migrate, (re)start both binaries with the file, backfill.
    let out = walk.run(migrate, &bridge_url);
    assert!(out.contains("trigger attached to inventory_items"), "{out}");
    let (mut bridge, bridge_port) = walk.start(bridge_run, &bridge_url);
    let (mut consumer, consumer_port) = walk.start(consumer_run, &consumer_url);
    walk.ready(&mut bridge, bridge_port).await;
    walk.ready(&mut consumer, consumer_port).await;
    let out = walk.run(backfill, &bridge_url);
    assert!(out.contains("backfill complete, 3 rows enqueued"), "{out}");

    // The application goes on writing.
    db.client
        .batch_execute(
            "INSERT INTO inventory_items (sku, name, quantity, state, warehouse, latitude, longitude)
                 VALUES ('SKU-4', 'Tabak', 9, 'stocked', 'Gebze', 40.80, 29.43);
             UPDATE inventory_items SET scan_count = scan_count + 1;  -- ignored: no job
             UPDATE inventory_items SET state = 'discontinued' WHERE sku = 'SKU-1';",
        )
        .await
        .expect("inventory changes");
    let index = TestIndex {
        alias: inventory.clone(),
        client: search_url()
            .client(Duration::from_secs(30))
            .expect("search client"),
    };
    walk.wait_for("the inventory in its index", async || {
        open_jobs(&db).await == 0
            && jobs(&db, "inventory_items", "completed").await == 5
            && index.search(json!({"match_all": {}})).await == ["SKU-2", "SKU-4"]
    })
    .await;
    assert_eq!(
        index.search(json!({"match": {"name": "bardak"}})).await,
        ["SKU-2"],
        "the Turkish analyzer of the file"
    );
    let item = index.get("SKU-4").await.expect("indexed");
    assert_eq!(item["_source"]["stored_in"], "Gebze", "a renamed column");
    stop(bridge);
    stop(consumer);

    // "Everything else is derived from the name", as the README lists it.
    for (kind, name) in [
        ("exchanges", "benalsam.inventory"),
        ("queues", "inventory.sync"),
        ("exchanges", "inventory.sync.dlx"),
        ("queues", "inventory.sync.dlq"),
    ] {
        claims(text, name);
        assert!(on_broker(&vhost, kind, name).await, "{kind} {name}");
    }
    claims(text, "benalsam_inventory_v1");
    claims(text, "benalsam_inventory");
    let aliases: serde_json::Value = reqwest::get(format!(
        "{}/{inventory}_v1/_alias",
        search_url().expose().trim_end_matches('/')
    ))
    .await
    .expect("search node")
    .json()
    .await
    .expect("json");
    assert!(
        aliases[format!("{inventory}_v1")]["aliases"][&inventory].is_object(),
        "the index <alias>_v1 behind the alias: {aliases}"
    );

    index.drop().await;
    TestIndex {
        alias: listings,
        client: search_url()
            .client(Duration::from_secs(30))
            .expect("search client"),
    }
    .drop()
    .await;
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn documents_joined_from_related_tables_run_as_the_readme_says() {
    let text = section("Documents joined from related tables");
    let config_path = "examples/joined_documents/listings.toml";

    // The relations the README shows are those of the shipped file: every key it shows has
    // the file's value (the file also spells out some defaults the README leaves out).
    let blocks = toml_blocks(text);
    assert_eq!(blocks.len(), 1, "one TOML block in the section");
    let shown: toml::Table = blocks[0].parse().expect("the README's TOML parses");
    let file: toml::Table = JOINED_TOML.parse().expect("the shipped file parses");
    let file_relations = &file["event_type"][0]["relations"];
    let shown_relations = shown["event_type"]["relations"]
        .as_table()
        .expect("the README shows relations");
    assert!(!shown_relations.is_empty());
    for (name, relation) in shown_relations {
        let shipped = file_relations
            .get(name)
            .unwrap_or_else(|| panic!("{config_path} has no relation {name}"));
        for (key, value) in relation.as_table().expect("a relation is a table") {
            assert_eq!(
                Some(value),
                shipped.get(key),
                "relations.{name}.{key} of the README is the one of {config_path}"
            );
        }
    }

    let all = commands(text);
    let migrate = command(&all, "benalsam-bridge", "migrate");
    let bridge_run = command(&all, "benalsam-bridge", "run");
    let consumer_run = command(&all, "benalsam-consumer", "run");
    for words in [migrate, bridge_run, consumer_run] {
        assert!(
            words.iter().any(|w| w == config_path),
            "`{}` runs {config_path}",
            words.join(" ")
        );
    }

    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    let alias = unique_name("t");
    let rabbitmq = vhost.url.expose().to_owned();
    db.client
        .batch_execute(MARKETPLACE_SQL)
        .await
        .expect("the tables of examples/joined_documents/marketplace.sql");

    // A mistake stops migrate with the file, the line of the event type and the key, in the
    // README's words.
    let quoted = inline_code(text)
        .into_iter()
        .find(|span| span.starts_with("listings.toml:"))
        .expect("the README quotes the error of a misspelt column");
    let broken = Walkthrough::new(&db.name);
    broken.write(
        config_path,
        &JOINED_TOML.replace(
            "foreign_key = [\"user_id\"]",
            "foreign_key = [\"user_idd\"]",
        ),
    );
    let out = broken.output(migrate, &rabbitmq);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a misspelt column stops migrate");
    assert!(
        stderr.contains(&quoted),
        "the README quotes `{quoted}`; migrate says: {stderr}"
    );

    let mut walk = Walkthrough::new(&db.name);
    walk.write(
        config_path,
        &with_alias(JOINED_TOML, "benalsam_listings_joined", &alias),
    );
    walk.run(migrate, &rabbitmq);
    // `benalsam_<event type>_<relation>` on each related table.
    let triggers: Vec<String> = db
        .client
        .query(
            "SELECT tgname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND tgname::text LIKE 'benalsam\\_listings\\_%' ORDER BY 1",
            &[&db.name],
        )
        .await
        .expect("triggers")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        triggers,
        [
            "benalsam_listings_category_info",
            "benalsam_listings_photos",
            "benalsam_listings_seller"
        ]
    );
    claims(text, "benalsam_<event type>_<relation>");

    let (mut bridge, bridge_port) = walk.start(bridge_run, &rabbitmq);
    let (mut consumer, consumer_port) = walk.start(consumer_run, &rabbitmq);
    walk.ready(&mut bridge, bridge_port).await;
    walk.ready(&mut consumer, consumer_port).await;

    let mut listed: Vec<(String, String)> = db
        .client
        .query(
            "WITH ayse AS (INSERT INTO users (display_name, rating) VALUES ('Ayşe K.', 4.8) RETURNING id),
                  mehmet AS (INSERT INTO users (display_name, rating) VALUES ('Mehmet Y.', 4.2) RETURNING id),
                  spor AS (INSERT INTO categories VALUES ('spor', 'Spor ve Outdoor', 'Sports'))
             INSERT INTO listings (user_id, title, description, category, status)
             SELECT seller, title, '', 'spor', 'active' FROM (VALUES
                 ((SELECT id FROM ayse), 'Dağ bisikleti'),
                 ((SELECT id FROM ayse), 'Kamp çadırı'),
                 ((SELECT id FROM mehmet), 'Tenis raketi')) AS l (seller, title)
             RETURNING title, id::text",
            &[],
        )
        .await
        .expect("a seller, a category and listings")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // By title: Dağ bisikleti, Kamp çadırı (Ayşe's), Tenis raketi (Mehmet's).
    listed.sort();
    let ids: Vec<String> = listed.into_iter().map(|(_, id)| id).collect();
    db.client
        .execute(
            "INSERT INTO listing_images (listing_id, url, position)
             SELECT $1::text::uuid, 'https://img.example/' || n || '.jpg', n FROM generate_series(4, 1, -1) AS n",
            &[&ids[0]],
        )
        .await
        .expect("four photos");
    let index = TestIndex {
        alias: alias.clone(),
        client: search_url()
            .client(Duration::from_secs(30))
            .expect("search client"),
    };
    let sellers = async || {
        let documents = index.documents().await;
        ids.iter()
            .map(|id| {
                documents
                    .get(id)
                    .map(|d| d["seller"]["display_name"].clone())
            })
            .collect::<Vec<_>>()
    };
    walk.wait_for("the listings with their sellers", async || {
        open_jobs(&db).await == 0
            && sellers().await
                == [
                    Some(json!("Ayşe K.")),
                    Some(json!("Ayşe K.")),
                    Some(json!("Mehmet Y.")),
                ]
    })
    .await;
    let documents = index.documents().await;
    let photos: Vec<i64> = documents[&ids[0]]["photos"]
        .as_array()
        .expect("photos")
        .iter()
        .filter_map(|p| p["position"].as_i64())
        .collect();
    assert_eq!(photos, [1, 2, 3], "the first three by position");
    assert_eq!(
        documents[&ids[0]]["category_info"]["name"],
        "Spor ve Outdoor"
    );

    // A column no document takes: no job. A rename: one job, `listings#seller`, and every
    // listing of the seller follows.
    claims(text, "listings#seller");
    let before = jobs(&db, "listings#seller", "completed").await;
    db.client
        .batch_execute(
            "UPDATE users SET email = 'ayse@example.com', last_seen_at = now() WHERE display_name = 'Ayşe K.';
             UPDATE users SET display_name = 'Ayşe Kaya' WHERE display_name = 'Ayşe K.';",
        )
        .await
        .expect("the seller's changes");
    walk.wait_for("the rename in every listing of the seller", async || {
        open_jobs(&db).await == 0
            && sellers().await
                == [
                    Some(json!("Ayşe Kaya")),
                    Some(json!("Ayşe Kaya")),
                    Some(json!("Mehmet Y.")),
                ]
    })
    .await;
    assert_eq!(
        jobs(&db, "listings#seller", "completed").await,
        before + 1,
        "one job for the rename, none for the email"
    );
    stop(bridge);
    stop(consumer);

    index.drop().await;
    db.drop().await;
    vhost.drop().await;
}
