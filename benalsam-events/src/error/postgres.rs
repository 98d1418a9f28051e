//! PostgreSQL's own words in an error: message, SQLSTATE and detail.

use std::fmt;

/// The server's message, code and detail of a tokio-postgres error, for a message of its own.
pub(crate) fn pg_detail(error: &tokio_postgres::Error) -> String {
    PgDetail(error).to_string()
}

/// Renders a tokio-postgres error with the server's message, code and detail: its own
/// `Display` is only "db error".
pub(super) struct PgDetail<'a>(pub(super) &'a tokio_postgres::Error);

impl fmt::Display for PgDetail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(db) = self.0.as_db_error() {
            write!(f, "{} (SQLSTATE {})", db.message(), db.code().code())?;
            if let Some(detail) = db.detail() {
                write!(f, "; {detail}")?;
            }
            // A missing table or function almost always means a schema that was never
            // migrated (or the wrong BENALSAM_SCHEMA): say what to do about it.
            if matches!(db.code().code(), "42P01" | "42883") {
                write!(
                    f,
                    "; is the schema migrated? run `benalsam-bridge migrate` (or start with \
                     --migrate), and check BENALSAM_SCHEMA"
                )?;
            }
            return Ok(());
        }
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
