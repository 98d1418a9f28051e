//! Settings: where the services are (URLs that validate themselves and never print a
//! password), and checks shared by every setting the library takes.

mod addresses;
mod queue;
mod redact;
mod secret_file;
pub(crate) mod tls;
mod url_list;
mod urls;

use std::time::Duration;

pub use crate::queue_type::QueueType;
pub(crate) use addresses::Addresses;
pub use secret_file::env_or_file;
pub use urls::{AmqpUrl, DatabaseUrl, SearchUrl};
pub(crate) use urls::{
    ELASTICSEARCH_CA, ELASTICSEARCH_CLIENT_CERT, ELASTICSEARCH_CLIENT_KEY, validate_identifier,
    validate_schema,
};

use crate::{error::Error, error::Result};

/// Refuses a zero duration for `setting`: a zero lease, poll interval or timeout cannot work
/// (a lease that is over before the claim returns, a loop that never sleeps, a request that
/// is given no time).
pub(crate) fn require_positive(setting: &str, value: Duration) -> Result<Duration> {
    if value.is_zero() {
        return Err(Error::config(
            setting,
            "must be longer than zero (e.g. 500ms, 1s, 15m)",
        ));
    }
    Ok(value)
}
