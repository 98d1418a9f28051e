//! The system tests of benalsam-events: the real `benalsam-bridge` and `benalsam-consumer`
//! binaries as separate processes against the real stack (PostgreSQL, RabbitMQ, the search
//! engine), in `tests/`.
//!
//! They run the binaries a `cargo build --workspace --bins` left beside them (or those in
//! `BENALSAM_BIN_DIR`) and never build anything themselves; `scripts/test` builds first:
//!
//! ```text
//! scripts/stack up && eval "$(scripts/stack env)"
//! cargo build --workspace --bins
//! cargo test -p benalsam-system-tests
//! ```
//!
//! The crate has no code of its own; this library exists so the package has a target besides
//! its tests.
