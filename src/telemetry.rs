//! Telemetry: every metric switchyard exports is named here, and logging is set up here.
//!
//! Names follow Prometheus conventions (`switchyard_<what>_<unit>[_total]`). Labels are bounded: stage,
//! topic (from config), reason (fixed sets), route and agent (from config); never a resource id.

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, register_histogram_vec_with_registry,
    register_int_counter_vec_with_registry, register_int_gauge_vec_with_registry, HistogramVec,
    IntCounterVec, IntGaugeVec, Registry,
};

use serde::{Deserialize, Serialize};

/// All switchyard metrics, registered in one registry (plus process metrics).
pub struct Metrics {
    pub registry: Registry,
    /// Records read from Kafka, by stage and topic.
    pub records_consumed: IntCounterVec,
    /// Records written and acknowledged by the broker, by stage and topic.
    pub records_produced: IntCounterVec,
    /// Records sent to the dead-letter topic, by stage and reason.
    pub dlq_records: IntCounterVec,
    /// Records a stage holds between poll and commit.
    pub in_flight: IntGaugeVec,
    /// Time from poll to every output acknowledged, by stage.
    pub record_duration: HistogramVec,
    /// Time from the input record's Kafka timestamp to its outputs being acknowledged, by stage.
    pub end_to_end_latency: HistogramVec,
    /// Offset commits by stage and result (`ok`, `error`).
    pub commits: IntCounterVec,
    /// Rebalance events by stage and kind (`assign`, `revoke`).
    pub rebalances: IntCounterVec,
    /// Partitions currently assigned, by stage.
    pub assigned_partitions: IntGaugeVec,
    /// Times a stage stopped taking records because `max_in_flight` was reached.
    pub backpressure_pauses: IntCounterVec,
    /// Times such a stop lasted long enough that the stage paused its consumer (which discards
    /// what librdkafka prefetched: fetched again on resume).
    pub consumer_pauses: IntCounterVec,
    /// Produce attempts retried because the local producer queue was full.
    pub producer_queue_full: IntCounterVec,
    /// Record batches the producer sent, by topic (librdkafka statistics, every 5 s).
    pub produce_batches: IntCounterVec,
    /// The records in those batches, by topic.
    pub produce_batched_records: IntCounterVec,
    /// Produce failures reported by the broker, by stage.
    pub produce_errors: IntCounterVec,
    /// Consumer errors reported by librdkafka, by stage.
    pub consumer_errors: IntCounterVec,
    /// Events the route stage read, by topic and outcome (`routed`, `unrouted`).
    pub events_routed: IntCounterVec,
    /// Tasks written, by route and agent.
    pub tasks_emitted: IntCounterVec,
    /// Approximate consumer lag (high watermark - position), by stage and topic.
    pub consumer_lag: IntGaugeVec,
    /// Agent tasks by agent and outcome (`started`, `succeeded`, `failed`, `timed_out`, `replayed`).
    pub agent_tasks: IntCounterVec,
    /// Agent call attempts by agent and result (`ok`, `error`, `timeout`).
    pub agent_calls: IntCounterVec,
    /// Duration of a task's agent work (all attempts), by agent.
    pub agent_duration: HistogramVec,
    /// Agent calls running now, by agent.
    pub agent_in_flight: IntGaugeVec,
    /// Refused agent requests by agent and reason (`read`, `write`, `action`).
    pub agent_refusals: IntCounterVec,
    /// Shared-context operations by op and result (`ok`, `error`).
    pub context_ops: IntCounterVec,
    /// Shared-context operation latency by op.
    pub context_op_duration: HistogramVec,
    /// Proposals by resolve outcome (accepted, approval_requested, rejected, deduplicated, merged,
    /// replayed, fenced).
    pub proposals: IntCounterVec,
    /// Actions accepted, by action type.
    pub actions_accepted: IntCounterVec,
    /// Actions rejected, by reason (conflict, stale, cooldown, pending_approval, access, budget).
    pub actions_rejected: IntCounterVec,
    /// Resolution rule hits, by rule (priority, dedupe, merge, cooldown, staleness, pending_approval).
    pub conflicts: IntCounterVec,
    /// Approval events by kind (requested, approved, rejected, expired, escalated).
    pub approvals: IntCounterVec,
    /// Approvals waiting for a person now.
    pub approvals_pending: IntGaugeVec,
    /// Approval notifications (webhooks) by event (requested, escalated, expired) and outcome
    /// (sent, failed, dropped).
    pub approval_notifications: IntCounterVec,
    /// Time from approval request to decision.
    pub approval_wait: HistogramVec,
    /// Budget spent in the current period, by budget and unit (calls, cost).
    pub budget_spent: prometheus::GaugeVec,
    /// Budget remaining in the current period, by budget and unit.
    pub budget_remaining: prometheus::GaugeVec,
    /// Refusals because a budget was exhausted, by budget.
    pub budget_refusals: IntCounterVec,
    /// Audit records sealed into hash chains.
    pub audit_sealed: IntCounterVec,
    /// Seals written again by a process sealing on a head it did not write (after a crash or a
    /// partition moving).
    pub audit_seals_rewritten: prometheus::IntCounter,
    /// Times a seal waited for an earlier seal of its chain to be delivered (so a seal lost in a
    /// crash is always among those the chain head keeps).
    pub audit_seal_waits: prometheus::IntCounter,
    /// HTTP connections closed at once because `http.max_connections` were open.
    pub http_connections_refused: prometheus::IntCounter,
    /// Model calls through the gateway, by provider, model and outcome (ok, retryable, rejected,
    /// timeout, transport, malformed, rate_limited, cooling).
    pub llm_requests: IntCounterVec,
    /// Tokens of model calls, by model and kind (input, output, cached).
    pub llm_tokens: IntCounterVec,
    /// Cost of model calls, by model and currency.
    pub llm_cost: prometheus::CounterVec,
    /// Duration of one provider request, by provider.
    pub llm_duration: HistogramVec,
    /// Tokens of LLM agents' model calls, by agent and kind (input, output, cached).
    pub agent_llm_tokens: IntCounterVec,
    /// Cost of LLM agents' model calls, by agent and currency.
    pub agent_llm_cost: prometheus::CounterVec,
    /// Model calls per LLM-agent run, by agent.
    pub agent_llm_iterations: HistogramVec,
    /// Tool calls by tool and outcome (ok, error, refused, proposed, executed, skipped).
    pub tool_calls: IntCounterVec,
    /// 1 while an agent's circuit is open (as this instance last saw it), by agent.
    pub agent_circuit_open: IntGaugeVec,
    pub agent_proposals: IntCounterVec,
    pub agent_actions_undone: IntCounterVec,
    pub agent_score: prometheus::GaugeVec,
    pub workflow_runs_active: IntGaugeVec,
    /// Workflow runs by workflow and outcome (started, succeeded, completed_with_failures, failed).
    pub workflow_runs: IntCounterVec,
    /// Duration of workflow steps (the agent's work), by workflow and step.
    pub workflow_step_duration: HistogramVec,
    /// Events through the HTTP ingest doors, by source (cloudevents, alertmanager, github) and
    /// outcome (see [`crate::http::ingest::OUTCOMES`]).
    pub ingest_events: IntCounterVec,
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> =
    LazyLock::new(|| Metrics::new().expect("metric definitions are valid"));

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let latency_buckets = exponential_buckets(0.0005, 2.0, 18)?; // 0.5 ms .. ~65 s
        Ok(Metrics {
            records_consumed: register_int_counter_vec_with_registry!(
                "switchyard_records_consumed_total",
                "Records read from Kafka.",
                &["stage", "topic"],
                r
            )?,
            records_produced: register_int_counter_vec_with_registry!(
                "switchyard_records_produced_total",
                "Records written and acknowledged by the broker.",
                &["stage", "topic"],
                r
            )?,
            dlq_records: register_int_counter_vec_with_registry!(
                "switchyard_dlq_records_total",
                "Records sent to the dead-letter topic.",
                &["stage", "reason"],
                r
            )?,
            in_flight: register_int_gauge_vec_with_registry!(
                "switchyard_in_flight_records",
                "Records held between poll and commit.",
                &["stage"],
                r
            )?,
            record_duration: register_histogram_vec_with_registry!(
                "switchyard_record_duration_seconds",
                "Time from poll until every output of a record was acknowledged.",
                &["stage"],
                latency_buckets.clone(),
                r
            )?,
            end_to_end_latency: register_histogram_vec_with_registry!(
                "switchyard_end_to_end_latency_seconds",
                "Time from the input record's timestamp until its outputs were acknowledged.",
                &["stage"],
                latency_buckets.clone(),
                r
            )?,
            commits: register_int_counter_vec_with_registry!(
                "switchyard_offset_commits_total",
                "Synchronous offset commits (revoke, shutdown).",
                &["stage", "result"],
                r
            )?,
            rebalances: register_int_counter_vec_with_registry!(
                "switchyard_rebalances_total",
                "Consumer-group rebalance events.",
                &["stage", "kind"],
                r
            )?,
            assigned_partitions: register_int_gauge_vec_with_registry!(
                "switchyard_assigned_partitions",
                "Partitions currently assigned.",
                &["stage"],
                r
            )?,
            backpressure_pauses: register_int_counter_vec_with_registry!(
                "switchyard_backpressure_pauses_total",
                "Times a stage stopped taking records because max_in_flight was reached.",
                &["stage"],
                r
            )?,
            consumer_pauses: register_int_counter_vec_with_registry!(
                "switchyard_consumer_pauses_total",
                "Times a stage held at max_in_flight for over 3 s and paused its consumer (prefetched records are fetched again on resume).",
                &["stage"],
                r
            )?,
            producer_queue_full: register_int_counter_vec_with_registry!(
                "switchyard_producer_queue_full_total",
                "Produce attempts retried because the producer queue was full.",
                &["stage"],
                r
            )?,
            produce_batches: register_int_counter_vec_with_registry!(
                "switchyard_produce_batches_total",
                "Record batches the producer sent, by topic (librdkafka statistics every 5 s; a retried batch counts again); fewer, fuller batches cost the broker less.",
                &["topic"],
                r
            )?,
            produce_batched_records: register_int_counter_vec_with_registry!(
                "switchyard_produce_batched_records_total",
                "Records in the batches switchyard_produce_batches_total counts, by topic: the two give how full the batches are.",
                &["topic"],
                r
            )?,
            produce_errors: register_int_counter_vec_with_registry!(
                "switchyard_produce_errors_total",
                "Produce failures reported by the broker or client.",
                &["stage"],
                r
            )?,
            consumer_errors: register_int_counter_vec_with_registry!(
                "switchyard_consumer_errors_total",
                "Consumer errors reported by librdkafka.",
                &["stage"],
                r
            )?,
            events_routed: register_int_counter_vec_with_registry!(
                "switchyard_events_total",
                "Events read by the route stage, by outcome (routed, unrouted).",
                &["topic", "outcome"],
                r
            )?,
            tasks_emitted: register_int_counter_vec_with_registry!(
                "switchyard_tasks_emitted_total",
                "Tasks written by the route stage.",
                &["route", "agent"],
                r
            )?,
            consumer_lag: register_int_gauge_vec_with_registry!(
                "switchyard_consumer_lag_records",
                "Approximate consumer lag (high watermark minus position, clamped at 0).",
                &["stage", "topic"],
                r
            )?,
            agent_tasks: register_int_counter_vec_with_registry!(
                "switchyard_agent_tasks_total",
                "Agent tasks by outcome (started, succeeded, failed, timed_out, replayed).",
                &["agent", "outcome"],
                r
            )?,
            agent_calls: register_int_counter_vec_with_registry!(
                "switchyard_agent_calls_total",
                "Agent call attempts by result (ok, error, timeout).",
                &["agent", "result"],
                r
            )?,
            agent_duration: register_histogram_vec_with_registry!(
                "switchyard_agent_duration_seconds",
                "Time an agent task took, all attempts included.",
                &["agent"],
                exponential_buckets(0.0005, 2.0, 18)?,
                r
            )?,
            agent_in_flight: register_int_gauge_vec_with_registry!(
                "switchyard_agent_in_flight_calls",
                "Agent calls running now.",
                &["agent"],
                r
            )?,
            agent_refusals: register_int_counter_vec_with_registry!(
                "switchyard_agent_refusals_total",
                "Agent requests refused for leaving their scope, by reason (read, write, action).",
                &["agent", "reason"],
                r
            )?,
            context_ops: register_int_counter_vec_with_registry!(
                "switchyard_context_operations_total",
                "Shared-context operations by result.",
                &["op", "result"],
                r
            )?,
            context_op_duration: register_histogram_vec_with_registry!(
                "switchyard_context_operation_duration_seconds",
                "Shared-context operation latency.",
                &["op"],
                exponential_buckets(0.0001, 2.0, 16)?,
                r
            )?,
            proposals: register_int_counter_vec_with_registry!(
                "switchyard_proposals_total",
                "Proposals by resolve outcome.",
                &["outcome"],
                r
            )?,
            actions_accepted: register_int_counter_vec_with_registry!(
                "switchyard_actions_accepted_total",
                "Actions accepted, by action type.",
                &["action"],
                r
            )?,
            actions_rejected: register_int_counter_vec_with_registry!(
                "switchyard_actions_rejected_total",
                "Actions rejected, by reason.",
                &["reason"],
                r
            )?,
            conflicts: register_int_counter_vec_with_registry!(
                "switchyard_resolution_rule_hits_total",
                "Resolution rule hits, by rule.",
                &["rule"],
                r
            )?,
            approvals: register_int_counter_vec_with_registry!(
                "switchyard_approvals_total",
                "Approval events by kind (requested, approved, rejected, expired, escalated).",
                &["kind"],
                r
            )?,
            approval_notifications: register_int_counter_vec_with_registry!(
                "switchyard_approval_notifications_total",
                "Approval notifications (webhooks) by event and outcome (sent, failed, dropped).",
                &["event", "outcome"],
                r
            )?,
            approvals_pending: register_int_gauge_vec_with_registry!(
                "switchyard_approvals_pending",
                "Approvals waiting for a person.",
                &["tenant"],
                r
            )?,
            approval_wait: register_histogram_vec_with_registry!(
                "switchyard_approval_wait_seconds",
                "Time from approval request to decision.",
                &["decision"],
                exponential_buckets(1.0, 2.0, 16)?,
                r
            )?,
            budget_spent: prometheus::register_gauge_vec_with_registry!(
                "switchyard_budget_spent",
                "Budget spent in the current period (unit: calls or currency).",
                &["budget", "unit"],
                r
            )?,
            budget_remaining: prometheus::register_gauge_vec_with_registry!(
                "switchyard_budget_remaining",
                "Budget remaining in the current period (unit: calls or currency).",
                &["budget", "unit"],
                r
            )?,
            budget_refusals: register_int_counter_vec_with_registry!(
                "switchyard_budget_refusals_total",
                "Refusals because a budget was exhausted.",
                &["budget"],
                r
            )?,
            llm_requests: register_int_counter_vec_with_registry!(
                "switchyard_llm_requests_total",
                "Model calls through the gateway, by provider, model and outcome.",
                &["provider", "model", "outcome"],
                r
            )?,
            llm_tokens: register_int_counter_vec_with_registry!(
                "switchyard_llm_tokens_total",
                "Tokens of model calls, by model and kind (input, output, cached).",
                &["model", "kind"],
                r
            )?,
            llm_cost: prometheus::register_counter_vec_with_registry!(
                "switchyard_llm_cost_total",
                "Cost of model calls from the configured prices, by model and currency.",
                &["model", "currency"],
                r
            )?,
            llm_duration: register_histogram_vec_with_registry!(
                "switchyard_llm_request_duration_seconds",
                "Duration of one provider request (each retry counts).",
                &["provider"],
                exponential_buckets(0.005, 2.0, 14)?,
                r
            )?,
            agent_llm_tokens: register_int_counter_vec_with_registry!(
                "switchyard_agent_llm_tokens_total",
                "Tokens of LLM agents' model calls, by agent and kind (input, output, cached).",
                &["agent", "kind"],
                r
            )?,
            agent_llm_cost: prometheus::register_counter_vec_with_registry!(
                "switchyard_agent_llm_cost_total",
                "Cost of LLM agents' model calls, by agent and currency.",
                &["agent", "currency"],
                r
            )?,
            agent_llm_iterations: register_histogram_vec_with_registry!(
                "switchyard_agent_llm_iterations",
                "Model calls per LLM-agent run (the tool loop's iterations), by agent.",
                &["agent"],
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0],
                r
            )?,
            tool_calls: register_int_counter_vec_with_registry!(
                "switchyard_tool_calls_total",
                "Tool calls by tool and outcome (ok, error, refused, proposed, executed, skipped, not_run, expired).",
                &["tool", "outcome"],
                r
            )?,
            agent_circuit_open: register_int_gauge_vec_with_registry!(
                "switchyard_agent_circuit_open",
                "1 while an agent's circuit breaker is open (as this instance last saw it), by agent.",
                &["agent"],
                r
            )?,
            agent_proposals: register_int_counter_vec_with_registry!(
                "switchyard_agent_proposals_total",
                "Fate of agents' proposals by agent and outcome (accepted, rejected, approval_requested by rules; approved, declined by people).",
                &["agent", "outcome"],
                r
            )?,
            agent_actions_undone: register_int_counter_vec_with_registry!(
                "switchyard_agent_actions_undone_total",
                "Accepted actions later superseded by a conflicting action of higher priority (e.g. a rollback), by the agent that proposed them.",
                &["agent"],
                r
            )?,
            agent_score: prometheus::register_gauge_vec_with_registry!(
                "switchyard_agent_score",
                "An agent's scorecard success score (0-1: smoothed share of tasks that succeeded and proposals not refused, over the last hour) as best_of routing sees it.",
                &["agent"],
                r
            )?,
            workflow_runs_active: register_int_gauge_vec_with_registry!(
                "switchyard_workflow_runs_active",
                "Workflow runs started and not yet ended (all instances; refreshed by the deadline sweeper), by workflow.",
                &["workflow"],
                r
            )?,
            workflow_runs: register_int_counter_vec_with_registry!(
                "switchyard_workflow_runs_total",
                "Workflow runs by workflow and outcome (started, succeeded, completed_with_failures, failed).",
                &["workflow", "outcome"],
                r
            )?,
            workflow_step_duration: register_histogram_vec_with_registry!(
                "switchyard_workflow_step_duration_seconds",
                "Duration of workflow steps (the agent's work), by workflow and step.",
                &["workflow", "step"],
                latency_buckets.clone(),
                r
            )?,
            ingest_events: register_int_counter_vec_with_registry!(
                "switchyard_ingest_events_total",
                "Events through the HTTP ingest doors, by source (cloudevents, alertmanager, github) and outcome (accepted, duplicate, rejected, unauthorized, too_large, rate_limited, in_progress, failed, ignored); a request refused before its events are read counts once.",
                &["source", "outcome"],
                r
            )?,
            audit_sealed: register_int_counter_vec_with_registry!(
                "switchyard_audit_records_sealed_total",
                "Audit records sealed into per-resource hash chains.",
                &["stage"],
                r
            )?,
            audit_seals_rewritten: prometheus::register_int_counter_with_registry!(
                "switchyard_audit_seals_rewritten_total",
                "Seals written again, byte for byte, by a process sealing on a chain head it did not write (the previous owner may have died before producing it).",
                r
            )?,
            audit_seal_waits: prometheus::register_int_counter_with_registry!(
                "switchyard_audit_seal_waits_total",
                "Times a seal waited for an earlier seal of its chain to be delivered, so that any seal a crash loses is among the last ones its chain head keeps (and the next owner writes again).",
                r
            )?,
            http_connections_refused: prometheus::register_int_counter_with_registry!(
                "switchyard_http_connections_refused_total",
                "HTTP connections closed at once because http.max_connections were open.",
                r
            )?,
            registry: r,
        })
    }

    /// Creates a stage's series at zero, so dashboards and alerts see them before the first event.
    pub fn init_stage(&self, stage: &str) {
        for c in [
            &self.producer_queue_full,
            &self.produce_errors,
            &self.consumer_errors,
            &self.backpressure_pauses,
            &self.consumer_pauses,
        ] {
            c.with_label_values(&[stage]).inc_by(0);
        }
        for result in ["ok", "error"] {
            self.commits.with_label_values(&[stage, result]).inc_by(0);
        }
        for kind in ["assign", "revoke"] {
            self.rebalances.with_label_values(&[stage, kind]).inc_by(0);
        }
        self.in_flight.with_label_values(&[stage]).add(0);
        self.assigned_partitions.with_label_values(&[stage]).add(0);
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "Encoding metrics failed.");
        }
        buf
    }
}

