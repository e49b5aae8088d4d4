//! [`PostgresOrgStore`]: organizations in PostgreSQL (table `tollgate_orgs`), so an org
//! created through one replica's admin API exists for every replica and survives restarts.

use std::fmt;

use tollgate_core::{BackendError, BoxFuture, OrgId};
use tollgate_postgres::deadpool_postgres::Pool;
use tollgate_postgres::refinery::{Migration, Runner};
use tollgate_postgres::{run_migrations, to_backend_error, PoolOptions};

use super::orgs::OrgStore;

/// The name of the gateway's organizations migration set (history table
/// `tollgate_gateway_orgs_migrations`).
pub const MIGRATION_SET: &str = "gateway_orgs";

/// The migrations, in order. Kept here rather than in a folder: the set is tiny and belongs
/// to the gateway alone.
const MIGRATIONS: &[(&str, &str)] = &[(
    "V1__orgs",
    "CREATE TABLE tollgate_orgs (
         id         uuid PRIMARY KEY,
         name       text NOT NULL,
         created_at timestamptz NOT NULL DEFAULT now()
     );",
)];

fn runner() -> Result<Runner, BackendError> {
    let migrations = MIGRATIONS
        .iter()
        .map(|(name, sql)| Migration::unapplied(name, sql).map_err(to_backend_error))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Runner::new(&migrations))
}

/// An [`OrgStore`] in PostgreSQL. Cloning shares the pool.
#[derive(Clone)]
pub struct PostgresOrgStore {
    pool: Pool,
}

impl fmt::Debug for PostgresOrgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresOrgStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresOrgStore {
    /// A store on `pool` (e.g. shared with the other PostgreSQL backends), after applying its
    /// migrations.
    pub async fn new(pool: Pool) -> Result<Self, BackendError> {
        run_migrations(&pool, MIGRATION_SET, runner()?).await?;
        Ok(PostgresOrgStore { pool })
    }

    /// Connects to `url` with its own pool and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, BackendError> {
        Self::new(tollgate_postgres::connect_with(
            url,
            &PoolOptions::default().with_max_size(4),
        )?)
        .await
    }
}

impl OrgStore for PostgresOrgStore {
    fn create(&self, name: String) -> BoxFuture<Result<OrgId, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let org = OrgId::new();
            let client = pool.get().await.map_err(to_backend_error)?;
            client
                .execute(
                    "INSERT INTO tollgate_orgs (id, name) VALUES ($1, $2)",
                    &[org.as_uuid(), &name],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(org)
        })
    }

    fn name(&self, org: OrgId) -> BoxFuture<Result<Option<String>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let row = client
                .query_opt(
                    "SELECT name FROM tollgate_orgs WHERE id = $1",
                    &[org.as_uuid()],
                )
                .await
                .map_err(to_backend_error)?;
            row.map(|row| row.try_get::<_, String>(0).map_err(to_backend_error))
                .transpose()
        })
    }

    fn list(&self) -> BoxFuture<Result<Vec<(OrgId, String)>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let rows = client
                .query(
                    "SELECT id, name FROM tollgate_orgs ORDER BY name COLLATE \"C\", id",
                    &[],
                )
                .await
                .map_err(to_backend_error)?;
            rows.iter()
                .map(|row| {
                    Ok((
                        OrgId::from_uuid(row.try_get(0).map_err(to_backend_error)?),
                        row.try_get::<_, String>(1).map_err(to_backend_error)?,
                    ))
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    //! Against the real server (`DATABASE_URL`, default 127.0.0.1:5432) in a fresh schema;
    //! skipped when unreachable unless `TOLLGATE_REQUIRE_SERVICES=1`.

    use std::collections::HashSet;
    use std::sync::Arc;

    use tollgate_core::BackendErrorKind;
    use tollgate_postgres::testing::{unreachable_url, TestDb};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orgs_are_shared_by_replicas_and_survive_restarts() {
        let Some(db) = TestDb::new().await else {
            return;
        };
        let a = PostgresOrgStore::new(db.pool().clone()).await.unwrap();
        let b = PostgresOrgStore::new(db.new_pool()).await.unwrap();
        let org = a.create("Acme ünïcode 'quoted'".to_owned()).await.unwrap();
        assert_eq!(
            b.name(org).await.unwrap().as_deref(),
            Some("Acme ünïcode 'quoted'")
        );
        assert_eq!(b.name(OrgId::new()).await.unwrap(), None);
        drop((a, b));
        let restarted = PostgresOrgStore::new(db.new_pool()).await.unwrap();
        assert!(restarted.name(org).await.unwrap().is_some());
        db.cleanup().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_creates_are_all_kept() {
        let Some(db) = TestDb::new().await else {
            return;
        };
        let store = Arc::new(PostgresOrgStore::new(db.pool().clone()).await.unwrap());
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { (i, store.create(format!("org {i}")).await.unwrap()) })
            })
            .collect();
        let mut ids = HashSet::new();
        for task in tasks {
            let (i, org) = task.await.unwrap();
            assert!(ids.insert(org));
            assert_eq!(store.name(org).await.unwrap(), Some(format!("org {i}")));
        }
        assert_eq!(ids.len(), 50);
        db.cleanup().await;
    }

    #[tokio::test]
    async fn an_unreachable_database_is_unavailable() {
        let err = PostgresOrgStore::connect(&unreachable_url())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Unavailable);
    }
}
