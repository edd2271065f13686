//! Workflows: graphs of steps a route can start instead of independent agents (`workflows:` in
//! the config). A step runs an agent; `after` orders steps (sequential and DAG); `when` conditions
//! on earlier steps' status and findings; steps with the same parents run in parallel and a
//! `merge` step joins them — an agent that receives every branch's result, or a declarative merge
//! (`union`, `majority`, `highest_confidence`) switchyard computes itself. A failing step fails the
//! run, is passed over, or hands over to a fallback agent (`on_failure`).
//!
//! Every step is a task on the tasks topic (the same at-least-once runtime and per-resource
//! context). The run's state lives in Redis ([`runs`]) and moves by compare-and-set; what a step's
//! completion caused (the next steps, lifecycle records) is stored with the state, so a redelivered
//! completion produces the same records again and a join fires once: [`advance`] is pure and
//! idempotent.

pub mod runs;

/// Header of a step's task record naming the step: the agent stage runs tasks of one resource in
/// order, except a run's parallel steps, which it runs side by side.
pub const STEP_HEADER: &str = "switchyard.step";

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::pattern::stable_id;
use crate::records::{Finding, ProposalSpec};

/// What planning a run asks of the world outside the run: which agent of a `best_of` group runs
/// a task, and whether governance lets a supervisor delegate to an agent.
pub trait Chooser: Send + Sync {
    /// The agent of `select` that runs task `task_id`.
    fn pick(&self, select: &crate::route::Select, task_id: &str) -> String;
    /// Whether `supervisor` may delegate to `agent` on the run's resource; else why not.
    fn may_delegate(&self, supervisor: &str, agent: &str, run: &RunState) -> Result<(), String>;
}

/// The first candidate of every group, every delegation allowed (tests, tools).
pub struct FirstChoice;

impl Chooser for FirstChoice {
    fn pick(&self, select: &crate::route::Select, _: &str) -> String {
        select.best_of.first().cloned().unwrap_or_default()
    }
    fn may_delegate(&self, _: &str, _: &str, _: &RunState) -> Result<(), String> {
        Ok(())
    }
}

/// The agent that runs a step's task `task_id`: its `agent`, or its `select` group's pick.
pub fn step_agent(step: &StepSpec, task_id: &str, choose: &dyn Chooser) -> Option<String> {
    match (&step.agent, &step.select) {
        (Some(a), _) => Some(a.clone()),
        (None, Some(sel)) => Some(choose.pick(sel, task_id)),
        _ => None,
    }
}

/// A workflow as declared under `workflows:`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSpec {
    /// Steps by name.
    pub steps: BTreeMap<String, StepSpec>,
    /// Longest a run may take; steps not finished by then are failed by the sweeper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_seconds: Option<u64>,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// The agent that runs the step (none for a declarative merge or a `select`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Interchangeable agents one of which runs the step, chosen by scorecard and load
    /// (`{best_of: [a, b]}`), instead of `agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<crate::route::Select>,
    /// Steps that must have finished (succeeded, failed under `continue`, or been skipped) first.
    #[serde(default)]
    pub after: Vec<String>,
    /// All must hold when the step becomes ready, else it is skipped.
    #[serde(default)]
    pub when: Vec<StepCondition>,
    /// What a failure of this step does.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Longest the step's task may take, every attempt of its agent included; past it the step
    /// is `timed_out` and `on_failure` applies. (The agent's own `timeout_ms` bounds each attempt.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// The agent that runs the step instead when it failed (`on_failure: fallback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Joins the parents: their proposals are held (not sent to resolve) and merged here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<Merge>,
    /// Makes the step a supervisor: its agent may delegate to these agents and is called again
    /// with their results; only its final proposals go to resolve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervise: Option<Supervise>,
}

/// A supervisor's delegation rules.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Supervise {
    /// The agents it may delegate to (any other delegation is refused and audited).
    pub agents: Vec<String>,
    /// Rounds of delegation at most; the call after the last round must conclude.
    #[serde(default = "default_max_rounds")]
    pub max_rounds: u32,
    /// Delegations over the whole run at most (more are refused).
    #[serde(default = "default_max_delegations")]
    pub max_delegations: u32,
    /// How deep delegation nests: 1 = sub-agents cannot delegate further (the only depth built).
    #[serde(default = "one_u32")]
    pub max_depth: u32,
}

fn default_max_rounds() -> u32 {
    2
}
fn default_max_delegations() -> u32 {
    8
}
fn one_u32() -> u32 {
    1
}

/// How a merge step combines its parents' proposals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Merge {
    /// The step's agent receives every branch's result (`task.step.inputs`) and proposes itself.
    Agent,
    /// Every distinct proposal (action and parameters) of every branch.
    Union,
    /// The action most branches propose (ties: the higher priority, then the earlier branch).
    Majority,
    /// The proposal with the highest `parameters.confidence` (then priority).
    HighestConfidence,
}

/// What a failed step does to its run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The run fails; steps not started are skipped.
    #[default]
    Fail,
    /// The step counts as finished (status `failed`); the steps after it go on.
    Continue,
    /// The `fallback` agent runs the step; if it fails too, the run fails.
    Fallback,
}

/// A condition on an earlier step: its status, or a finding it wrote.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepCondition {
    pub step: String,
    /// The step's status is one of these (`succeeded`, `failed`, `skipped`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Vec<String>>,
    /// The step wrote this finding (with `equals`: this value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<Value>,
}

