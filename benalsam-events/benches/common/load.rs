//! Load the benchmarks share: writers of listings changes (a mix of inserts, edits, status
//! changes and deletes, at full speed or paced), the binaries as child processes with their
//! CPU and peak RSS, and the jobs' latency from commit to completed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use benalsam_events::config::SearchUrl;

use super::{BenchEnv, BoxError, binary, setting};

/// What the writers do, in percent.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub insert: u32,
    pub edit: u32,
    pub status: u32,
}

pub fn mix() -> Result<Mix, BoxError> {
    let raw = std::env::var("BENCH_MIX").unwrap_or_else(|_| "70,15,10,5".to_owned());
    let parts: Vec<u32> = raw
        .split(',')
        .map(|p| p.trim().parse())
        .collect::<Result<_, _>>()?;
    match parts[..] {
        [insert, edit, status, delete] if insert + edit + status + delete == 100 && insert > 0 => {
            Ok(Mix {
                insert,
                edit,
                status,
            })
        }
        _ => Err(
            format!("BENCH_MIX {raw:?}: four percentages adding up to 100, inserts first").into(),
        ),
    }
}

/// The description of every inserted listing: `BENCH_DESCRIPTION_BYTES` long (default 280,
/// the demo's size); larger values make large rows (an UPDATE's job carries two of them).
pub fn description() -> Result<String, BoxError> {
    let bytes: usize = setting("BENCH_DESCRIPTION_BYTES", 280)?;
    let sentence = "Az kullanılmış, bakımlı, faturalı. ";
    let mut text = sentence.repeat(bytes / sentence.len() + 1);
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    Ok(text)
}

/// One writer: `ops` changes, single-statement transactions, at full speed or paced.
pub async fn writer(
    env: &BenchEnv,
    table: &str,
    seed: u64,
    ops: usize,
    mix: Mix,
    pace: Option<Duration>,
) -> Result<(), BoxError> {
    let db = env.db_url.connect().await?;
    db.batch_execute(&format!("SET search_path TO {}", env.name))
        .await?;
    let insert = db
        .prepare(&format!(
            "INSERT INTO {table} (user_id, title, description, category, status, latitude, longitude, location_city, attributes)
             VALUES (gen_random_uuid(), $1, $2, 'spor', 'active', 41.0, 29.0, 'İstanbul', '{{\"renk\": \"kırmızı\"}}')
             RETURNING id::text"
        ))
        .await?;
    let edit = db
        .prepare(&format!(
            "UPDATE {table} SET description = $2, updated_at = now() WHERE id = $1::text::uuid"
        ))
        .await?;
    let status = db
        .prepare(&format!(
            "UPDATE {table} SET status = $2 WHERE id = $1::text::uuid"
        ))
        .await?;
    let delete = db
        .prepare(&format!("DELETE FROM {table} WHERE id = $1::text::uuid"))
        .await?;
    let description = description()?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut alive: Vec<String> = Vec::new();
    let mut ticks = pace.map(tokio::time::interval);
    for n in 0..ops {
        if let Some(t) = ticks.as_mut() {
            t.tick().await;
        }
        let roll = rng.u32(..100);
        if alive.is_empty() || roll < mix.insert {
            let row = db
                .query_one(
                    &insert,
                    &[&format!("Satılık bisiklet {seed}-{n}"), &description],
                )
                .await?;
            alive.push(row.get(0));
        } else if roll < mix.insert + mix.edit {
            let id = &alive[rng.usize(..alive.len())];
            let edited = format!("Düzenlendi {n}. {description}");
            db.execute(&edit, &[id, &edited]).await?;
        } else if roll < mix.insert + mix.edit + mix.status {
            let id = &alive[rng.usize(..alive.len())];
            let to = ["active", "sold", "inactive", "active"][rng.usize(..4)];
            db.execute(&status, &[id, &to]).await?;
        } else {
            let id = alive.swap_remove(rng.usize(..alive.len()));
            db.execute(&delete, &[&id]).await?;
        }
    }
    Ok(())
}

/// Runs `writers` writers for `ops` changes in all; returns the elapsed time.
pub async fn write(
    env: &BenchEnv,
    table: &str,
    writers: usize,
    ops: usize,
    mix: Mix,
    rate: Option<f64>,
) -> Result<Duration, BoxError> {
    let started = Instant::now();
    let pace = rate.map(|r| Duration::from_secs_f64(writers as f64 / r));
    let runs = (0..writers).map(|w| writer(env, table, w as u64 + 1, ops / writers, mix, pace));
    for result in futures::future::join_all(runs).await {
        result?;
    }
    Ok(started.elapsed())
}

pub struct Process {
    pub child: Child,
}

impl Process {
    pub fn start(name: &str, env: &BenchEnv, index: &str, port: u16) -> Result<Self, BoxError> {
        let mut command = Command::new(binary(name)?);
        if let Some(slot) = &env.capture_slot {
            command.env("BENALSAM_CAPTURE_SLOT", slot);
        }
        let child = command
            .env("DATABASE_URL", env.db_url.expose())
            .env("BENALSAM_SCHEMA", &env.name)
            .env("RABBITMQ_URL", env.url.expose())
            .env("ELASTICSEARCH_URL", SearchUrl::from_env()?.expose())
            .env("BENALSAM_INDEX", index)
            .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self { child })
    }

    /// CPU seconds (user + system) and peak RSS in MiB, from /proc.
    pub fn usage(&self) -> Result<(f64, f64), BoxError> {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        let hz: f64 = String::from_utf8(Command::new("getconf").arg("CLK_TCK").output()?.stdout)?
            .trim()
            .parse()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let hwm_kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .ok_or("no VmHWM")?
            .parse()?;
        Ok((ticks / hz, hwm_kib / 1024.0))
    }

    pub fn stop(self) {
        super::stop(self.child);
    }
}

/// Jobs after `first`: count, span from first commit to last completion, latency percentiles
/// (commit → completed, in ms).
pub async fn job_stats(env: &BenchEnv, first: i64) -> Result<(i64, f64, [f64; 4]), BoxError> {
    let row = env
        .client
        .query_one(
            "SELECT count(*),
                    extract(epoch FROM max(completed_at) - min(created_at))::float8,
                    percentile_cont(ARRAY[0.5, 0.95, 0.99, 1.0]) WITHIN GROUP
                        (ORDER BY extract(epoch FROM completed_at - created_at) * 1000)
             FROM elasticsearch_sync_queue WHERE id > $1",
            &[&first],
        )
        .await?;
    let p: Vec<f64> = row.get(2);
    Ok((row.get(0), row.get(1), [p[0], p[1], p[2], p[3]]))
}
