//! Hiding secrets in URLs. Every URL that reaches a log line, a health answer or an error
//! message goes through [`redact_url`] first.

/// What a password is replaced with.
pub const MASK: &str = "***";

/// Returns `url` with its password replaced by `***`.
///
/// A string that does not parse as a URL is still cleaned: everything between `://` and the
/// last `@` of the authority is masked, so a malformed URL cannot leak a secret either.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // set_password fails only for URLs that cannot have credentials, which have none.
            let _ = parsed.set_password(Some(MASK));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => mask_userinfo(url),
    }
}

fn mask_userinfo(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else {
        return raw.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &raw[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{}{user}:{MASK}{}", &raw[..rest_start], &rest[at..])
        }
        None => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests {
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
    fn masks_unparseable_urls_too() {
        let out = redact_url("postgres://user:p@ss:word@[bad host/db");
        assert!(!out.contains("p@ss"), "{out}");
        assert!(!out.contains("word"), "{out}");
        assert!(out.starts_with("postgres://user:***@"), "{out}");
    }
}