/// Problems of the `workflows:` section, as `(item, message)`. `agents` are the declared agents.
pub fn problems(
    workflows: &BTreeMap<String, WorkflowSpec>,
    agents: &[&str],
) -> Vec<(String, String)> {
    let mut p = Vec::new();
    for (name, w) in workflows {
        let item = |s: &str| format!("workflows.{name}.steps.{s}");
        if w.steps.is_empty() {
            p.push((format!("workflows.{name}"), "has no steps".into()));
        }
        for (s, step) in &w.steps {
            if step.timeout_seconds == Some(0) {
                p.push((item(s), "timeout_seconds must be at least 1".into()));
            }
        }
        if w.deadline_seconds == Some(0) {
            p.push((
                format!("workflows.{name}.deadline_seconds"),
                "must be at least 1".into(),
            ));
        }
        for (s, step) in &w.steps {
            let runs_agent = step.agent.is_some() || step.select.is_some();
            if step.agent.is_some() && step.select.is_some() {
                p.push((item(s), "names both agent and select: keep one".into()));
            }
            for m in step.select.iter().flat_map(|x| x.problems(agents)) {
                p.push((item(s), m));
            }
            match (runs_agent, step.merge) {
                (false, None) | (false, Some(Merge::Agent)) => p.push((
                    item(s),
                    "needs an agent (or select, or a declarative merge)".into(),
                )),
                (true, Some(m)) if m != Merge::Agent => p.push((
                    item(s),
                    "a declarative merge runs no agent: drop `agent` or use `merge: agent`".into(),
                )),
                _ => {}
            }
            for a in step.agent.iter().chain(step.fallback.iter()) {
                if !agents.contains(&a.as_str()) {
                    p.push((item(s), format!("agent {a:?} is not declared under agents")));
                }
            }
            if step.on_failure == OnFailure::Fallback && step.fallback.is_none() {
                p.push((
                    item(s),
                    "on_failure: fallback needs `fallback: <agent>`".into(),
                ));
            }
            if let Some(sv) = &step.supervise {
                if !runs_agent {
                    p.push((item(s), "a supervisor needs an agent".into()));
                }
                for a in &sv.agents {
                    if !agents.contains(&a.as_str()) {
                        p.push((
                            item(s),
                            format!(
                                "supervise.agents names {a:?}, which is not declared under agents"
                            ),
                        ));
                    }
                }
                if sv.max_depth != 1 {
                    p.push((
                        item(s),
                        "supervise.max_depth: only 1 is supported (sub-agents do not delegate further)"
                            .into(),
                    ));
                }
                if sv.max_rounds == 0 || sv.max_delegations == 0 {
                    p.push((
                        item(s),
                        "supervise.max_rounds and max_delegations must be at least 1".into(),
                    ));
                }
            }
            if step.merge.is_some() && step.after.is_empty() {
                p.push((
                    item(s),
                    "a merge step needs the steps it joins in `after`".into(),
                ));
            }
            for a in &step.after {
                if !w.steps.contains_key(a) {
                    p.push((item(s), format!("after names {a:?}, which is not a step")));
                }
            }
            let before = ancestors(w, s);
            for c in &step.when {
                if !before.contains(&c.step) {
                    p.push((
                        item(s),
                        format!(
                            "when names {:?}, which does not run before this step (list it in after)",
                            c.step
                        ),
                    ));
                }
            }
        }
        if let Some(s) = cycle(w) {
            p.push((item(&s), "is part of a cycle of `after`".into()));
        }
    }
    p
}

/// Every step that runs before `step` (its `after`, their `after`, ...).
fn ancestors(w: &WorkflowSpec, step: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut todo: Vec<&str> = vec![step];
    while let Some(s) = todo.pop() {
        for a in w.steps.get(s).map(|x| x.after.as_slice()).unwrap_or(&[]) {
            if !out.contains(a) && a != step {
                out.push(a.clone());
                todo.push(a);
            }
        }
    }
    out
}

/// A step on a cycle of `after`, if there is one.
fn cycle(w: &WorkflowSpec) -> Option<String> {
    w.steps
        .keys()
        .find(|s| {
            let mut seen = Vec::new();
            let mut todo: Vec<&str> = w.steps[*s].after.iter().map(String::as_str).collect();
            while let Some(x) = todo.pop() {
                if x == s.as_str() {
                    return true;
                }
                if seen.contains(&x) {
                    continue;
                }
                seen.push(x);
                if let Some(st) = w.steps.get(x) {
                    todo.extend(st.after.iter().map(String::as_str));
                }
            }
            false
        })
        .cloned()
}

/// The steps that start a run (no `after`).
pub fn roots(w: &WorkflowSpec) -> Vec<&String> {
    w.steps
        .iter()
        .filter(|(_, s)| s.after.is_empty())
        .map(|(n, _)| n)
        .collect()
}

/// Whether a step's proposals are held for a merge step instead of going to resolve.
pub fn holds(w: &WorkflowSpec, step: &str) -> bool {
    w.steps.get(step).is_some_and(|s| s.supervise.is_some())
        || w.steps
            .values()
            .any(|s| s.merge.is_some() && s.after.iter().any(|a| a == step))
}

/// The agents a step's task may delegate to in `round`.
pub fn delegates(w: &WorkflowSpec, step: &str, round: u32) -> Vec<String> {
    match w.steps.get(step).and_then(|s| s.supervise.as_ref()) {
        Some(sv) if round < sv.max_rounds => sv.agents.clone(),
        _ => Vec::new(),
    }
}

/// The name of a supervisor's sub-step: `<supervisor>#r<round>#<n>`.
fn sub_step(supervisor: &str, attempt: u32, round: u32, n: usize) -> String {
    format!("{supervisor}#{}#{n}", round_tag(attempt, round))
}

/// A supervisor's round in sub-step names: `r<round>`, and `r<round>a<attempt>` for its fallback
/// (attempt 2), whose rounds start again at 0 and must not take the names (and task ids) of the
/// first agent's sub-steps.
fn round_tag(attempt: u32, round: u32) -> String {
    if attempt > 1 {
        format!("r{round}a{attempt}")
    } else {
        format!("r{round}")
    }
}

