//! tollgate: composable tower layers for a metered, multi-tenant API gateway.
pub use tollgate_core as core;

#[cfg(feature = "sandbox")]
pub mod sandbox;
