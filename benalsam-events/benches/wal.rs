//! WAL written and row versions made per outbox job over its whole life, phase by phase:
//! the trigger's insert (writer transactions of one listing each), the claim (the job stream,
//! as the bridge claims), the `sent` mark (as the publisher reports confirms), the
//! `completed` mark (as the consumer's settler reports a bulk), the `VACUUM` that autovacuum
//! runs minutes later (it removes the versions the marks left behind), the purge
//! (`Outbox::purge_completed`, as `benalsam-bridge purge` runs it) and the `VACUUM` after
//! it.
//!
//! For each phase it prints, per job:
//! * the cluster's WAL (`pg_current_wal_insert_lsn()` before and after) and its records and
//!   full-page images (`pg_stat_wal`). WAL is cluster-wide: whatever else runs on the server
//!   meanwhile is counted too, so run it on a quiet server, a few times;
//! * with `BENCH_ADMIN_URL` (a superuser, for `pg_walinspect`), the WAL of this run's own
//!   relations only, read back record by record: the outbox's (queue table, its TOAST table,
//!   their indexes), the listings table's, the commit records of those transactions, and
//!   the rest of the cluster's (noise), so the numbers hold even on a busy server;
//! * row versions of the queue table and of its TOAST table (`pg_stat_all_tables`:
//!   inserted, updated, of those HOT, deleted), read once the counters have settled.
//!
//! Checkpoints decide full-page images: the first change of a page after a checkpoint logs
//! the whole page. The live phases follow each other within seconds, as in a running
//! pipeline where a checkpoint falls on a page a few times at most, while a purge comes days
//! later, after many checkpoints. So by default (`BENCH_CHECKPOINT=purge`) the run checkpoints
//! at the start and before the purge; `every` checkpoints before each phase (the worst case),
//! `none` never. A checkpoint needs a superuser or the `pg_checkpoint` role: the admin URL
//! when given, else the bench's own role; without either the run says so and goes on.
//!
//! Autovacuum is off on the run's tables, so its work is not spread unpredictably over the
//! phases: the two vacuum phases are the work it would have done.
//!
//! ```text
//! scripts/stack up
//! BENCH_ADMIN_URL="host=$PWD/.stack/postgres/run user=postgres dbname=benalsam" \
//!   cargo bench -p benalsam-events --bench wal
//! ```
//! Settings: `BENCH_JOBS` (default 10000), `BENCH_RUNS` (default 3), `BENCH_CHECKPOINT`
//! (`purge`, `every`, `none`), `BENCH_ADMIN_URL` (libpq key=value or URL, same database),
//! `BENCH_ALTER` (SQL run after the migrations, to try other table settings),
//! `BENCH_DETAIL` (non-empty: the outbox's WAL records by kind and relation, with the admin
//! URL).
//! Each run uses a PostgreSQL schema of its own and removes it at the end.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use benalsam_events::outbox::Wake;
use benalsam_events::{
    DatabaseUrl, EventType, JobStream, JobStreamConfig, Outbox, OutboxConfig, Outcome, Settle,
};
use common::{BoxError, LISTINGS_SQL, setting};
use futures::{StreamExt, TryStreamExt, stream};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

/// Claim batch, as the bridge's `BENALSAM_BATCH_SIZE` default.
const CLAIM_BATCH: usize = 100;
/// Completions per report, as the consumer's `BENALSAM_BULK_SIZE` default.
const COMPLETE_BATCH: usize = 250;
/// Rows per purge statement, as `benalsam-bridge purge --batch` default.
const PURGE_BATCH: usize = 1000;
/// Writer transactions in flight at once (each is still one row, one transaction).
const WRITERS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checkpoints {
    None,
    Purge,
    Every,
}

