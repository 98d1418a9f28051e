//! Login roles of a test's own, for least-privilege checks. The stack's database user cannot
//! create roles, so they are made by the superuser over the stack's socket,
//! `BENALSAM_PG_ADMIN_URL` (`scripts/stack env` prints it); every name is unique, and
//! [`TestRole::drop`] removes the role with its privileges.

use benalsam_events::config::DatabaseUrl;

use super::{database_url, unique_name};

/// The superuser's connection (libpq key=value form, over the stack's socket).
pub async fn admin() -> tokio_postgres::Client {
    let url = std::env::var("BENALSAM_PG_ADMIN_URL").expect(
        "BENALSAM_PG_ADMIN_URL names the PostgreSQL superuser of the stack: \
         eval \"$(scripts/stack env)\"",
    );
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("the superuser connects over the stack's socket (BENALSAM_PG_ADMIN_URL)");
    tokio::spawn(connection);
    client
}

/// A login role with a password, and no privilege beyond PUBLIC's.
pub struct TestRole {
    pub name: String,
    password: String,
}

impl TestRole {
    pub async fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        let password = format!("pw{}", unique_name("x"));
        admin()
            .await
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN PASSWORD '{password}' NOSUPERUSER NOCREATEDB NOCREATEROLE"
            ))
            .await
            .expect("create role");
        Self { name, password }
    }

    /// The role's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The stack's `DATABASE_URL` with this role's name and password.
    pub fn url(&self) -> DatabaseUrl {
        let mut url = database_url().url().clone();
        url.set_username(&self.name).expect("user");
        url.set_password(Some(&self.password)).expect("password");
        url.as_str().parse().expect("a database URL")
    }

    /// A session of this role with `search_path` set to `schema`.
    pub async fn connect(&self, schema: &str) -> tokio_postgres::Client {
        let client = self.url().connect().await.expect("the role logs in");
        client
            .batch_execute(&format!("SET search_path TO {schema}"))
            .await
            .expect("search_path");
        client
    }

    /// Drops the role and every privilege it was granted.
    pub async fn drop(self) {
        admin()
            .await
            .batch_execute(&format!(
                "DROP OWNED BY {0} CASCADE; DROP ROLE {0}",
                self.name
            ))
            .await
            .expect("drop role");
    }
}
