//! Versioned migrations, safe when several replicas start at once.

use deadpool_postgres::{Object, Pool};
use refinery::Runner;
use tollgate_core::BackendError;

use crate::error::to_backend_error;
use crate::pool::check_identifier;

/// The first key of the advisory lock every migration run takes ("tg" + "mi" in ASCII).
/// The second key is a hash of the connection's schema, so runs in different schemas (test
/// schemas, separate installations) do not wait for each other while replicas sharing a
/// schema take turns.
pub const MIGRATION_LOCK_KEY: i32 = 0x7467_6d69;

/// Applies one crate's migration set (a refinery [`Runner`], e.g. the `runner()` of an
/// `embed_migrations!` module) on a connection of `pool`.
///
/// Each set keeps its own history table, `tollgate_<set_name>_migrations`, in the
/// connection's schema, so the layer crates migrate independently. The whole run holds a
/// session-level `pg_advisory_lock` on one connection: when several replicas start at once,
/// one applies the migrations and the others wait, then find nothing left to do. Each
/// migration runs in its own transaction together with its history row. The connection
/// used is closed afterwards (so the lock cannot outlive the run) and runs without a
/// statement timeout (an index build may take a while).
///
/// A migration that was changed after being applied, or an applied one missing from the
/// set, is an error: replicas of different versions must not silently disagree.
pub async fn run_migrations(
    pool: &Pool,
    set_name: &str,
    mut runner: Runner,
) -> Result<(), BackendError> {
    check_identifier(set_name)?;
    let table = format!("tollgate_{set_name}_migrations");
    check_identifier(&table)?;
    runner.set_migration_table_name(&table);

    let object = pool.get().await.map_err(to_backend_error)?;
    // Taken out of the pool: dropped at the end of this function, which closes the
    // session and with it any advisory lock it still holds.
    let mut client = Object::take(object);
    client
        .batch_execute("SET statement_timeout = 0")
        .await
        .map_err(to_backend_error)?;
    client
        .execute(
            "SELECT pg_advisory_lock($1, hashtext(coalesce(current_schema(), '')))",
            &[&MIGRATION_LOCK_KEY],
        )
        .await
        .map_err(to_backend_error)?;

    let result = runner.run_async(&mut *client).await;

    // Best effort: closing the connection releases the lock anyway.
    let _ = client
        .execute(
            "SELECT pg_advisory_unlock($1, hashtext(coalesce(current_schema(), '')))",
            &[&MIGRATION_LOCK_KEY],
        )
        .await;

    match result {
        Ok(report) => {
            for migration in report.applied_migrations() {
                tracing::info!(
                    set = set_name,
                    version = migration.version(),
                    name = migration.name(),
                    "applied migration"
                );
            }
            Ok(())
        }
        Err(err) => {
            tracing::error!(set = set_name, error = %err, "migrations failed");
            Err(to_backend_error(err))
        }
    }
}
