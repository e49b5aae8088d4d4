//! Faults the sandbox can be told to inject into its next answers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;

/// What a faulty answer looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultMode {
    /// Answer with this status (a 5xx such as 500 or 503) and an upstream error body.
    Fail(StatusCode),
    /// Wait this long, then answer normally.
    Stall(Duration),
    /// 429 with `Retry-After: <secs>`.
    Throttle {
        /// The `Retry-After` seconds.
        retry_after_secs: u64,
    },
    /// 200 with a `text/html` page instead of JSON.
    NonJson,
    /// The normal answer, but the body stream sends part of the data and then breaks.
    CutBody,
    /// 400 code 101 with an `otpState` payload: the account must pass a two-factor check.
    TwoFactor,
}

impl FaultMode {
    /// The name used by the HTTP control endpoint (`POST /_sandbox/fault {"mode": …}`).
    pub fn name(&self) -> &'static str {
        match self {
            FaultMode::Fail(_) => "fail",
            FaultMode::Stall(_) => "stall",
            FaultMode::Throttle { .. } => "throttle",
            FaultMode::NonJson => "non_json",
            FaultMode::CutBody => "cut_body",
            FaultMode::TwoFactor => "two_factor",
        }
    }
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultScope {
    /// Requests of any account.
    Global,
    /// Requests of the account with this user id.
    Account(String),
}

/// A fault for the next `count` requests in `scope` that pass verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// What the answers look like.
    pub mode: FaultMode,
    /// Whose requests get it.
    pub scope: FaultScope,
    /// How many requests get it.
    pub count: u32,
}

impl Fault {
    /// A global fault for the next request.
    pub fn new(mode: FaultMode) -> Self {
        Fault {
            mode,
            scope: FaultScope::Global,
            count: 1,
        }
    }

    /// Answers with `status` (e.g. 500 or 503).
    pub fn fail(status: StatusCode) -> Self {
        Self::new(FaultMode::Fail(status))
    }

    /// Waits `duration` before answering.
    pub fn stall(duration: Duration) -> Self {
        Self::new(FaultMode::Stall(duration))
    }

    /// 429 with `Retry-After: 30`.
    pub fn throttle() -> Self {
        Self::new(FaultMode::Throttle {
            retry_after_secs: 30,
        })
    }

    /// 200 `text/html`.
    pub fn non_json() -> Self {
        Self::new(FaultMode::NonJson)
    }

    /// A 200 JSON answer whose body breaks mid-stream.
    pub fn cut_body() -> Self {
        Self::new(FaultMode::CutBody)
    }

    /// 400 code 101 with an `otpState` payload.
    pub fn two_factor() -> Self {
        Self::new(FaultMode::TwoFactor)
    }

    /// Applies to the next `count` requests instead of one.
    pub fn times(mut self, count: u32) -> Self {
        self.count = count;
        self
    }

    /// Applies only to requests of the account `user_id`.
    pub fn for_account(mut self, user_id: impl Into<String>) -> Self {
        self.scope = FaultScope::Account(user_id.into());
        self
    }

    fn applies_to(&self, user_id: &str) -> bool {
        match &self.scope {
            FaultScope::Global => true,
            FaultScope::Account(id) => id == user_id,
        }
    }
}

/// The queued faults, used in injection order.
#[derive(Debug, Default)]
pub(crate) struct FaultQueue {
    queue: Mutex<VecDeque<Fault>>,
    // Lets requests skip the lock when nothing is queued (the common case under load).
    len: AtomicUsize,
}

impl FaultQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Fault>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn push(&self, fault: Fault) {
        if fault.count == 0 {
            return;
        }
        let mut queue = self.lock();
        queue.push_back(fault);
        self.len.store(queue.len(), Ordering::Release);
    }

    /// Takes one use of the first fault that applies to `user_id`.
    pub(crate) fn take(&self, user_id: &str) -> Option<FaultMode> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut queue = self.lock();
        let at = queue.iter().position(|f| f.applies_to(user_id))?;
        let fault = &mut queue[at];
        fault.count -= 1;
        let mode = fault.mode.clone();
        if fault.count == 0 {
            queue.remove(at);
            self.len.store(queue.len(), Ordering::Release);
        }
        Some(mode)
    }

    pub(crate) fn clear(&self) -> usize {
        let mut queue = self.lock();
        let n = queue.len();
        queue.clear();
        self.len.store(0, Ordering::Release);
        n
    }

    pub(crate) fn snapshot(&self) -> Vec<Fault> {
        self.lock().iter().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_used_in_order_within_their_scope() {
        let q = FaultQueue::default();
        q.push(Fault::throttle().for_account("1").times(2));
        q.push(Fault::non_json());
        q.push(Fault::cut_body().times(0)); // nothing to do
        assert_eq!(q.len(), 2);
        assert_eq!(q.take("2"), Some(FaultMode::NonJson));
        assert_eq!(q.take("2"), None);
        let throttle = FaultMode::Throttle {
            retry_after_secs: 30,
        };
        assert_eq!(q.take("1"), Some(throttle.clone()));
        assert_eq!(q.snapshot()[0].count, 1);
        assert_eq!(q.take("1"), Some(throttle));
        assert_eq!(q.take("1"), None);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn clear_reports_what_was_pending() {
        let q = FaultQueue::default();
        q.push(Fault::two_factor().times(3));
        q.push(Fault::fail(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(q.clear(), 2);
        assert_eq!(q.take("1"), None);
    }
}
