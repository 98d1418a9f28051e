//! The live demo behind `scripts/demo`: writes a day of marketplace activity to `listings`,
//! waits while the running bridge and consumer carry it into the search index, then shows
//! what a person wants to see — search results (Turkish words matched through stemming),
//! each listing with its seller and category joined from their own tables, a seller renamed
//! and the results following, and the job table by status with the average processing time.
//!
//! It checks what it shows: each search has its expected hits (the two bicycle listings for
//! `bisiklet`, the Istanbul ones for the geo search, none for the sold computer, the seller's
//! listings under her old and her new name), and every job of the run must be completed.
//! A miss is printed with what was expected and what came, and the demo exits non-zero, so
//! `scripts/demo` (and CI, which runs it) fails. A rerun first removes the listings and
//! sellers of the earlier run, so it shows (and checks) the same results.
//!
//! # When to copy this
//!
//! Copy it to see how an application writes (plain SQL; the trigger does the rest) and how
//! to query the index. It expects `benalsam-bridge` and `benalsam-consumer` to be running,
//! which `scripts/demo` arranges with `examples/joined_documents/listings.toml` (listings
//! joined with their seller, category and photos). `demo setup` only creates the
//! application's tables (`examples/sql/listings.sql`, `examples/joined_documents/marketplace.sql`),
//! which the bridge's migration then attaches its triggers to.

use std::time::{Duration, Instant};

use benalsam_events::config::{DatabaseUrl, SearchUrl};
use benalsam_events::elasticsearch::SearchParts;
use benalsam_events::tokio_postgres::types::ToSql;
use benalsam_events::{Outbox, OutboxConfig};
use serde_json::{Value, json};

/// The application's tables: example schema, not the library's.
const LISTINGS_SQL: &str = include_str!("sql/listings.sql");
const MARKETPLACE_SQL: &str = include_str!("joined_documents/marketplace.sql");

/// The sellers, and the categories' Turkish names.
const SELLERS: &[(&str, f64)] = &[("Ayşe K.", 4.8), ("Mehmet Y.", 4.2), ("Zeynep D.", 3.9)];
const CATEGORIES: &[(&str, &str, &str)] = &[
    ("spor", "Spor ve Outdoor", "Sports"),
    ("kitap", "Kitap ve Dergi", "Books"),
    ("mobilya", "Mobilya", "Furniture"),
    ("elektronik", "Elektronik", "Electronics"),
    ("bebek", "Anne ve Bebek", "Baby"),
    ("antika", "Antika", "Antiques"),
];

/// The first seller's new display name.
const RENAMED: &str = "Ayşe Kaya";

/// One listing of the demo.
struct Demo {
    title: &'static str,
    description: &'static str,
    category: &'static str,
    city: &'static str,
    district: &'static str,
    lat: f64,
    lon: f64,
    budget: f64,
}

const fn demo(
    title: &'static str,
    description: &'static str,
    category: &'static str,
    (city, district): (&'static str, &'static str),
    (lat, lon): (f64, f64),
    budget: f64,
) -> Demo {
    Demo {
        title,
        description,
        category,
        city,
        district,
        lat,
        lon,
        budget,
    }
}

