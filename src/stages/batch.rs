//! What batch-shaped stages share: running a batch's records concurrently and sealing their audit
//! records together, one seal per chain for every group of records that finish together.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::Arc;

use futures::stream::{FuturesUnordered, Stream, StreamExt};
use futures::FutureExt;

use crate::audit::Sealer;
use crate::error::ProcessError;
use crate::event::CloudEvent;
use crate::kafka::runtime::{Done, SharedOutputs};
use crate::kafka::{Input, Output};
use crate::records::Emitter;

/// What a stage decided for one record: its outputs, its (unsealed) audit records, and the keys
/// that may go once it is committed.
#[derive(Default)]
pub struct Decided {
    pub outputs: Vec<Output>,
    pub audits: Vec<CloudEvent>,
    pub cleanup: Vec<String>,
}

impl Decided {
    /// The same, plus keys for [`crate::kafka::runtime::Processor::cleanup`] once committed.
    pub fn forgetting(mut self, keys: Vec<String>) -> Self {
        self.cleanup.extend(keys);
        self
    }
}

/// Seals a group of finished records' audit records, one seal per chain, and turns each into its
/// [`Done`].
async fn seal_group(
    stage: &'static str,
    sealer: &Sealer,
    emitter: &Emitter,
    group: Vec<(usize, String, Result<Decided, ProcessError>)>,
) -> Vec<(usize, Result<Done, ProcessError>)> {
    let mut out = Vec::with_capacity(group.len());
    let mut chains: BTreeMap<String, Vec<(usize, Decided)>> = BTreeMap::new();
    for (i, chain, r) in group {
        match r {
            Ok(d) if d.audits.is_empty() => out.push((
                i,
                Ok(Done {
                    outputs: d.outputs,
                    shared: None,
                    cleanup: d.cleanup,
                }),
            )),
            Ok(d) => chains.entry(chain).or_default().push((i, d)),
            Err(e) => out.push((i, Err(e))),
        }
    }
    let budget = sealer.entries_budget();
    for (chain, items) in chains.into_iter().flat_map(|(chain, items)| {
        split_for_seals(items, budget)
            .into_iter()
            .map(move |part| (chain.clone(), part))
    }) {
        let audits: Vec<CloudEvent> = items
            .iter()
            .flat_map(|(_, d)| d.audits.iter().cloned())
            .collect();
        match sealer.seal(stage, &chain, emitter, &audits).await {
            Ok((records, sealed)) => {
                let shared = SharedOutputs::watched(sealed.seals, Some(sealed.watch));
                let mut records = records.into_iter();
                for (i, d) in items {
                    let mut outputs = d.outputs;
                    outputs.extend(records.by_ref().take(d.audits.len()));
                    out.push((
                        i,
                        Ok(Done {
                            outputs,
                            shared: Some(shared.clone()),
                            cleanup: d.cleanup,
                        }),
                    ));
                }
            }
            Err(e) => out.extend(items.into_iter().map(|(i, _)| (i, Err(e.clone())))),
        }
    }
    out
}

/// A seal entry's size: its hash and field names, plus id, tenant and resource.
fn entry_bytes(ev: &CloudEvent) -> usize {
    120 + ev.id.len() + ev.tenant().len() + ev.subject.as_ref().map_or(0, String::len)
}

/// `items` (one chain's) in groups whose seal entries fit `budget` ([`Sealer::entries_budget`]): a
/// seal lists every record it seals, and one over the audit topic's limit stopped the process — a
/// wave of a few hundred tasks with many refusals each, after a restart (recorded outcomes replay at
/// once, so a whole batch is one wave). A record's audit records stay in one group (and the items
/// keep their order).
fn split_for_seals(items: Vec<(usize, Decided)>, budget: usize) -> Vec<Vec<(usize, Decided)>> {
    let mut groups: Vec<Vec<(usize, Decided)>> = vec![Vec::new()];
    let mut used = 0;
    for item in items {
        let n: usize = item.1.audits.iter().map(entry_bytes).sum();
        if used + n > budget && groups.last().is_some_and(|g| !g.is_empty()) {
            groups.push(Vec::new());
            used = 0;
        }
        used += n;
        if let Some(g) = groups.last_mut() {
            g.push(item);
        }
    }
    groups
}

