//! Resolve + govern stage: `switchyard.proposals` → actions, approval requests, audit.
//!
//! `switchyard.proposals` is keyed by resource, so one consumer owns each resource: the partition is
//! its lock. Proposals of one resource go through the rules ([`crate::resolve::decide`]) strictly in
//! order (lane = resource). State lives in Redis (one hash per resource) and every write is a
//! compare-and-set on the hash's revision that also records the proposal's offset: a zombie owner
//! after a rebalance, or a redelivered proposal, cannot apply anything twice. Each decision is stored
//! by proposal id, so a redelivery emits the same records again instead of deciding again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use redis::Script;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::audit::Sealer;
use crate::codec;
use crate::context::redis::RedisConn;
use crate::context::{ResourceKey, StoreError};
use crate::governance::{now_secs, BudgetCheck, Budgets, GovernanceConfig, Spender};
use crate::kafka::runtime::{ProcessError, Processor};
use crate::kafka::{Input, Output};
use crate::records::{
    audit_event, record_event, trace_id, types, ActionData, ApprovalData, AuditData, Emitter,
    ProposalData,
};
use crate::resolve::{
    decide, params_hash, prune, ActiveAction, ActiveStatus, Candidate, Decision, RejectReason,
    ResolveConfig, ResourceState,
};
use crate::route::stable_id;
use crate::telemetry::METRICS;

/// Source attribute of records the resolve stage writes.
pub const SOURCE: &str = "switchyard/resolve";

const CAS: &str = r#"
-- KEYS[1] = resource hash, KEYS[2] = side key; ARGV[1] = expected rev, ARGV[2] = ttl,
-- ARGV[3] = side value ('' = none), ARGV[4] = side ttl, ARGV[5..] = field, value pairs
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'rev', rev + 1)
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4]) end
return 1
"#;

/// An approval as stored in its resource's hash (field `approval:<id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredApproval {
    pub approval: ApprovalData,
    /// The action that goes out when approved (token assigned then).
    pub action: ActionData,
    #[serde(default)]
    pub escalated: bool,
}

/// A resource's resolve state as loaded.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub rev: u64,
    pub token: u64,
    pub state: ResourceState,
    pub applied: HashMap<i32, i64>,
    pub approvals: BTreeMap<String, StoredApproval>,
}

/// Redis state of the resolve stage and of approvals.
///
/// Keys: `<prefix>:res:{t/r}` (hash: `rev`, `token`, `state`, `applied:<partition>`,
/// `approval:<id>`), `<prefix>:decision:{t/r}:<proposal id>`, and two indexes of approvals:
/// `<prefix>:approvals:open` (sorted set by expiry) and `<prefix>:approvals:where` (id → resource).
pub struct ResourceStore {
    conn: RedisConn,
    prefix: String,
    cas: Script,
    /// Resource hashes expire this long after their last write.
    pub ttl: u64,
}