/// The agents of the config (set by `switchyard run`): the only `agent` label values of metrics
/// whose agent comes from a record (a proposal's `agent`, an action's `agents`); others count as
/// `other`, so whoever writes those topics cannot add series.
static KNOWN_AGENTS: std::sync::RwLock<Option<std::collections::HashSet<String>>> =
    std::sync::RwLock::new(None);

/// Adds the agents of a config to those [`agent_label`] knows.
pub fn know_agents(agents: impl IntoIterator<Item = String>) {
    let mut known = KNOWN_AGENTS.write().unwrap_or_else(|e| e.into_inner());
    known.get_or_insert_with(Default::default).extend(agents);
}

/// `agent` as a metric label: itself when a config has it (or none was set), else `other`.
pub fn agent_label(agent: &str) -> &str {
    let known = KNOWN_AGENTS.read().unwrap_or_else(|e| e.into_inner());
    match known.as_ref() {
        Some(k) if !k.contains(agent) => "other",
        _ => agent,
    }
}

/// The `tracing` filter `spec` describes (`info`, `switchyard=debug,rdkafka=warn`, ...); `None` when it
/// is not one. Text with a non-ASCII character is refused before it is parsed: tracing-subscriber
/// 0.3.23's directive parser panics on a multi-byte character (slicing inside it; found by fuzzing
/// the config loader, `fuzz/regressions/config_yaml/`), and a filter has no use for one.
pub fn log_filter(spec: &str) -> Option<tracing_subscriber::EnvFilter> {
    if !spec.is_ascii() {
        return None;
    }
    tracing_subscriber::EnvFilter::try_new(spec).ok()
}

