//! Hiding secrets in URLs. Every URL that reaches a log line, a health answer or an error
//! message goes through [`redact_url`] first.

/// What a password is replaced with.
pub(crate) const MASK: &str = "***";

/// Returns `url` with its password replaced by `***`.
///
/// Works on the raw text rather than a parsed URL, because a password with an unescaped `/`,
/// `?` or `#` makes a URL parser split it in the wrong place (and then print it as a path or
/// fragment): everything between `://` and the *last* `@` is user information, and all of it
/// after the user name is masked. A `password=` or `sslpassword=` query parameter (which
/// PostgreSQL's URLs accept) is masked too. Masking a little too much is preferred to showing a secret.
pub(crate) fn redact_url(url: &str) -> String {
    mask_query_passwords(&mask_userinfo(url))
}

/// Returns a value that did not parse as a URL with everything that may be a password
/// masked, for the error that says so.
///
/// A malformed value has no reliable structure: `postgres:/u:pw@h/db` (one slash),
/// `u:pw@h` (no scheme), libpq's `host=h password=pw`, `amqp://u:pw` (the host forgotten,
/// the password now where a port would be). Besides what [`redact_url`] masks, whatever
/// follows a colon after the host position is masked when there is no `@` at all.
pub(crate) fn redact_unparsed(raw: &str) -> String {
    let masked = redact_url(raw);
    let start = userinfo_start(&masked);
    let rest = &masked[start..];
    if rest.contains('@') {
        return masked;
    }
    match rest.find(':') {
        Some(colon) => {
            let after = &rest[colon + 1..];
            let end = after.find(['/', '?', '#', ' ']).unwrap_or(after.len());
            if after[..end].is_empty() || after[..end] == *MASK {
                return masked;
            }
            format!("{}:{MASK}{}", &masked[..start + colon], &after[end..])
        }
        None => masked,
    }
}

/// Where the user information would begin: after the scheme (`letter *(letter / digit / + -
/// .) ":"`) and the slashes that follow it, however many; at 0 without a scheme.
fn userinfo_start(raw: &str) -> usize {
    let scheme_len = raw
        .char_indices()
        .take_while(|(i, c)| {
            if *i == 0 {
                c.is_ascii_alphabetic()
            } else {
                c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')
            }
        })
        .count();
    if scheme_len == 0 || !raw[scheme_len..].starts_with(':') {
        return 0;
    }
    let after = &raw[scheme_len + 1..];
    scheme_len + 1 + (after.len() - after.trim_start_matches(['/', '\\']).len())
}

/// Masks the password of the user information: everything between the user name (up to the
/// first `:` or `@`) and the *last* `@` of the text.
fn mask_userinfo(raw: &str) -> String {
    let start = userinfo_start(raw);
    let rest = &raw[start..];
    let Some(at) = rest.rfind('@') else {
        return raw.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find([':', '@']) {
        Some(end) => format!(
            "{}{}:{MASK}{}",
            &raw[..start],
            &userinfo[..end],
            &rest[at..]
        ),
        None => raw.to_owned(),
    }
}

/// Masks the values of `password` and `sslpassword` parameters: in a URL's query (after `?`,
/// `&` or `;`) and in libpq's key=value form (after a space, or first), with spaces around
/// the `=` and quoted values as libpq allows them. Names are matched without regard to case.
fn mask_query_passwords(raw: &str) -> String {
    let lower = raw.to_ascii_lowercase();
    let mut out = String::with_capacity(raw.len());
    let mut done = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find("password").map(|f| f + search) {
        let name_end = found + "password".len();
        search = name_end;
        // `password` and libpq's `sslpassword` (the key's passphrase) are parameters of their
        // own; `oldpassword` is not.
        let before = &lower[..found];
        let name_start = before.strip_suffix("ssl").unwrap_or(before);
        let in_query = name_start.ends_with(['?', '&', ';']);
        let preceded =
            in_query || name_start.is_empty() || name_start.ends_with(char::is_whitespace);
        let after = &lower[name_end..];
        let spaces = after.len() - after.trim_start().len();
        if !preceded || !after[spaces..].starts_with('=') {
            continue;
        }
        let value_start = name_end + spaces + 1;
        let value = &raw[value_start..];
        let blank = value.len() - value.trim_start().len();
        let value = &value[blank..];
        let len = if let Some(quoted) = value.strip_prefix('\'') {
            // A quoted value ends at the first quote not escaped by a backslash.
            let mut escaped = false;
            let close = quoted.char_indices().find(|(_, c)| {
                let end = !escaped && *c == '\'';
                escaped = !escaped && *c == '\\';
                end
            });
            close.map_or(value.len(), |(i, _)| i + 2)
        } else {
            // A query's value ends at the next parameter (or the fragment); libpq's
            // key=value form separates by white space only.
            let end: &[char] = if in_query {
                &['&', '#', ' ', '\t', '\n']
            } else {
                &[' ', '\t', '\n']
            };
            value.find(end).unwrap_or(value.len())
        };
        out.push_str(&raw[done..value_start + blank]);
        out.push_str(MASK);
        done = value_start + blank + len;
        search = done.max(search);
    }
    out.push_str(&raw[done..]);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn masks_the_password_and_keeps_the_rest() {
        assert_eq!(
            redact_url("amqp://benalsam:benalsam123@localhost:5672/%2f"),
            "amqp://benalsam:***@localhost:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://app:s3cret@db.internal:5432/benalsam?sslmode=require"),
            "postgres://app:***@db.internal:5432/benalsam?sslmode=require"
        );
    }

    #[test]
    fn leaves_urls_without_password_alone() {
        assert_eq!(
            redact_url("http://127.0.0.1:9200/"),
            "http://127.0.0.1:9200/"
        );
        assert_eq!(
            redact_url("amqp://guest@localhost"),
            "amqp://guest@localhost"
        );
    }

    #[test]
    fn masks_passwords_that_confuse_url_parsers() {
        for (raw, secret) in [
            ("postgres://user:p@ss:word@[bad host/db", "p@ss"),
            ("postgres://app:p#ss@db/benalsam", "p#ss"),
            ("postgres://app:12/34@db/benalsam", "12/34"),
            ("postgres://app:a?b@db/benalsam", "a?b"),
        ] {
            let out = redact_url(raw);
            assert!(!out.contains(secret), "{raw} -> {out}");
            assert!(out.starts_with("postgres://"), "{out}");
        }
    }

    #[test]
    fn masks_password_parameters() {
        assert_eq!(
            redact_url("postgres://db/benalsam?user=app&password=s3cret&sslmode=require"),
            "postgres://db/benalsam?user=app&password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://db/x?password=s3cret"),
            "postgres://db/x?password=***"
        );
        assert_eq!(
            redact_url("postgres://db/x?oldpassword=keep"),
            "postgres://db/x?oldpassword=keep"
        );
        assert_eq!(
            redact_url("postgres://db/x?sslmode=require&sslpassword=s3cret&a=1"),
            "postgres://db/x?sslmode=require&sslpassword=***&a=1"
        );
        assert_eq!(
            redact_url("postgres://db/x?xsslpassword=keep"),
            "postgres://db/x?xsslpassword=keep"
        );
    }

    proptest! {
        #[test]
        fn a_password_never_survives(user in "[a-z]{1,8}", password in "[!-~]{4,20}", host in "[a-z]{1,10}") {
            let raw = format!("postgres://{user}:{password}@{host}:5432/db");
            prop_assert_eq!(redact_url(&raw), format!("postgres://{user}:***@{host}:5432/db"));
        }
    }
}