#[rustfmt::skip]
const LISTINGS: &[Demo] = &[
    demo("Az kullanılmış dağ bisikleti", "21 vites, alüminyum kadro, bakımları yapıldı", "spor", ("İstanbul", "Kadıköy"), (40.990, 29.029), 8500.0),
    demo("Çocuk bisikletleri (2 adet)", "4-7 yaş için, yardımcı tekerlekli", "spor", ("İzmir", "Karşıyaka"), (38.459, 27.115), 1800.0),
    demo("İkinci el roman kitapları", "Klasik Türk romanları, 40 kitap bir arada", "kitap", ("Ankara", "Çankaya"), (39.918, 32.862), 1200.0),
    demo("Üniversite hazırlık kitapları", "Temiz, yazısız test kitapları seti", "kitap", ("İstanbul", "Beşiktaş"), (41.043, 29.009), 650.0),
    demo("Çalışma masası ve sandalye", "Ahşap masa, ergonomik sandalye", "mobilya", ("Bursa", "Nilüfer"), (40.213, 28.978), 2500.0),
    demo("Üçlü koltuk takımı", "Gri kumaş, yatak olabilen koltuk", "mobilya", ("Antalya", "Muratpaşa"), (36.884, 30.704), 7000.0),
    demo("Oyun bilgisayarı", "RTX ekran kartı, 32 GB bellek, 1 TB SSD", "elektronik", ("İstanbul", "Ataşehir"), (40.983, 29.124), 32000.0),
    demo("Akıllı telefon, kutulu", "128 GB, garantisi devam ediyor", "elektronik", ("Ankara", "Keçiören"), (39.981, 32.868), 14000.0),
    demo("Bebek arabası", "Travel sistem, puset ve ana kucağı", "bebek", ("İzmir", "Bornova"), (38.462, 27.216), 3200.0),
    demo("Kamp çadırı 4 kişilik", "Su geçirmez, bir kez kullanıldı", "spor", ("Muğla", "Fethiye"), (36.621, 29.116), 2200.0),
    demo("Elektrikli scooter", "25 km menzil, şarj aleti ile", "elektronik", ("İstanbul", "Üsküdar"), (41.026, 29.015), 9000.0),
    demo("Antika duvar saati", "Çalışır durumda, 1950'ler", "antika", ("Eskişehir", "Odunpazarı"), (39.766, 30.521), 4500.0),
];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let database_url = DatabaseUrl::from_env()?;
    let search_url = SearchUrl::from_env()?;
    let schema = std::env::var("BENALSAM_SCHEMA").unwrap_or_else(|_| "public".to_owned());
    let index =
        std::env::var("BENALSAM_INDEX").unwrap_or_else(|_| "benalsam_listings_joined".to_owned());
    let db = database_url.connect().await?;
    db.batch_execute(&format!("SET search_path TO {schema}"))
        .await?;
    if std::env::args().nth(1).as_deref() == Some("setup") {
        db.batch_execute(LISTINGS_SQL).await?;
        db.batch_execute(MARKETPLACE_SQL).await?;
        println!(
            "the listings, users, categories and listing_images tables are in schema {schema}"
        );
        return Ok(());
    }
    let first_job: i64 = db
        .query_one(
            "SELECT coalesce(max(id), 0) FROM elasticsearch_sync_queue",
            &[],
        )
        .await?
        .get(0);
    let mut checks = Checks::default();
    remove_earlier_run(&db).await?;

    println!(
        "writing the demo workload: {} listings, then edits, approvals, sales and deletes",
        LISTINGS.len()
    );
    let mut sellers = Vec::new();
    for (name, rating) in SELLERS {
        let row = db
            .query_one(
                "INSERT INTO users (display_name, rating) VALUES ($1, $2::float8::numeric) RETURNING id::text",
                &[name, rating],
            )
            .await?;
        sellers.push(row.get::<_, String>(0));
    }
    for (slug, tr, en) in CATEGORIES {
        db.execute(
            "INSERT INTO categories VALUES ($1, $2, $3) ON CONFLICT (slug) DO UPDATE SET name_tr = $2",
            &[slug, tr, en],
        )
        .await?;
    }
    let mut ids = Vec::new();
    for (i, l) in LISTINGS.iter().enumerate() {
        let seller = &sellers[i % sellers.len()];
        let params: [&(dyn ToSql + Sync); 9] = [
            &l.title,
            &l.description,
            &l.category,
            &l.district,
            &l.city,
            &l.lat,
            &l.lon,
            &l.budget,
            seller,
        ];
        let row = db
            .query_one(
                "INSERT INTO listings (user_id, title, description, category, location, location_city,
                                       location_district, latitude, longitude, budget, status)
                 VALUES ($9::text::uuid, $1, $2, $3, $4 || ', ' || $5, $5, $4, $6, $7, $8::float8::numeric, 'pending_approval')
                 RETURNING id::text",
                &params,
            )
            .await?;
        ids.push(row.get::<_, String>(0));
    }
    db.execute(
        "INSERT INTO listing_images (listing_id, url, position)
         SELECT id, 'https://img.example/' || id || '/' || n || '.jpg', n
         FROM listings, generate_series(1, 2) AS n WHERE id::text = ANY($1)",
        &[&ids],
    )
    .await?;
    // The moderators approve all but the last; sellers edit, sell and delete.
    let approved = &ids[..ids.len() - 1];
    db.execute(
        "UPDATE listings SET status = 'active', updated_at = now() WHERE id::text = ANY($1)",
        &[&approved],
    )
    .await?;
    db.execute(
        "UPDATE listings SET description = description || ' — fiyatta pazarlık payı var', updated_at = now()
         WHERE id::text = $1",
        &[&ids[0]],
    )
    .await?;
    db.execute(
        "UPDATE listings SET view_count = view_count + 40 WHERE id::text = ANY($1)",
        &[&approved],
    )
    .await?; // ignored column: no jobs
    db.execute(
        "UPDATE listings SET status = 'sold', updated_at = now() WHERE id::text = $1",
        &[&ids[6]],
    )
    .await?;
    db.execute("DELETE FROM listings WHERE id::text = $1", &[&ids[7]])
        .await?;
    let written: i64 = db
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE id > $1",
            &[&first_job],
        )
        .await?
        .get(0);
    println!("{written} jobs recorded by the trigger (the view counter updates made none)");

    wait_done(&db, first_job).await?;

    let client = search_url.client(Duration::from_secs(10))?;
    show_searches(&client, &db, &index, &mut checks).await?;

    println!("\nthe first seller changes her display name to {RENAMED:?} (one UPDATE of users):");
    db.execute(
        "UPDATE users SET display_name = $1 WHERE id::text = $2",
        &[&RENAMED, &sellers[0]],
    )
    .await?;
    wait_done(&db, first_job).await?;
    refresh(&client, &index).await?;
    let found = run_query(
        &client,
        &index,
        json!({"match": {"seller.display_name": "Kaya"}}),
    )
    .await?;
    let label = "seller \"Kaya\" after the rename";
    print_hits(label, &found);
    checks.hits(label, &found, SELLER_0_ACTIVE);

    let summary = Outbox::new(database_url.clone(), OutboxConfig::in_schema(&schema))?
        .summary()
        .await?;
    println!(
        "\njob table (SELECT status, count(*), avg(processed_at - created_at) … GROUP BY status):"
    );
    println!(
        "  {:<12} {:>8} {:>22}",
        "status", "jobs", "avg processing time"
    );
    for line in summary.by_status {
        let avg = line
            .avg_processing_seconds
            .map_or("-".to_owned(), |s| format!("{:.0} ms", s * 1000.0));
        println!("  {:<12} {:>8} {:>22}", line.status, line.jobs, avg);
    }
    // Every job of this run completed: none failed, none left pending, claimed or sent.
    let unfinished = db
        .query(
            "SELECT status, count(*) FROM elasticsearch_sync_queue
             WHERE id > $1 AND status <> 'completed' GROUP BY status ORDER BY status",
            &[&first_job],
        )
        .await?;
    let unfinished: Vec<String> = unfinished
        .iter()
        .map(|row| format!("{} {}", row.get::<_, i64>(1), row.get::<_, String>(0)))
        .collect();
    checks.expect(
        "the jobs of this run",
        "all completed",
        &if unfinished.is_empty() {
            "all completed".to_owned()
        } else {
            unfinished.join(", ")
        },
    );
    checks.finish()
}

