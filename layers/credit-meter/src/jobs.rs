//! The periodic ledger job: renew due accounts and release expired holds.

use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::ledger::Ledger;

/// Runs forever: every `every`, renews accounts whose period is over
/// ([`Ledger::renew_due`]) and releases expired holds ([`Ledger::sweep_expired_holds`]).
/// Spawn it next to the server, e.g. `tokio::spawn(run_ledger_jobs(ledger.clone(),
/// Duration::from_secs(30)))`. Failures are logged and retried on the next tick.
pub async fn run_ledger_jobs<L: Ledger>(ledger: L, every: Duration) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match ledger.renew_due().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(accounts = n, "renewed billing periods"),
            Err(err) => tracing::error!(error = %err, "renewing billing periods failed"),
        }
        match ledger.sweep_expired_holds().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(holds = n, "released expired credit holds"),
            Err(err) => tracing::error!(error = %err, "sweeping expired credit holds failed"),
        }
    }
}
