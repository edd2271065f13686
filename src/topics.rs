//! Topic definitions (`topics/*.yaml`) and `switchyard topics apply`.
//!
//! `apply` creates what is missing and reports what differs; it never alters or deletes an existing
//! topic (changing partition counts moves keys between partitions, which breaks per-resource order).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};

use crate::codec::Encoding;

/// One topic, as defined in `topics/<name>.yaml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicDef {
    /// Topic name.
    pub name: String,
    /// What the topic carries, for people.
    #[serde(default)]
    pub description: String,
    pub partitions: i32,
    #[serde(default = "one")]
    pub replication_factor: i32,
    /// What the record key is (documentation; switchyard keys its own records by resource id).
    pub key: String,
    /// Avro schema (file stem in `schemas/`) describing the records.
    #[serde(default)]
    pub schema: Option<String>,
    /// How switchyard writes records to this topic.
    #[serde(default)]
    pub encoding: Encoding,
    /// Topic-level broker settings (`retention.ms`, `cleanup.policy`, ...).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn one() -> i32 {
    1
}

/// All topic definitions, by name.
#[derive(Debug, Clone, Default)]
pub struct TopicCatalog {
    defs: BTreeMap<String, TopicDef>,
}

impl TopicCatalog {
    /// Loads every `*.yaml` / `*.yml` file of a directory; problems are `(item, message)` pairs.
    pub fn load_dir(dir: &Path) -> Result<Self, Vec<(String, String)>> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            vec![(
                "topics.dir".to_string(),
                format!("cannot read {}: {e}", dir.display()),
            )]
        })?;
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        paths.sort();
        let mut files = Vec::new();
        let mut problems = Vec::new();
        for path in paths {
            let item = format!("topic file {}", path.display());
            match std::fs::read_to_string(&path) {
                Ok(text) => files.push((item, text)),
                Err(e) => problems.push((item, e.to_string())),
            }
        }
        let catalog = Self::from_texts(files);
        match (catalog, problems.is_empty()) {
            (Ok(c), true) => Ok(c),
            (Ok(_), false) => Err(problems),
            (Err(mut more), _) => {
                problems.append(&mut more);
                Err(problems)
            }
        }
    }

    /// Parses definitions given as `(label, YAML text)` (files, or the ones compiled into the binary).
    pub fn from_texts<L: Into<String>, T: AsRef<str>>(
        files: impl IntoIterator<Item = (L, T)>,
    ) -> Result<Self, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut defs = BTreeMap::new();
        for (item, text) in files {
            let item = item.into();
            match serde_yaml::from_str::<TopicDef>(text.as_ref()) {
                Err(e) => problems.push((item, e.to_string())),
                Ok(def) => {
                    if def.partitions < 1 {
                        problems.push((item.clone(), "partitions must be at least 1".into()));
                    }
                    if def.replication_factor < 1 {
                        problems
                            .push((item.clone(), "replication_factor must be at least 1".into()));
                    }
                    if def.encoding == Encoding::Avro && def.schema.is_none() {
                        problems.push((item.clone(), "encoding avro needs a schema".into()));
                    }
                    if defs.contains_key(&def.name) {
                        problems.push((item, format!("topic {} is defined twice", def.name)));
                    } else {
                        defs.insert(def.name.clone(), def);
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(TopicCatalog { defs })
        } else {
            Err(problems)
        }
    }

    pub fn get(&self, name: &str) -> Option<&TopicDef> {
        self.defs.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &TopicDef> {
        self.defs.values()
    }

    /// Encoding and schema switchyard uses to write to a topic (JSON when the topic is not defined).
    pub fn encoding_of(&self, name: &str) -> (Encoding, Option<&str>) {
        self.defs
            .get(name)
            .map(|d| (d.encoding, d.schema.as_deref()))
            .unwrap_or((Encoding::Json, None))
    }
}

/// The `topics:` config section: the names switchyard reads and writes, and where definitions live.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Directory of topic definitions (one YAML file per topic), relative to the config file.
    #[serde(default = "default_topics_dir")]
    pub dir: PathBuf,
    /// Input topics the route stage consumes.
    #[serde(default = "default_inputs")]
    pub inputs: Vec<String>,
    /// Tasks for agents, keyed by resource.
    #[serde(default = "default_tasks")]
    pub tasks: String,
    /// What agents want done, keyed by resource (the partition is the resource's lock).
    #[serde(default = "default_proposals")]
    pub proposals: String,
    /// Governed actions for executors.
    #[serde(default = "default_actions")]
    pub actions: String,
    /// Approval requests and decisions.
    #[serde(default = "default_approvals")]
    pub approvals: String,
    /// One result per agent task.
    #[serde(default = "default_results")]
    pub results: String,
    /// The hash-chained audit trail.
    #[serde(default = "default_audit")]
    pub audit: String,
    /// Records that could not be processed, with reason headers.
    #[serde(default = "default_dlq")]
    pub dlq: String,
    /// Approval decisions arriving from other systems (`{"approval_id", "decision", "by", "why"}`).
    #[serde(default = "default_decisions")]
    pub decisions: String,
    /// Transcripts of model calls through the AI gateway, keyed by task id.
    #[serde(default = "default_llm_calls")]
    pub llm_calls: String,
    /// Tool calls of LLM agents and of the tool executor, keyed by task id.
    #[serde(default = "default_tool_calls")]
    pub tool_calls: String,
    /// Workflow lifecycle records, keyed by run id.
    #[serde(default = "default_workflows")]
    pub workflows: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("every field has a default")
    }
}

