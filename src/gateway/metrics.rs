//! Prometheus text exposition of the gateway's counters (docs/contract.md §8 `/metrics`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The route label of requests that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// The gateway's own counters. Gauges owned by layers (open holds, dropped log rows) are
/// passed in when rendering.
#[derive(Debug, Default)]
pub struct Metrics {
    /// route template → code → count (looked up by `&str`, so counting allocates nothing).
    requests: RwLock<HashMap<String, HashMap<&'static str, AtomicU64>>>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_sum_micros: AtomicU64,
    latency_count: AtomicU64,
    backend_errors: RwLock<HashMap<&'static str, AtomicU64>>,
    /// route template → requests whose client left before the end of the response.
    abandoned: RwLock<HashMap<String, AtomicU64>>,
}

/// Gauges read from the layers at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Credit holds not yet committed or released.
    pub open_holds: u64,
    /// Log rows dropped because the log channel was full.
    pub dropped_log_rows: u64,
    /// Log rows the sink failed to write.
    pub failed_log_rows: u64,
}

impl Metrics {
    /// Counts one answered request: its route template (or `unmatched`), its code (`OK` for
    /// success) and its latency to the response head.
    pub fn record_request(&self, route: &str, code: &'static str, latency: Duration) {
        let counted = {
            let map = self.requests.read().unwrap_or_else(|e| e.into_inner());
            match map.get(route).and_then(|codes| codes.get(code)) {
                Some(c) => {
                    c.fetch_add(1, Ordering::Relaxed);
                    true
                }
                None => false,
            }
        };
        if !counted {
            let mut map = self.requests.write().unwrap_or_else(|e| e.into_inner());
            map.entry(route.to_owned())
                .or_default()
                .entry(code)
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
        let secs = latency.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_sum_micros
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed call to a backend (`postgres`, `redis`, `upstream`, `signer`, …).
    pub fn record_backend_error(&self, backend: &'static str) {
        {
            let map = self
                .backend_errors
                .read()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(c) = map.get(backend) {
                c.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut map = self
            .backend_errors
            .write()
            .unwrap_or_else(|e| e.into_inner());
        map.entry(backend)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one request to `route` whose client went away before the end of its response
    /// (before the head, or in the middle of the body).
    pub fn record_abandoned(&self, route: &str) {
        {
            let map = self.abandoned.read().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = map.get(route) {
                c.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut map = self.abandoned.write().unwrap_or_else(|e| e.into_inner());
        map.entry(route.to_owned())
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Requests to `route` counted as abandoned by their client.
    pub fn abandoned(&self, route: &str) -> u64 {
        let map = self.abandoned.read().unwrap_or_else(|e| e.into_inner());
        map.get(route).map_or(0, |v| v.load(Ordering::Relaxed))
    }

    /// Failed calls counted for `backend`.
    pub fn backend_errors(&self, backend: &str) -> u64 {
        let map = self
            .backend_errors
            .read()
            .unwrap_or_else(|e| e.into_inner());
        map.get(backend).map_or(0, |v| v.load(Ordering::Relaxed))
    }

    /// Total requests counted for `(route, code)`.
    pub fn requests(&self, route: &str, code: &str) -> u64 {
        let map = self.requests.read().unwrap_or_else(|e| e.into_inner());
        map.get(route)
            .and_then(|codes| codes.get(code))
            .map_or(0, |v| v.load(Ordering::Relaxed))
    }

    /// The Prometheus text format.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP tollgate_requests_total Requests answered, by route template and code.\n",
        );
        out.push_str("# TYPE tollgate_requests_total counter\n");
        {
            let map = self.requests.read().unwrap_or_else(|e| e.into_inner());
            let mut rows: Vec<_> = map
                .iter()
                .flat_map(|(r, codes)| {
                    codes
                        .iter()
                        .map(move |(c, v)| (r.clone(), *c, v.load(Ordering::Relaxed)))
                })
                .collect();
            rows.sort();
            for (route, code, n) in rows {
                let _ = writeln!(
                    out,
                    "tollgate_requests_total{{route=\"{}\",code=\"{}\"}} {n}",
                    escape(&route),
                    code
                );
            }
        }
        out.push_str(
            "# HELP tollgate_requests_abandoned_total Requests whose client went away before \
             the end of the response, by route template.\n",
        );
        out.push_str("# TYPE tollgate_requests_abandoned_total counter\n");
        {
            let map = self.abandoned.read().unwrap_or_else(|e| e.into_inner());
            let mut rows: Vec<_> = map
                .iter()
                .map(|(r, v)| (r.clone(), v.load(Ordering::Relaxed)))
                .collect();
            rows.sort();
            for (route, n) in rows {
                let _ = writeln!(
                    out,
                    "tollgate_requests_abandoned_total{{route=\"{}\"}} {n}",
                    escape(&route)
                );
            }
        }
        out.push_str("# HELP tollgate_request_duration_seconds Time to the response head.\n");
        out.push_str("# TYPE tollgate_request_duration_seconds histogram\n");
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "tollgate_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                self.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "tollgate_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "tollgate_request_duration_seconds_sum {}",
            self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "tollgate_request_duration_seconds_count {count}");

        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "tollgate_open_credit_holds",
            "Credit holds not yet committed or released.",
            "gauge",
            gauges.open_holds,
        );
        gauge(
            &mut out,
            "tollgate_log_rows_dropped_total",
            "Log rows dropped because the log queue was full.",
            "counter",
            gauges.dropped_log_rows,
        );
        gauge(
            &mut out,
            "tollgate_log_rows_failed_total",
            "Log rows the log sink failed to write.",
            "counter",
            gauges.failed_log_rows,
        );
        out.push_str("# HELP tollgate_backend_errors_total Failed calls to a backend.\n");
        out.push_str("# TYPE tollgate_backend_errors_total counter\n");
        let map = self
            .backend_errors
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = map
            .iter()
            .map(|(b, v)| (*b, v.load(Ordering::Relaxed)))
            .collect();
        rows.sort();
        for (backend, n) in rows {
            let _ = writeln!(
                out,
                "tollgate_backend_errors_total{{backend=\"{backend}\"}} {n}"
            );
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges() {
        let m = Metrics::default();
        m.record_request("/api/models/:id/users/me", "OK", Duration::from_micros(700));
        m.record_request("/api/models/:id/users/me", "OK", Duration::from_millis(30));
        m.record_request("unmatched", "NOT_FOUND", Duration::from_micros(100));
        m.record_backend_error("upstream");
        m.record_abandoned("/api/credits");
        let text = m.render(Gauges {
            open_holds: 3,
            dropped_log_rows: 2,
            failed_log_rows: 0,
        });
        assert!(text.contains(
            "tollgate_requests_total{route=\"/api/models/:id/users/me\",code=\"OK\"} 2\n"
        ));
        assert!(
            text.contains("tollgate_requests_total{route=\"unmatched\",code=\"NOT_FOUND\"} 1\n")
        );
        assert!(text.contains("tollgate_request_duration_seconds_bucket{le=\"0.001\"} 2\n"));
        assert!(text.contains("tollgate_request_duration_seconds_bucket{le=\"0.05\"} 3\n"));
        assert!(text.contains("tollgate_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("tollgate_request_duration_seconds_count 3\n"));
        assert!(text.contains("tollgate_open_credit_holds 3\n"));
        assert!(text.contains("tollgate_log_rows_dropped_total 2\n"));
        assert!(text.contains("tollgate_backend_errors_total{backend=\"upstream\"} 1\n"));
        assert!(text.contains("tollgate_requests_abandoned_total{route=\"/api/credits\"} 1\n"));
        assert_eq!(m.requests("unmatched", "NOT_FOUND"), 1);
        assert_eq!(m.abandoned("/api/credits"), 1);
        assert_eq!(m.backend_errors("upstream"), 1);
    }
}
