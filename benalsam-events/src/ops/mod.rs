//! Operating the pipeline: health answers, heartbeats, metrics, logs and traces.

pub(crate) mod events;
mod health;
pub(crate) mod metrics;
mod process;
mod status;
pub(crate) mod telemetry;

pub(crate) use health::{HealthReport, HealthServer, Readiness};
pub(crate) use health::{rfc3339, since};
pub use metrics::Metrics;
pub(crate) use status::CountsErrors;
pub use status::Live;