fn rerr(e: redis::RedisError) -> StoreError {
    StoreError::Redis(e.to_string())
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

impl ResourceStore {
    pub fn new(conn: RedisConn, prefix: &str, ttl: u64) -> Self {
        ResourceStore {
            conn,
            prefix: prefix.into(),
            cas: Script::new(CAS),
            ttl,
        }
    }

    fn res_key(&self, k: &ResourceKey) -> String {
        format!("{}:res:{}", self.prefix, k.hash_tag())
    }
    fn decision_key(&self, k: &ResourceKey, proposal_id: &str) -> String {
        format!("{}:decision:{}:{proposal_id}", self.prefix, k.hash_tag())
    }
    fn ctx_key(&self, k: &ResourceKey) -> String {
        format!("{}:ctx:{}", self.prefix, k.hash_tag())
    }
    fn open_key(&self) -> String {
        format!("{}:approvals:open", self.prefix)
    }
    fn where_key(&self) -> String {
        format!("{}:approvals:where", self.prefix)
    }

    /// The resource's state, plus the context versions at which `keys` last changed.
    pub async fn load(
        &self,
        k: &ResourceKey,
        keys: &[String],
    ) -> Result<(Loaded, BTreeMap<String, u64>), StoreError> {
        let (_, l, v) = self.load_with_decision(k, keys, None).await?;
        Ok((l, v))
    }

    /// [`Self::load`], plus the stored decision of `proposal_id` when given, in one round trip.
    pub async fn load_with_decision(
        &self,
        k: &ResourceKey,
        keys: &[String],
        proposal_id: Option<&str>,
    ) -> Result<(Option<Decided>, Loaded, BTreeMap<String, u64>), StoreError> {
        use redis::FromRedisValue;
        let mut c = self.conn.get().await?;
        let mut pipe = redis::pipe();
        pipe.hgetall(self.res_key(k));
        if let Some(id) = proposal_id {
            pipe.get(self.decision_key(k, id));
        }
        let fields: Vec<String> = keys.iter().map(|k| format!("_v:{k}")).collect();
        if !fields.is_empty() {
            pipe.cmd("HMGET").arg(self.ctx_key(k)).arg(&fields);
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut c).await.map_err(rerr)?;
        let mut replies = replies.into_iter();
        let mut next = || replies.next().unwrap_or(redis::Value::Nil);
        let hash: HashMap<String, String> =
            FromRedisValue::from_redis_value(next()).map_err(|e| corrupt("state", e))?;
        let decided: Option<String> = match proposal_id {
            Some(_) => {
                FromRedisValue::from_redis_value(next()).map_err(|e| corrupt("decision", e))?
            }
            None => None,
        };
        let versions: Vec<Option<u64>> = if fields.is_empty() {
            Vec::new()
        } else {
            FromRedisValue::from_redis_value(next()).map_err(|e| corrupt("versions", e))?
        };
        let decided = decided
            .map(|s| serde_json::from_str(&s).map_err(|e| corrupt("decision", e)))
            .transpose()?;
        let mut l = Loaded::default();
        for (f, v) in hash {
            match f.as_str() {
                "rev" => l.rev = v.parse().map_err(|e| corrupt("rev", e))?,
                "token" => l.token = v.parse().map_err(|e| corrupt("token", e))?,
                "state" => l.state = serde_json::from_str(&v).map_err(|e| corrupt("state", e))?,
                _ => {
                    if let Some(p) = f.strip_prefix("applied:") {
                        l.applied.insert(
                            p.parse().map_err(|e| corrupt("applied", e))?,
                            v.parse().map_err(|e| corrupt("applied", e))?,
                        );
                    } else if let Some(id) = f.strip_prefix("approval:") {
                        l.approvals.insert(
                            id.to_string(),
                            serde_json::from_str(&v).map_err(|e| corrupt("approval", e))?,
                        );
                    }
                }
            }
        }
        let key_versions = keys
            .iter()
            .cloned()
            .zip(versions)
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        Ok((decided, l, key_versions))
    }

    /// Writes `fields` if the resource is still at `rev`; also sets `side` (a decision) when given.
    pub async fn cas(
        &self,
        k: &ResourceKey,
        rev: u64,
        fields: &[(String, String)],
        side: Option<(&str, &str, u64)>,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn.get().await?;
        let mut inv = self.cas.prepare_invoke();
        let (side_key, side_val, side_ttl) = side.unwrap_or(("", "", 0));
        inv.key(self.res_key(k))
            .key(if side_key.is_empty() {
                self.res_key(k)
            } else {
                side_key.to_string()
            })
            .arg(rev)
            .arg(self.ttl)
            .arg(side_val)
            .arg(side_ttl.max(1));
        for (f, v) in fields {
            inv.arg(f).arg(v);
        }
        let ok: i64 = inv.invoke_async(&mut c).await.map_err(rerr)?;
        Ok(ok == 1)
    }

    /// Adds approvals to the open index (idempotent).
    pub async fn index_open(&self, approvals: &[&ApprovalData]) -> Result<(), StoreError> {
        if approvals.is_empty() {
            return Ok(());
        }
        let mut c = self.conn.get().await?;
        let mut pipe = redis::pipe();
        for a in approvals {
            pipe.zadd(self.open_key(), &a.approval_id, a.expires_at)
                .ignore();
            pipe.hset(
                self.where_key(),
                &a.approval_id,
                format!("{}\t{}", a.tenant, a.resource),
            )
            .ignore();
        }
        pipe.query_async::<()>(&mut c).await.map_err(rerr)
    }

    /// Removes an approval from the open index (it stays findable by id).
    pub async fn index_close(&self, approval_id: &str) -> Result<(), StoreError> {
        let mut c = self.conn.get().await?;
        redis::cmd("ZREM")
            .arg(self.open_key())
            .arg(approval_id)
            .query_async::<()>(&mut c)
            .await
            .map_err(rerr)
    }

    /// Open approvals with their expiry, soonest first.
    pub async fn open(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let mut c = self.conn.get().await?;
        redis::cmd("ZRANGE")
            .arg(self.open_key())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await
            .map_err(rerr)
    }

    /// The resource an approval belongs to.
    pub async fn where_is(&self, approval_id: &str) -> Result<Option<ResourceKey>, StoreError> {
        let mut c = self.conn.get().await?;
        let v: Option<String> = redis::cmd("HGET")
            .arg(self.where_key())
            .arg(approval_id)
            .query_async(&mut c)
            .await
            .map_err(rerr)?;
        Ok(v.and_then(|s| s.split_once('\t').map(|(t, r)| ResourceKey::new(t, r))))
    }
}

/// What was decided for one proposal; stored so a redelivery emits the same records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decided {
    /// `accepted`, `approval_requested`, `rejected`, `deduplicated` or `merged`.
    pub outcome: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub rule: Option<String>,
    pub detail: String,
    /// The action sent to `switchyard.actions` (accepted, or merged and sent again).
    #[serde(default)]
    pub action: Option<ActionData>,
    /// Approval records to send: a new request, superseded requests.
    #[serde(default)]
    pub approvals: Vec<ApprovalData>,
    /// The existing action a duplicate or merge went into.
    #[serde(default)]
    pub into_action: Option<String>,
    #[serde(default)]
    pub superseded: Vec<String>,
    /// When it was decided (RFC 3339): the `time` of every record it causes, so a re-emission is
    /// byte-identical.
    #[serde(default)]
    pub at: String,
}

