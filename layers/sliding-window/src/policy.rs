//! [`WindowPolicy`]: the window length and the per-plan limits and bursts (docs/contract.md §3, §8).

use std::fmt;
use std::time::Duration;

use tollgate_core::Plan;

use crate::store::WindowLimits;

/// The window length and, per plan, the requests per window and the per-second burst.
///
/// Defaults: a 60 s window, [`Plan::requests_per_minute`] and [`Plan::default_burst`].
///
/// ```
/// use std::time::Duration;
/// use tollgate_core::Plan;
/// use tollgate_sliding_window::WindowPolicy;
///
/// let policy = WindowPolicy::new()
///     .with_window(Duration::from_secs(10))
///     .with_limit(Plan::Free, 3)
///     .with_bursts_config("basic=2, pro=40")
///     .unwrap();
/// let free = policy.limits(Plan::Free);
/// assert_eq!((free.limit, free.burst, free.window_ms), (3, 5, 10_000));
/// assert_eq!(policy.burst(Plan::Basic), 2);
/// assert_eq!(policy.burst(Plan::Enterprise), 200);
///
/// let err = WindowPolicy::new().with_bursts_config("free=5,gold=9").unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "invalid per-plan setting \"gold=9\": unknown plan \"gold\" (expected free, basic, pro \
///      or enterprise); expected a list like free=5,basic=10,pro=30,enterprise=200"
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowPolicy {
    window_ms: u64,
    limits: [u32; Plan::ALL.len()],
    bursts: [u32; Plan::ALL.len()],
}

impl WindowPolicy {
    /// The window length the product is sold with.
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

    /// The defaults of docs/contract.md §3.
    pub fn new() -> Self {
        WindowPolicy {
            window_ms: 60_000,
            limits: Plan::ALL.map(Plan::requests_per_minute),
            bursts: Plan::ALL.map(Plan::default_burst),
        }
    }

    /// Sets the window length (shorter for tests). Counted in whole milliseconds, at least 1.
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        self
    }

    /// Sets the requests per window of `plan`. A limit of 0 refuses every request.
    pub fn with_limit(mut self, plan: Plan, limit: u32) -> Self {
        self.limits[plan.index()] = limit;
        self
    }

    /// Sets the per-second burst of `plan`. A burst of 0 refuses every request.
    pub fn with_burst(mut self, plan: Plan, burst: u32) -> Self {
        self.bursts[plan.index()] = burst;
        self
    }

    /// Sets bursts from the `TOLLGATE_BURST` syntax, `free=5,basic=10,pro=30,enterprise=200`.
    /// Plans not listed keep their burst.
    pub fn with_bursts_config(mut self, config: &str) -> Result<Self, PolicyParseError> {
        for (plan, burst) in parse_plan_values(config)? {
            self.bursts[plan.index()] = burst;
        }
        Ok(self)
    }

    /// Sets limits per window from the same syntax, e.g. `free=20,basic=120`. Plans not
    /// listed keep their limit.
    pub fn with_limits_config(mut self, config: &str) -> Result<Self, PolicyParseError> {
        for (plan, limit) in parse_plan_values(config)? {
            self.limits[plan.index()] = limit;
        }
        Ok(self)
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// Requests per window of `plan`.
    pub fn limit(&self, plan: Plan) -> u32 {
        self.limits[plan.index()]
    }

    /// Per-second burst of `plan`.
    pub fn burst(&self, plan: Plan) -> u32 {
        self.bursts[plan.index()]
    }

    /// The limits a request of `plan` is checked under.
    pub fn limits(&self, plan: Plan) -> WindowLimits {
        WindowLimits {
            limit: self.limit(plan),
            burst: self.burst(plan),
            window_ms: self.window_ms,
        }
    }
}

impl Default for WindowPolicy {
    fn default() -> Self {
        WindowPolicy::new()
    }
}

/// Parses `plan=value` pairs separated by commas (`free=5,basic=10,pro=30,enterprise=200`).
/// Spaces around names, values and commas are allowed; every value is a whole number of at
/// least 1; each plan may appear once.
pub fn parse_plan_values(config: &str) -> Result<Vec<(Plan, u32)>, PolicyParseError> {
    let config = config.trim();
    if config.is_empty() {
        return Err(PolicyParseError::new(config, Problem::Empty));
    }
    let mut out: Vec<(Plan, u32)> = Vec::with_capacity(Plan::ALL.len());
    for entry in config.split(',') {
        let entry = entry.trim();
        let err = |problem| Err(PolicyParseError::new(entry, problem));
        let Some((name, value)) = entry.split_once('=') else {
            return err(Problem::NotAPair);
        };
        let plan = match name.trim().parse::<Plan>() {
            Ok(plan) => plan,
            Err(e) => return err(Problem::UnknownPlan(e.to_string())),
        };
        let value = match value.trim().parse::<u32>() {
            Ok(v) if v >= 1 => v,
            _ => return err(Problem::BadValue(value.trim().to_owned())),
        };
        if out.iter().any(|&(p, _)| p == plan) {
            return err(Problem::Duplicate(plan));
        }
        out.push((plan, value));
    }
    Ok(out)
}

