//! Organizations' names: the one piece of tenancy data no layer owns.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tollgate_core::{BackendError, BoxFuture, OrgId};

/// Where organizations are registered.
pub trait OrgStore: Send + Sync + 'static {
    /// Registers a new organization.
    fn create(&self, name: String) -> BoxFuture<Result<OrgId, BackendError>>;
    /// The organization's name, if it exists.
    fn name(&self, org: OrgId) -> BoxFuture<Result<Option<String>, BackendError>>;
    /// Every organization with its name, ordered by name (then id).
    fn list(&self) -> BoxFuture<Result<Vec<(OrgId, String)>, BackendError>>;
}

/// Organizations in memory.
#[derive(Debug, Default, Clone)]
pub struct MemoryOrgStore {
    orgs: Arc<RwLock<HashMap<OrgId, String>>>,
}

impl MemoryOrgStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl OrgStore for MemoryOrgStore {
    fn create(&self, name: String) -> BoxFuture<Result<OrgId, BackendError>> {
        let org = OrgId::new();
        self.orgs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(org, name);
        Box::pin(std::future::ready(Ok(org)))
    }

    fn name(&self, org: OrgId) -> BoxFuture<Result<Option<String>, BackendError>> {
        let name = self
            .orgs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&org)
            .cloned();
        Box::pin(std::future::ready(Ok(name)))
    }

    fn list(&self) -> BoxFuture<Result<Vec<(OrgId, String)>, BackendError>> {
        let mut orgs: Vec<(OrgId, String)> = self
            .orgs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, name)| (*id, name.clone()))
            .collect();
        orgs.sort_by(|a, b| (&a.1, a.0).cmp(&(&b.1, b.0)));
        Box::pin(std::future::ready(Ok(orgs)))
    }
}
