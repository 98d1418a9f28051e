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

fn mask_userinfo(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else {
        return raw.to_owned();
    };
    let start = scheme_end + 3;
    let rest = &raw[start..];
    match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:{MASK}{}", &raw[..start], &rest[at..]),
                None => raw.to_owned(),
            }
        }
        None => raw.to_owned(),
    }
}

fn mask_query_passwords(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(found) = rest.find("password=") {
        let value_start = found + "password=".len();
        // `password=` and libpq's `sslpassword=` (the key's passphrase) are parameters of
        // their own; `oldpassword=` is not.
        let before = &rest[..found];
        let name_start = before.strip_suffix("ssl").unwrap_or(before);
        let preceded = name_start.is_empty() || name_start.ends_with(['?', '&', ';']);
        out.push_str(&rest[..value_start]);
        rest = &rest[value_start..];
        if preceded {
            let end = rest.find(['&', '#', ';']).unwrap_or(rest.len());
            out.push_str(MASK);
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
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
