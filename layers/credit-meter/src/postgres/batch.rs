//! Group commit: the ledger's hot path (holds, commits, releases) sent in batches.
//!
//! A request's ledger call joins a queue instead of taking a connection. A queue runs at most
//! a few batches at once (each one statement, on one pooled connection, in one transaction);
//! whatever arrives while they run waits, and goes — all of it, up to [`BatchConfig::max`]
//! items — in the next batch as soon as one finishes. So an idle ledger answers a lone
//! request at once, and a busy one sends one statement (and shares one WAL flush) for
//! everything that arrived during the previous statement: the tick adapts to the load and is
//! never longer than one statement.
//!
//! Every item gets its own answer: the statement decides the items one by one, in arrival
//! order per org (see `migrations/V3__group_commit.sql`).
//!
//! **Per-org isolation.** Batches are shared by every org, so one org whose account row is
//! locked (a long transaction elsewhere) must not hold up the others: in a shared batch each
//! org waits for its row at most [`BatchConfig::lock_timeout`], and an org that could not get
//! it comes back `busy` (nothing done). Such an org is then *isolated*: its items go to a
//! queue of its own, whose batches wait for the row as long as the statement may (the pool's
//! `statement_timeout`), at most [`BatchConfig::org_in_flight`] at a time, and fail like any
//! statement — they never delay another org. The first batch of that org that goes through
//! returns it to the shared queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use tollgate_core::{BackendError, BackendErrorKind, OrgId};

/// How batches are formed.
#[derive(Debug, Clone, Copy)]
pub(super) struct BatchConfig {
    /// Most items in one statement.
    pub(super) max: usize,
    /// Batches of the shared queue in flight at once (per kind of operation).
    pub(super) shared_in_flight: usize,
    /// Batches of one isolated org in flight at once (per kind of operation).
    pub(super) org_in_flight: usize,
    /// How long a shared batch waits for one org's account row before answering its items
    /// `busy`.
    pub(super) lock_timeout: Duration,
}

/// The answer the statement gave one item.
pub(super) enum Answer<T> {
    Done(T),
    /// The item's org row was locked past the lock timeout: nothing was done.
    Busy,
}

/// One kind of batched operation: how to run a batch of its items in one statement.
pub(super) trait Op: Send + Sync + 'static {
    type Item: Send + 'static;
    type Out: Send + 'static;

    fn org(item: &Self::Item) -> OrgId;

    /// A key that must appear at most once per batch (a hold id), if any.
    fn key(_item: &Self::Item) -> Option<u64> {
        None
    }

    /// What to do with an answer whose caller has gone (its future was dropped while the
    /// batch ran): whatever it took must be given back, as nobody will settle it.
    fn orphaned(&self, _out: Self::Out) {}

    /// Runs `items` in one statement; one answer per item, in order. `lock_timeout`: a
    /// PostgreSQL `lock_timeout` value (`"0"`: as long as the statement may).
    fn run<'a>(
        &'a self,
        pool: &'a Pool,
        items: &'a [Self::Item],
        lock_timeout: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Answer<Self::Out>>, BackendError>>;
}

struct Waiter<O: Op> {
    item: O::Item,
    tx: oneshot::Sender<Result<O::Out, BackendError>>,
}

struct Queue<O: Op> {
    pending: VecDeque<Waiter<O>>,
    in_flight: usize,
}

impl<O: Op> Default for Queue<O> {
    fn default() -> Self {
        Queue {
            pending: VecDeque::new(),
            in_flight: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    Shared,
    Org(OrgId),
}

/// Orgs whose account row was found locked: their operations run in batches of their own.
/// Shared by the batchers of every kind of operation.
#[derive(Default)]
pub(super) struct Isolated(Mutex<HashSet<OrgId>>);

impl Isolated {
    fn contains(&self, org: OrgId) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&org)
    }

    fn insert(&self, org: OrgId) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(org)
    }

    fn remove(&self, org: OrgId) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&org);
    }
}

/// The queues of one kind of operation.
pub(super) struct Batcher<O: Op> {
    op: O,
    pool: Pool,
    config: BatchConfig,
    isolated: Arc<Isolated>,
    shared_lock_timeout: String,
    shared: Mutex<Queue<O>>,
    orgs: Mutex<HashMap<OrgId, Queue<O>>>,
}

impl<O: Op> Batcher<O> {
    pub(super) fn new(op: O, pool: Pool, config: BatchConfig, isolated: Arc<Isolated>) -> Self {
        // At least 1 ms ("0" would mean no limit).
        let ms = config.lock_timeout.as_millis().max(1);
        Batcher {
            op,
            pool,
            config,
            isolated,
            shared_lock_timeout: format!("{ms}ms"),
            shared: Mutex::new(Queue::default()),
            orgs: Mutex::new(HashMap::new()),
        }
    }

