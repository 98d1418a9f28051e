//! Secrets from files: the `*_FILE` convention of Docker and Kubernetes secrets.
//!
//! Every setting that may carry a password (`DATABASE_URL`, `RABBITMQ_URL`,
//! `ELASTICSEARCH_URL`) may instead be given as `<SETTING>_FILE`, the path of a file holding
//! the value, so the secret appears neither in the process list (as a flag would) nor in the
//! environment. The file's content is the value, without its trailing line break. Setting
//! both the variable and its `_FILE` is refused (the binaries refuse a flag beside a `_FILE`
//! too): which one would win would be a guess. An error names the file, never its content.

use std::path::PathBuf;

use crate::{error::Error, error::Result};

/// The variable naming the file of `setting`.
fn file_variable(setting: &str) -> String {
    format!("{setting}_FILE")
}

/// Reads `setting` from the environment: its variable, or the file its `_FILE` variable
/// names; `None` when neither is set (or both are empty).
pub fn env_or_file(setting: &str) -> Result<Option<String>> {
    let direct = std::env::var_os(setting).filter(|v| !v.is_empty());
    match (direct, from_file(setting)?) {
        (Some(_), Some(_)) => Err(both_given(setting, setting)),
        (Some(value), None) => value
            .into_string()
            .map(Some)
            .map_err(|_| Error::config(setting, "is not valid UTF-8")),
        (None, from_file) => Ok(from_file),
    }
}

/// The content of the file `<setting>_FILE` names, when it is set.
fn from_file(setting: &str) -> Result<Option<String>> {
    let variable = file_variable(setting);
    let Some(path) = std::env::var_os(&variable).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    // The error of a failed read names the path and the reason (not found, permission
    // denied), never anything read.
    let bytes = std::fs::read(&path).map_err(|e| {
        Error::config(
            &variable,
            format!("cannot read {}: {}", path.display(), e.kind()),
        )
    })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        Error::config(
            &variable,
            format!("{} is not a UTF-8 text file", path.display()),
        )
    })?;
    // One trailing line break (what an editor or `echo` adds) is not part of the value.
    let value = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if value.trim().is_empty() {
        return Err(Error::config(
            &variable,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Some(value.to_owned()))
}

/// The error of a setting given twice: as `given` (its variable or its flag) and as a file.
fn both_given(setting: &str, given: &str) -> Error {
    Error::config(
        file_variable(setting),
        format!("{given} is given too; give the value one way only"),
    )
}