const PHASES: [&str; 7] = [
    "insert",
    "claim",
    "sent",
    "completed",
    "vacuum",
    "purge",
    "vacuum after purge",
];

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let jobs: usize = setting("BENCH_JOBS", 10_000)?;
    let runs: usize = setting("BENCH_RUNS", 3)?;
    let checkpoints = match std::env::var("BENCH_CHECKPOINT").as_deref() {
        Ok("none") => Checkpoints::None,
        Ok("every") => Checkpoints::Every,
        Ok("purge") | Err(_) => Checkpoints::Purge,
        Ok(other) => return Err(format!("BENCH_CHECKPOINT={other}: purge, every or none").into()),
    };
    let url = DatabaseUrl::from_env()?;
    let admin = match std::env::var("BENCH_ADMIN_URL") {
        Ok(admin) => Some(Admin::connect(&admin, &url).await?),
        Err(_) => None,
    };
    println!(
        "{jobs} jobs per run, {runs} runs, checkpoints: {checkpoints:?}; WAL is cluster-wide: \
         anything else on the server adds to the cluster columns{}",
        if admin.is_some() {
            ", not to the attributed ones"
        } else {
            " (set BENCH_ADMIN_URL to attribute it)"
        }
    );
    let mut totals: Vec<Run> = Vec::new();
    let mut outcome = Ok(());
    for run in 1..=runs {
        println!("\n## run {run}");
        match one_run(&url, admin.as_ref(), jobs, checkpoints).await {
            Ok(run) => totals.push(run),
            Err(error) => {
                outcome = Err(error);
                break;
            }
        }
    }
    summary(&totals, admin.is_some());
    // The extension goes even after a failed run: it lives in the shared database.
    if let Some(admin) = admin {
        admin.finish().await?;
    }
    outcome
}

/// The superuser connection: checkpoints and `pg_walinspect`.
struct Admin {
    client: Client,
    /// Schema holding `pg_walinspect`, and whether this bench created it (and drops it).
    walinspect: (String, bool),
}

impl Admin {
    async fn connect(admin_url: &str, url: &DatabaseUrl) -> Result<Self, BoxError> {
        let (client, connection) = tokio_postgres::connect(admin_url, NoTls).await?;
        tokio::spawn(connection);
        let bench = url.connect().await?;
        let (ours, theirs): (String, String) = (
            bench
                .query_one("SELECT current_database()", &[])
                .await?
                .get(0),
            client
                .query_one("SELECT current_database()", &[])
                .await?
                .get(0),
        );
        if ours != theirs {
            return Err(format!(
                "BENCH_ADMIN_URL is database {theirs}, DATABASE_URL is {ours}: give the same"
            )
            .into());
        }
        let existing: Option<String> = client
            .query_opt(
                "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                 WHERE e.extname = 'pg_walinspect'",
                &[],
            )
            .await?
            .map(|r| r.get(0));
        let walinspect = match existing {
            Some(schema) => (schema, false),
            None => {
                let schema = format!("bench_walinspect_{}", std::process::id());
                client
                    .batch_execute(&format!(
                        "CREATE SCHEMA {schema}; CREATE EXTENSION pg_walinspect SCHEMA {schema}"
                    ))
                    .await?;
                (schema, true)
            }
        };
        Ok(Self { client, walinspect })
    }

