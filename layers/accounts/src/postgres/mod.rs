//! The PostgreSQL stores (feature `postgres`): shared by every gateway replica, kept across
//! restarts. Each store applies its own migration set when built (history tables
//! `tollgate_<set>_migrations`, under the advisory lock of
//! [`run_migrations`](tollgate_postgres::run_migrations)), on a pool that may be shared with
//! the other backends. Times are passed from the store's clock, never taken from the server,
//! so a store behaves exactly like its memory counterpart.

mod sessions;
mod usage;
mod users;

pub use sessions::PostgresDashboardSessionStore;
pub use usage::PostgresUsageStore;
pub use users::PostgresUserStore;

use tollgate_core::BackendError;

mod embedded {
    pub mod users {
        refinery::embed_migrations!("migrations/users");
    }
    pub mod sessions {
        refinery::embed_migrations!("migrations/sessions");
    }
    pub mod usage {
        refinery::embed_migrations!("migrations/usage");
    }
}

/// The migration set of [`PostgresUserStore`] (`tollgate_accounts_users_migrations`).
pub const USERS_MIGRATION_SET: &str = "accounts_users";
/// The migration set of [`PostgresDashboardSessionStore`].
pub const SESSIONS_MIGRATION_SET: &str = "accounts_sessions";
/// The migration set of [`PostgresUsageStore`].
pub const USAGE_MIGRATION_SET: &str = "accounts_usage";

/// Milliseconds as a `bigint` (times stay far below `i64::MAX`).
fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A `bigint` column back to milliseconds or a count (never negative by construction).
fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn bad_row(what: &str) -> BackendError {
    BackendError::other(format!("unexpected {what} in the database"))
}
