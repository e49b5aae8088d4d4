//! Connection pools.

use std::fmt;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tollgate_core::BackendError;

use crate::error::to_backend_error;

/// How [`connect_with`] builds a pool. [`Default`] is what [`connect`] uses.
///
/// ```
/// use std::time::Duration;
/// use tollgate_postgres::PoolOptions;
///
/// let options = PoolOptions::default()
///     .with_max_size(8)
///     .with_statement_timeout(Duration::from_secs(2))
///     .with_schema("tenant_a");
/// assert_eq!(options.max_size(), 8);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct PoolOptions {
    max_size: usize,
    connect_timeout: Duration,
    wait_timeout: Duration,
    statement_timeout: Duration,
    schema: Option<String>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_size: 16,
            connect_timeout: Duration::from_secs(2),
            wait_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(10),
            schema: None,
        }
    }
}

impl fmt::Debug for PoolOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolOptions")
            .field("max_size", &self.max_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("wait_timeout", &self.wait_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("schema", &self.schema)
            .finish()
    }
}

impl PoolOptions {
    /// The most connections the pool opens (default 16). Connections are opened on demand.
    pub fn with_max_size(mut self, max_size: usize) -> Self {
        self.max_size = max_size.max(1);
        self
    }

    /// How long opening a connection may take (default 2 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a caller waits for a free connection when all are busy (default 2 s);
    /// then it gets [`BackendError::unavailable`].
    pub fn with_wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// The server-side `statement_timeout` of every connection (default 10 s; zero
    /// disables it).
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Puts every connection's `search_path` on this schema (which must already exist).
    /// The name must be a plain identifier: ASCII letters, digits and `_`, not starting with
    /// a digit.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// The most connections the pool opens.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// The schema connections are bound to, if any.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }
}

/// A pool of connections to the PostgreSQL server at `url` (a `postgres://` URL or a
/// `key=value` connection string), with [`PoolOptions::default`].
///
/// No connection is opened yet: an unreachable server shows up as
/// [`BackendError::unavailable`] on first use (the pool never blocks longer than the
/// connect timeout of 2 s). An unparsable URL is an error here. Connections do not use TLS.
pub fn connect(url: &str) -> Result<Pool, BackendError> {
    connect_with(url, &PoolOptions::default())
}

/// Like [`connect`], with every connection's `search_path` set to `schema` (through the
/// connection's startup `options`, `-c search_path=…`), so one database can hold several
/// independent tollgate installations or test runs.
pub fn connect_in_schema(url: &str, schema: &str) -> Result<Pool, BackendError> {
    connect_with(url, &PoolOptions::default().with_schema(schema))
}

/// A pool built with explicit [`PoolOptions`].
pub fn connect_with(url: &str, options: &PoolOptions) -> Result<Pool, BackendError> {
    let config = pg_config(url, options)?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            // A connection that died is noticed by its first query (and then reported as
            // unavailable); a round trip per checkout would double the cost of each request.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(options.max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(options.wait_timeout))
        .create_timeout(Some(options.connect_timeout))
        .recycle_timeout(Some(options.connect_timeout))
        .build()
        .map_err(BackendError::other)
}

/// The tokio-postgres configuration of one connection with these options: what the pool
/// uses, and what dedicated connections (a `LISTEN` session, a migration run) should use.
pub fn pg_config(url: &str, options: &PoolOptions) -> Result<tokio_postgres::Config, BackendError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(to_backend_error)?;
    config.connect_timeout(options.connect_timeout);
    let mut startup = config.get_options().unwrap_or_default().to_owned();
    let mut push = |setting: String| {
        if !startup.is_empty() {
            startup.push(' ');
        }
        startup.push_str(&setting);
    };
    push(format!(
        "-c statement_timeout={}",
        options.statement_timeout.as_millis()
    ));
    if let Some(schema) = &options.schema {
        check_identifier(schema)?;
        push(format!("-c search_path={schema}"));
    }
    config.options(&startup);
    if config.get_application_name().is_none() {
        config.application_name("tollgate");
    }
    Ok(config)
}

/// Checks that `name` can be used unquoted as a PostgreSQL identifier (and inside the
/// startup options, where spaces would split it).
pub(crate) fn check_identifier(name: &str) -> Result<(), BackendError> {
    let mut chars = name.chars();
    let ok = name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(BackendError::other(format!(
            "{name:?} is not a plain identifier (ASCII letters, digits and _, at most 63)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_options_carry_timeouts_and_schema() {
        let options = PoolOptions::default()
            .with_schema("t_abc")
            .with_statement_timeout(Duration::from_millis(1500));
        let config = pg_config("postgres://u@127.0.0.1:5432/db", &options).unwrap();
        assert_eq!(
            config.get_options(),
            Some("-c statement_timeout=1500 -c search_path=t_abc")
        );
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(2)));
    }

    #[test]
    fn existing_options_are_kept() {
        let config = pg_config(
            "host=127.0.0.1 user=u options='-c work_mem=8MB'",
            &PoolOptions::default(),
        )
        .unwrap();
        assert_eq!(
            config.get_options(),
            Some("-c work_mem=8MB -c statement_timeout=10000")
        );
    }

    #[test]
    fn unsafe_schema_names_are_refused() {
        for bad in ["", "1abc", "a b", "a;drop", "a-b", "\"x\"", &"x".repeat(64)] {
            assert!(
                connect_in_schema("postgres://u@127.0.0.1/db", bad).is_err(),
                "{bad:?}"
            );
        }
        assert!(connect_in_schema("postgres://u@127.0.0.1/db", "t_0aF").is_ok());
    }

    #[test]
    fn bad_urls_are_errors_not_panics() {
        assert!(connect("postgres://[::1").is_err());
        assert!(connect("definitely not a url = =").is_err());
    }
}
