//! tollgate (placeholder while the workspace is assembled)
pub use tollgate_core as core;
