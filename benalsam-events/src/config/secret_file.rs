//! Secrets from files: the `*_FILE` convention of Docker and Kubernetes secrets.
//!
//! Every setting that may carry a password (`DATABASE_URL`, `RABBITMQ_URL`,
//! `ELASTICSEARCH_URL`) may instead be given as `<SETTING>_FILE`, the path of a file holding
//! the value, so the secret appears neither in the process list (as a flag would) nor in the
//! environment. The file's content is the value, without its trailing line break. Setting
//! both the variable and its `_FILE` is refused, as is a flag beside a `_FILE`: which one
//! wins would be a guess. An error names the file, never its content.

use std::path::PathBuf;

use crate::{Error, Result};

/// The settings that may be read from a file: the environment variable and the argument id
/// of the binaries' flag.
pub(crate) const SECRET_SETTINGS: &[(&str, &str)] = &[
    ("DATABASE_URL", "database_url"),
    ("RABBITMQ_URL", "rabbitmq_url"),
    ("ELASTICSEARCH_URL", "elasticsearch_url"),
];

/// The variable naming the file of `setting`.
pub(crate) fn file_variable(setting: &str) -> String {
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
pub(crate) fn from_file(setting: &str) -> Result<Option<String>> {
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

/// Whether `<setting>_FILE` is set (and not empty).
#[cfg(feature = "cli")]
fn from_file_variable_set(setting: &str) -> bool {
    std::env::var_os(file_variable(setting)).is_some_and(|v| !v.is_empty())
}

/// The error of a setting given twice: as `given` (its variable or its flag) and as a file.
fn both_given(setting: &str, given: &str) -> Error {
    Error::config(
        file_variable(setting),
        format!("{given} is given too; give the value one way only"),
    )
}

/// Parses the command line of a binary like `P::parse()`, with the `_FILE` convention for
/// the settings that may carry a password: a file's content stands for the setting's value
/// when neither its flag nor its variable is given (both and a file are refused). Exits with
/// clap's message on an error, as `parse` does.
#[cfg(feature = "cli")]
pub fn parse_with_secret_files<P: clap::Parser>() -> P {
    try_parse_with_secret_files(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// [`parse_with_secret_files`] over `args`, returning the error.
#[cfg(feature = "cli")]
pub fn try_parse_with_secret_files<P, I, T>(args: I) -> std::result::Result<P, clap::Error>
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    use clap::parser::ValueSource;

    let mut command = P::command();
    let mut from_files = Vec::new();
    for (setting, id) in SECRET_SETTINGS {
        if !command.get_arguments().any(|a| a.get_id() == *id) {
            continue;
        }
        let value = match env_or_file(setting) {
            Ok(value) => value,
            Err(error) => return Err(command.error(ErrorKind::ArgumentConflict, error)),
        };
        if let (Some(value), true) = (value, from_file_variable_set(setting)) {
            // The value becomes the flag's default: a flag on the command line is noticed
            // below; the default is never shown (it is a secret).
            command = command.mut_arg(*id, |arg| arg.default_value(value).hide_default_value(true));
            from_files.push((*setting, *id));
        }
    }
    let matches = command.try_get_matches_from_mut(args)?;
    for (setting, id) in from_files {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            let flag = format!("--{}", id.replace('_', "-"));
            return Err(command.error(ErrorKind::ArgumentConflict, both_given(setting, &flag)));
        }
    }
    P::from_arg_matches(&matches).map_err(|e| e.format(&mut command))
}
