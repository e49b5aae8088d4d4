//! Shared PostgreSQL plumbing of the tollgate backends (not a layer).
//!
//! The PostgreSQL backends of the layer crates (`PostgresKeyStore`, the PostgreSQL ledger,
//! the PostgreSQL log sink, …) all need the same few things, provided here once:
//!
//! - [`connect`] / [`connect_in_schema`] / [`connect_with`]: a [`Pool`] with a connect
//!   timeout, a bounded wait for a free connection and a server-side statement timeout.
//! - [`to_backend_error`]: PostgreSQL and pool failures as a [`BackendError`] — the server
//!   cannot be reached → [`BackendErrorKind::Unavailable`] (503), anything else →
//!   [`BackendErrorKind::Other`] (500).
//! - [`run_migrations`]: one crate's refinery migration set, with its own history table
//!   `tollgate_<set>_migrations`, under an advisory lock so replicas starting at once are
//!   safe.
//! - [`Listener`] and [`InvalidatingCache`]: an in-process cache that every replica keeps
//!   exact through `LISTEN`/`NOTIFY` (changes seen within 1 s), with a TTL backstop.
//! - [`testing::TestDb`] (feature `testing`): a fresh schema per test.
//!
//! ```
//! use tollgate_core::BackendErrorKind;
//! use tollgate_postgres::{connect_in_schema, to_backend_error};
//!
//! // Pools connect lazily: building one never blocks on the server.
//! let pool = connect_in_schema("postgres://postgres@127.0.0.1:5432/tollgate", "tollgate").unwrap();
//! assert_eq!(pool.status().max_size, 16);
//!
//! // Schema names go into the connection options unquoted, so only plain identifiers pass.
//! assert!(connect_in_schema("postgres://postgres@127.0.0.1/db", "x; DROP").is_err());
//!
//! let err = to_backend_error(tollgate_postgres::deadpool_postgres::PoolError::Closed);
//! assert_eq!(err.kind(), BackendErrorKind::Unavailable);
//! ```
//!
//! A crate's PostgreSQL backend embeds its migrations (refinery's `embed_migrations!`
//! over its `migrations/` folder) and runs them at start:
//!
//! ```no_run
//! # async fn start() -> Result<(), tollgate_core::BackendError> {
//! use tollgate_postgres::refinery::{Migration, Runner};
//!
//! let pool = tollgate_postgres::connect("postgres://postgres@127.0.0.1:5432/tollgate")?;
//! // Usually `embedded::migrations::runner()` from `refinery::embed_migrations!("migrations")`.
//! let v1 = Migration::unapplied("V1__widgets", "CREATE TABLE tollgate_widgets (id uuid PRIMARY KEY)")
//!     .expect("a valid migration name");
//! tollgate_postgres::run_migrations(&pool, "widgets", Runner::new(&[v1])).await?;
//! # Ok(()) }
//! ```
//!
//! [`BackendError`]: tollgate_core::BackendError
//! [`BackendErrorKind::Unavailable`]: tollgate_core::BackendErrorKind::Unavailable
//! [`BackendErrorKind::Other`]: tollgate_core::BackendErrorKind::Other
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cache;
mod error;
mod listen;
mod migrate;
mod pool;
#[cfg(feature = "testing")]
pub mod testing;

pub use cache::InvalidatingCache;
pub use deadpool_postgres::{self, Pool};
pub use error::{is_unavailable, to_backend_error, IntoBackendError};
pub use listen::{Listener, ListenerOptions, NotificationHandler};
pub use migrate::{run_migrations, MIGRATION_LOCK_KEY};
pub use pool::{connect, connect_in_schema, connect_with, pg_config, PoolOptions};
pub use refinery;
pub use tokio_postgres;
