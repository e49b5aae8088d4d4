//! Subscription plans (docs/contract.md §3): monthly credits, the per-minute window limit and the default
//! per-second burst of each plan.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A subscription plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// $0/month, 100 credits, 10 requests/minute per model.
    Free,
    /// $29/month, 1,000 credits, 60 requests/minute per model.
    Basic,
    /// $99/month, 5,000 credits, 300 requests/minute per model.
    Pro,
    /// $499/month, unlimited credits, 9,999 requests/minute per model.
    Enterprise,
}

impl Plan {
    /// Every plan, cheapest first.
    pub const ALL: [Plan; 4] = [Plan::Free, Plan::Basic, Plan::Pro, Plan::Enterprise];

    /// The plan's name as used in the admin API and configuration.
    pub const fn name(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Basic => "basic",
            Plan::Pro => "pro",
            Plan::Enterprise => "enterprise",
        }
    }

    /// Monthly price in US cents.
    pub const fn price_cents(self) -> u32 {
        match self {
            Plan::Free => 0,
            Plan::Basic => 2_900,
            Plan::Pro => 9_900,
            Plan::Enterprise => 49_900,
        }
    }

    /// Plan credits granted at each renewal; `None` means unlimited.
    pub const fn monthly_credits(self) -> Option<u64> {
        match self {
            Plan::Free => Some(100),
            Plan::Basic => Some(1_000),
            Plan::Pro => Some(5_000),
            Plan::Enterprise => None,
        }
    }

    /// Whether the plan never runs out of credits.
    pub const fn is_unlimited(self) -> bool {
        self.monthly_credits().is_none()
    }

    /// Requests per sliding window (one minute by default) per (org, model).
    pub const fn requests_per_minute(self) -> u32 {
        match self {
            Plan::Free => 10,
            Plan::Basic => 60,
            Plan::Pro => 300,
            Plan::Enterprise => 9_999,
        }
    }

    /// The default per-second burst limit per (org, model).
    pub const fn default_burst(self) -> u32 {
        match self {
            Plan::Free => 5,
            Plan::Basic => 10,
            Plan::Pro => 30,
            Plan::Enterprise => 200,
        }
    }

    /// Position in [`Plan::ALL`], for per-plan tables.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The text was not one of `free`, `basic`, `pro`, `enterprise`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanParseError(pub String);

impl fmt::Display for PlanParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown plan {:?} (expected free, basic, pro or enterprise)",
            self.0
        )
    }
}

impl std::error::Error for PlanParseError {}

impl FromStr for Plan {
    type Err = PlanParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Plan::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| PlanParseError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_match_the_contract() {
        let rows: Vec<_> = Plan::ALL
            .iter()
            .map(|p| {
                (
                    p.name(),
                    p.price_cents(),
                    p.monthly_credits(),
                    p.requests_per_minute(),
                    p.default_burst(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("free", 0, Some(100), 10, 5),
                ("basic", 2_900, Some(1_000), 60, 10),
                ("pro", 9_900, Some(5_000), 300, 30),
                ("enterprise", 49_900, None, 9_999, 200),
            ]
        );
    }

    #[test]
    fn parses_names_only() {
        assert_eq!("pro".parse::<Plan>(), Ok(Plan::Pro));
        assert!("Pro".parse::<Plan>().is_err());
        assert_eq!(
            serde_json::to_string(&Plan::Enterprise).unwrap(),
            "\"enterprise\""
        );
    }
}
