//! [`MemorySessionStore`]: models and sessions in process memory (tests, the demo gateway, a
//! single replica without a database).

use std::collections::HashMap;
use std::fmt;
use std::future::ready;
use std::sync::{PoisonError, RwLock};

use tollgate_core::{BackendError, BoxFuture, ModelId, OrgId};

use crate::session::{ModelRecord, ModelSession, ModelStatus, Session, SessionStore};

struct Entry {
    seq: u64,
    record: ModelRecord,
    session: Session,
    version: u64,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    // One counter for the whole store, so versions only grow, even across `insert`s that
    // replace a model with the same id.
    last_version: u64,
    models: HashMap<ModelId, Entry>,
}

impl State {
    fn next_version(&mut self) -> u64 {
        self.last_version += 1;
        self.last_version
    }
}

/// A [`SessionStore`] in memory. Every operation is atomic under one lock.
#[derive(Default)]
pub struct MemorySessionStore {
    state: RwLock<State>,
}

impl MemorySessionStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a connected model with a chosen id (demo seeding, tests). Replaces any model with
    /// that id.
    pub fn insert(
        &self,
        id: ModelId,
        org: OrgId,
        name: impl Into<String>,
        session: Session,
    ) -> ModelRecord {
        let record = ModelRecord {
            id,
            org,
            name: name.into(),
            status: ModelStatus::Connected,
            disconnected_at_ms: None,
        };
        let mut state = self.write();
        let seq = state.next_seq;
        state.next_seq += 1;
        let version = state.next_version();
        state.models.insert(
            id,
            Entry {
                seq,
                record: record.clone(),
                session,
                version,
            },
        );
        record
    }

    /// How many models the store holds.
    pub fn len(&self) -> usize {
        self.read().models.len()
    }

    /// Whether the store holds no model.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemorySessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the sessions.
        f.debug_struct("MemorySessionStore")
            .field("models", &self.len())
            .finish()
    }
}

impl SessionStore for MemorySessionStore {
    fn session(&self, model: ModelId) -> BoxFuture<Result<Option<ModelSession>, BackendError>> {
        let found = self.read().models.get(&model).map(|e| ModelSession {
            session: e.session.clone(),
            status: e.record.status,
            version: e.version,
        });
        Box::pin(ready(Ok(found)))
    }

    fn mark_disconnected(
        &self,
        model: ModelId,
        version: u64,
    ) -> BoxFuture<Result<bool, BackendError>> {
        let applied = match self.write().models.get_mut(&model) {
            Some(e) if e.version == version => {
                if e.record.status != ModelStatus::Disconnected {
                    e.record.status = ModelStatus::Disconnected;
                    e.record.disconnected_at_ms = Some(now_ms());
                }
                true
            }
            _ => false,
        };
        Box::pin(ready(Ok(applied)))
    }

    fn connect(
        &self,
        org: OrgId,
        name: String,
        session: Session,
    ) -> BoxFuture<Result<ModelRecord, BackendError>> {
        let record = self.insert(ModelId::new(), org, name, session);
        Box::pin(ready(Ok(record)))
    }

    fn reconnect(
        &self,
        model: ModelId,
        session: Session,
    ) -> BoxFuture<Result<Option<ModelRecord>, BackendError>> {
        let mut state = self.write();
        let version = state.next_version();
        let record = state.models.get_mut(&model).map(|e| {
            e.session = session;
            e.version = version;
            e.record.status = ModelStatus::Connected;
            e.record.clone()
        });
        Box::pin(ready(Ok(record)))
    }

    fn model(&self, model: ModelId) -> BoxFuture<Result<Option<ModelRecord>, BackendError>> {
        let record = self.read().models.get(&model).map(|e| e.record.clone());
        Box::pin(ready(Ok(record)))
    }

    fn list(&self, org: OrgId) -> BoxFuture<Result<Vec<ModelRecord>, BackendError>> {
        let state = self.read();
        let mut entries: Vec<&Entry> = state
            .models
            .values()
            .filter(|e| e.record.org == org)
            .collect();
        entries.sort_by_key(|e| e.seq);
        let list = entries.into_iter().map(|e| e.record.clone()).collect();
        Box::pin(ready(Ok(list)))
    }
}

/// The wall clock in ms since the epoch (when a model was disconnected).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