/// The titles the searches must find (the listings are written by [`LISTINGS`]' order: the
/// first seller has the 1st, 4th, 7th and 10th; the 7th is sold, the 8th deleted, the last
/// never approved).
const BICYCLES: &[&str] = &[
    "Az kullanılmış dağ bisikleti",
    "Çocuk bisikletleri (2 adet)",
];
const BOOKS: &[&str] = &["İkinci el roman kitapları", "Üniversite hazırlık kitapları"];
/// Within 15 km of Kadıköy: the active listings of Istanbul (the Ataşehir computer is sold).
const ISTANBUL: &[&str] = &[
    "Az kullanılmış dağ bisikleti",
    "Elektrikli scooter",
    "Üniversite hazırlık kitapları",
];
const SELLER_0_ACTIVE: &[&str] = &[
    "Az kullanılmış dağ bisikleti",
    "Kamp çadırı 4 kişilik",
    "Üniversite hazırlık kitapları",
];

/// What the demo expected and what it saw; a miss is reported at the end, and fails the run.
#[derive(Default)]
struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn expect(&mut self, what: &str, expected: &str, got: &str) {
        if expected == got {
            self.passed += 1;
        } else {
            self.failed
                .push(format!("{what}: expected {expected}, got {got}"));
        }
    }

    /// The hits of a search must be exactly the listings titled `expected`.
    fn hits(&mut self, label: &str, found: &Value, expected: &[&str]) {
        let mut want: Vec<&str> = expected.to_vec();
        want.sort_unstable();
        let mut got: Vec<&str> = found["hits"]["hits"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|hit| hit["_source"]["title"].as_str().unwrap_or("(no title)"))
            .collect();
        got.sort_unstable();
        let total = found["hits"]["total"]["value"].as_u64().unwrap_or(0);
        let shown = |titles: &[&str], n: u64| format!("{n} hits {titles:?}");
        self.expect(
            &format!("search {label}"),
            &shown(&want, want.len() as u64),
            &shown(&got, total),
        );
    }

    fn finish(self) -> Result<(), Box<dyn std::error::Error>> {
        if self.failed.is_empty() {
            println!("\nall {} checks passed", self.passed);
            return Ok(());
        }
        for failure in &self.failed {
            eprintln!("demo check failed: {failure}");
        }
        eprintln!(
            "{} of {} checks failed (above): what the demo shows is not what it should",
            self.failed.len(),
            self.failed.len() + self.passed
        );
        // The exit code is the verdict scripts/demo (and CI) go by.
        std::process::exit(1)
    }
}