pub struct ResolveStage {
    pub rules: ResolveConfig,
    pub governance: Arc<GovernanceConfig>,
    pub budgets: Arc<Budgets>,
    pub store: Arc<ResourceStore>,
    pub emitter: Emitter,
    pub actions_topic: String,
    pub approvals_topic: String,
    /// Seals each decision into its resource's audit chain.
    pub sealer: Arc<Sealer>,
    /// Decisions are kept this long (the window in which a redelivered proposal is recognised).
    pub decision_ttl: u64,
}

fn transient(e: StoreError) -> ProcessError {
    match e {
        StoreError::Corrupt(d) => ProcessError::Poison {
            reason: "corrupt_state",
            detail: d,
        },
        e => ProcessError::Transient(format!("resolve state: {e}")),
    }
}

fn poison(reason: &'static str, detail: impl Into<String>) -> ProcessError {
    ProcessError::Poison {
        reason,
        detail: detail.into(),
    }
}

/// Reads a proposal record.
pub fn decode_proposal(
    rec: &Input,
    emitter: &Emitter,
) -> Result<(ProposalData, Option<String>), ProcessError> {
    let ev = codec::decode(rec.view(), &emitter.schemas)
        .map_err(|e| poison(e.reason(), e.to_string()))?;
    if ev.ty != types::PROPOSAL {
        return Err(poison(
            "not_a_proposal",
            format!("record type is {:?}, expected {}", ev.ty, types::PROPOSAL),
        ));
    }
    let tp = ev.traceparent().map(str::to_string);
    let p: ProposalData = serde_json::from_value(ev.data.unwrap_or(Value::Null))
        .map_err(|e| poison("malformed_proposal", e.to_string()))?;
    Ok((p, tp))
}

