//! [`MemoryDashboardSessionStore`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tollgate_core::{BackendError, BoxFuture, SharedClock};

use super::ready;
use crate::sessions::{is_live, DashboardSession, DashboardSessionStore, SessionSubject};
use crate::token::TokenHash;
use crate::user::UserId;

/// A [`DashboardSessionStore`] in memory. Cloning shares the sessions.
#[derive(Clone)]
pub struct MemoryDashboardSessionStore {
    sessions: Arc<Mutex<HashMap<TokenHash, DashboardSession>>>,
    clock: SharedClock,
}

impl fmt::Debug for MemoryDashboardSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDashboardSessionStore")
            .field("sessions", &self.lock().len())
            .finish()
    }
}

impl MemoryDashboardSessionStore {
    /// An empty store on `clock`.
    pub fn new(clock: SharedClock) -> Self {
        MemoryDashboardSessionStore {
            sessions: Arc::default(),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<TokenHash, DashboardSession>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl DashboardSessionStore for MemoryDashboardSessionStore {
    fn create(
        &self,
        token: TokenHash,
        subject: SessionSubject,
    ) -> BoxFuture<Result<DashboardSession, BackendError>> {
        let now = self.clock.now_ms();
        let session = DashboardSession {
            subject,
            created_at_ms: now,
            last_seen_ms: now,
        };
        self.lock().insert(token, session);
        ready(Ok(session))
    }

    fn touch(&self, token: TokenHash) -> BoxFuture<Result<Option<DashboardSession>, BackendError>> {
        let now = self.clock.now_ms();
        let mut sessions = self.lock();
        let live = sessions
            .get_mut(&token)
            .filter(|s| is_live(s.created_at_ms, s.last_seen_ms, now))
            .map(|s| {
                s.last_seen_ms = s.last_seen_ms.max(now);
                *s
            });
        ready(Ok(live))
    }

    fn revoke(&self, token: TokenHash) -> BoxFuture<Result<bool, BackendError>> {
        ready(Ok(self.lock().remove(&token).is_some()))
    }

    fn revoke_user(&self, user: UserId) -> BoxFuture<Result<u64, BackendError>> {
        let mut sessions = self.lock();
        let before = sessions.len();
        sessions.retain(|_, s| s.subject != SessionSubject::User(user));
        ready(Ok((before - sessions.len()) as u64))
    }

    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>> {
        let now = self.clock.now_ms();
        let mut sessions = self.lock();
        let before = sessions.len();
        sessions.retain(|_, s| is_live(s.created_at_ms, s.last_seen_ms, now));
        ready(Ok((before - sessions.len()) as u64))
    }
}