    async fn finish(self) -> Result<(), BoxError> {
        if self.walinspect.1 {
            self.client
                .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.walinspect.0))
                .await?;
        }
        Ok(())
    }

    /// WAL records between `from` and `to` by whose they are: `outbox` (records touching
    /// `outbox` relations), `listings`, `commit` (the commit records of transactions that
    /// touched either) and `other`. Each: (records, bytes, of which full-page images).
    async fn attribute(
        &self,
        from: &str,
        to: &str,
        relations: &Relations,
    ) -> Result<BTreeMap<String, (i64, i64, i64)>, BoxError> {
        // Wait until the WAL up to `to` is flushed: pg_walinspect reads only flushed WAL
        // (VACUUM's last records, say, wait for the WAL writer).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .client
            .query_one(
                "SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn",
                &[&to],
            )
            .await?
            .get::<_, bool>(0)
        {
            if Instant::now() > deadline {
                return Err("the WAL was not flushed within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if from == to {
            return Ok(BTreeMap::new());
        }
        let rows = self
            .client
            .query(
                &format!(
                    "WITH w AS (
                         SELECT record_length, fpi_length, xid,
                                ARRAY(SELECT m[1] FROM regexp_matches(coalesce(block_ref, ''),
                                                    'rel (\\d+/\\d+/\\d+)', 'g') AS m) AS rels
                         FROM {}.pg_get_wal_records_info($1::text::pg_lsn, $2::text::pg_lsn)),
                     c AS (
                         SELECT *, CASE WHEN rels && $3::text[] THEN 'outbox'
                                        WHEN rels && $4::text[] THEN 'listings' END AS class
                         FROM w),
                     x AS (SELECT DISTINCT xid FROM c WHERE class IS NOT NULL AND xid <> 0)
                     SELECT coalesce(class, CASE WHEN xid IN (SELECT xid FROM x) THEN 'commit'
                                                 ELSE 'other' END),
                            count(*), sum(record_length)::int8, sum(fpi_length)::int8
                     FROM c GROUP BY 1",
                    self.walinspect.0
                ),
                &[&from, &to, &relations.outbox, &relations.listings],
            )
            .await?;
        if std::env::var_os("BENCH_DETAIL").is_some() {
            self.detail(from, to, relations).await?;
        }
        Ok(rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
            .collect())
    }

    /// The outbox's records between `from` and `to` by kind and relation (`BENCH_DETAIL`).
    async fn detail(&self, from: &str, to: &str, relations: &Relations) -> Result<(), BoxError> {
        let rows = self
            .client
            .query(
                &format!(
                    "WITH w AS (
                         SELECT resource_manager || '/' || record_type AS kind, record_length,
                                fpi_length,
                                (regexp_match(coalesce(block_ref, ''),
                                              'rel (\\d+/\\d+/\\d+)'))[1] AS rel
                         FROM {}.pg_get_wal_records_info($1::text::pg_lsn, $2::text::pg_lsn))
                     SELECT kind, n.name, count(*), sum(record_length)::int8,
                            sum(fpi_length)::int8
                     FROM w JOIN unnest($3::text[], $4::text[]) AS n(rel, name) USING (rel)
                     GROUP BY 1, 2 ORDER BY 4 DESC",
                    self.walinspect.0
                ),
                &[&from, &to, &relations.outbox, &relations.names],
            )
            .await?;
        for r in rows {
            let (kind, rel, n, bytes, fpi): (String, String, i64, i64, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            println!("    {kind:<28} {rel:<40} {n:>7} records {bytes:>10} B ({fpi} B FPI)");
        }
        Ok(())
    }
}

/// The files of the run's relations as WAL names them (`tablespace/database/filenode`).
struct Relations {
    outbox: Vec<String>,
    /// The name of each of `outbox`.
    names: Vec<String>,
    listings: Vec<String>,
}

impl Relations {
    async fn of(client: &Client) -> Result<Self, BoxError> {
        // The table, its indexes, its TOAST table and that one's index.
        let files = |table: &'static str| async move {
            let rows = client
                .query(
                    "WITH t AS (SELECT $1::text::regclass::oid AS oid),
                          r AS (SELECT oid FROM t
                                UNION SELECT indexrelid FROM pg_index, t WHERE indrelid = t.oid
                                UNION SELECT reltoastrelid FROM pg_class, t
                                      WHERE pg_class.oid = t.oid AND reltoastrelid <> 0
                                UNION SELECT indexrelid FROM pg_index, pg_class, t
                                      WHERE pg_class.oid = t.oid AND indrelid = reltoastrelid)
                     SELECT format('%s/%s/%s',
                                   coalesce(nullif(c.reltablespace, 0), d.dattablespace),
                                   d.oid, pg_relation_filenode(c.oid)),
                            c.relname::text
                     FROM r JOIN pg_class c ON c.oid = r.oid
                     JOIN pg_database d ON d.datname = current_database()",
                    &[&table],
                )
                .await?;
            Ok::<_, BoxError>(
                rows.iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .unzip::<String, String, Vec<_>, Vec<_>>(),
            )
        };
        let (outbox, names) = files("elasticsearch_sync_queue").await?;
        Ok(Self {
            outbox,
            names,
            listings: files("listings").await?.0,
        })
    }
}

/// Cluster-wide WAL position and counters.
#[derive(Debug, Clone)]
struct Mark {
    lsn: String,
    records: i64,
    fpi: i64,
}

