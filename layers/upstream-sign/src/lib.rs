//! Signs upstream requests with the OnlyFans "dynamic rules", attaches the model's session,
//! and classifies the upstream's answers into tollgate error codes.
//!
//! PLACEHOLDER
mod classify;
mod future;
mod layer;
#[cfg(feature = "memory")]
mod memory;
mod remote;
pub mod rules;
mod rules_signer;
mod service;
mod session;
mod signer;

pub use future::ResponseFuture;
pub use layer::{UpstreamSignLayer, DEFAULT_ERROR_BODY_LIMIT};
#[cfg(feature = "memory")]
pub use memory::MemorySessionStore;
pub use remote::{InvalidSignerUrl, RemoteSigner, DEFAULT_SIGNER_TIMEOUT};
pub use rules::{sandbox_rules, DynamicRules, RulesError, Signature, SANDBOX_RULES_JSON};
pub use rules_signer::{RulesFileError, RulesSigner, RulesWatcher, DEFAULT_RULES_POLL_INTERVAL};
pub use service::UpstreamSign;
pub use session::{InvalidSession, ModelRecord, ModelStatus, Session, SessionStore};
pub use signer::{SignError, Signer};