/// Sets up `tracing` output. `RUST_LOG`, when set to a valid filter, overrides `level`.
pub fn init_logging(format: LogFormat, level: &str) {
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let env_filter = from_env.as_deref().and_then(log_filter);
    if let (Some(v), None) = (&from_env, &env_filter) {
        // Logging is not set up yet: say it on stderr.
        eprintln!("RUST_LOG={v:?} is not a valid log filter; using log.level {level:?}.");
    }
    let mut filter = env_filter
        .or_else(|| log_filter(level))
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    // The MCP client library logs its transport's errors itself, and they quote the server's URL
    // (whose path may be a credential: hosted MCP servers put tokens there); switchyard logs
    // those failures without URLs. Shown only when a filter names it.
    if !from_env.as_deref().unwrap_or(level).contains("rmcp") {
        if let Ok(d) = "rmcp=off".parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests) is harmless; ignore the error.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `switchyard=debug,rdkafka=warn`. `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("every field has a default")
    }
}

fn default_log_level() -> String {
    "info".into()
}

#[cfg(test)]
mod agent_label_tests {
    #[test]
    fn agents_not_in_a_config_are_other() {
        super::know_agents(["triage".to_string()]);
        assert_eq!(super::agent_label("triage"), "triage");
        assert_eq!(super::agent_label("forged-7f3a"), "other");
    }
}