async fn mark(client: &Client) -> Result<Mark, BoxError> {
    let row = client
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, wal_records, wal_fpi FROM pg_stat_wal",
            &[],
        )
        .await?;
    Ok(Mark {
        lsn: row.get(0),
        records: row.get(1),
        fpi: row.get(2),
    })
}

/// Row-version counters: queue table (inserted, updated, HOT, deleted), then its TOAST table.
type Versions = [i64; 8];

async fn versions(client: &Client) -> Result<Versions, BoxError> {
    let row = client
        .query_one(
            "SELECT coalesce(q.n_tup_ins, 0), coalesce(q.n_tup_upd, 0),
                    coalesce(q.n_tup_hot_upd, 0), coalesce(q.n_tup_del, 0),
                    coalesce(t.n_tup_ins, 0), coalesce(t.n_tup_upd, 0),
                    coalesce(t.n_tup_hot_upd, 0), coalesce(t.n_tup_del, 0)
             FROM pg_stat_all_tables q
             LEFT JOIN pg_stat_all_tables t
                    ON t.relid = (SELECT reltoastrelid FROM pg_class WHERE oid = q.relid)
             WHERE q.relid = 'elasticsearch_sync_queue'::regclass",
            &[],
        )
        .await?;
    Ok(std::array::from_fn(|i| row.get(i)))
}

/// The counters once they stop moving: each backend reports its table counters lazily
/// (within about a second of going idle, or when it exits), so read until two reads a
/// second and a half apart agree, at most 20 s.
async fn settled_versions(client: &Client) -> Result<Versions, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = versions(client).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = versions(client).await?;
        if now == last || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// One phase's numbers, totals over the run's jobs.
#[derive(Debug, Clone, Default)]
struct Phase {
    cluster_bytes: i64,
    cluster_records: i64,
    cluster_fpi: i64,
    /// By owner (see [`Admin::attribute`]): records, bytes, FPI bytes.
    attributed: BTreeMap<String, (i64, i64, i64)>,
    versions: Versions,
    seconds: f64,
}

impl Phase {
    /// The outbox's own WAL: its relations' records, and its transactions' commits (not
    /// in the insert phase, whose commits are the writers', there with or without the
    /// trigger).
    fn outbox_bytes(&self, name: &str) -> i64 {
        let get = |k: &str| self.attributed.get(k).map_or(0, |v| v.1);
        get("outbox") + if name == "insert" { 0 } else { get("commit") }
    }
}

type Run = Vec<(&'static str, Phase)>;

async fn one_run(
    url: &DatabaseUrl,
    admin: Option<&Admin>,
    jobs: usize,
    checkpoints: Checkpoints,
) -> Result<Run, BoxError> {
    let schema = format!("bench_wal_{}", std::process::id());
    let mut client = url.connect().await?;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}; {LISTINGS_SQL}"
        ))
        .await?;
    // The schema goes whether the run worked or not.
    let run = phases(&mut client, url, &schema, admin, jobs, checkpoints).await;
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await?;
    let run = run?;
    print_run(&run, jobs, admin.is_some());
    Ok(run
        .into_iter()
        .map(|(name, mut p)| {
            // Per job from here on.
            let per = |v: i64| v / jobs as i64;
            p.cluster_bytes = per(p.cluster_bytes);
            for v in p.attributed.values_mut() {
                *v = (v.0, per(v.1), per(v.2));
            }
            (name, p)
        })
        .collect())
}