impl ResolveStage {
    /// Decides one proposal against the loaded state. Returns the decision and the fields to write.
    async fn decide_one(
        &self,
        p: &ProposalData,
        loaded: &Loaded,
        key_versions: BTreeMap<String, u64>,
        now: i64,
    ) -> Result<(Decided, Vec<(String, String)>), ProcessError> {
        let mut state = loaded.state.clone();
        state.key_versions = key_versions;
        prune(&mut state, &self.rules, now);
        let cand = Candidate {
            proposal_id: p.proposal_id.clone(),
            agent: p.agent.clone(),
            action: p.action.clone(),
            parameters: p.parameters.clone(),
            priority: p.priority,
            impact: p.impact,
            context_version: p.context_version,
        };
        let mut token = loaded.token;
        let mut fields: Vec<(String, String)> = Vec::new();
        let rejected = |reason: RejectReason, rule: &str, detail: String| Decided {
            outcome: "rejected".into(),
            reason: Some(reason.as_str().into()),
            rule: Some(rule.into()),
            detail,
            action: None,
            approvals: vec![],
            into_action: None,
            superseded: vec![],
            at: String::new(),
        };
        let action_of = |action_id: &str,
                         priority: i32,
                         parameters: &Value,
                         proposals: Vec<String>,
                         agents: Vec<String>,
                         token: u64| ActionData {
            action_id: action_id.to_string(),
            action: p.action.clone(),
            resource: p.resource.clone(),
            tenant: p.tenant.clone(),
            workflow_id: p.workflow_id.clone(),
            parameters: parameters.clone(),
            fencing_token: token,
            proposals: json!(proposals),
            agents: json!(agents),
            priority,
            impact: p.impact,
            approved_by: None,
            reason: p.reason.clone(),
        };
        let decided = match decide(&self.rules, &state, &cand, now) {
            Decision::Rejected {
                reason,
                detail,
                rule,
            } => rejected(reason, rule, detail),
            Decision::Duplicate { action_id } => {
                if let Some(a) = state.active.iter_mut().find(|a| a.action_id == action_id) {
                    a.proposals.push(p.proposal_id.clone());
                    if !a.agents.contains(&p.agent) {
                        a.agents.push(p.agent.clone());
                    }
                }
                Decided {
                    outcome: "deduplicated".into(),
                    reason: None,
                    rule: Some("dedupe".into()),
                    detail: format!("same as {action_id}"),
                    action: None,
                    approvals: vec![],
                    into_action: Some(action_id),
                    superseded: vec![],
                    at: String::new(),
                }
            }
            Decision::Merged {
                action_id,
                parameters,
            } => {
                let mut action = None;
                if let Some(a) = state.active.iter_mut().find(|a| a.action_id == action_id) {
                    a.proposals.push(p.proposal_id.clone());
                    if !a.agents.contains(&p.agent) {
                        a.agents.push(p.agent.clone());
                    }
                    a.parameters = parameters.clone();
                    a.params_hash = params_hash(&parameters);
                    if a.status == ActiveStatus::Accepted {
                        token += 1;
                        action = Some(action_of(
                            &action_id,
                            a.priority,
                            &parameters,
                            a.proposals.clone(),
                            a.agents.clone(),
                            token,
                        ));
                    }
                }
                Decided {
                    outcome: "merged".into(),
                    reason: None,
                    rule: Some("merge".into()),
                    detail: format!("combined into {action_id}"),
                    action,
                    approvals: vec![],
                    into_action: Some(action_id),
                    superseded: vec![],
                    at: String::new(),
                }
            }
            Decision::New {
                action_id,
                priority,
                superseded,
            } => {
                let spender = Spender {
                    agent: &p.agent,
                    workflow: &p.workflow_id,
                    tenant: &p.tenant,
                };
                if !self
                    .governance
                    .allows(&p.tenant, &p.agent, &p.action, &p.resource)
                {
                    rejected(
                        RejectReason::Access,
                        "access",
                        format!(
                            "no access rule lets {} cause {} on {}",
                            p.agent, p.action, p.resource
                        ),
                    )
                } else if let BudgetCheck::Exhausted { budget } =
                    self.budgets.check(&spender).await.map_err(transient)?
                {
                    METRICS.budget_refusals.with_label_values(&[&budget]).inc();
                    rejected(
                        RejectReason::Budget,
                        "budget",
                        format!("budget {budget} is exhausted"),
                    )
                } else {
                    let mut approvals = Vec::new();
                    for id in &superseded {
                        if let Some(a) = state.active.iter().find(|a| &a.action_id == id) {
                            if let Some(apr) =
                                a.approval_id.as_ref().and_then(|x| loaded.approvals.get(x))
                            {
                                let mut s = apr.clone();
                                s.approval.status = "superseded".into();
                                s.approval.why = Some(format!(
                                    "superseded by {action_id} (priority {priority})"
                                ));
                                fields.push((
                                    format!("approval:{}", s.approval.approval_id),
                                    serde_json::to_string(&s)
                                        .map_err(|e| ProcessError::Fatal(e.to_string()))?,
                                ));
                                approvals.push(s.approval);
                            }
                        }
                    }
                    state.active.retain(|a| !superseded.contains(&a.action_id));
                    let provenance = vec![p.proposal_id.clone()];
                    let agents = vec![p.agent.clone()];
                    let mut entry = ActiveAction {
                        action_id: action_id.clone(),
                        action: p.action.clone(),
                        priority,
                        status: ActiveStatus::Accepted,
                        at: now,
                        params_hash: params_hash(&p.parameters),
                        parameters: p.parameters.clone(),
                        proposals: provenance.clone(),
                        agents: agents.clone(),
                        approval_id: None,
                    };
                    if let Some(rule) = self.governance.needs_approval(&p.action, p.impact, p.cost)
                    {
                        let approval_id = format!("apr-{}", stable_id(&[&action_id]));
                        let action =
                            action_of(&action_id, priority, &p.parameters, provenance, agents, 0);
                        let approval = ApprovalData {
                            approval_id: approval_id.clone(),
                            action_id: action_id.clone(),
                            action: p.action.clone(),
                            resource: p.resource.clone(),
                            tenant: p.tenant.clone(),
                            status: "pending".into(),
                            decided_by: None,
                            why: None,
                            requested_at: now,
                            expires_at: now + self.governance.approvals.timeout_seconds as i64,
                            action_record: serde_json::to_value(&action)
                                .map_err(|e| ProcessError::Fatal(e.to_string()))?,
                        };
                        let stored = StoredApproval {
                            approval: approval.clone(),
                            action,
                            escalated: false,
                        };
                        fields.push((
                            format!("approval:{approval_id}"),
                            serde_json::to_string(&stored)
                                .map_err(|e| ProcessError::Fatal(e.to_string()))?,
                        ));
                        entry.status = ActiveStatus::PendingApproval;
                        entry.approval_id = Some(approval_id);
                        state.active.push(entry);
                        approvals.insert(0, approval);
                        Decided {
                            outcome: "approval_requested".into(),
                            reason: None,
                            rule: Some(format!("approvals.rules[{rule}]")),
                            detail: format!("{} needs approval", p.action),
                            action: None,
                            approvals,
                            into_action: None,
                            superseded,
                            at: String::new(),
                        }
                    } else {
                        token += 1;
                        state.active.push(entry);
                        let action = action_of(
                            &action_id,
                            priority,
                            &p.parameters,
                            provenance,
                            agents,
                            token,
                        );
                        Decided {
                            outcome: "accepted".into(),
                            reason: None,
                            rule: None,
                            detail: format!("accepted with fencing token {token}"),
                            action: Some(action),
                            approvals,
                            into_action: None,
                            superseded,
                            at: String::new(),
                        }
                    }
                }
            }
        };
        state.key_versions.clear();
        fields.push((
            "state".into(),
            serde_json::to_string(&state).map_err(|e| ProcessError::Fatal(e.to_string()))?,
        ));
        fields.push(("token".into(), token.to_string()));
        Ok((decided, fields))
    }

