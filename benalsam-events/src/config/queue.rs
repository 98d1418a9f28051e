//! Reading a queue type from a setting.

use crate::queue_type::QueueType;
use crate::{error::Error, error::Result};

impl std::str::FromStr for QueueType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(Error::config(
                "BENALSAM_QUEUE_TYPE",
                format!("{other:?} is not a queue type; use \"classic\" or \"quorum\""),
            )),
        }
    }
}
