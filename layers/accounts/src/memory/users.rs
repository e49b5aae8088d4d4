//! [`MemoryUserStore`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tollgate_core::{BackendError, BoxFuture, OrgId, SharedClock};

use super::ready;
use crate::token::TokenHash;
use crate::user::{User, UserId};
use crate::users::{
    Credentials, InviteOutcome, NewInvite, SignInGate, UserStore, INVITE_TTL, MAX_SIGN_IN_FAILURES,
    SIGN_IN_WINDOW,
};

/// A [`UserStore`] in memory. Cloning shares the users.
#[derive(Clone)]
pub struct MemoryUserStore {
    inner: Arc<Mutex<State>>,
    clock: SharedClock,
}

#[derive(Default)]
struct State {
    users: HashMap<UserId, Stored>,
    by_email: HashMap<String, UserId>,
    invites: HashMap<TokenHash, Invite>,
    /// Throttle key hash → (window start, attempts counted).
    attempts: HashMap<TokenHash, (u64, u32)>,
}

struct Stored {
    user: User,
    password_hash: Option<String>,
}

struct Invite {
    user: UserId,
    expires_ms: u64,
    used: bool,
}

impl fmt::Debug for MemoryUserStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryUserStore")
            .field("users", &self.lock().users.len())
            .finish()
    }
}

impl MemoryUserStore {
    /// An empty store on `clock`.
    pub fn new(clock: SharedClock) -> Self {
        MemoryUserStore {
            inner: Arc::default(),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }
}

const WINDOW_MS: u64 = SIGN_IN_WINDOW.as_millis() as u64;

impl UserStore for MemoryUserStore {
    fn invite(&self, invite: NewInvite) -> BoxFuture<Result<InviteOutcome, BackendError>> {
        let now = self.now();
        let mut state = self.lock();
        if state.by_email.contains_key(&invite.email) {
            return ready(Ok(InviteOutcome::EmailTaken));
        }
        let user = User {
            id: UserId::new(),
            org: invite.org,
            email: invite.email.clone(),
            role: invite.role,
            created_at_ms: now,
            active: false,
        };
        state.by_email.insert(invite.email, user.id);
        state.invites.insert(
            invite.token,
            Invite {
                user: user.id,
                expires_ms: now + INVITE_TTL.as_millis() as u64,
                used: false,
            },
        );
        state.users.insert(
            user.id,
            Stored {
                user: user.clone(),
                password_hash: None,
            },
        );
        ready(Ok(InviteOutcome::Invited(user)))
    }

    fn users(&self, org: OrgId) -> BoxFuture<Result<Vec<User>, BackendError>> {
        let mut users: Vec<User> = self
            .lock()
            .users
            .values()
            .filter(|s| s.user.org == org)
            .map(|s| s.user.clone())
            .collect();
        users.sort_by_key(|u| (u.created_at_ms, u.id));
        ready(Ok(users))
    }

    fn user(&self, id: UserId) -> BoxFuture<Result<Option<User>, BackendError>> {
        ready(Ok(self.lock().users.get(&id).map(|s| s.user.clone())))
    }

    fn delete_user(&self, id: UserId) -> BoxFuture<Result<Option<User>, BackendError>> {
        let mut state = self.lock();
        let Some(stored) = state.users.remove(&id) else {
            return ready(Ok(None));
        };
        state.by_email.remove(&stored.user.email);
        state.invites.retain(|_, i| i.user != id);
        ready(Ok(Some(stored.user)))
    }

    fn pending_invite(&self, token: TokenHash) -> BoxFuture<Result<Option<User>, BackendError>> {
        let now = self.now();
        let state = self.lock();
        let user = state
            .invites
            .get(&token)
            .filter(|i| !i.used && i.expires_ms > now)
            .and_then(|i| state.users.get(&i.user))
            .map(|s| s.user.clone());
        ready(Ok(user))
    }

    fn accept_invite(
        &self,
        token: TokenHash,
        password_hash: String,
    ) -> BoxFuture<Result<Option<User>, BackendError>> {
        let now = self.now();
        let mut state = self.lock();
        let Some(invite) = state
            .invites
            .get_mut(&token)
            .filter(|i| !i.used && i.expires_ms > now)
        else {
            return ready(Ok(None));
        };
        invite.used = true;
        let id = invite.user;
        let user = state.users.get_mut(&id).map(|s| {
            s.password_hash = Some(password_hash);
            s.user.active = true;
            s.user.clone()
        });
        ready(Ok(user))
    }

    fn credentials(&self, email: String) -> BoxFuture<Result<Option<Credentials>, BackendError>> {
        let state = self.lock();
        let found = state
            .by_email
            .get(&email)
            .and_then(|id| state.users.get(id))
            .map(|s| Credentials {
                user: s.user.clone(),
                password_hash: s.password_hash.clone(),
            });
        ready(Ok(found))
    }

    fn set_password(
        &self,
        id: UserId,
        password_hash: String,
    ) -> BoxFuture<Result<bool, BackendError>> {
        let mut state = self.lock();
        let found = state.users.get_mut(&id).map(|s| {
            s.password_hash = Some(password_hash);
            s.user.active = true;
        });
        ready(Ok(found.is_some()))
    }

    fn sign_in_attempt(&self, key: String) -> BoxFuture<Result<SignInGate, BackendError>> {
        let now = self.now();
        let mut state = self.lock();
        let entry = state
            .attempts
            .entry(TokenHash::of(key.as_bytes()))
            .or_insert((now, 0));
        if entry.0 + WINDOW_MS <= now {
            *entry = (now, 0);
        }
        if entry.1 >= MAX_SIGN_IN_FAILURES {
            return ready(Ok(SignInGate::Throttled {
                until_ms: entry.0 + WINDOW_MS,
            }));
        }
        entry.1 += 1;
        ready(Ok(SignInGate::Allowed))
    }

    fn sign_in_succeeded(&self, key: String) -> BoxFuture<Result<(), BackendError>> {
        self.lock().attempts.remove(&TokenHash::of(key.as_bytes()));
        ready(Ok(()))
    }

    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>> {
        let now = self.now();
        let mut state = self.lock();
        let before = state.invites.len() + state.attempts.len();
        state.invites.retain(|_, i| !i.used && i.expires_ms > now);
        state
            .attempts
            .retain(|_, (start, _)| *start + WINDOW_MS > now);
        let after = state.invites.len() + state.attempts.len();
        ready(Ok((before - after) as u64))
    }
}
