//! Adapters that can be served, by model id. Read-mostly and shared between the API (which
//! resolves a request's `model` to a lease) and the job manager (which adds and removes).
//! A request holds its `AdapterLease` until it finishes, so removing an adapter never
//! disturbs requests already using it: the weights go away with the last lease.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::LoraWeights;

#[derive(Debug)]
pub struct ServedAdapter {
    /// The model id clients use (`ft:...`).
    pub id: String,
    pub weights: LoraWeights,
    /// Unix seconds.
    pub created: u64,
}

pub type AdapterLease = Arc<ServedAdapter>;

#[derive(Debug, Default)]
pub struct AdapterRegistry {
    adapters: RwLock<BTreeMap<String, AdapterLease>>,
}

impl AdapterRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, id: String, weights: LoraWeights) -> AdapterLease {
        self.insert_created(id, weights, crate::api::unix_now())
    }

    /// As `insert`, for an adapter created at `created` (Unix seconds), e.g. reloaded.
    pub fn insert_created(&self, id: String, weights: LoraWeights, created: u64) -> AdapterLease {
        let lease = Arc::new(ServedAdapter { id: id.clone(), weights, created });
        self.write().insert(id, lease.clone());
        lease
    }

    /// A lease on the adapter, if it is served.
    pub fn get(&self, id: &str) -> Option<AdapterLease> {
        self.read().get(id).cloned()
    }

    pub fn remove(&self, id: &str) -> Option<AdapterLease> {
        self.write().remove(id)
    }

    pub fn ids(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Every served adapter, by id.
    pub fn all(&self) -> Vec<AdapterLease> {
        self.read().values().cloned().collect()
    }

    // A poisoned lock only means a panic elsewhere while holding it; the map is still valid.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, AdapterLease>> {
        self.adapters.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, AdapterLease>> {
        self.adapters.write().unwrap_or_else(|e| e.into_inner())
    }
}
