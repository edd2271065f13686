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
    for (chain, items) in chains {
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