    /// The records a decision causes, its audit record sealed.
    async fn outputs(
        &self,
        p: &ProposalData,
        d: &Decided,
        tp: Option<&str>,
    ) -> Result<Vec<Output>, ProcessError> {
        let mut out = Vec::new();
        if let Some(a) = &d.action {
            let mut ev = record_event(
                format!("{}-{}", a.action_id, a.fencing_token),
                SOURCE,
                types::ACTION,
                &a.resource,
                &a.tenant,
                tp,
                a,
            )?;
            at(&mut ev, &d.at);
            out.push(self.emitter.emit(&self.actions_topic, &ev)?);
        }
        for a in &d.approvals {
            out.push(approval_output(
                &self.emitter,
                &self.approvals_topic,
                a,
                tp,
                Some(&d.at),
            )?);
        }
        let audit = AuditData {
            decision: d.outcome.clone(),
            stage: "resolve".into(),
            resource: p.resource.clone(),
            tenant: p.tenant.clone(),
            event_id: p.event_id.clone(),
            task_id: Some(p.task_id.clone()),
            workflow_id: Some(p.workflow_id.clone()),
            trace_id: trace_id(tp),
            reason: d.reason.clone(),
            detail: json!({
                "proposal_id": p.proposal_id, "agent": p.agent, "action": p.action, "rule": d.rule, "detail": d.detail,
                "action_id": d.action.as_ref().map(|a| &a.action_id).or(d.into_action.as_ref()),
                "fencing_token": d.action.as_ref().map(|a| a.fencing_token),
                "approval_id": d.approvals.first().filter(|a| a.status == "pending").map(|a| &a.approval_id),
                "superseded": d.superseded,
            }),
            seq: None,
            prev_hash: None,
            hash: None,
        };
        let mut ev = audit_event(SOURCE, &[&d.outcome, &p.proposal_id], &audit, tp)?;
        at(&mut ev, &d.at);
        out.extend(
            self.sealer
                .outputs("resolve", &self.emitter, vec![ev])
                .await?,
        );
        Ok(out)
    }
}

