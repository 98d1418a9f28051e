//! The two binaries as processes, for the system tests.
#![allow(dead_code)] // each test binary uses a part

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The bridge binary, as `cargo build --workspace --bins` left it.
pub fn bridge_binary() -> PathBuf {
    binary("benalsam-bridge")
}

/// The consumer binary, as `cargo build --workspace --bins` left it.
pub fn consumer_binary() -> PathBuf {
    binary("benalsam-consumer")
}

/// A binary of the workspace, already built: `BENALSAM_BIN_DIR` when set (a release build,
/// say), else the profile folder this test runs from (`target/debug/deps/<test>` sits two
/// levels below `target/debug/<binary>`). These tests never build anything themselves:
/// `scripts/test` builds the binaries first, so one build serves every test, and a test
/// never waits on a cargo lock.
fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("BENALSAM_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_exe()
            .expect("the test knows its own path")
            .parent()
            .and_then(|deps| deps.parent())
            .expect("the test runs from <target>/<profile>/deps")
            .to_path_buf(),
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does), \
         or point BENALSAM_BIN_DIR at the folder that has it",
        path.display()
    );
    path
}

/// A child process that is killed when dropped, so a failing test leaves nothing running.
#[derive(Debug)]
pub struct Guarded(std::process::Child);

impl From<std::process::Child> for Guarded {
    fn from(child: std::process::Child) -> Self {
        Self(child)
    }
}

impl std::ops::Deref for Guarded {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Guarded {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Asks a child to stop (SIGTERM) and waits for it.
pub fn stop(mut child: Guarded) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// The answer of `path` on a binary's health port: status and JSON body; `None` while
/// nothing answers (within 2 s).
pub async fn answer(port: u16, path: &str) -> Option<(u16, serde_json::Value)> {
    let response = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(std::time::Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.unwrap_or_default()))
}

/// Waits until the answer of `path` satisfies `check`, for at most `within`; returns the body.
pub async fn wait_until(
    port: u16,
    path: &str,
    within: std::time::Duration,
    check: impl Fn(u16, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = std::time::Instant::now();
    loop {
        let now = answer(port, path).await;
        if let Some((got, body)) = &now
            && check(*got, body)
        {
            return body.clone();
        }
        assert!(
            started.elapsed() < within,
            "{path} on :{port} did not answer as expected within {within:?}; last: {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Runs a binary to its end, or kills it after a minute (a binary that accepted a bad file
/// would run on): its exit status (`None` when killed) and what it wrote to stderr.
pub fn run_bounded(command: &mut Command) -> (Option<std::process::ExitStatus>, String) {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let stderr = std::env::temp_dir().join(format!(
        "benalsam-bounded-{}-{run}.stderr",
        std::process::id()
    ));
    let file = std::fs::File::create(&stderr).expect("a file for stderr");
    let mut child: Guarded = command
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("the binary starts")
        .into();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(child);
    let text = std::fs::read_to_string(&stderr).unwrap_or_default();
    let _ = std::fs::remove_file(stderr);
    (status, text)
}
