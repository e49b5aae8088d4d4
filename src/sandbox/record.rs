//! Request counters and the record of recent requests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

/// One request as the sandbox received it, and the status it answered.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request method.
    pub method: Method,
    /// The path and query exactly as received (percent-encoding kept).
    pub path_and_query: String,
    /// The request headers (including the session material: this is a test tool).
    pub headers: HeaderMap,
    /// The request body.
    pub body: Bytes,
    /// The status the sandbox answered with.
    pub status: StatusCode,
    /// The name of the fault that shaped the answer, if any (see
    /// [`FaultMode::name`](super::FaultMode::name)).
    pub fault: Option<&'static str>,
}

impl RecordedRequest {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(p, _)| p)
    }

    /// The raw query, if the request had one.
    pub fn query(&self) -> Option<&str> {
        self.path_and_query.split_once('?').map(|(_, q)| q)
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct Log {
    per_path: HashMap<String, u64>,
    recent: VecDeque<RecordedRequest>,
    capacity: usize,
}

pub(crate) struct Stats {
    total: AtomicU64,
    log: Mutex<Log>,
}

impl Stats {
    pub(crate) fn new(capacity: usize) -> Self {
        Stats {
            total: AtomicU64::new(0),
            log: Mutex::new(Log {
                per_path: HashMap::new(),
                recent: VecDeque::with_capacity(capacity.min(1024)),
                capacity,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request to `path` as soon as it arrives.
    pub(crate) fn count(&self, path: &str) {
        let mut log = self.lock();
        self.total.fetch_add(1, Ordering::Relaxed);
        match log.per_path.get_mut(path) {
            Some(n) => *n += 1,
            None => {
                log.per_path.insert(path.to_owned(), 1);
            }
        }
    }

    pub(crate) fn record(&self, request: RecordedRequest) {
        let mut log = self.lock();
        if log.capacity == 0 {
            return;
        }
        while log.recent.len() >= log.capacity {
            log.recent.pop_front();
        }
        log.recent.push_back(request);
    }

    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub(crate) fn count_for(&self, path: &str) -> u64 {
        self.lock().per_path.get(path).copied().unwrap_or(0)
    }

    pub(crate) fn per_path(&self) -> BTreeMap<String, u64> {
        self.lock()
            .per_path
            .iter()
            .map(|(p, n)| (p.clone(), *n))
            .collect()
    }

    pub(crate) fn recorded(&self) -> Vec<RecordedRequest> {
        self.lock().recent.iter().cloned().collect()
    }

    pub(crate) fn last(&self) -> Option<RecordedRequest> {
        self.lock().recent.back().cloned()
    }

    pub(crate) fn set_capacity(&self, capacity: usize) {
        let mut log = self.lock();
        log.capacity = capacity;
        while log.recent.len() > capacity {
            log.recent.pop_front();
        }
    }

    pub(crate) fn reset(&self) {
        let mut log = self.lock();
        self.total.store(0, Ordering::Relaxed);
        log.per_path.clear();
        log.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pq: &str) -> RecordedRequest {
        RecordedRequest {
            method: Method::GET,
            path_and_query: pq.into(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            status: StatusCode::OK,
            fault: None,
        }
    }

    #[test]
    fn keeps_the_most_recent_within_capacity() {
        let stats = Stats::new(2);
        for pq in ["/a?x=1", "/b", "/c?y=%20"] {
            stats.count(request(pq).path());
            stats.record(request(pq));
        }
        let kept: Vec<String> = stats
            .recorded()
            .into_iter()
            .map(|r| r.path_and_query)
            .collect();
        assert_eq!(kept, ["/b", "/c?y=%20"]);
        assert_eq!(stats.last().unwrap().query(), Some("y=%20"));
        assert_eq!(stats.total(), 3);
        assert_eq!(stats.count_for("/a"), 1);
        stats.set_capacity(1);
        assert_eq!(stats.recorded().len(), 1);
        stats.reset();
        assert_eq!((stats.total(), stats.recorded().len()), (0, 0));
        assert!(stats.per_path().is_empty());
    }
}