/// Runs each record's decision concurrently; each time some have finished (with none more ready
/// at once), seals that group's audit records and yields their results. Fast stages finish in one
/// group; a slow agent does not hold up the others' records.
pub fn sealed_waves<'a, F>(
    stage: &'static str,
    sealer: &'a Sealer,
    emitter: &'a Emitter,
    recs: Vec<Arc<Input>>,
    decide: impl Fn(Arc<Input>) -> F,
) -> impl Stream<Item = (usize, Result<Done, ProcessError>)> + Send + 'a
where
    F: Future<Output = Result<Decided, ProcessError>> + Send + 'a,
{
    let jobs = recs
        .into_iter()
        .map(|rec| (Sealer::chain(stage, &rec.topic, rec.partition), decide(rec)))
        .collect();
    sealed_jobs(stage, sealer, emitter, jobs)
}

/// Yields the results of `running` wave by wave: whatever finished together is sealed together.
fn waves<'a, F>(
    stage: &'static str,
    sealer: &'a Sealer,
    emitter: &'a Emitter,
    running: FuturesUnordered<F>,
) -> impl Stream<Item = (usize, Result<Done, ProcessError>)> + Send + 'a
where
    F: Future<Output = (usize, String, Result<Decided, ProcessError>)> + Send + 'a,
{
    futures::stream::unfold(
        (running, VecDeque::new()),
        move |(mut running, mut ready)| async move {
            if let Some(item) = ready.pop_front() {
                return Some((item, (running, ready)));
            }
            let first = running.next().await?;
            let mut group = vec![first];
            while let Some(Some(more)) = running.next().now_or_never() {
                group.push(more);
            }
            ready.extend(seal_group(stage, sealer, emitter, group).await);
            let item = ready.pop_front()?;
            Some((item, (running, ready)))
        },
    )
}

/// [`sealed_waves`] over prepared work: each job is its record's chain and the future deciding it
/// (for stages that first do batch-wide work, such as one read for the whole batch).
pub fn sealed_jobs<'a, F>(
    stage: &'static str,
    sealer: &'a Sealer,
    emitter: &'a Emitter,
    jobs: Vec<(String, F)>,
) -> impl Stream<Item = (usize, Result<Done, ProcessError>)> + Send + 'a
where
    F: Future<Output = Result<Decided, ProcessError>> + Send + 'a,
{
    // Each record is decided once its chain has room for more seals (the wait is before the
    // decision, never between it and its seal: see `Sealer::wait_for_room`).
    let running: FuturesUnordered<_> = jobs
        .into_iter()
        .enumerate()
        .map(|(i, (chain, f))| async move {
            sealer.wait_for_room(&chain).await;
            (i, chain, f.await)
        })
        .collect();
    waves(stage, sealer, emitter, running)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decided(audits: usize, resource_len: usize) -> Decided {
        Decided {
            audits: (0..audits)
                .map(|i| {
                    CloudEvent::new(format!("a-{i}"), "test", "audit")
                        .with_subject("r".repeat(resource_len))
                })
                .collect(),
            ..Decided::default()
        }
    }

    /// 300 records of 65 audit records each with long resource names (~6 MB of entries) are
    /// sealed in groups under the budget, each record whole, in order; a small wave stays one; the
    /// budget is three fifths of the smaller of the audit topic's and the producer's limits.
    #[test]
    fn a_large_wave_is_sealed_in_seals_under_the_budget() {
        let items: Vec<(usize, Decided)> = (0..300).map(|i| (i, decided(65, 200))).collect();
        const BUDGET: usize = 600_000;
        let groups = split_for_seals(items, BUDGET);
        assert!(groups.len() > 10, "{}", groups.len());
        let mut seen = Vec::new();
        for g in &groups {
            let bytes: usize = g
                .iter()
                .flat_map(|(_, d)| d.audits.iter().map(entry_bytes))
                .sum();
            assert!(bytes <= BUDGET, "{bytes}");
            assert!(g.iter().all(|(_, d)| d.audits.len() == 65));
            seen.extend(g.iter().map(|(i, _)| *i));
        }
        assert_eq!(seen, (0..300).collect::<Vec<_>>());
        let small: Vec<(usize, Decided)> = (0..10).map(|i| (i, decided(2, 10))).collect();
        assert_eq!(split_for_seals(small, BUDGET).len(), 1);
        // One record over the budget on its own is still sealed (alone).
        let huge = vec![(0, decided(3000, 200))];
        assert_eq!(split_for_seals(huge, BUDGET).len(), 1);
        let store = Arc::new(crate::audit::sealer::MemoryChainStore::default());
        let limits = crate::kafka::TopicLimits::default();
        let sealer = Sealer::new(store, "audit").with_limits(limits.clone(), 1_000_000);
        assert_eq!(sealer.entries_budget(), 600_000, "the producer's limit");
        limits.set([(
            "audit".to_string(),
            100_000 + crate::kafka::config::BATCH_FRAMING_BYTES,
        )]);
        assert_eq!(sealer.entries_budget(), 60_000, "the topic's, smaller");
    }
}
