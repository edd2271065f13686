//! In-memory [`ContextStore`] for unit tests (no TTLs).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value;

use super::{
    CommitResult, ContextConfig, ContextStore, Fact, Outcome, Prior, ResourceKey, Snapshot,
    StoreError,
};
use crate::store::{Place, MEMO_SLOTS};

#[derive(Default)]
struct Resource {
    snap: Snapshot,
    outcomes: HashMap<String, Outcome>,
    done: VecDeque<String>,
    /// The memo slots: task id, its input's place tag, outcome.
    kept: [Option<(String, String, Outcome)>; MEMO_SLOTS],
}

#[derive(Default)]
pub struct MemoryStore {
    config: ContextConfig,
    resources: Mutex<HashMap<ResourceKey, Resource>>,
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
        Ok(self.read(key, "").await?.1)
    }

    async fn read(
        &self,
        key: &ResourceKey,
        task_id: &str,
    ) -> Result<(Prior, Snapshot), StoreError> {
        let r = self.resources.lock().unwrap_or_else(|e| e.into_inner());
        let Some(res) = r.get(key) else {
            return Ok((Prior::New, Snapshot::default()));
        };
        let prior = match res.outcomes.get(task_id) {
            Some(o) => Prior::Recorded(Box::new(o.clone())),
            None => match res.kept.iter().flatten().find(|(t, _, _)| t == task_id) {
                Some((_, input, o)) => Prior::Kept {
                    outcome: Box::new(o.clone()),
                    input: input.clone(),
                },
                None if res.done.iter().any(|t| t == task_id) => Prior::Finished,
                None => Prior::New,
            },
        };
        Ok((prior, res.snap.clone()))
    }

    async fn commit(
        &self,
        key: &ResourceKey,
        task_id: &str,
        facts: &[(String, Fact)],
        event: Option<&Value>,
        outcome: &Outcome,
        place: Option<&Place>,
    ) -> Result<CommitResult, StoreError> {
        let mut resources = self.resources.lock().unwrap_or_else(|e| e.into_inner());
        let res = resources.entry(key.clone()).or_default();
        if let Some(existing) = res.outcomes.get(task_id) {
            return Ok(CommitResult::AlreadyRecorded(Box::new(existing.clone())));
        }
        if let Some((_, _, existing)) = res.kept.iter().flatten().find(|(t, _, _)| t == task_id) {
            return Ok(CommitResult::AlreadyRecorded(Box::new(existing.clone())));
        }
        if res.done.iter().any(|t| t == task_id)
            || place.is_some_and(|p| res.snap.applied_covers(p))
        {
            return Ok(CommitResult::Finished);
        }
        let snap = &mut res.snap;
        if !facts.is_empty() {
            snap.version += 1;
            for (k, f) in facts {
                snap.facts.insert(k.clone(), f.clone());
                snap.key_versions.insert(k.clone(), snap.version);
            }
        }
        if let Some(ev) = event.filter(|_| self.config.max_events > 0) {
            snap.recent_events.retain(|e| e != ev);
            snap.recent_events.insert(0, ev.clone());
            snap.recent_events.truncate(self.config.max_events);
        }
        res.done.push_front(task_id.to_string());
        res.done.truncate(self.config.remember_tasks.max(1));
        if let Some(p) = place {
            res.snap.apply(p);
        }
        // A memo slot when one is free: empty, or holding a delivered input's outcome (at most
        // MAX_SLOT_OUTCOME_BYTES, as the Redis store keeps).
        let small =
            serde_json::to_string(outcome).is_ok_and(|j| j.len() <= super::MAX_SLOT_OUTCOME_BYTES);
        let slot = place.filter(|_| small).and_then(|p| {
            let i = p.pick_slot(
                res.kept
                    .iter()
                    .map(|k| k.as_ref().map(|(_, input, _)| input.as_str())),
            )?;
            Some((i, p))
        });
        match slot {
            Some((i, p)) => res.kept[i] = Some((task_id.to_string(), p.tag(), outcome.clone())),
            None => {
                res.outcomes.insert(task_id.to_string(), outcome.clone());
            }
        }
        Ok(CommitResult::Applied {
            version: res.snap.version,
            kept: slot.is_some(),
        })
    }

    async fn forget(&self, tasks: &[(ResourceKey, String)]) -> Result<(), StoreError> {
        let mut resources = self.resources.lock().unwrap_or_else(|e| e.into_inner());
        for (k, t) in tasks {
            if let Some(res) = resources.get_mut(k) {
                res.outcomes.remove(t);
            }
        }
        Ok(())
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
