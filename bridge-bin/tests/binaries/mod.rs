//! The two binaries as processes, for the tests of this package.

use std::path::PathBuf;
use std::process::Command;

/// The bridge binary of this package.
pub fn bridge_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_benalsam-bridge"))
}

/// The consumer binary, built next to the bridge (built now if this package was tested alone).
pub fn consumer_binary() -> PathBuf {
    let path = bridge_binary().with_file_name("benalsam-consumer");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "benalsam-consumer",
                "--bin",
                "benalsam-consumer",
            ])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building benalsam-consumer");
    }
    path
}

/// Asks a child to stop (SIGTERM) and waits for it.
pub fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
