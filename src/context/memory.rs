//! In-memory [`ContextStore`] for unit tests (no TTLs).

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;

use super::{
    CommitResult, ContextConfig, ContextStore, Fact, Outcome, ResourceKey, Snapshot, StoreError,
};

#[derive(Default)]
pub struct MemoryStore {
    config: ContextConfig,
    resources: Mutex<HashMap<ResourceKey, Snapshot>>,
    outcomes: Mutex<HashMap<(ResourceKey, String), Outcome>>,
}

impl MemoryStore {
    pub fn new(config: ContextConfig) -> Self {
        MemoryStore {
            config,
            ..Default::default()
        }
    }
}

impl ContextStore for MemoryStore {
    async fn snapshot(&self, key: &ResourceKey) -> Result<Snapshot, StoreError> {
        let r = self.resources.lock().unwrap_or_else(|e| e.into_inner());
        Ok(r.get(key).cloned().unwrap_or_default())
    }

    async fn outcome(
        &self,
        key: &ResourceKey,
        task_id: &str,
    ) -> Result<Option<Outcome>, StoreError> {
        let o = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        Ok(o.get(&(key.clone(), task_id.to_string())).cloned())
    }

    async fn commit(
        &self,
        key: &ResourceKey,
        task_id: &str,
        facts: &[(String, Fact)],
        event: Option<&Value>,
        outcome: &Outcome,
    ) -> Result<CommitResult, StoreError> {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        let okey = (key.clone(), task_id.to_string());
        if let Some(existing) = outcomes.get(&okey) {
            return Ok(CommitResult::AlreadyRecorded(Box::new(existing.clone())));
        }
        let mut resources = self.resources.lock().unwrap_or_else(|e| e.into_inner());
        let snap = resources.entry(key.clone()).or_default();
        if !facts.is_empty() {
            snap.version += 1;
            for (k, f) in facts {
                snap.facts.insert(k.clone(), f.clone());
                snap.key_versions.insert(k.clone(), snap.version);
            }
        }
        if let Some(ev) = event {
            snap.recent_events.retain(|e| e != ev);
            snap.recent_events.insert(0, ev.clone());
            snap.recent_events.truncate(self.config.max_events);
        }
        outcomes.insert(okey, outcome.clone());
        Ok(CommitResult::Applied {
            version: snap.version,
        })
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_store_meets_the_contract() {
        let store = super::MemoryStore::new(crate::context::contract::config());
        crate::context::contract::run_all(&store, "mem").await;
    }
}
