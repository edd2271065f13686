//! What a stage is ([`StageDef`]) and what it is built from ([`Services`]).

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::Sealer;
use crate::config::{Config, Loaded};
use crate::governance::approvals::Approvals;
use crate::governance::budgets::Budgets;
use crate::kafka::runtime::{run_stage, Processor, RuntimeError, StageHealth, StageSettings};
use crate::kafka::Producer;
use crate::records::Emitter;
use crate::resolve::store::ResourceStore;
use crate::store::RedisConn;
use crate::topics::TopicsConfig;

/// What stages are built from: the loaded config and the process's shared clients and stores.
pub struct Services {
    pub loaded: Loaded,
    pub emitter: Emitter,
    pub producer: Producer,
    pub redis: RedisConn,
    pub budgets: Arc<Budgets>,
    pub resources: Arc<dyn ResourceStore>,
    pub approvals: Arc<Approvals>,
    pub sealer: Arc<Sealer>,
    /// The AI gateway, when a model provider is configured.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
    /// The external tools of `tools:`.
    pub tools: Arc<crate::tools::Toolbox>,
    /// Writes audit records of work without an input record (tool calls).
    pub recorder: crate::audit::Recorder,
    /// Agent scorecards: every stage adds what it learns about agents (flushed to Redis each second).
    pub stats: Arc<crate::agents::stats::AgentStats>,
    /// Scores and loads of the agents in `best_of` groups (refreshed in the background when any).
    pub scoreboard: Arc<crate::agents::stats::Scoreboard>,
    /// Relations between resources and the fact index (`context.relations`, `context.index`).
    pub graph: Arc<crate::context::graph::Graph>,
    /// Background work a stage starts (sweepers, flushers) is tracked here and stops with `stop`.
    pub tracker: TaskTracker,
    pub stop: CancellationToken,
}

impl Services {
    pub fn config(&self) -> &Config {
        &self.loaded.config
    }
}

/// A built stage, ready to run on the commit-safe runtime.
pub type Runner = Box<
    dyn FnOnce(
            StageSettings,
            Producer,
            CancellationToken,
            Arc<StageHealth>,
        ) -> BoxFuture<'static, Result<(), RuntimeError>>
        + Send,
>;

/// Wraps a processor as a [`Runner`].
pub fn runner<P: Processor>(p: P) -> Runner {
    Box::new(move |settings, producer, stop, health| {
        Box::pin(run_stage(settings, Arc::new(p), producer, stop, health))
    })
}

/// One stage of the pipeline.
pub struct StageDef {
    /// Name in `stages:`, `--stages`, consumer groups (`<group_prefix>.<name>`), metrics and logs.
    pub name: &'static str,
    /// What it does, for `--help` and `status`.
    pub about: &'static str,
    /// The topics it consumes.
    pub inputs: fn(&TopicsConfig) -> Vec<String>,
    /// Builds it (and starts its background work on `Services::tracker`).
    pub build: for<'a> fn(&'a Services) -> BoxFuture<'a, Result<Runner, String>>,
}

/// The process's [`crate::workflow::Chooser`]: `best_of` picks from the scoreboard (scores and
/// loads over each agent's `max_concurrency`), delegations checked against `governance.access`
/// (action `delegate:<agent>`).
pub struct StageChooser {
    pub scoreboard: Arc<crate::agents::stats::Scoreboard>,
    pub capacity: std::collections::HashMap<String, usize>,
    pub governance: Arc<crate::governance::GovernanceConfig>,
}

impl Services {
    pub fn chooser(&self) -> Arc<StageChooser> {
        let cfg = self.config();
        Arc::new(StageChooser {
            scoreboard: self.scoreboard.clone(),
            capacity: cfg
                .agents
                .iter()
                .map(|(n, a)| (n.clone(), a.max_concurrency))
                .collect(),
            governance: Arc::new(cfg.governance.clone()),
        })
    }
}

impl crate::workflow::Chooser for StageChooser {
    fn pick(&self, select: &crate::route::Select, task_id: &str) -> String {
        let snap = self.scoreboard.snapshot();
        crate::agents::select::pick(select, task_id, &snap, &|a| {
            self.capacity.get(a).copied().unwrap_or(1)
        })
    }

    fn may_delegate(
        &self,
        supervisor: &str,
        agent: &str,
        run: &crate::workflow::RunState,
    ) -> Result<(), String> {
        let action = format!("delegate:{agent}");
        if self
            .governance
            .allows(&run.tenant, supervisor, &action, &run.resource)
        {
            Ok(())
        } else {
            tracing::info!(supervisor, agent, run_id = %run.run_id, resource = %run.resource,
                "Delegation refused: no governance.access rule lets this supervisor delegate to this agent.");
            Err(format!(
                "no governance.access rule lets {supervisor} delegate to {agent} (action {action})"
            ))
        }
    }
}