/// A per-plan setting string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyParseError {
    entry: String,
    problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Problem {
    Empty,
    NotAPair,
    UnknownPlan(String),
    BadValue(String),
    Duplicate(Plan),
}

impl PolicyParseError {
    fn new(entry: &str, problem: Problem) -> Self {
        PolicyParseError {
            entry: entry.to_owned(),
            problem,
        }
    }

    /// The offending `plan=value` entry (empty when the whole setting was empty).
    pub fn entry(&self) -> &str {
        &self.entry
    }
}

impl fmt::Display for PolicyParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            Problem::Empty => f.write_str("invalid per-plan setting: it is empty")?,
            Problem::NotAPair => write!(
                f,
                "invalid per-plan setting {:?}: expected plan=value",
                self.entry
            )?,
            Problem::UnknownPlan(why) => {
                write!(f, "invalid per-plan setting {:?}: {why}", self.entry)?
            }
            Problem::BadValue(value) => write!(
                f,
                "invalid per-plan setting {:?}: {value:?} is not a whole number from 1 to {}",
                self.entry,
                u32::MAX
            )?,
            Problem::Duplicate(plan) => write!(
                f,
                "invalid per-plan setting {:?}: {plan} is set more than once",
                self.entry
            )?,
        }
        f.write_str("; expected a list like free=5,basic=10,pro=30,enterprise=200")
    }
}

impl std::error::Error for PolicyParseError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_plans() {
        let p = WindowPolicy::default();
        assert_eq!(p.window(), Duration::from_secs(60));
        for plan in Plan::ALL {
            assert_eq!(
                p.limits(plan),
                WindowLimits {
                    limit: plan.requests_per_minute(),
                    burst: plan.default_burst(),
                    window_ms: 60_000
                }
            );
        }
    }

    #[test]
    fn parses_the_spec_default_and_partial_lists() {
        assert_eq!(
            parse_plan_values("free=5,basic=10,pro=30,enterprise=200").unwrap(),
            vec![
                (Plan::Free, 5),
                (Plan::Basic, 10),
                (Plan::Pro, 30),
                (Plan::Enterprise, 200)
            ]
        );
        let p = WindowPolicy::new()
            .with_bursts_config(" pro = 7 ,free=1 ")
            .unwrap()
            .with_limits_config("enterprise=20000")
            .unwrap();
        assert_eq!(p.burst(Plan::Pro), 7);
        assert_eq!(p.burst(Plan::Free), 1);
        assert_eq!(p.burst(Plan::Basic), 10);
        assert_eq!(p.limit(Plan::Enterprise), 20_000);
        assert_eq!(p.limit(Plan::Pro), 300);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let cases = [
            ("", "invalid per-plan setting: it is empty"),
            ("  ", "invalid per-plan setting: it is empty"),
            ("free", "invalid per-plan setting \"free\": expected plan=value"),
            ("free=5,", "invalid per-plan setting \"\": expected plan=value"),
            (
                "Free=5",
                "invalid per-plan setting \"Free=5\": unknown plan \"Free\" (expected free, basic, pro or enterprise)",
            ),
            (
                "free=0",
                "invalid per-plan setting \"free=0\": \"0\" is not a whole number from 1 to 4294967295",
            ),
            (
                "free=-1",
                "invalid per-plan setting \"free=-1\": \"-1\" is not a whole number from 1 to 4294967295",
            ),
            (
                "free=5.5",
                "invalid per-plan setting \"free=5.5\": \"5.5\" is not a whole number from 1 to 4294967295",
            ),
            (
                "free=4294967296",
                "invalid per-plan setting \"free=4294967296\": \"4294967296\" is not a whole number from 1 to 4294967295",
            ),
            (
                "free=5,free=6",
                "invalid per-plan setting \"free=6\": free is set more than once",
            ),
        ];
        for (input, message) in cases {
            let err = parse_plan_values(input).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("{message}; expected a list like free=5,basic=10,pro=30,enterprise=200"),
                "{input:?}"
            );
        }
    }

    #[test]
    fn window_is_at_least_one_millisecond() {
        let p = WindowPolicy::new().with_window(Duration::from_micros(10));
        assert_eq!(p.limits(Plan::Free).window_ms, 1);
        let p = WindowPolicy::new().with_window(Duration::from_millis(1_500));
        assert_eq!(p.limits(Plan::Pro).window_ms, 1_500);
    }
}
