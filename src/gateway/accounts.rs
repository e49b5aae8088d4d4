//! The gateway's customer-account backends: dashboard users, their sessions, usage rollups
//! and the password hasher, chosen like the other backends (memory by default, PostgreSQL
//! with `DATABASE_URL`).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tollgate_accounts::{
    DashboardSessionStore, MemoryDashboardSessionStore, MemoryUsageStore, MemoryUserStore,
    Passwords, UsageStore, UserStore, USAGE_RETENTION,
};
use tollgate_core::{BoxError, SharedClock};

/// The stores behind the dashboard and the usage API. Cheap to clone (shared).
#[derive(Clone)]
pub struct Accounts {
    /// Users, invites and the sign-in throttle.
    pub users: Arc<dyn UserStore>,
    /// Signed-in dashboard sessions.
    pub sessions: Arc<dyn DashboardSessionStore>,
    /// Hourly usage rollups, fed by the request logger's worker.
    pub usage: Arc<dyn UsageStore>,
    /// Argon2id hashing of dashboard passwords.
    pub passwords: Passwords,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("passwords", &self.passwords)
            .finish_non_exhaustive()
    }
}

impl Accounts {
    /// Memory stores on `clock`, passwords at the default Argon2id cost.
    pub fn memory(clock: SharedClock) -> Self {
        Accounts {
            users: Arc::new(MemoryUserStore::new(clock.clone())),
            sessions: Arc::new(MemoryDashboardSessionStore::new(clock.clone())),
            usage: Arc::new(MemoryUsageStore::new(clock)),
            passwords: Passwords::new(),
        }
    }

    /// PostgreSQL stores on `pool` (their migrations applied), passwords at the default cost.
    #[cfg(feature = "postgres")]
    pub async fn postgres(
        pool: tollgate_postgres::Pool,
        clock: SharedClock,
    ) -> Result<Self, BoxError> {
        use tollgate_accounts::{
            PostgresDashboardSessionStore, PostgresUsageStore, PostgresUserStore,
        };
        Ok(Accounts {
            users: Arc::new(PostgresUserStore::new(pool.clone(), clock.clone()).await?),
            sessions: Arc::new(
                PostgresDashboardSessionStore::new(pool.clone(), clock.clone()).await?,
            ),
            usage: Arc::new(PostgresUsageStore::new(pool, clock).await?),
            passwords: Passwords::new(),
        })
    }

    /// The same stores with another password hasher (e.g. a cheaper cost in tests).
    pub fn with_passwords(mut self, passwords: Passwords) -> Self {
        self.passwords = passwords;
        self
    }
}

/// Every hour: ended sessions, used and expired invites, ended throttle windows, and
/// rollups past their retention go.
pub(crate) fn spawn_upkeep(accounts: &Accounts, clock: SharedClock) -> JoinHandle<()> {
    let accounts = accounts.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            if let Err(e) = accounts.sessions.purge_expired().await {
                tracing::warn!(error = %e, "purging dashboard sessions failed");
            }
            if let Err(e) = accounts.users.purge_expired().await {
                tracing::warn!(error = %e, "purging invites and sign-in attempts failed");
            }
            let cutoff = clock
                .now_ms()
                .saturating_sub(USAGE_RETENTION.as_millis() as u64);
            if let Err(e) = accounts.usage.purge_older_than(cutoff).await {
                tracing::warn!(error = %e, "purging usage rollups failed");
            }
        }
    })
}