/// The supervisor, round and attempt of a sub-step name.
fn parent_of(sub: &str) -> Option<(&str, u32, u32)> {
    let mut parts = sub.split('#');
    let sup = parts.next()?;
    let tag = parts.next()?.strip_prefix('r')?;
    let (round, attempt) = match tag.split_once('a') {
        Some((r, a)) => (r.parse().ok()?, a.parse().ok()?),
        None => (tag.parse().ok()?, 1),
    };
    Some((sup, round, attempt))
}

/// Refused delegations of one completion recorded one by one; the rest in one record.
const MAX_REFUSAL_RECORDS: usize = 16;

/// The run id of `workflow` started by the input event whose workflow id is `event_wf`.
pub fn run_id(event_wf: &str, workflow: &str) -> String {
    format!("run-{}", stable_id(&[event_wf, workflow]))
}

/// The task id of a step (`attempt` 2 for its fallback).
pub fn step_task_id(run_id: &str, step: &str, attempt: u32) -> String {
    format!("task-{}", stable_id(&[run_id, step, &attempt.to_string()]))
}

pub use crate::records::StepRef;

/// A step's state within its run.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct StepState {
    /// `running`, `succeeded`, `failed`, `skipped`.
    pub status: String,
    pub agent: String,
    pub task_id: String,
    pub attempt: u32,
    /// The task whose completion started (or skipped) it; `route` for the first steps.
    pub started_by: String,
    #[serde(default)]
    pub findings: Vec<Finding>,
    /// `(agent, proposal)`: the proposals it made (held or sent).
    #[serde(default)]
    pub proposals: Vec<(String, ProposalSpec)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// A supervisor's current round; a sub-step's instructions.
    #[serde(default)]
    pub round: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    /// What the step's agent calls cost (every round and attempt), in the budgets' currency.
    #[serde(default)]
    pub cost: f64,
}

impl StepState {
    /// A step just started (or skipped/merged: the caller sets the status).
    fn started(agent: &str, task_id: String, started_by: &str, round: u32) -> StepState {
        StepState {
            status: "running".into(),
            agent: agent.to_string(),
            task_id,
            attempt: 1,
            started_by: started_by.to_string(),
            findings: Vec::new(),
            proposals: Vec::new(),
            error: None,
            duration_ms: 0,
            finished_at: None,
            round,
            instructions: None,
            cost: 0.0,
        }
    }
}

/// A run's state (stored as JSON under the run's key).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct RunState {
    pub run_id: String,
    pub workflow: String,
    pub resource: String,
    pub tenant: String,
    pub event_id: String,
    pub started_at: String,
    /// `running`, `completed`, `failed`, `timed_out`.
    pub status: String,
    pub steps: BTreeMap<String, StepState>,
    /// What each completing task caused, by task id (a redelivery returns it again).
    #[serde(default)]
    pub plans: BTreeMap<String, Plan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// The `workflow.timed_out` record of a run the deadline sweeper ended, stored with the
    /// move so that writing it again writes the same record (steps still finishing afterwards
    /// change the run, not it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<Lifecycle>,
}

/// A step to start: its task.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Start {
    pub step: String,
    pub agent: String,
    pub task_id: String,
    pub attempt: u32,
    pub hold: bool,
    pub inputs: Value,
    #[serde(default)]
    pub round: u32,
    #[serde(default)]
    pub delegates: Vec<String>,
}

/// A lifecycle record (`switchyard.workflows`, keyed by run id).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Lifecycle {
    /// `workflow.started`, `step.started|completed|failed|skipped`, `workflow.completed|failed|timed_out`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A finished step's cost; the run's total on `workflow.completed|failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    pub at: String,
}

/// What a step's completion caused.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct Plan {
    pub start: Vec<Start>,
    pub records: Vec<Lifecycle>,
    /// Proposals of declarative merge steps, `(step, agent, proposal)`, to send to resolve.
    pub merged: Vec<(String, String, ProposalSpec)>,
}

/// The record of a lifecycle step on the workflows topic (keyed by run id; its id depends only on
/// its content, so a redelivery writes the same record).
pub fn lifecycle_event(run: &RunState, l: &Lifecycle) -> crate::event::CloudEvent {
    let mut parts = vec![
        run.run_id.as_str(),
        &l.kind,
        l.step.as_deref().unwrap_or(""),
        l.task_id.as_deref().unwrap_or(""),
        &l.at,
    ];
    if l.kind == "delegation.refused" {
        // One completion can refuse several delegations: each its own record (the same agent
        // refused for the same reason twice is one fact).
        parts.push(l.agent.as_deref().unwrap_or(""));
        parts.push(l.error.as_deref().unwrap_or(""));
    }
    let id = format!("wfe-{}", stable_id(&parts));
    let mut data = json!({"run_id": run.run_id, "workflow": run.workflow, "resource": run.resource,
                          "tenant": run.tenant, "event_id": run.event_id});
    if let (Value::Object(d), Ok(Value::Object(x))) = (&mut data, serde_json::to_value(l)) {
        d.extend(x);
    }
    crate::event::CloudEvent::new(id, "switchyard/workflows", "switchyard.workflow")
        .with_subject(run.run_id.clone())
        .with_time(&l.at)
        .with_data(data)
        .with_extension("tenant", run.tenant.clone())
}

/// A finished step task, as [`advance`] needs it.
pub struct Finished<'a> {
    pub step: &'a StepRef,
    pub agent: &'a str,
    pub task_id: &'a str,
    /// The agent stage's outcome status: `succeeded`, `failed`, `timed_out`, `refused`.
    pub status: &'a str,
    pub findings: &'a [Finding],
    pub proposals: &'a [ProposalSpec],
    /// What a supervisor delegated.
    pub delegate: &'a [crate::records::Delegation],
    pub error: Option<&'a str>,
    pub duration_ms: u64,
    /// What the agent's work cost (its `cost_per_call` and model calls).
    pub cost: f64,
    pub at: &'a str,
    /// Picks `best_of` agents and checks delegations.
    pub choose: &'a dyn Chooser,
}

