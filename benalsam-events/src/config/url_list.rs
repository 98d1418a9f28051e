//! A setting holding several URLs of one cluster (`amqp://a,amqp://b`): splitting it without
//! cutting a password in two, checking each entry, and checking that the entries agree.

use super::redact::{redact_unparsed, redact_url};
use crate::{error::Error, error::Result};

/// The entries of a comma-separated list of URLs. A comma separates entries only where the
/// next one starts with a scheme (`amqp://`, `x://`): a comma inside a password (legal in a
/// URL's user information) leaves a single URL whole, rather than splitting its password
/// into two "entries" whose pieces an error message would then show unmasked.
pub(super) fn split_addresses(raw: &str) -> Vec<&str> {
    let starts_entry = |rest: &str| {
        let rest = rest.trim_start();
        rest.find("://").is_some_and(|end| {
            let scheme = &rest[..end];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        })
    };
    let mut entries = Vec::new();
    let mut start = 0;
    for (at, _) in raw.match_indices(',') {
        let next = &raw[at + 1..];
        if next.trim().is_empty() || starts_entry(next) {
            entries.push(raw[start..at].trim());
            start = at + 1;
        }
    }
    entries.push(raw[start..].trim());
    entries
}

/// Refuses an address with more than one `@` before its host, for the settings that take a
/// list: `http://u:p@a:9200,u:p@b:9200` (a second address without its scheme) parses as ONE
/// address whose password swallowed the first host, which would drop a node and send a
/// wrong password. The address is not shown: its password cannot be masked.
pub(super) fn one_at_sign(setting: &str, raw: &str, what: &str) -> Result<()> {
    if authority(raw).matches('@').count() > 1 {
        return Err(Error::config(
            setting,
            format!(
                "{what} has more than one @ before its host: write an @ of a user name or password as %40, and start every address of a list with its scheme (http://…)"
            ),
        ));
    }
    Ok(())
}

/// The authority of a URL's text (between `://` and the next `/`, `?` or `#`).
fn authority(entry: &str) -> &str {
    let rest = entry.split_once("://").map_or(entry, |(_, rest)| rest);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// Why an entry of a list cannot serve beside the first (`None`: it can), for the settings
/// that take a list; the text completes "entry N of M (url) …".
pub(super) type Disagreement = fn(first: &url::Url, other: &url::Url) -> Option<String>;

/// Parses a comma-separated list of addresses of `setting`, each with `parse_one`, and
/// checks each against the first with `agree`. An error names the entry (by position, and
/// redacted) so the wrong one of a long list is found at once.
pub(super) fn parse_list(
    setting: &str,
    raw: &str,
    parse_one: impl Fn(&str) -> Result<url::Url>,
    agree: Disagreement,
) -> Result<(url::Url, Vec<url::Url>)> {
    let entries: Vec<&str> = split_addresses(raw);
    let total = entries.len();
    let mut urls = Vec::with_capacity(total);
    for (index, entry) in entries.into_iter().enumerate() {
        let position = index + 1;
        if entry.is_empty() {
            return Err(Error::config(
                setting,
                format!("entry {position} of {total} is empty; separate addresses with one comma"),
            ));
        }
        one_at_sign(setting, entry, &format!("entry {position} of {total}"))?;
        let parsed = parse_one(entry).map_err(|error| {
            Error::config(
                setting,
                format!(
                    "entry {position} of {total} ({}): {error}",
                    redact_unparsed(entry)
                ),
            )
        })?;
        urls.push(parsed);
    }
    let mut urls = urls.into_iter();
    let Some(first) = urls.next() else {
        return Err(Error::config(setting, "no address given"));
    };
    let others: Vec<url::Url> = urls.collect();
    for (index, other) in others.iter().enumerate() {
        if let Some(why) = agree(&first, other) {
            return Err(Error::config(
                setting,
                format!(
                    "entry {} of {total} ({}) {why}",
                    index + 2,
                    redact_url(other.as_str()),
                ),
            ));
        }
    }
    Ok((first, others))
}

/// Broker addresses must all name the same vhost: failing over to another vhost would
/// publish into, or consume from, another set of exchanges and queues without anyone
/// noticing. The list must be one cluster's nodes.
pub(super) fn same_vhost(first: &url::Url, other: &url::Url) -> Option<String> {
    (other.path() != first.path()).then(|| {
        format!(
            "names vhost path {:?}, entry 1 names {:?}; all entries must name the same vhost",
            other.path(),
            first.path()
        )
    })
}

/// Search nodes must all use one scheme and one set of credentials. The TLS files apply to
/// every node, and a failover that fell back to plain HTTP would send the credentials and
/// the documents in clear; a node whose credentials differ would refuse every request with
/// 401, which is a refused request, not an unavailable node: the documents would be
/// dead-lettered instead of waiting. The password is compared, never shown.
pub(super) fn same_scheme_and_credentials(first: &url::Url, other: &url::Url) -> Option<String> {
    if other.scheme() != first.scheme() {
        return Some(format!(
            "is {}://, entry 1 is {}://; all entries must use the same scheme",
            other.scheme(),
            first.scheme()
        ));
    }
    if other.username() != first.username() || other.password() != first.password() {
        return Some(
            "carries other credentials than entry 1; every entry must carry the same user and \
             password (or none)"
                .to_owned(),
        );
    }
    None
}