/// Migrates `schema` and takes its jobs through every phase; totals per phase.
async fn phases(
    client: &mut Client,
    url: &DatabaseUrl,
    schema: &str,
    admin: Option<&Admin>,
    jobs: usize,
    checkpoints: Checkpoints,
) -> Result<Run, BoxError> {
    let config = OutboxConfig::in_schema(schema);
    config.migrate(client, &[EventType::listings()]).await?;
    client
        .batch_execute(
            "ALTER TABLE elasticsearch_sync_queue
                 SET (autovacuum_enabled = off, toast.autovacuum_enabled = off);
             ALTER TABLE listings SET (autovacuum_enabled = off, toast.autovacuum_enabled = off)",
        )
        .await?;
    // Settings to try beside the migrations' (say, another fillfactor).
    if let Ok(sql) = std::env::var("BENCH_ALTER") {
        client.batch_execute(&sql).await?;
    }
    let options: Option<String> = client
        .query_one(
            "SELECT array_to_string(reloptions, ', ') FROM pg_class
             WHERE oid = 'elasticsearch_sync_queue'::regclass",
            &[],
        )
        .await?
        .get(0);
    println!("queue table options: {}", options.unwrap_or_default());
    let relations = match admin {
        Some(_) => Some(Relations::of(client).await?),
        None => None,
    };

    let mut results: Run = Vec::new();
    let mut ids: Vec<i64> = Vec::new();
    let mut before_versions = settled_versions(client).await?;
    for name in PHASES {
        let checkpoint = match checkpoints {
            Checkpoints::None => false,
            Checkpoints::Every => true,
            Checkpoints::Purge => name == "insert" || name == "purge",
        };
        if checkpoint {
            self::checkpoint(client, admin).await;
        }
        let before = mark(client).await?;
        let started = Instant::now();
        match name {
            "insert" => insert(client, jobs).await?,
            "claim" => ids = claim(url, schema, jobs).await?,
            "sent" => sent(url, schema, &ids).await?,
            "completed" => completed(url, schema, &ids).await?,
            "purge" => purge(url, schema, jobs).await?,
            // The vacuum that removes the versions the marks left behind, as autovacuum
            // does minutes later; and the one that removes the purged rows.
            _ => {
                client
                    .batch_execute("VACUUM elasticsearch_sync_queue")
                    .await?
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let after = mark(client).await?;
        let cluster_bytes: i64 = client
            .query_one(
                "SELECT pg_wal_lsn_diff($2::text::pg_lsn, $1::text::pg_lsn)::int8",
                &[&before.lsn, &after.lsn],
            )
            .await?
            .get(0);
        let attributed = match (admin, &relations) {
            (Some(admin), Some(relations)) => {
                admin.attribute(&before.lsn, &after.lsn, relations).await?
            }
            _ => BTreeMap::new(),
        };
        match name {
            "insert" => sizes(client, jobs).await?,
            "vacuum" => kept(client).await?,
            _ => {}
        }
        let now_versions = settled_versions(client).await?;
        let versions = std::array::from_fn(|i| now_versions[i] - before_versions[i]);
        before_versions = now_versions;
        results.push((
            name,
            Phase {
                cluster_bytes,
                cluster_records: after.records - before.records,
                cluster_fpi: after.fpi - before.fpi,
                attributed,
                versions,
                seconds,
            },
        ));
    }
    Ok(results)
}

async fn checkpoint(client: &Client, admin: Option<&Admin>) {
    let result = match admin {
        Some(admin) => admin.client.batch_execute("CHECKPOINT").await,
        None => client.batch_execute("CHECKPOINT").await,
    };
    if let Err(error) = result {
        println!("no checkpoint ({error}): full-page images depend on when the server's own fall");
    }
}

/// Payload and table sizes after the inserts.
async fn sizes(client: &Client, jobs: usize) -> Result<(), BoxError> {
    let row = client
        .query_one(
            "SELECT avg(octet_length(change_data::text))::float8,
                    avg(pg_column_size(change_data))::float8,
                    avg(pg_column_size(q.*))::float8,
                    pg_relation_size('elasticsearch_sync_queue'),
                    coalesce(pg_relation_size(nullif((SELECT reltoastrelid FROM pg_class
                        WHERE oid = 'elasticsearch_sync_queue'::regclass), 0)), 0)
             FROM elasticsearch_sync_queue q",
            &[],
        )
        .await?;
    let (text, stored, tuple): (f64, f64, f64) = (row.get(0), row.get(1), row.get(2));
    let (heap, toast): (i64, i64) = (row.get(3), row.get(4));
    println!(
        "change_data: {text:.0} bytes as text, {stored:.0} stored; queue row {tuple:.0} bytes; \
         heap {} pages ({:.1} jobs/page), TOAST {} pages",
        heap / 8192,
        jobs as f64 / (heap / 8192).max(1) as f64,
        toast / 8192
    );
    Ok(())
}

/// What the completed jobs take while they wait for the purge.
async fn kept(client: &Client) -> Result<(), BoxError> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(pg_column_size(q.*)), 0)::int8,
                    pg_relation_size('elasticsearch_sync_queue')
             FROM elasticsearch_sync_queue q",
            &[],
        )
        .await?;
    let (rows, heap): (i64, i64) = (row.get(0), row.get(1));
    println!(
        "completed and vacuumed: rows {} KiB in a heap of {} pages ({} KiB)",
        rows / 1024,
        heap / 8192,
        heap / 1024
    );
    Ok(())
}

