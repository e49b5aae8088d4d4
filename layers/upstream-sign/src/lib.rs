//! Signs upstream requests with the OnlyFans "dynamic rules", attaches the model's session,
//! and classifies the upstream's answers into tollgate error codes.

pub mod rules;

pub use rules::{sandbox_rules, DynamicRules, RulesError, Signature, SANDBOX_RULES_JSON};