/// Stamps a record with the decision's time (when known).
fn at(ev: &mut crate::event::CloudEvent, time: &str) {
    if !time.is_empty() {
        ev.time = Some(time.to_string());
    }
}

/// The `switchyard.approvals` record for an approval's current status.
pub fn approval_output(
    emitter: &Emitter,
    topic: &str,
    a: &ApprovalData,
    tp: Option<&str>,
    time: Option<&str>,
) -> Result<Output, ProcessError> {
    let mut ev = record_event(
        format!("{}-{}", a.approval_id, a.status),
        SOURCE,
        types::APPROVAL,
        &a.resource,
        &a.tenant,
        tp,
        a,
    )?;
    at(&mut ev, time.unwrap_or_default());
    emitter.emit(topic, &ev)
}

impl Processor for ResolveStage {
    fn stage(&self) -> &'static str {
        "resolve"
    }

    /// One lane per resource: its proposals are decided strictly in order.
    fn lane(&self, rec: &Input) -> u64 {
        rec.key_lane()
    }

    async fn process(&self, rec: Arc<Input>) -> Result<Vec<Output>, ProcessError> {
        let (p, tp) = decode_proposal(&rec, &self.emitter)?;
        let key = ResourceKey::new(p.tenant.clone(), p.resource.clone());
        let inval = self
            .rules
            .actions
            .get(&p.action)
            .map(|r| r.invalidated_by.clone())
            .unwrap_or_default();
        // One round trip: a decision stored for this proposal (a redelivery), and the state.
        let (stored, loaded, key_versions) = self
            .store
            .load_with_decision(&key, &inval, Some(&p.proposal_id))
            .await
            .map_err(transient)?;
        if let Some(d) = stored {
            METRICS.proposals.with_label_values(&["replayed"]).inc();
            let open: Vec<&ApprovalData> = d
                .approvals
                .iter()
                .filter(|a| a.status == "pending")
                .collect();
            self.store.index_open(&open).await.map_err(transient)?;
            return self.outputs(&p, &d, tp.as_deref()).await;
        }
        let mut first = Some((loaded, key_versions));
        for _ in 0..20 {
            let (loaded, key_versions) = match first.take() {
                Some(l) => l,
                None => self.store.load(&key, &inval).await.map_err(transient)?,
            };
            if loaded
                .applied
                .get(&rec.partition)
                .is_some_and(|a| *a >= rec.offset)
            {
                // A newer owner already went past this record: we are a zombie (or it was redelivered
                // after its decision expired). Apply nothing.
                METRICS.proposals.with_label_values(&["fenced"]).inc();
                tracing::warn!(
                    partition = rec.partition,
                    offset = rec.offset,
                    "Proposal fenced: state is already past this offset."
                );
                return Ok(Vec::new());
            }
            let now = now_secs();
            let (mut decided, mut fields) = self.decide_one(&p, &loaded, key_versions, now).await?;
            decided.at = crate::event::now_rfc3339();
            fields.push((format!("applied:{}", rec.partition), rec.offset.to_string()));
            let djson =
                serde_json::to_string(&decided).map_err(|e| ProcessError::Fatal(e.to_string()))?;
            let dkey = self.store.decision_key(&key, &p.proposal_id);
            if self
                .store
                .cas(
                    &key,
                    loaded.rev,
                    &fields,
                    Some((&dkey, &djson, self.decision_ttl)),
                )
                .await
                .map_err(transient)?
            {
                let open: Vec<&ApprovalData> = decided
                    .approvals
                    .iter()
                    .filter(|a| a.status == "pending")
                    .collect();
                self.store.index_open(&open).await.map_err(transient)?;
                for a in decided.approvals.iter().filter(|a| a.status != "pending") {
                    self.store
                        .index_close(&a.approval_id)
                        .await
                        .map_err(transient)?;
                }
                METRICS
                    .proposals
                    .with_label_values(&[&decided.outcome])
                    .inc();
                if let Some(r) = &decided.reason {
                    METRICS.actions_rejected.with_label_values(&[r]).inc();
                }
                if let Some(rule) = decided.rule.as_deref().filter(|r| {
                    matches!(
                        *r,
                        "priority"
                            | "dedupe"
                            | "merge"
                            | "cooldown"
                            | "staleness"
                            | "pending_approval"
                    )
                }) {
                    METRICS.conflicts.with_label_values(&[rule]).inc();
                }
                if decided.outcome == "accepted" {
                    METRICS
                        .actions_accepted
                        .with_label_values(&[&p.action])
                        .inc();
                }
                if decided.outcome == "approval_requested" {
                    METRICS.approvals.with_label_values(&["requested"]).inc();
                }
                return self.outputs(&p, &decided, tp.as_deref()).await;
            }
            // Someone (an approval decision) changed the resource meanwhile: decide again.
        }
        Err(ProcessError::Transient(
            "resource state kept changing; retrying".into(),
        ))
    }
}
