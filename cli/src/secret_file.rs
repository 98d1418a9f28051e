//! The `*_FILE` convention of Docker and Kubernetes secrets on the command line: a file's
//! content stands for a setting that may carry a password, when neither its flag nor its
//! variable is given. The library reads the variables the same way
//! ([`benalsam_events::config::env_or_file`]); this adds the flags.

use benalsam_events::Error;
use benalsam_events::config::env_or_file;
use clap::error::ErrorKind;
use clap::parser::ValueSource;

/// The settings that may be read from a file: the environment variable and the argument id
/// of the binaries' flag.
const SECRET_SETTINGS: &[(&str, &str)] = &[
    ("DATABASE_URL", "database_url"),
    ("RABBITMQ_URL", "rabbitmq_url"),
    ("ELASTICSEARCH_URL", "elasticsearch_url"),
];

/// The variable naming the file of `setting`.
fn file_variable(setting: &str) -> String {
    format!("{setting}_FILE")
}

/// Whether `<setting>_FILE` is set (and not empty).
fn from_file_variable_set(setting: &str) -> bool {
    std::env::var_os(file_variable(setting)).is_some_and(|v| !v.is_empty())
}

/// Parses the command line of a binary like `P::parse()`, with the `_FILE` convention for
/// the settings that may carry a password: a file's content stands for the setting's value
/// when neither its flag nor its variable is given (both and a file are refused). Exits with
/// clap's message on an error, as `parse` does.
pub fn parse_with_secret_files<P: clap::Parser>() -> P {
    try_parse_with_secret_files(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// [`parse_with_secret_files`] over `args`, returning the error.
pub fn try_parse_with_secret_files<P, I, T>(args: I) -> Result<P, clap::Error>
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
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
            // The same words as the library's refusal of a variable beside its file.
            let error = Error::config(
                file_variable(setting),
                format!("{flag} is given too; give the value one way only"),
            );
            return Err(command.error(ErrorKind::ArgumentConflict, error));
        }
    }
    P::from_arg_matches(&matches).map_err(|e| e.format(&mut command))
}