/// Removes the listings, photos and sellers an earlier run of the demo wrote (found by the
/// sellers' names), so a rerun shows the same results; their jobs take them out of the index.
async fn remove_earlier_run(
    db: &benalsam_events::tokio_postgres::Client,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut names: Vec<&str> = SELLERS.iter().map(|(name, _)| *name).collect();
    names.push(RENAMED);
    let removed = db
        .execute(
            "WITH sellers AS (SELECT id FROM users WHERE display_name = ANY($1)),
                  gone AS (DELETE FROM listings WHERE user_id IN (SELECT id FROM sellers) RETURNING id),
                  photos AS (DELETE FROM listing_images WHERE listing_id IN (SELECT id FROM gone))
             DELETE FROM users WHERE id IN (SELECT id FROM sellers)",
            &[&names],
        )
        .await?;
    if removed > 0 {
        println!("removing the listings and {removed} sellers of an earlier run of the demo");
    }
    Ok(())
}

/// Waits while the bridge and the consumer carry every job since `first_job`.
async fn wait_done(
    db: &benalsam_events::tokio_postgres::Client,
    first_job: i64,
) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    loop {
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE status IN ('completed', 'failed')), count(*)
                 FROM elasticsearch_sync_queue WHERE id > $1",
                &[&first_job],
            )
            .await?;
        let (done, all): (i64, i64) = (row.get(0), row.get(1));
        println!(
            "  {done}/{all} jobs done after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        if done == all {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err("the jobs did not finish in two minutes: are benalsam-bridge and benalsam-consumer running? (see scripts/demo)".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    Ok(())
}

