//! [`RulesSigner`]: signs locally with [`DynamicRules`], which can be replaced at run time by
//! hand ([`RulesSigner::replace`]) or by a watcher that re-reads a rules file
//! ([`RulesSigner::watch`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use sha1::{Digest, Sha1};
use tokio::task::JoinHandle;
use tollgate_core::{BoxFuture, SharedClock, SystemClock};

use crate::rules::{DynamicRules, RulesError, Signature};
use crate::signer::{SignError, Signer};

/// How often [`RulesSigner::watch`] looks at the rules file by default (docs/contract.md §8 asks for a
/// change to be picked up within 5 s).
pub const DEFAULT_RULES_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A rules file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RulesFileError {
    /// The file could not be read.
    #[error("cannot read rules file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold valid rules.
    #[error("invalid rules file {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: RulesError,
    },
}

fn read_rules(path: &Path) -> Result<(DynamicRules, [u8; 20]), RulesFileError> {
    let bytes = std::fs::read(path).map_err(|source| RulesFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let digest: [u8; 20] = Sha1::digest(&bytes).into();
    let text = String::from_utf8_lossy(&bytes);
    let rules = DynamicRules::from_json(&text).map_err(|source| RulesFileError::Invalid {
        path: path.to_owned(),
        source,
    })?;
    Ok((rules, digest))
}

struct Current {
    rules: RwLock<Arc<DynamicRules>>,
    generation: AtomicU64,
}

/// Signs with local [`DynamicRules`], taking the time from a clock.
///
/// Clones share the rules: a [`replace`](Self::replace) or a watcher reload is seen by every
/// clone. A signature is computed with the rules current when `sign` is called; requests
/// already signed are not affected by a later rotation.
#[derive(Clone)]
pub struct RulesSigner {
    current: Arc<Current>,
    clock: SharedClock,
}

impl RulesSigner {
    /// A signer with fixed (but replaceable) rules and the system clock.
    pub fn new(rules: DynamicRules) -> Self {
        RulesSigner {
            current: Arc::new(Current {
                rules: RwLock::new(Arc::new(rules)),
                generation: AtomicU64::new(0),
            }),
            clock: SystemClock::shared(),
        }
    }

    /// A signer with the rules of a JSON file (read once; see [`watch`](Self::watch) to
    /// follow changes).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, RulesFileError> {
        let (rules, _) = read_rules(path.as_ref())?;
        Ok(RulesSigner::new(rules))
    }

    /// Loads the rules file and starts a watcher that re-reads it every `poll_interval`
    /// (see [`spawn_watcher`](Self::spawn_watcher)). Must be called inside a tokio runtime.
    pub fn watch(
        path: impl AsRef<Path>,
        poll_interval: Duration,
    ) -> Result<(RulesSigner, RulesWatcher), RulesFileError> {
        let path = path.as_ref().to_owned();
        let (rules, digest) = read_rules(&path)?;
        let signer = RulesSigner::new(rules);
        let watcher = signer.spawn_watcher_from(path, poll_interval, Some(digest));
        Ok((signer, watcher))
    }

    /// Uses `clock` for the `time` of each signature.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Replaces the rules (programmatic rotation). Signatures made from now on use them.
    pub fn replace(&self, rules: DynamicRules) {
        let rules = Arc::new(rules);
        *self
            .current
            .rules
            .write()
            .unwrap_or_else(PoisonError::into_inner) = rules;
        self.current.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The rules in force.
    pub fn current(&self) -> Arc<DynamicRules> {
        self.current
            .rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many times the rules were replaced since the signer was created.
    pub fn generation(&self) -> u64 {
        self.current.generation.load(Ordering::SeqCst)
    }

    /// Signs now, synchronously.
    pub fn sign_now(&self, path_and_query: &str, user_id: &str) -> Signature {
        self.current()
            .sign_at(path_and_query, user_id, self.clock.now_ms())
    }

    /// Starts a background task that re-reads `path` every `poll_interval` and replaces the
    /// rules when the file's content changed and parses. A missing, unreadable or invalid file
    /// is logged (`tracing::warn!`, once per distinct content) and the last good rules stay.
    /// Must be called inside a tokio runtime. The task stops when the [`RulesWatcher`] is
    /// dropped or stopped.
    pub fn spawn_watcher(&self, path: impl AsRef<Path>, poll_interval: Duration) -> RulesWatcher {
        self.spawn_watcher_from(path.as_ref().to_owned(), poll_interval, None)
    }

    fn spawn_watcher_from(
        &self,
        path: PathBuf,
        poll_interval: Duration,
        loaded: Option<[u8; 20]>,
    ) -> RulesWatcher {
        let signer = self.clone();
        let poll_interval = poll_interval.max(Duration::from_millis(1));
        let task_path = path.clone();
        let task = tokio::spawn(async move {
            let path = task_path;
            // The content last seen, good or bad: a reload or a warning happens once per
            // distinct content, not on every poll.
            let mut seen: Option<Result<[u8; 20], String>> = loaded.map(Ok);
            let mut ticker = tokio::time::interval(poll_interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let read_path = path.clone();
                let read = tokio::task::spawn_blocking(move || {
                    std::fs::read(&read_path).map(|bytes| {
                        let digest: [u8; 20] = Sha1::digest(&bytes).into();
                        (bytes, digest)
                    })
                })
                .await;
                let (bytes, digest) = match read {
                    Ok(Ok(read)) => read,
                    Ok(Err(e)) => {
                        let key = Err(e.kind().to_string());
                        if seen.as_ref() != Some(&key) {
                            tracing::warn!(path = %path.display(), error = %e,
                                "cannot read the signing rules file; keeping the last good rules");
                            seen = Some(key);
                        }
                        continue;
                    }
                    // The blocking pool is shutting down with the runtime.
                    Err(_) => return,
                };
                if seen.as_ref() == Some(&Ok(digest)) {
                    continue;
                }
                seen = Some(Ok(digest));
                match DynamicRules::from_json(&String::from_utf8_lossy(&bytes)) {
                    Ok(rules) => {
                        tracing::info!(path = %path.display(), revision = rules.revision(),
                            "signing rules reloaded");
                        signer.replace(rules);
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e,
                            "invalid signing rules file; keeping the last good rules");
                    }
                }
            }
        });
        RulesWatcher {
            task: Some(task),
            path,
        }
    }
}

impl Signer for RulesSigner {
    fn sign(&self, path_and_query: &str, user_id: &str) -> BoxFuture<Result<Signature, SignError>> {
        Box::pin(std::future::ready(Ok(
            self.sign_now(path_and_query, user_id)
        )))
    }
}

impl fmt::Debug for RulesSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules = self.current();
        f.debug_struct("RulesSigner")
            .field("revision", &rules.revision())
            .field("app_token", &rules.app_token())
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

/// The background task that follows a rules file. Dropping it stops the task.
#[derive(Debug)]
pub struct RulesWatcher {
    task: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl RulesWatcher {
    /// The file being watched.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops watching (the rules in force stay).
    pub fn stop(self) {
        // Drop aborts the task.
    }

    /// Keeps the watcher running for the life of the runtime (the task is detached).
    pub fn detach(mut self) {
        // Dropping a `JoinHandle` detaches its task.
        self.task.take();
    }

    /// Whether the watcher task is still running.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for RulesWatcher {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
