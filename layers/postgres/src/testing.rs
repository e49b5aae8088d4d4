//! Test support: a fresh schema per test on a real PostgreSQL server.
//!
//! ```no_run
//! # async fn demo() {
//! use tollgate_postgres::testing::TestDb;
//!
//! let Some(db) = TestDb::new().await else { return }; // server unreachable: skipped
//! let client = db.pool().get().await.unwrap();
//! client.batch_execute("CREATE TABLE t (x int)").await.unwrap(); // lands in db.schema()
//! drop(client);
//! db.cleanup().await;
//! # }
//! ```

use std::fmt;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::NoTls;

use crate::pool::{connect_with, pg_config, PoolOptions};

/// The server tests use when `DATABASE_URL` is not set.
pub const DEFAULT_TEST_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh, empty schema `t_<random>` on the server named by `DATABASE_URL` (default
/// [`DEFAULT_TEST_DATABASE_URL`]), with a pool whose connections use it as `search_path`.
///
/// [`cleanup`](TestDb::cleanup) drops the schema; dropping a `TestDb` without it drops the
/// schema too, best effort, from a helper thread.
pub struct TestDb {
    url: String,
    schema: String,
    pool: Pool,
    cleaned: bool,
}

impl fmt::Debug for TestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDb")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl TestDb {
    /// Creates the schema and its pool.
    ///
    /// When the server cannot be reached, prints `skipping: PostgreSQL unreachable …` and
    /// returns `None` — unless `TOLLGATE_REQUIRE_SERVICES=1`, then it panics, so a CI job
    /// that promises a server cannot pass by skipping.
    pub async fn new() -> Option<TestDb> {
        let url = std::env::var("DATABASE_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_TEST_DATABASE_URL.to_owned());
        let schema = format!("t_{}", tollgate_core::KeyId::new().as_uuid().simple());
        match admin_execute(&url, &format!("CREATE SCHEMA {schema}")).await {
            Ok(()) => {}
            Err(err) => {
                if require_services() {
                    panic!(
                        "PostgreSQL at {} is required (TOLLGATE_REQUIRE_SERVICES=1) but \
                         unreachable: {err}",
                        redact(&url)
                    );
                }
                eprintln!(
                    "skipping: PostgreSQL unreachable at {}: {err}",
                    redact(&url)
                );
                return None;
            }
        }
        let pool = match connect_with(&url, &Self::options_for(&schema)) {
            Ok(pool) => pool,
            Err(err) => panic!("a pool on the test schema: {err}"),
        };
        Some(TestDb {
            url,
            schema,
            pool,
            cleaned: false,
        })
    }

    fn options_for(schema: &str) -> PoolOptions {
        // Small pools: many tests (of several crates) run at once against one server with a
        // limited number of connections.
        PoolOptions::default()
            .with_max_size(4)
            .with_wait_timeout(Duration::from_secs(10))
            .with_schema(schema)
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The schema's name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The pool bound to the schema (cloning a pool is cheap and shares it).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The options the pool was built with (e.g. for a dedicated connection via
    /// [`pg_config`]).
    pub fn pool_options(&self) -> PoolOptions {
        Self::options_for(&self.schema)
    }

    /// A second, independent pool on the same schema: what another gateway replica (or
    /// the same one after a restart) would have.
    pub fn new_pool(&self) -> Pool {
        match connect_with(&self.url, &self.pool_options()) {
            Ok(pool) => pool,
            Err(err) => panic!("a pool on the test schema: {err}"),
        }
    }

    /// Drops the schema and everything in it.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        self.pool.close();
        if let Err(err) = admin_execute(&self.url, &drop_statement(&self.schema)).await {
            eprintln!("could not drop test schema {}: {err}", self.schema);
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        self.pool.close();
        let url = self.url.clone();
        let sql = drop_statement(&self.schema);
        // Nothing awaits in Drop: a helper thread with its own runtime drops the schema.
        let helper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                let _ = runtime.block_on(admin_execute(&url, &sql));
            }
        });
        let _ = helper.join();
    }
}

fn drop_statement(schema: &str) -> String {
    format!("SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS {schema} CASCADE")
}

/// A `postgres://` URL on 127.0.0.1 where nothing listens: a store pointed at it must
/// answer [`BackendError::unavailable`](tollgate_core::BackendError::unavailable).
pub fn unreachable_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(1);
    format!("postgres://postgres@127.0.0.1:{port}/test")
}

/// Whether `TOLLGATE_REQUIRE_SERVICES=1`: tests must not skip for lack of a server.
pub fn require_services() -> bool {
    std::env::var("TOLLGATE_REQUIRE_SERVICES").is_ok_and(|v| v.trim() == "1")
}

async fn admin_execute(url: &str, sql: &str) -> Result<(), tokio_postgres::Error> {
    let config = match pg_config(url, &PoolOptions::default()) {
        Ok(config) => config,
        Err(_) => url.parse::<tokio_postgres::Config>()?,
    };
    let (client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let result = client.batch_execute(sql).await;
    drop(client);
    let _ = driver.await;
    result
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