async fn refresh(
    client: &benalsam_events::elasticsearch::Elasticsearch,
    index: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    client
        .indices()
        .refresh(benalsam_events::elasticsearch::indices::IndicesRefreshParts::Index(&[index]))
        .send()
        .await?;
    Ok(())
}

async fn show_searches(
    client: &benalsam_events::elasticsearch::Elasticsearch,
    db: &benalsam_events::tokio_postgres::Client,
    index: &str,
    checks: &mut Checks,
) -> Result<(), Box<dyn std::error::Error>> {
    refresh(client, index).await?;
    let searchable: i64 = db
        .query_one("SELECT count(*) FROM listings WHERE status = 'active'", &[])
        .await?
        .get(0);
    let all = run_query(client, index, json!({"match_all": {}})).await?;
    println!(
        "\nthe index {index} holds {} listings; the table has {searchable} active ones",
        all["hits"]["total"]["value"]
    );
    checks.expect(
        &format!("listings in {index}"),
        &format!("{searchable} (the active ones of the table)"),
        &format!(
            "{} (the active ones of the table)",
            all["hits"]["total"]["value"]
        ),
    );
    for (label, query, expected) in [
        (
            "\"bisiklet\" (finds \"bisikleti\", \"bisikletleri\")",
            json!({"match": {"search_text": "bisiklet"}}),
            BICYCLES,
        ),
        (
            "\"kitap\" (finds \"kitapları\")",
            json!({"match": {"search_text": "kitap"}}),
            BOOKS,
        ),
        (
            "anything within 15 km of Kadıköy",
            json!({"bool": {"filter": {"geo_distance": {"distance": "15km", "geo_location": {"lat": 40.990, "lon": 29.029}}}}}),
            ISTANBUL,
        ),
        (
            "\"bilgisayar\" (sold: gone from search)",
            json!({"match": {"search_text": "bilgisayar"}}),
            &[],
        ),
        (
            "seller \"Ayşe\" (joined from users)",
            json!({"match": {"seller.display_name": "Ayşe"}}),
            SELLER_0_ACTIVE,
        ),
    ] {
        let found = run_query(client, index, query).await?;
        print_hits(label, &found);
        checks.hits(label, &found, expected);
    }
    Ok(())
}

fn print_hits(label: &str, found: &Value) {
    println!("\nsearch {label}: {} hits", found["hits"]["total"]["value"]);
    for hit in found["hits"]["hits"].as_array().into_iter().flatten() {
        let s = &hit["_source"];
        println!(
            "  - {:<34} {:<10} {:>9} TRY  {:<7} {:<10} {} ({}), {} photos",
            s["title"].as_str().unwrap_or(""),
            s["location_city"].as_str().unwrap_or(""),
            s["budget"]
                .as_f64()
                .map_or(String::new(), |b| format!("{b:.0}")),
            s["status"].as_str().unwrap_or(""),
            s["category_info"]["name"].as_str().unwrap_or("-"),
            s["seller"]["display_name"].as_str().unwrap_or("-"),
            s["seller"]["rating"]
                .as_f64()
                .map_or("-".to_owned(), |r| format!("{r:.1}")),
            s["photos"].as_array().map_or(0, Vec::len),
        );
    }
}

async fn run_query(
    client: &benalsam_events::elasticsearch::Elasticsearch,
    index: &str,
    query: Value,
) -> Result<Value, Box<dyn std::error::Error>> {
    Ok(client
        .search(SearchParts::Index(&[index]))
        .body(json!({"query": query, "size": 5, "track_total_hits": true, "sort": ["_score", {"budget": "desc"}]}))
        .send()
        .await?
        .json()
        .await?)
}
