//! The three batched operations of the hot path — holds, commits, releases — each one call of
//! a `migrations/V3__group_commit.sql` function (as `V4__key_limits.sql` and
//! `V5__index_probes.sql` redefine them) per batch.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use deadpool_postgres::Pool;
use futures_util::future::BoxFuture;
use tokio_postgres::Row;
use tollgate_core::{BackendError, KeyId, OrgId, SharedClock};
use tollgate_postgres::to_backend_error;

use super::batch::{Answer, Op};
use super::releaser::Detached;
use super::sql::{col, from_sql, to_sql};
use crate::ledger::{CommitOutcome, Hold, HoldId, HoldOutcome, ReleaseOutcome};

pub(super) const HOLD_BATCH: &str = "SELECT idx, outcome, hold_id, available \
     FROM tollgate_credit_hold_batch($1, $2, $3, $4, $5, $6, $7, $8)";
pub(super) const COMMIT_BATCH: &str = "SELECT idx, outcome, balance, note, charged \
     FROM tollgate_credit_commit_batch($1, $2, $3, $4, $5)";
pub(super) const RELEASE_BATCH: &str = "SELECT idx, outcome, charged \
     FROM tollgate_credit_release_batch($1, $2, $3, $4, $5)";

/// Runs `sql` on a pooled connection; its rows sorted by their first column (`idx`, 1-based).
async fn rows(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Row>, BackendError> {
    let client = pool.get().await.map_err(to_backend_error)?;
    let stmt = client.prepare_cached(sql).await.map_err(to_backend_error)?;
    let mut rows = client
        .query(&stmt, params)
        .await
        .map_err(to_backend_error)?;
    // The functions return their rows in item order; sorting costs nothing if so.
    rows.sort_by_key(|r| r.try_get::<_, i32>(0).unwrap_or(i32::MAX));
    Ok(rows)
}

/// What the ops share: time, the hold TTL and the open-holds gauge.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) clock: SharedClock,
    pub(super) hold_ttl_ms: u64,
    pub(super) open_holds: Arc<AtomicI64>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}

/// A hold to place: `amount` ≤ [`MAX_CREDITS`](crate::MAX_CREDITS).
pub(super) struct HoldItem {
    pub(super) org: OrgId,
    pub(super) amount: u64,
    pub(super) request_id: Option<String>,
    /// The key the hold is for, and its limit (≤ `i64::MAX`).
    pub(super) key: Option<KeyId>,
    pub(super) key_limit: Option<u64>,
}

pub(super) struct HoldOp {
    pub(super) shared: Shared,
    /// Holds placed for requests that had gone by then are voided here.
    pub(super) orphans: Arc<Detached>,
}

impl Op for HoldOp {
    type Item = HoldItem;
    type Out = HoldOutcome;

    fn org(item: &HoldItem) -> OrgId {
        item.org
    }

    fn orphaned(&self, out: HoldOutcome) {
        if let HoldOutcome::Held(hold) = out {
            self.orphans.release(hold);
        }
    }

    fn run<'a>(
        &'a self,
        pool: &'a Pool,
        items: &'a [HoldItem],
        lock_timeout: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Answer<HoldOutcome>>, BackendError>> {
        Box::pin(async move {
            let now_ms = self.shared.now_ms();
            let now = to_sql(now_ms);
            let expires_at = to_sql(now_ms.saturating_add(self.shared.hold_ttl_ms));
            let orgs: Vec<uuid::Uuid> = items.iter().map(|i| *i.org.as_uuid()).collect();
            let amounts: Vec<i64> = items.iter().map(|i| to_sql(i.amount)).collect();
            let request_ids: Vec<Option<&str>> =
                items.iter().map(|i| i.request_id.as_deref()).collect();
            let keys: Vec<Option<uuid::Uuid>> =
                items.iter().map(|i| i.key.map(|k| *k.as_uuid())).collect();
            let limits: Vec<Option<i64>> = items.iter().map(|i| i.key_limit.map(to_sql)).collect();
            let rows = rows(
                pool,
                HOLD_BATCH,
                &[
                    &orgs,
                    &amounts,
                    &request_ids,
                    &keys,
                    &limits,
                    &now,
                    &expires_at,
                    &lock_timeout,
                ],
            )
            .await?;
            let mut held = 0;
            let answers = rows
                .iter()
                .zip(items)
                .map(|(row, item)| {
                    let outcome: &str = col(row, 1)?;
                    Ok(match outcome {
                        "held" => {
                            let id: i64 = col(row, 2)?;
                            held += 1;
                            Answer::Done(HoldOutcome::Held(Hold {
                                id: HoldId(from_sql(id)),
                                org: item.org,
                                amount: item.amount,
                            }))
                        }
                        "unlimited" => Answer::Done(HoldOutcome::Unlimited),
                        "no_subscription" => Answer::Done(HoldOutcome::NoSubscription),
                        "insufficient" => {
                            let available: i64 = col(row, 3)?;
                            Answer::Done(HoldOutcome::Insufficient {
                                available: from_sql(available),
                            })
                        }
                        "key_limit" => {
                            let available: i64 = col(row, 3)?;
                            Answer::Done(HoldOutcome::KeyLimit {
                                available: from_sql(available),
                            })
                        }
                        "busy" => Answer::Busy,
                        other => {
                            return Err(BackendError::other(format!(
                                "unexpected hold outcome {other:?}"
                            )))
                        }
                    })
                })
                .collect::<Result<Vec<_>, BackendError>>();
            self.shared.open_holds.fetch_add(held, Ordering::Relaxed);
            answers
        })
    }
}

/// A hold to commit (its id fits a `bigint`).
pub(super) struct CommitItem {
    pub(super) hold: Hold,
}