fn record(kind: &str, at: &str) -> Lifecycle {
    Lifecycle {
        kind: kind.into(),
        step: None,
        agent: None,
        task_id: None,
        status: None,
        duration_ms: None,
        error: None,
        cost: None,
        at: at.into(),
    }
}

/// The first steps of a run and its `workflow.started` / `step.started` records.
pub fn start(
    w: &WorkflowSpec,
    run_id: &str,
    at: &str,
    choose: &dyn Chooser,
) -> (Vec<Start>, Vec<Lifecycle>) {
    let mut starts = Vec::new();
    let mut records = vec![record("workflow.started", at)];
    for name in roots(w) {
        let Some(agent) = &step_agent(&w.steps[name], &step_task_id(run_id, name, 1), choose)
        else {
            continue;
        };
        starts.push(Start {
            step: name.clone(),
            agent: agent.clone(),
            task_id: step_task_id(run_id, name, 1),
            attempt: 1,
            hold: holds(w, name),
            inputs: json!({}),
            round: 0,
            delegates: delegates(w, name, 0),
        });
        records.push(Lifecycle {
            step: Some(name.clone()),
            agent: Some(agent.clone()),
            task_id: Some(step_task_id(run_id, name, 1)),
            ..record("step.started", at)
        });
    }
    (starts, records)
}

/// A new run's state: its first steps running.
pub fn new_run(w: &WorkflowSpec, meta: RunState, choose: &dyn Chooser) -> RunState {
    let mut state = RunState {
        status: "running".into(),
        ..meta
    };
    for s in start(w, &state.run_id, &state.started_at, choose).0 {
        let first = StepState::started(&s.agent, s.task_id, "route", 0);
        state.steps.insert(s.step, first);
    }
    state
}

fn terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "skipped")
}

/// The results of a step's parents, as its task's `inputs`.
fn inputs_of(w: &WorkflowSpec, state: &RunState, step: &str) -> Value {
    let mut m = serde_json::Map::new();
    for a in &w.steps[step].after {
        if let Some(s) = state.steps.get(a) {
            m.insert(
                a.clone(),
                json!({"status": s.status, "agent": s.agent, "findings": s.findings,
                       "proposals": s.proposals.iter().map(|(agent, p)| json!({"agent": agent, "proposal": p})).collect::<Vec<_>>(),
                       "error": s.error}),
            );
        }
    }
    Value::Object(m)
}

fn holds_when(state: &RunState, c: &StepCondition) -> bool {
    let Some(s) = state.steps.get(&c.step) else {
        return false;
    };
    if let Some(st) = &c.status {
        if !st.iter().any(|x| x == &s.status) {
            return false;
        }
    }
    if let Some(k) = &c.finding {
        match s.findings.iter().find(|f| &f.key == k) {
            None => return false,
            Some(f) => {
                if c.equals.as_ref().is_some_and(|e| e != &f.value) {
                    return false;
                }
            }
        }
    }
    true
}

/// Merges the held proposals of a merge step's parents.
fn merged(
    w: &WorkflowSpec,
    state: &RunState,
    step: &str,
    how: Merge,
) -> Vec<(String, ProposalSpec)> {
    let all: Vec<(String, ProposalSpec)> = w.steps[step]
        .after
        .iter()
        .filter_map(|a| state.steps.get(a))
        .flat_map(|s| s.proposals.iter().cloned())
        .collect();
    match how {
        Merge::Agent => Vec::new(),
        Merge::Union => {
            let mut out: Vec<(String, ProposalSpec)> = Vec::new();
            for (a, p) in all {
                if !out.iter().any(|(_, q)| {
                    q.action == p.action && q.parameters == p.parameters && q.resource == p.resource
                }) {
                    out.push((a, p));
                }
            }
            out
        }
        Merge::Majority => {
            let mut counts: Vec<(String, usize, i32)> = Vec::new();
            for (_, p) in &all {
                match counts.iter_mut().find(|(a, _, _)| a == &p.action) {
                    Some(c) => {
                        c.1 += 1;
                        c.2 = c.2.max(p.priority);
                    }
                    None => counts.push((p.action.clone(), 1, p.priority)),
                }
            }
            let best = counts
                .iter()
                .enumerate()
                .max_by(|(i, a), (j, b)| {
                    (a.1, a.2, std::cmp::Reverse(*i)).cmp(&(b.1, b.2, std::cmp::Reverse(*j)))
                })
                .map(|(_, c)| c.0.clone());
            all.into_iter()
                .find(|(_, p)| Some(&p.action) == best.as_ref())
                .into_iter()
                .collect()
        }
        Merge::HighestConfidence => {
            let conf = |p: &ProposalSpec| {
                p.parameters
                    .get("confidence")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0)
            };
            let mut best: Option<(String, ProposalSpec)> = None;
            for (a, p) in all {
                let better = best.as_ref().is_none_or(|(_, b)| {
                    conf(&p) > conf(b) || (conf(&p) == conf(b) && p.priority > b.priority)
                });
                if better {
                    best = Some((a, p));
                }
            }
            best.into_iter().collect()
        }
    }
}