impl TopicsConfig {
    /// Every topic switchyard reads or writes.
    pub fn all(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.inputs.iter().map(String::as_str).collect();
        v.extend([
            self.tasks.as_str(),
            self.proposals.as_str(),
            self.actions.as_str(),
            self.approvals.as_str(),
            self.results.as_str(),
            self.audit.as_str(),
            self.dlq.as_str(),
            self.decisions.as_str(),
            self.llm_calls.as_str(),
            self.tool_calls.as_str(),
            self.workflows.as_str(),
        ]);
        v
    }
}

fn default_topics_dir() -> PathBuf {
    "topics".into()
}
fn default_inputs() -> Vec<String> {
    [
        "events.deployments",
        "events.sla-breaches",
        "events.cost-thresholds",
    ]
    .map(String::from)
    .to_vec()
}
fn default_tasks() -> String {
    "switchyard.tasks".into()
}
fn default_proposals() -> String {
    "switchyard.proposals".into()
}
fn default_actions() -> String {
    "switchyard.actions".into()
}
fn default_approvals() -> String {
    "switchyard.approvals".into()
}
fn default_results() -> String {
    "switchyard.results".into()
}
fn default_audit() -> String {
    "switchyard.audit".into()
}
fn default_dlq() -> String {
    "switchyard.dlq".into()
}
fn default_llm_calls() -> String {
    "switchyard.llm-calls".into()
}
fn default_workflows() -> String {
    "switchyard.workflows".into()
}
fn default_tool_calls() -> String {
    "switchyard.tool-calls".into()
}
fn default_decisions() -> String {
    "switchyard.approval-decisions".into()
}

/// What `apply` did or found for one topic.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyOutcome {
    Created,
    Unchanged,
    /// Exists but differs; each string names one difference. Nothing is changed.
    Differs(Vec<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    #[error("cannot reach Kafka at {brokers}: {detail}")]
    Unreachable { brokers: String, detail: String },
    #[error("creating topic {topic} failed: {detail}")]
    Create { topic: String, detail: String },
}