pub(super) struct CommitOp(pub(super) Shared);

impl Op for CommitOp {
    type Item = CommitItem;
    type Out = CommitOutcome;

    fn org(item: &CommitItem) -> OrgId {
        item.hold.org
    }

    fn key(item: &CommitItem) -> Option<u64> {
        Some(item.hold.id.0)
    }

    fn run<'a>(
        &'a self,
        pool: &'a Pool,
        items: &'a [CommitItem],
        lock_timeout: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Answer<CommitOutcome>>, BackendError>> {
        Box::pin(async move {
            let now_ms = self.0.now_ms();
            let now = to_sql(now_ms);
            // A committed hold is remembered for one TTL, so a lost answer can be resolved.
            let forget_at = to_sql(now_ms.saturating_add(self.0.hold_ttl_ms));
            let orgs: Vec<uuid::Uuid> = items.iter().map(|i| *i.hold.org.as_uuid()).collect();
            let ids: Vec<i64> = items.iter().map(|i| to_sql(i.hold.id.0)).collect();
            let rows = rows(
                pool,
                COMMIT_BATCH,
                &[&orgs, &ids, &now, &forget_at, &lock_timeout],
            )
            .await?;
            let mut settled = 0;
            let answers = rows
                .iter()
                .zip(items)
                .map(|(row, item)| {
                    let hold = &item.hold;
                    let outcome: &str = col(row, 1)?;
                    let note: Option<&str> = col(row, 3)?;
                    let charged: i64 = col(row, 4)?;
                    // An open hold was settled here (a swept one left the gauge when it was
                    // swept).
                    if matches!(outcome, "charged" | "unlimited") && note != Some("swept") {
                        settled += 1;
                    }
                    Ok(match outcome {
                        "charged" => {
                            let balance: i64 = col(row, 2)?;
                            match note {
                                Some("lowered") => tracing::warn!(
                                    org = %hold.org,
                                    hold = %hold.id,
                                    amount = hold.amount,
                                    charged,
                                    balance,
                                    "the balance was lowered while the hold was open; charged what was left"
                                ),
                                Some("swept") => tracing::warn!(
                                    org = %hold.org,
                                    hold = %hold.id,
                                    "committing a hold that had expired and was released; charged after re-checking the balance"
                                ),
                                _ => {}
                            }
                            Answer::Done(CommitOutcome::Charged {
                                charged: from_sql(charged),
                                balance: Some(from_sql(balance)),
                            })
                        }
                        "unlimited" => Answer::Done(CommitOutcome::Charged {
                            charged: 0,
                            balance: None,
                        }),
                        "expired" => Answer::Done(CommitOutcome::Expired),
                        "unknown" => Answer::Done(CommitOutcome::Unknown),
                        "busy" => Answer::Busy,
                        other => {
                            return Err(BackendError::other(format!(
                                "unexpected commit outcome {other:?}"
                            )))
                        }
                    })
                })
                .collect::<Result<Vec<_>, BackendError>>();
            self.0.open_holds.fetch_sub(settled, Ordering::Relaxed);
            answers
        })
    }
}

/// A hold to release (its id fits a `bigint`); with `refund`, a committed one is refunded.
pub(super) struct ReleaseItem {
    pub(super) hold: Hold,
    pub(super) refund: bool,
}

pub(super) struct ReleaseOp(pub(super) Shared);

impl Op for ReleaseOp {
    type Item = ReleaseItem;
    type Out = ReleaseOutcome;

    fn org(item: &ReleaseItem) -> OrgId {
        item.hold.org
    }

    fn key(item: &ReleaseItem) -> Option<u64> {
        Some(item.hold.id.0)
    }

    fn run<'a>(
        &'a self,
        pool: &'a Pool,
        items: &'a [ReleaseItem],
        lock_timeout: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Answer<ReleaseOutcome>>, BackendError>> {
        Box::pin(async move {
            let now = to_sql(self.0.now_ms());
            let orgs: Vec<uuid::Uuid> = items.iter().map(|i| *i.hold.org.as_uuid()).collect();
            let ids: Vec<i64> = items.iter().map(|i| to_sql(i.hold.id.0)).collect();
            let refunds: Vec<bool> = items.iter().map(|i| i.refund).collect();
            let rows = rows(
                pool,
                RELEASE_BATCH,
                &[&orgs, &ids, &refunds, &now, &lock_timeout],
            )
            .await?;
            let mut released = 0;
            let answers = rows
                .iter()
                .zip(items)
                .map(|(row, item)| {
                    let outcome: &str = col(row, 1)?;
                    let charged: i64 = col(row, 2)?;
                    Ok(match outcome {
                        "released" => {
                            released += 1;
                            Answer::Done(ReleaseOutcome::Released)
                        }
                        "swept" => Answer::Done(ReleaseOutcome::Swept),
                        "committed" => Answer::Done(ReleaseOutcome::Committed {
                            charged: from_sql(charged),
                        }),
                        "refunded" => {
                            tracing::warn!(
                                org = %item.hold.org,
                                hold = %item.hold.id,
                                charged,
                                "a credit hold whose response was withheld had been charged; refunded"
                            );
                            Answer::Done(ReleaseOutcome::Committed {
                                charged: from_sql(charged),
                            })
                        }
                        "gone" => Answer::Done(ReleaseOutcome::Gone),
                        "busy" => Answer::Busy,
                        other => {
                            return Err(BackendError::other(format!(
                                "unexpected release outcome {other:?}"
                            )))
                        }
                    })
                })
                .collect::<Result<Vec<_>, BackendError>>();
            self.0.open_holds.fetch_sub(released, Ordering::Relaxed);
            answers
        })
    }
}