/// Writers of one listing per transaction, like the demo's: the trigger enqueues each.
async fn insert(client: &Client, jobs: usize) -> Result<(), BoxError> {
    // A description of the demo's length from a vocabulary, so it compresses like text does
    // rather than like a repeated sentence.
    let statement = client
        .prepare(
            "INSERT INTO listings (user_id, title, description, category, status, latitude,
                                   longitude, attributes, location_city)
             SELECT gen_random_uuid(), 'Satılık ikinci el bisiklet ' || $1::int,
                    (SELECT string_agg(w[1 + (abs(hashint4($1::int * 64 + i)) % 40)], ' ')
                     FROM generate_series(1, 56) AS i,
                          (SELECT string_to_array('az kullanılmış bakımlı faturalı temiz orijinal \
                           kutulu garantili acil satılık takas olur pazarlık payı var kadıköy \
                           teslim kargo ile gönderilir hasarsız çiziksiz yeni gibi ikinci el \
                           fiyatı uygun alüminyum kadro vites fren lastik sele zincir pedal \
                           jant kask hediye', ' ') AS w) v),
                    'spor', 'active', 41.0, 29.0, '{\"renk\": \"kırmızı\", \"vites\": 21}',
                    'İstanbul'",
        )
        .await?;
    stream::iter(0..jobs)
        .map(|i| {
            let statement = &statement;
            async move {
                let n = i32::try_from(i).unwrap_or(i32::MAX);
                client.execute(statement, &[&n]).await
            }
        })
        .buffer_unordered(WRITERS)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(())
}

fn outbox(url: &DatabaseUrl, schema: &str) -> Result<Outbox, BoxError> {
    let mut config = OutboxConfig::in_schema(schema);
    config.tables = Some(vec!["listings".to_owned()]);
    config.worker_id = "bench".to_owned();
    Ok(Outbox::new(url.clone(), config)?)
}

/// The bridge's claims: the job stream, batches of 100, until every job is held.
async fn claim(url: &DatabaseUrl, schema: &str, jobs: usize) -> Result<Vec<i64>, BoxError> {
    let shutdown = CancellationToken::new();
    let mut config = JobStreamConfig::default();
    config.batch_size = CLAIM_BATCH;
    config.wake = Wake::PollOnly;
    let mut stream = JobStream::new(outbox(url, schema)?, config, shutdown.clone())?;
    let mut ids = Vec::with_capacity(jobs);
    while ids.len() < jobs {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(batch)) => ids.extend(batch.iter().map(|j| j.id)),
            _ => return Err(format!("claimed {} of {jobs} jobs", ids.len()).into()),
        }
    }
    shutdown.cancel();
    Ok(ids)
}

/// The publisher's reports of confirmed batches.
async fn sent(url: &DatabaseUrl, schema: &str, ids: &[i64]) -> Result<(), BoxError> {
    settle(url, schema, ids, CLAIM_BATCH, Outcome::Sent).await
}

/// The consumer's settler, a bulk at a time.
async fn completed(url: &DatabaseUrl, schema: &str, ids: &[i64]) -> Result<(), BoxError> {
    settle(url, schema, ids, COMPLETE_BATCH, Outcome::Completed).await
}

async fn settle(
    url: &DatabaseUrl,
    schema: &str,
    ids: &[i64],
    batch: usize,
    outcome: Outcome,
) -> Result<(), BoxError> {
    let outbox = outbox(url, schema)?;
    let mut changed = 0;
    for chunk in ids.chunks(batch) {
        let reports: Vec<(i64, Outcome)> = chunk.iter().map(|id| (*id, outcome.clone())).collect();
        changed += outbox.settle(&reports).await?.changed.len();
    }
    if changed != ids.len() {
        return Err(format!("{outcome:?}: {changed} of {} jobs moved", ids.len()).into());
    }
    Ok(())
}