/// Moves a run on after one of its step tasks finished: records the step, starts (or skips) the
/// steps that became ready, computes declarative merges, finishes the run when nothing is left.
/// Idempotent: a task that was advanced before gets its stored plan back and changes nothing.
pub fn advance(w: &WorkflowSpec, state: &mut RunState, f: &Finished<'_>) -> Plan {
    if let Some(p) = state.plans.get(f.task_id) {
        return p.clone();
    }
    let step = f.step.step.as_str();
    let mut plan = Plan::default();
    let spec = w.steps.get(step);
    let ok = f.status == "succeeded";
    let mut st = StepState {
        status: if ok { "succeeded" } else { "failed" }.into(),
        agent: f.agent.into(),
        task_id: f.task_id.into(),
        attempt: f.step.attempt,
        started_by: state
            .steps
            .get(step)
            .map(|s| s.started_by.clone())
            .unwrap_or_else(|| "route".into()),
        findings: f.findings.to_vec(),
        proposals: f
            .proposals
            .iter()
            .map(|p| (f.agent.to_string(), p.clone()))
            .collect(),
        error: f.error.map(str::to_string),
        duration_ms: f.duration_ms,
        finished_at: Some(f.at.into()),
        round: f.step.round,
        instructions: None,
        cost: state.steps.get(step).map_or(0.0, |s| s.cost) + f.cost,
    };
    // A run that ended (timed out, or failed by another branch) starts nothing more: no fallback,
    // no delegation, no supervisor's conclusion sent to resolve — its late steps are recorded only.
    let running = state.status == "running";
    let fallback = spec
        .filter(|s| running && !ok && s.on_failure == OnFailure::Fallback && f.step.attempt == 1)
        .and_then(|s| s.fallback.clone());
    plan.records.push(Lifecycle {
        step: Some(step.into()),
        agent: Some(f.agent.into()),
        task_id: Some(f.task_id.into()),
        status: Some(f.status.into()),
        duration_ms: Some(f.duration_ms),
        error: f.error.map(str::to_string),
        cost: Some(st.cost),
        ..record(if ok { "step.completed" } else { "step.failed" }, f.at)
    });
    // A supervisor's sub-step: recorded; once its round is complete, the supervisor is called
    // again with every sub-step's result.
    if let Some((sup, round, attempt)) = parent_of(step) {
        st.instructions = state.steps.get(step).and_then(|s| s.instructions.clone());
        state.steps.insert(step.into(), st);
        let prefix = format!("{sup}#{}#", round_tag(attempt, round));
        let subs: Vec<(&String, &StepState)> = state
            .steps
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .collect();
        if state.status == "running" && subs.iter().all(|(_, s)| terminal(&s.status)) {
            let delegated: serde_json::Map<String, Value> = subs
                .iter()
                .map(|(n, s)| {
                    (
                        n.to_string(),
                        json!({"agent": s.agent, "status": s.status, "instructions": s.instructions,
                               "findings": s.findings,
                               "proposals": s.proposals.iter().map(|(_, p)| p).collect::<Vec<_>>(),
                               "error": s.error}),
                    )
                })
                .collect();
            let next = round + 1;
            let task_id = format!(
                "task-{}",
                if attempt > 1 {
                    stable_id(&[
                        &state.run_id,
                        sup,
                        "round",
                        &next.to_string(),
                        &attempt.to_string(),
                    ])
                } else {
                    stable_id(&[&state.run_id, sup, "round", &next.to_string()])
                }
            );
            // The agent that ran the supervisor's earlier rounds (a `best_of` pick stays).
            let agent = state
                .steps
                .get(sup)
                .map(|s| s.agent.clone())
                .filter(|a| !a.is_empty())
                .or_else(|| w.steps.get(sup).and_then(|s| s.agent.clone()))
                .unwrap_or_default();
            let mut inputs = inputs_of(w, state, sup);
            if let Value::Object(m) = &mut inputs {
                m.insert("delegated".into(), Value::Object(delegated));
            }
            plan.start.push(Start {
                step: sup.into(),
                agent: agent.clone(),
                task_id: task_id.clone(),
                // The fallback's rounds stay its own (their sub-steps' names, its failure).
                attempt,
                hold: true,
                inputs,
                round: next,
                delegates: delegates(w, sup, next),
            });
            plan.records.push(Lifecycle {
                step: Some(sup.into()),
                agent: Some(agent),
                task_id: Some(task_id.clone()),
                ..record("step.started", f.at)
            });
            if let Some(s) = state.steps.get_mut(sup) {
                s.status = "running".into();
                s.task_id = task_id;
                s.round = next;
            }
        }
        state.plans.insert(f.task_id.into(), plan.clone());
        return plan;
    }
    if let Some(sv) = spec
        .and_then(|s| s.supervise.as_ref())
        .filter(|_| ok && running)
    {
        let used = state
            .steps
            .keys()
            .filter(|n| parent_of(n).is_some_and(|(s, _, _)| s == step))
            .count();
        let mut accepted: Vec<&crate::records::Delegation> = Vec::new();
        let mut refusals = 0usize;
        for d in f.delegate {
            let refused = if f.step.round >= sv.max_rounds {
                Some(format!(
                    "no delegation rounds left (max_rounds {})",
                    sv.max_rounds
                ))
            } else if !sv.agents.contains(&d.agent) {
                Some(format!("{} is not among supervise.agents", d.agent))
            } else if let Err(why) = f.choose.may_delegate(f.agent, &d.agent, state) {
                Some(why)
            } else if used + accepted.len() >= sv.max_delegations as usize {
                Some(format!("max_delegations ({}) reached", sv.max_delegations))
            } else {
                None
            };
            match refused {
                Some(why) => {
                    refusals += 1;
                    if refusals <= MAX_REFUSAL_RECORDS {
                        plan.records.push(Lifecycle {
                            step: Some(step.into()),
                            agent: Some(d.agent.clone()),
                            status: Some("refused".into()),
                            error: Some(why),
                            ..record("delegation.refused", f.at)
                        });
                    }
                }
                None => accepted.push(d),
            }
        }
        if refusals > MAX_REFUSAL_RECORDS {
            // A supervisor asking for hundreds of delegations gets one record for the rest.
            plan.records.push(Lifecycle {
                step: Some(step.into()),
                status: Some("refused".into()),
                error: Some(format!(
                    "{} more delegations refused",
                    refusals - MAX_REFUSAL_RECORDS
                )),
                ..record("delegation.refused", f.at)
            });
        }
        if !accepted.is_empty() {
            // The supervisor waits for its sub-steps; this round's proposals are not final.
            plan.records[0].kind = "step.delegated".into();
            plan.records[0].status = Some(format!("{} delegated", accepted.len()));
            st.status = "delegating".into();
            for (i, d) in accepted.iter().enumerate() {
                let name = sub_step(step, f.step.attempt, f.step.round, i);
                let task_id = step_task_id(&state.run_id, &name, 1);
                plan.start.push(Start {
                    step: name.clone(),
                    agent: d.agent.clone(),
                    task_id: task_id.clone(),
                    attempt: 1,
                    hold: true,
                    inputs: json!({"instructions": d.instructions, "supervisor": step, "round": f.step.round}),
                    round: 0,
                    delegates: Vec::new(),
                });
                plan.records.push(Lifecycle {
                    step: Some(name.clone()),
                    agent: Some(d.agent.clone()),
                    task_id: Some(task_id.clone()),
                    ..record("step.started", f.at)
                });
                state.steps.insert(
                    name,
                    StepState {
                        instructions: Some(d.instructions.clone()),
                        ..StepState::started(&d.agent, task_id, f.task_id, f.step.round)
                    },
                );
            }
            state.steps.insert(step.into(), st);
            state.plans.insert(f.task_id.into(), plan.clone());
            return plan;
        }
        // The supervisor concluded: its proposals, and only these, go to resolve.
        for p in f.proposals {
            plan.merged.push((step.into(), f.agent.into(), p.clone()));
        }
    }
    if let Some(agent) = fallback {
        // The step runs again with its fallback agent; it is not finished.
        st.status = "running".into();
        let task_id = step_task_id(&state.run_id, step, 2);
        st.agent = agent.clone();
        st.task_id = task_id.clone();
        st.attempt = 2;
        st.started_by = f.task_id.into();
        plan.start.push(Start {
            step: step.into(),
            agent: agent.clone(),
            task_id,
            attempt: 2,
            hold: holds(w, step),
            inputs: inputs_of(w, state, step),
            round: 0,
            delegates: delegates(w, step, 0),
        });
        plan.records.push(Lifecycle {
            step: Some(step.into()),
            agent: Some(agent),
            task_id: Some(st.task_id.clone()),
            ..record("step.started", f.at)
        });
        state.steps.insert(step.into(), st);
        state.plans.insert(f.task_id.into(), plan.clone());
        return plan;
    }
    let fails_run = !ok && spec.is_none_or(|s| s.on_failure != OnFailure::Continue);
    state.steps.insert(step.into(), st);
    if fails_run && state.status == "running" {
        state.status = "failed".into();
        state.finished_at = Some(f.at.into());
        plan.records.push(Lifecycle {
            error: f.error.map(|e| format!("step {step} failed: {e}")),
            status: Some("failed".into()),
            cost: Some(state.steps.values().map(|s| s.cost).sum()),
            ..record("workflow.failed", f.at)
        });
    }
    if state.status == "running" {
        // Start, skip or merge every step that became ready; a skip or a merge can make more
        // steps ready, so look again until nothing changes.
        loop {
            let ready: Vec<String> = w
                .steps
                .iter()
                .filter(|(n, s)| {
                    !state.steps.contains_key(*n)
                        && s.after
                            .iter()
                            .all(|a| state.steps.get(a).is_some_and(|x| terminal(&x.status)))
                })
                .map(|(n, _)| n.clone())
                .collect();
            if ready.is_empty() {
                break;
            }
            for n in ready {
                let s = &w.steps[&n];
                let base = StepState::started(
                    s.agent.as_deref().unwrap_or_default(),
                    String::new(),
                    f.task_id,
                    0,
                );
                if !s.when.iter().all(|c| holds_when(state, c)) {
                    plan.records.push(Lifecycle {
                        step: Some(n.clone()),
                        status: Some("skipped".into()),
                        ..record("step.skipped", f.at)
                    });
                    state.steps.insert(
                        n,
                        StepState {
                            status: "skipped".into(),
                            finished_at: Some(f.at.into()),
                            ..base
                        },
                    );
                    continue;
                }
                let task_id = step_task_id(&state.run_id, &n, 1);
                match (s.merge, step_agent(s, &task_id, f.choose)) {
                    (Some(m), _) if m != Merge::Agent => {
                        let props = merged(w, state, &n, m);
                        for (a, p) in &props {
                            plan.merged.push((n.clone(), a.clone(), p.clone()));
                        }
                        plan.records.push(Lifecycle {
                            step: Some(n.clone()),
                            status: Some("succeeded".into()),
                            duration_ms: Some(0),
                            ..record("step.completed", f.at)
                        });
                        state.steps.insert(
                            n,
                            StepState {
                                status: "succeeded".into(),
                                proposals: props,
                                finished_at: Some(f.at.into()),
                                ..base
                            },
                        );
                    }
                    (_, Some(agent)) => {
                        plan.start.push(Start {
                            step: n.clone(),
                            agent: agent.clone(),
                            task_id: task_id.clone(),
                            attempt: 1,
                            hold: holds(w, &n),
                            inputs: inputs_of(w, state, &n),
                            round: 0,
                            delegates: delegates(w, &n, 0),
                        });
                        plan.records.push(Lifecycle {
                            step: Some(n.clone()),
                            agent: Some(agent.clone()),
                            task_id: Some(task_id.clone()),
                            ..record("step.started", f.at)
                        });
                        state.steps.insert(
                            n,
                            StepState {
                                task_id,
                                agent,
                                ..base
                            },
                        );
                    }
                    _ => {}
                }
            }
        }
        let all_done = w
            .steps
            .keys()
            .all(|n| state.steps.get(n).is_some_and(|s| terminal(&s.status)));
        if all_done {
            let failed = state.steps.values().any(|s| s.status == "failed");
            state.status = "completed".into();
            state.finished_at = Some(f.at.into());
            plan.records.push(Lifecycle {
                status: Some(
                    if failed {
                        "completed_with_failures"
                    } else {
                        "succeeded"
                    }
                    .into(),
                ),
                cost: Some(state.steps.values().map(|s| s.cost).sum()),
                ..record("workflow.completed", f.at)
            });
        }
    }
    state.plans.insert(f.task_id.into(), plan.clone());
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(yaml: &str) -> WorkflowSpec {
        serde_yaml::from_str(yaml).expect("workflow")
    }

    fn finish<'a>(
        step: &'a StepRef,
        task: &'a str,
        status: &'a str,
        props: &'a [ProposalSpec],
    ) -> Finished<'a> {
        Finished {
            step,
            agent: "a",
            task_id: task,
            status,
            findings: &[],
            proposals: props,
            delegate: &[],
            error: None,
            duration_ms: 5,
            cost: 0.5,
            at: "2026-11-26T00:00:00Z",
            choose: &FirstChoice,
        }
    }

    /// A new run `run-1` of `w`.
    fn run_of(w: &WorkflowSpec) -> RunState {
        new_run(
            w,
            RunState {
                run_id: "run-1".into(),
                ..RunState::default()
            },
            &FirstChoice,
        )
    }

    fn sref(step: &str) -> StepRef {
        StepRef {
            run_id: "run-1".into(),
            workflow: "w".into(),
            step: step.into(),
            attempt: 1,
            hold: false,
            inputs: json!({}),
            run_started_at: "t".into(),
            round: 0,
            delegates: vec![],
        }
    }

    fn proposal(action: &str) -> ProposalSpec {
        serde_json::from_value(json!({"action": action})).expect("proposal")
    }

    #[test]
    fn a_join_fires_once_and_a_redelivery_gets_the_same_plan() {
        let w = wf("steps:\n  a: {agent: x}\n  b: {agent: y}\n  m: {merge: union, after: [a, b]}\n  c: {agent: z, after: [m]}\n");
        assert!(problems(
            &BTreeMap::from([("w".to_string(), w.clone())]),
            &["x", "y", "z"]
        )
        .is_empty());
        assert!(holds(&w, "a") && holds(&w, "b") && !holds(&w, "c"));
        let mut st = new_run(
            &w,
            RunState {
                run_id: "run-1".into(),
                ..RunState::default()
            },
            &FirstChoice,
        );
        let (ra, rb) = (sref("a"), sref("b"));
        let pa = [proposal("page")];
        let pb = [proposal("page"), proposal("rollback")];
        let p1 = advance(&w, &mut st, &finish(&ra, "ta", "succeeded", &pa));
        assert!(
            p1.start.is_empty() && p1.merged.is_empty(),
            "the join waits for b"
        );
        let p2 = advance(&w, &mut st, &finish(&rb, "tb", "succeeded", &pb));
        assert_eq!(p2.merged.len(), 2, "union: page once, rollback");
        assert_eq!(p2.start.len(), 1);
        assert_eq!(p2.start[0].step, "c");
        // Redelivered: the same plan, nothing started twice.
        assert_eq!(
            advance(&w, &mut st, &finish(&rb, "tb", "succeeded", &pb)),
            p2
        );
        let p1again = advance(&w, &mut st, &finish(&ra, "ta", "succeeded", &pa));
        assert!(p1again.start.is_empty());
        let rc = sref("c");
        let p3 = advance(
            &w,
            &mut st,
            &finish(&rc, &p2.start[0].task_id.clone(), "succeeded", &[]),
        );
        assert_eq!(
            p3.records.last().map(|r| r.kind.as_str()),
            Some("workflow.completed")
        );
    }

    #[test]
    fn a_run_that_ended_starts_no_fallback_and_sends_no_conclusion() {
        let w = wf("steps:\n  a: {agent: x, on_failure: fallback, fallback: y}\n  b: {agent: z}\n");
        let mut st = run_of(&w);
        // The run timed out while both steps were running.
        st.status = "timed_out".into();
        let ra = sref("a");
        let p = advance(&w, &mut st, &finish(&ra, "ta", "failed", &[]));
        assert!(p.start.is_empty(), "no fallback after the run ended: {p:?}");
        assert_eq!(st.status, "timed_out");
        let rb = sref("b");
        let p = advance(
            &w,
            &mut st,
            &finish(&rb, "tb", "succeeded", &[proposal("page")]),
        );
        assert!(p.start.is_empty() && p.merged.is_empty(), "{p:?}");
    }

    #[test]
    fn a_supervisors_fallback_delegates_under_names_of_its_own() {
        let w = wf("steps:\n  s: {agent: boss, supervise: {agents: [x]}, on_failure: fallback, fallback: boss2}\n");
        let mut st = run_of(&w);
        let go = [crate::records::Delegation {
            agent: "x".into(),
            instructions: "look".into(),
        }];
        let delegating = |st: &mut RunState, r: &StepRef, task: &str| {
            let mut f = finish(r, task, "succeeded", &[]);
            f.delegate = &go;
            advance(&w, st, &f)
        };
        // The first agent delegates, hears back, and fails in its second round.
        let p = delegating(&mut st, &sref("s"), "t0");
        let first_sub = p.start[0].clone();
        assert_eq!(first_sub.step, "s#r0#0");
        let p = advance(
            &w,
            &mut st,
            &finish(&sref(&first_sub.step), &first_sub.task_id, "succeeded", &[]),
        );
        let round1 = p.start[0].clone();
        let r1 = StepRef {
            round: 1,
            ..sref("s")
        };
        let p = advance(&w, &mut st, &finish(&r1, &round1.task_id, "failed", &[]));
        let fallback = p.start[0].clone();
        assert_eq!((fallback.attempt, fallback.round), (2, 0));
        // Its fallback delegates too: other sub-step names and task ids, its own rounds.
        let rf = StepRef {
            attempt: 2,
            ..sref("s")
        };
        let p = delegating(&mut st, &rf, &fallback.task_id);
        let sub = p.start[0].clone();
        assert_eq!(sub.step, "s#r0a2#0");
        assert_ne!(sub.task_id, first_sub.task_id);
        assert_eq!(st.steps[&first_sub.step].status, "succeeded", "kept");
        let p = advance(
            &w,
            &mut st,
            &finish(&sref(&sub.step), &sub.task_id, "succeeded", &[]),
        );
        assert_eq!(p.start.len(), 1, "the fallback is called again: {p:?}");
        assert_eq!(p.start[0].attempt, 2);
        assert_ne!(p.start[0].task_id, round1.task_id);
    }

    #[test]
    fn refused_delegations_are_each_a_record_and_bounded() {
        let w = wf("steps:\n  s: {agent: boss, supervise: {agents: [x]}}\n");
        let mut st = run_of(&w);
        let asked: Vec<crate::records::Delegation> = (0..40)
            .map(|i| crate::records::Delegation {
                agent: format!("y{i}"),
                instructions: "go".into(),
            })
            .collect();
        let rs = sref("s");
        let mut f = finish(&rs, "ts", "succeeded", &[]);
        f.delegate = &asked;
        let p = advance(&w, &mut st, &f);
        let refused: Vec<&Lifecycle> = p
            .records
            .iter()
            .filter(|r| r.kind == "delegation.refused")
            .collect();
        assert_eq!(refused.len(), MAX_REFUSAL_RECORDS + 1);
        assert_eq!(
            refused.last().and_then(|r| r.error.as_deref()),
            Some("24 more delegations refused")
        );
        let ids: std::collections::BTreeSet<String> =
            refused.iter().map(|r| lifecycle_event(&st, r).id).collect();
        assert_eq!(ids.len(), refused.len(), "one id each");
    }

    #[test]
    fn when_skips_failure_policies_and_cycles() {
        let w = wf("steps:\n  a: {agent: x, on_failure: continue}\n  b: {agent: y, after: [a], when: [{step: a, status: [succeeded]}]}\n  c: {agent: z, after: [b], on_failure: fallback, fallback: y}\n");
        let mut st = new_run(
            &w,
            RunState {
                run_id: "r".into(),
                ..RunState::default()
            },
            &FirstChoice,
        );
        let ra = sref("a");
        let p = advance(&w, &mut st, &finish(&ra, "ta", "failed", &[]));
        let kinds: Vec<&str> = p.records.iter().map(|r| r.kind.as_str()).collect();
        assert!(kinds.contains(&"step.skipped"), "{kinds:?}");
        assert_eq!(p.start[0].step, "c", "skipped b makes c ready");
        let rc = sref("c");
        let p = advance(
            &w,
            &mut st,
            &finish(&rc, &p.start[0].task_id.clone(), "failed", &[]),
        );
        assert_eq!(p.start[0].attempt, 2, "fallback agent");
        let mut rc2 = sref("c");
        rc2.attempt = 2;
        let p = advance(
            &w,
            &mut st,
            &finish(&rc2, &p.start[0].task_id.clone(), "failed", &[]),
        );
        assert!(p.records.iter().any(|r| r.kind == "workflow.failed"));
        let bad = wf("steps:\n  a: {agent: x, after: [b]}\n  b: {agent: x, after: [a]}\n");
        let pr = problems(&BTreeMap::from([("w".to_string(), bad)]), &["x"]);
        assert!(pr.iter().any(|(_, m)| m.contains("cycle")), "{pr:?}");
    }

    #[test]
    fn majority_and_highest_confidence() {
        let w = wf("steps:\n  a: {agent: x}\n  b: {agent: x}\n  c: {agent: x}\n  m: {merge: majority, after: [a, b, c]}\n");
        let mut st = new_run(
            &w,
            RunState {
                run_id: "r".into(),
                ..RunState::default()
            },
            &FirstChoice,
        );
        let (ra, rb, rc) = (sref("a"), sref("b"), sref("c"));
        advance(
            &w,
            &mut st,
            &finish(&ra, "ta", "succeeded", &[proposal("rollback")]),
        );
        advance(
            &w,
            &mut st,
            &finish(&rb, "tb", "succeeded", &[proposal("page")]),
        );
        let p = advance(
            &w,
            &mut st,
            &finish(&rc, "tc", "succeeded", &[proposal("page")]),
        );
        assert_eq!(p.merged.len(), 1);
        assert_eq!(p.merged[0].2.action, "page");
        let mut hi = proposal("scale_down");
        hi.parameters = json!({"confidence": 0.9});
        let mut lo = proposal("rollback");
        lo.parameters = json!({"confidence": 0.4});
        let w = wf("steps:\n  a: {agent: x}\n  b: {agent: x}\n  m: {merge: highest_confidence, after: [a, b]}\n");
        let mut st = new_run(
            &w,
            RunState {
                run_id: "r".into(),
                ..RunState::default()
            },
            &FirstChoice,
        );
        advance(&w, &mut st, &finish(&ra, "ta", "succeeded", &[lo]));
        let p = advance(&w, &mut st, &finish(&rb, "tb", "succeeded", &[hi]));
        assert_eq!(p.merged[0].2.action, "scale_down");
    }
}