/// The `max.message.bytes` of each of `names` that exists and whose config the broker returns: the
/// largest record batch the broker takes into that topic (its own setting, or the broker's default).
/// A topic the broker answers with an error for is warned about once per `quiet` set (`None`: every
/// time), then logged at debug.
pub async fn max_message_bytes(
    client: &ClientConfig,
    names: &[&str],
    timeout: Duration,
    quiet: Option<&std::sync::Mutex<std::collections::HashSet<String>>>,
) -> Result<Vec<(String, usize)>, TopicsError> {
    let brokers = client.get("bootstrap.servers").unwrap_or("?").to_string();
    let unreachable = |detail: String| TopicsError::Unreachable {
        brokers: brokers.clone(),
        detail,
    };
    let admin: AdminClient<DefaultClientContext> =
        client.create().map_err(|e| unreachable(e.to_string()))?;
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let specs: Vec<ResourceSpecifier> = names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let results = admin
        .describe_configs(specs.iter(), &opts)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(names
        .iter()
        .zip(results)
        .filter_map(|(name, r)| {
            match r {
                // A broker that names no limit for the topic (tansu) leaves it to the producer's.
                Ok(res) => res
                    .get("max.message.bytes")
                    .and_then(|e| e.value.clone())
                    .and_then(|v| v.parse().ok())
                    .map(|l| (name.to_string(), l)),
                Err(e) => {
                    let first = quiet.is_none_or(|q| {
                        q.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(name.to_string())
                    });
                    if first {
                        tracing::warn!(topic = %name, error = %e, "Could not read a topic's max.message.bytes; its records are checked only against the producer's limit.");
                    } else {
                        tracing::debug!(topic = %name, error = %e, "Could not read a topic's max.message.bytes.");
                    }
                    None
                }
            }
        })
        .collect())
}

/// Creates missing topics and reports differences of existing ones.
pub async fn apply(
    client: &ClientConfig,
    defs: &[&TopicDef],
    timeout: Duration,
) -> Result<Vec<(String, ApplyOutcome)>, TopicsError> {
    let brokers = client.get("bootstrap.servers").unwrap_or("?").to_string();
    let admin: AdminClient<DefaultClientContext> =
        client.create().map_err(|e| TopicsError::Unreachable {
            brokers: brokers.clone(),
            detail: e.to_string(),
        })?;
    let metadata =
        admin
            .inner()
            .fetch_metadata(None, timeout)
            .map_err(|e| TopicsError::Unreachable {
                brokers: brokers.clone(),
                detail: e.to_string(),
            })?;
    let existing: BTreeMap<String, usize> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    let mut out = Vec::new();
    let missing: Vec<&TopicDef> = defs
        .iter()
        .copied()
        .filter(|d| !existing.contains_key(&d.name))
        .collect();
    if !missing.is_empty() {
        let new_topics: Vec<NewTopic> = missing
            .iter()
            .map(|d| {
                let mut t = NewTopic::new(
                    &d.name,
                    d.partitions,
                    TopicReplication::Fixed(d.replication_factor),
                );
                for (k, v) in &d.config {
                    t = t.set(k, v);
                }
                t
            })
            .collect();
        let results = admin
            .create_topics(new_topics.iter(), &opts)
            .await
            .map_err(|e| TopicsError::Unreachable {
                brokers: brokers.clone(),
                detail: e.to_string(),
            })?;
        for r in results {
            match r {
                Ok(name) => out.push((name, ApplyOutcome::Created)),
                // Another instance created it between our metadata read and now.
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    out.push((name, ApplyOutcome::Unchanged))
                }
                Err((name, code)) => {
                    return Err(TopicsError::Create {
                        topic: name,
                        detail: code.to_string(),
                    })
                }
            }
        }
    }
    for d in defs.iter().filter(|d| existing.contains_key(&d.name)) {
        let mut diffs = Vec::new();
        let have = existing[&d.name];
        if have != d.partitions as usize {
            diffs.push(format!(
                "has {have} partitions, definition says {} (not changed: repartitioning moves keys)",
                d.partitions
            ));
        }
        if !d.config.is_empty() {
            match admin
                .describe_configs([&ResourceSpecifier::Topic(&d.name)], &opts)
                .await
            {
                Ok(results) => match results.into_iter().next() {
                    Some(Ok(res)) => {
                        for (k, want) in &d.config {
                            let got = res.get(k).and_then(|e| e.value.clone());
                            if got.as_deref() != Some(want.as_str()) {
                                diffs.push(format!(
                                    "{k} is {}, definition says {want}",
                                    got.as_deref().unwrap_or("unset")
                                ));
                            }
                        }
                    }
                    Some(Err(e)) => diffs.push(format!("cannot read its config: {e}")),
                    None => diffs.push("broker returned no config".into()),
                },
                Err(e) => diffs.push(format!("cannot read its config: {e}")),
            }
        }
        out.push((
            d.name.clone(),
            if diffs.is_empty() {
                ApplyOutcome::Unchanged
            } else {
                ApplyOutcome::Differs(diffs)
            },
        ));
    }
    Ok(out)
}