async fn purge(url: &DatabaseUrl, schema: &str, jobs: usize) -> Result<(), BoxError> {
    let deleted = outbox(url, schema)?
        .purge_completed(Duration::ZERO, PURGE_BATCH, |_, _| {})
        .await?;
    if deleted != jobs as u64 {
        return Err(format!("purged {deleted} of {jobs} jobs").into());
    }
    Ok(())
}

fn print_run(run: &[(&'static str, Phase)], jobs: usize, attributed: bool) {
    let j = jobs as f64;
    println!(
        "| phase | s | cluster WAL B/job | records/job | FPI/job | {}queue ins/upd/hot/del per job | TOAST ins/del per job |",
        if attributed {
            "outbox B/job (FPI B) | listings B/job | commits B/job | others' B (total) | "
        } else {
            ""
        }
    );
    println!(
        "|---|---:|---:|---:|---:|{}---|---|",
        if attributed {
            "---:|---:|---:|---:|"
        } else {
            ""
        }
    );
    for (name, p) in run {
        let a = |k: &str| p.attributed.get(k).copied().unwrap_or_default();
        let v = |i: usize| p.versions[i] as f64 / j;
        let attributed_cells = if attributed {
            format!(
                "{:.0} ({:.0}) | {:.0} | {:.0} | {} | ",
                a("outbox").1 as f64 / j,
                a("outbox").2 as f64 / j,
                a("listings").1 as f64 / j,
                a("commit").1 as f64 / j,
                a("other").1
            )
        } else {
            String::new()
        };
        println!(
            "| {name} | {:.1} | {:.0} | {:.1} | {:.2} | {attributed_cells}{:.2}/{:.2}/{:.2}/{:.2} | {:.2}/{:.2} |",
            p.seconds,
            p.cluster_bytes as f64 / j,
            p.cluster_records as f64 / j,
            p.cluster_fpi as f64 / j,
            v(0),
            v(1),
            v(2),
            v(3),
            v(4),
            v(7),
        );
    }
    let total: i64 = run.iter().map(|(_, p)| p.cluster_bytes).sum();
    let mut line = format!("total: cluster {:.0} B/job", total as f64 / j);
    if attributed {
        let outbox: i64 = run.iter().map(|(n, p)| p.outbox_bytes(n)).sum();
        let live: i64 = run
            .iter()
            .filter(|(n, _)| !n.starts_with("vacuum"))
            .map(|(n, p)| p.outbox_bytes(n))
            .sum();
        line.push_str(&format!(
            "; the outbox's own {:.0} B/job ({:.0} without the vacuums)",
            outbox as f64 / j,
            live as f64 / j
        ));
    }
    println!("{line}");
}

/// Median and spread over the runs of each phase's per-job WAL.
fn summary(runs: &[Run], attributed: bool) {
    if runs.is_empty() {
        return;
    }
    println!(
        "\n## over {} runs: median [min, max] B/job{}",
        runs.len(),
        if attributed {
            " (outbox: its relations' records, and the commits after the insert)"
        } else {
            ""
        }
    );
    println!(
        "| phase | cluster |{}",
        if attributed { " outbox |" } else { "" }
    );
    println!("|---|---:|{}", if attributed { "---:|" } else { "" });
    let stat = |mut v: Vec<i64>| {
        v.sort_unstable();
        format!("{} [{}, {}]", v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let mut names: Vec<&'static str> = PHASES.to_vec();
    names.push("total");
    for name in names {
        let pick = |f: &dyn Fn(&str, &Phase) -> i64| -> Vec<i64> {
            runs.iter()
                .map(|run| {
                    run.iter()
                        .filter(|(n, _)| name == "total" || *n == name)
                        .map(|(n, p)| f(n, p))
                        .sum()
                })
                .collect()
        };
        let cluster = stat(pick(&|_, p| p.cluster_bytes));
        let outbox = if attributed {
            format!(" {} |", stat(pick(&|n, p| p.outbox_bytes(n))))
        } else {
            String::new()
        };
        println!("| {name} | {cluster} |{outbox}");
    }
}