    /// Queues `item` for the next batch and waits for its answer.
    pub(super) async fn submit(self: &Arc<Self>, item: O::Item) -> Result<O::Out, BackendError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Waiter { item, tx });
        rx.await
            .map_err(|_| BackendError::other("the ledger's batch was abandoned"))?
    }

    fn enqueue(self: &Arc<Self>, waiter: Waiter<O>) {
        let org = O::org(&waiter.item);
        if self.isolated.contains(org) {
            let mut orgs = self.orgs.lock().unwrap_or_else(PoisonError::into_inner);
            let queue = orgs.entry(org).or_default();
            queue.pending.push_back(waiter);
            self.start(Lane::Org(org), queue);
        } else {
            let mut queue = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            queue.pending.push_back(waiter);
            self.start(Lane::Shared, &mut queue);
        }
    }

    fn cap(&self, lane: Lane) -> usize {
        match lane {
            Lane::Shared => self.config.shared_in_flight,
            Lane::Org(_) => self.config.org_in_flight,
        }
    }

    /// Starts a batch of `queue` (under its lock) if it has items and room for one.
    fn start(self: &Arc<Self>, lane: Lane, queue: &mut Queue<O>) {
        if queue.pending.is_empty() || queue.in_flight >= self.cap(lane) {
            return;
        }
        let batch = self.take(queue);
        queue.in_flight += 1;
        let this = Arc::clone(self);
        tokio::spawn(async move { this.flush(lane, batch).await });
    }

    /// The next batch: the oldest items, up to the maximum, each key at most once (a
    /// repeated key waits for the next batch, in its place).
    fn take(&self, queue: &mut Queue<O>) -> Vec<Waiter<O>> {
        let mut keys = HashSet::new();
        let mut batch = Vec::with_capacity(queue.pending.len().min(self.config.max));
        let mut deferred = Vec::new();
        while batch.len() < self.config.max {
            let Some(w) = queue.pending.pop_front() else {
                break;
            };
            match O::key(&w.item) {
                Some(key) if !keys.insert(key) => deferred.push(w),
                _ => batch.push(w),
            }
        }
        for w in deferred.into_iter().rev() {
            queue.pending.push_front(w);
        }
        batch
    }

    async fn flush(self: Arc<Self>, lane: Lane, mut batch: Vec<Waiter<O>>) {
        loop {
            self.run(lane, batch).await;
            // The next batch of this queue, or this one's slot given back.
            let next = match lane {
                Lane::Shared => {
                    let mut queue = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
                    self.next(&mut queue)
                }
                Lane::Org(org) => {
                    let mut orgs = self.orgs.lock().unwrap_or_else(PoisonError::into_inner);
                    let Some(queue) = orgs.get_mut(&org) else {
                        return;
                    };
                    let next = self.next(queue);
                    if queue.in_flight == 0 && queue.pending.is_empty() {
                        orgs.remove(&org);
                    }
                    next
                }
            };
            match next {
                Some(b) => batch = b,
                None => return,
            }
        }
    }

    fn next(&self, queue: &mut Queue<O>) -> Option<Vec<Waiter<O>>> {
        if queue.pending.is_empty() {
            queue.in_flight -= 1;
            None
        } else {
            Some(self.take(queue))
        }
    }

    async fn run(self: &Arc<Self>, lane: Lane, batch: Vec<Waiter<O>>) {
        let (items, txs): (Vec<O::Item>, Vec<_>) =
            batch.into_iter().map(|w| (w.item, w.tx)).unzip();
        let lock_timeout = match lane {
            Lane::Shared => self.shared_lock_timeout.as_str(),
            Lane::Org(_) => "0",
        };
        let answers = match self.op.run(&self.pool, &items, lock_timeout).await {
            Ok(answers) if answers.len() == items.len() => answers,
            Ok(answers) => {
                let err = format!(
                    "the ledger answered {} of {} batched operations",
                    answers.len(),
                    items.len()
                );
                for tx in txs {
                    let _ = tx.send(Err(BackendError::other(err.clone())));
                }
                return;
            }
            Err(err) => {
                let kind = err.kind();
                let message = err.to_string();
                for tx in txs {
                    let _ = tx.send(Err(copy_error(kind, &message)));
                }
                return;
            }
        };
        if let Lane::Org(org) = lane {
            // Its row could be had: back to the shared batches.
            self.isolated.remove(org);
        }
        for ((item, tx), answer) in items.into_iter().zip(txs).zip(answers) {
            match answer {
                Answer::Done(out) => {
                    if let Err(Ok(out)) = tx.send(Ok(out)) {
                        self.op.orphaned(out);
                    }
                }
                Answer::Busy => {
                    let org = O::org(&item);
                    if self.isolated.insert(org) {
                        tracing::warn!(
                            org = %org,
                            "the organization's credit account row stayed locked; its ledger \
                             operations run in batches of their own until it is free"
                        );
                    }
                    self.enqueue(Waiter { item, tx });
                }
            }
        }
    }
}

/// The same failure again, for each waiter of a failed batch.
fn copy_error(kind: BackendErrorKind, message: &str) -> BackendError {
    match kind {
        BackendErrorKind::Unavailable => BackendError::unavailable(message.to_owned()),
        BackendErrorKind::Other => BackendError::other(message.to_owned()),
    }
}
