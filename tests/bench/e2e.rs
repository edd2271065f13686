//! End-to-end benchmark: switchyard against the physical limit (a raw rdkafka chain with the same
//! hops, records, bytes, topics and partitions as switchyard) and a peer (the same flow in
//! quixstreams + redis-py), on the same broker and Redis, in one run. Prints a table and writes JSON;
//! `deploy/bench/run.sh` sets everything up and plots the result.
//!
//! What is measured, per phase:
//! - throughput: events / (the moment the LAST record the system writes, on any of its output topics
//!   (intermediate ones included), is received by the reader − the start of producing);
//! - latency: per event, from produce to the event's result record (switchyard.results,
//!   peer.results, limit.results);
//! - records and bytes (key + payload + headers) the system wrote per input event, Redis commands per
//!   event (INFO commandstats; Lua-internal calls included, as Redis counts them), Redis memory
//!   retained per event, CPU of the system, the broker and Redis, peak RSS.
//!
//! The limit chain copies switchyard's shape, measured in switchyard's maximum-rate phase: per
//! output topic and per hop (1 route, 2 agents, 3 resolve), records per input event and their
//! average size. Switchyard's per-event Redis command mix is replayed, pipelined, as its own line.
//!
//! Environment: SWITCHYARD_KAFKA_BROKERS, SWITCHYARD_REDIS_URL, SWITCHYARD_STACK_DIR (to restart the
//! broker between phases), BENCH_EVENTS (default 20000), BENCH_RESOURCES (10000), BENCH_FRACTIONS
//! (0.25,0.5,0.75), BENCH_PEER_PYTHON (python with quixstreams; the peer is skipped without it),
//! BENCH_OUT (directory for e2e.json, default target/bench), BENCH_ONLY (switchyard, limit, peer,
//! redis or scaling: one part, no JSON), BENCH_SCALING (1: include the scaling figures, 0: leave them
//! out; default on), BENCH_SCALING_EVENTS (events per scaling phase, default BENCH_EVENTS),
//! BENCH_REDIS_EVENTS (events the Redis mix replays, default BENCH_EVENTS), BENCH_LINGER_MS,
//! BENCH_FETCH_WAIT_MS (consumer `fetch.wait.max.ms` of all three systems, default 20),
//! BENCH_MAX_IN_FLIGHT (producer `max.in.flight.requests.per.connection` of all three, default 5),
//! BENCH_SWITCHYARD_BIN and BENCH_SWITCHYARD_TREE (measure another build, with the config, topics
//! and schemas of its source tree; default this build's release binary and this tree).
//!
//! Modes of this binary besides the benchmark: `--limit-chain BROKERS SHAPE.json` (the limit chain's
//! process) and `--instructions` (instructions per event under callgrind; deploy/bench/instructions.sh;
//! INSTR_EVENTS 3000, INSTR_RESOURCES 1000, INSTR_WARM_FRACTION 0.1, INSTR_TIMEOUT_S 1800).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::json;

const INPUTS: [&str; 3] = [
    "events.deployments",
    "events.sla-breaches",
    "events.cost-thresholds",
];

/// Every topic switchyard writes (the reader consumes all of them; the limit mirrors them).
const SY_OUTPUTS: [&str; 7] = [
    "switchyard.tasks",
    "switchyard.proposals",
    "switchyard.results",
    "switchyard.actions",
    "switchyard.approvals",
    "switchyard.audit",
    "switchyard.dlq",
];

/// The peer's topics, each with the partition count of its switchyard counterpart.
const PEER_OUTPUTS: [(&str, &str); 4] = [
    ("peer.tasks", "switchyard.tasks"),
    ("peer.results", "switchyard.results"),
    ("peer.proposals", "switchyard.proposals"),
    ("peer.actions", "switchyard.actions"),
];

/// A system is done when none of its output topics has received a record for this long.
const QUIET: Duration = Duration::from_secs(3);

/// Events per Redis pipeline in the replay of switchyard's command mix.
const REPLAY_PIPELINE_EVENTS: usize = 100;
/// Connections the replay uses concurrently.
const REPLAY_CONNECTIONS: usize = 4;

/// Commands the bench itself sends (not part of any system's work).
const BENCH_OWN_COMMANDS: [&str; 3] = ["info", "flushall", "config|resetstat"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| d.to_string())
}

fn env_num<T: std::str::FromStr>(k: &str, d: T) -> T {
    match std::env::var(k).ok().filter(|v| !v.is_empty()) {
        None => d,
        Some(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{k}={v:?} is not a number")),
    }
}

/// The source tree whose config (deploy/bench/switchyard.yaml), topics/ and schemas/ the measured
/// switchyard runs with: this one, or BENCH_SWITCHYARD_TREE (with BENCH_SWITCHYARD_BIN, another
/// commit's build and its own config).
fn tree() -> PathBuf {
    std::env::var_os("BENCH_SWITCHYARD_TREE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(root)
}

/// Where the bench keeps its scratch files (configs, the limit's shape, callgrind dumps).
fn scratch_dir() -> PathBuf {
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// Partition counts of switchyard's topics, from topics/*.yaml (what `switchyard topics apply`
/// creates); the limit and the peer get the same counts.
fn topic_partitions() -> HashMap<String, i32> {
    let dir = tree().join("topics");
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let mut out = HashMap::new();
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let doc: serde_yaml::Value = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
        let name = doc.get("name").and_then(|v| v.as_str());
        let parts = doc.get("partitions").and_then(|v| v.as_i64());
        if let (Some(name), Some(parts)) = (name, parts) {
            out.insert(name.to_string(), parts as i32);
        }
    }
    out
}

fn partitions_of(map: &HashMap<String, i32>, topic: &str) -> i32 {
    *map.get(topic)
        .unwrap_or_else(|| panic!("topics/*.yaml defines no topic {topic}"))
}

/// The limit chain's mirror of a switchyard topic: switchyard.tasks -> limit.tasks.
fn mirror(topic: &str) -> String {
    format!("limit.{}", topic.trim_start_matches("switchyard."))
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum System {
    Limit,
    Switchyard,
    Peer,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Limit => "limit (raw rdkafka chain)",
            System::Switchyard => "switchyard",
            System::Peer => "peer (quixstreams + redis-py)",
        }
    }
    fn key(self) -> &'static str {
        match self {
            System::Limit => "limit",
            System::Switchyard => "switchyard",
            System::Peer => "peer",
        }
    }
    /// Every topic the system writes; its clock stops at the last record on any of them.
    fn outputs(self) -> Vec<String> {
        match self {
            System::Limit => SY_OUTPUTS.iter().map(|t| mirror(t)).collect(),
            System::Switchyard => SY_OUTPUTS.iter().map(|t| t.to_string()).collect(),
            System::Peer => PEER_OUTPUTS.iter().map(|(t, _)| t.to_string()).collect(),
        }
    }
    /// The topic of the event's result record, where latency is measured.
    fn results_topic(self) -> &'static str {
        match self {
            System::Limit => "limit.results",
            System::Switchyard => "switchyard.results",
            System::Peer => "peer.results",
        }
    }
}

/// One phase: a system at a rate (None: maximum) over some resources, in some processes.
#[derive(Clone, Debug)]
struct PhaseSpec {
    system: System,
    rate: Option<f64>,
    tag: String,
    events: usize,
    resources: usize,
    /// switchyard processes in one consumer group (other systems: 1).
    processes: usize,
    /// After the measured events, as many again over the same resources, for the steady-state
    /// Redis figures ([`Steady`]).
    steady: bool,
}

/// Redis figures of a second pass of as many events over the same resources, measured while the
/// system keeps running (its resources exist already): what a long-running system costs per
/// event once it has seen its resources.
#[derive(Debug, Clone, Serialize)]
struct Steady {
    events: usize,
    /// Events of the second pass whose result record arrived.
    received: usize,
    /// Redis commands per event of the second pass (INFO commandstats).
    redis_commands_per_event: f64,
    /// Redis used_memory 3 s after the second pass's last output minus 3 s after the first's,
    /// per event.
    redis_bytes_retained_per_event: f64,
    /// The second pass's Redis commands per event, by command.
    redis_mix: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
struct PhaseResult {
    system: &'static str,
    /// Offered rate (events/s); null at maximum rate.
    offered_rate: Option<f64>,
    events: usize,
    resources: usize,
    processes: usize,
    /// Events whose result record arrived.
    received: usize,
    /// events / (last output record of any topic received − start of producing).
    throughput_eps: f64,
    /// events / (last result record received − start of producing): the previous definition.
    throughput_to_last_result_eps: f64,
    /// Latency from produce to the event's result record.
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_seconds_per_1000: f64,
    peak_rss_mb: f64,
    /// CPU the broker (tansu) and Redis spent per 1,000 events in the same phase.
    broker_cpu_seconds_per_1000: f64,
    redis_cpu_seconds_per_1000: f64,
    /// Records the system wrote per input event, intermediate topics included.
    records_per_event: f64,
    /// Record batches its producers sent per input event (librdkafka statistics): records over
    /// batches is how full the broker's batches are.
    batches_per_event: Option<f64>,
    /// Bytes (key + payload + headers) of those records per input event.
    bytes_per_event: f64,
    /// Redis commands per input event (INFO commandstats; Lua-internal calls included).
    redis_commands_per_event: f64,
    /// Redis used_memory after the phase (after a settle) minus before, per input event.
    redis_bytes_retained_per_event: f64,
    /// The second pass over the same resources, where the spec asked for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    steady: Option<Steady>,
}

/// Records and bytes of one (topic, hop).
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Tally {
    records: u64,
    key_bytes: u64,
    value_bytes: u64,
    headers: u64,
    header_bytes: u64,
}

impl Tally {
    fn add<M: Message>(&mut self, m: &M) {
        self.records += 1;
        self.key_bytes += m.key().map_or(0, |k| k.len()) as u64;
        self.value_bytes += m.payload().map_or(0, |p| p.len()) as u64;
        if let Some(h) = m.headers() {
            for hd in h.iter() {
                self.headers += 1;
                self.header_bytes += (hd.key.len() + hd.value.map_or(0, |v| v.len())) as u64;
            }
        }
    }
    fn bytes(&self) -> u64 {
        self.key_bytes + self.value_bytes + self.header_bytes
    }
}

/// What a phase measured besides its result line.
struct PhaseOutcome {
    result: PhaseResult,
    /// Per (topic, hop) records and bytes the system wrote during the measured part.
    tallies: BTreeMap<(String, u8), Tally>,
    /// Redis commands per input event, by command name (bench's own commands excluded).
    redis_mix: BTreeMap<String, f64>,
}

/// Which switchyard hop wrote a record: 1 route, 2 agents, 3 resolve (0: unknown).
fn switchyard_hop(topic: &str, payload: &[u8]) -> u8 {
    match topic.strip_prefix("switchyard.") {
        Some("tasks") => 1,
        Some("proposals" | "results" | "dlq") => 2,
        Some("actions" | "approvals") => 3,
        Some("audit") => audit_hop(payload),
        _ => 0,
    }
}

/// Audit records are JSON CloudEvents whose data.stage names the stage that decided them; seal
/// records (a batch's seal) name it as the first segment of data.chain, e.g. "agents/<topic>/<p>".
fn audit_hop(payload: &[u8]) -> u8 {
    #[derive(Deserialize)]
    struct Probe {
        data: Option<ProbeData>,
    }
    #[derive(Deserialize)]
    struct ProbeData {
        stage: Option<String>,
        chain: Option<String>,
    }
    let stage = serde_json::from_slice::<Probe>(payload)
        .ok()
        .and_then(|p| p.data)
        .and_then(|d| {
            d.stage.or_else(|| {
                d.chain
                    .and_then(|c| c.split('/').next().map(str::to_string))
            })
        });
    match stage.as_deref() {
        Some("route") => 1,
        Some("agents") => 2,
        Some("resolve" | "approvals") => 3,
        _ => 0,
    }
}

/// Pid of a stack service from its pid file.
fn stack_pid(name: &str) -> Option<u32> {
    let dir = std::env::var("SWITCHYARD_STACK_DIR").ok()?;
    std::fs::read_to_string(format!("{dir}/{name}.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The switchyard binary measured: this build's (BENCH_SWITCHYARD_BIN overrides it, e.g. to
/// measure another commit's release build with this harness).
fn switchyard_bin() -> String {
    env_or("BENCH_SWITCHYARD_BIN", env!("CARGO_BIN_EXE_switchyard"))
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client")
}

/// The events of a phase: the three families, ~300 bytes each, over `resources` resources.
fn make_events(tag: &str, n: usize, resources: usize) -> Vec<(String, String, Vec<u8>)> {
    make_events_from(tag, 0, n, resources)
}

/// Events `from..from + n` of the generator (ids `e-<tag>-<i>`).
fn make_events_from(
    tag: &str,
    from: usize,
    n: usize,
    resources: usize,
) -> Vec<(String, String, Vec<u8>)> {
    (from..from + n)
        .map(|i| {
            let subject = format!("svc-{}", (i * 7919) % resources.max(1));
            let (topic, ty, data) = match i % 3 {
                0 => (0, "deployment.completed", json!({"service": subject, "version": format!("v{}", i % 97), "previous_version": format!("v{}", i % 97 + 1), "environment": "production", "actor": "ci-bot", "change_url": "https://ci.example/builds/12345"})),
                1 => (1, "sla.breached", json!({"service": subject, "slo": "availability", "objective": 99.9, "observed": 97.5, "window": "5m", "owner": "team-payments"})),
                _ => (2, "cost.threshold_exceeded", json!({"service": subject, "budget": 1000.0, "spend": 1234.5, "currency": "USD", "period": "2026-11", "threshold_pct": 120.0})),
            };
            let ev = json!({"specversion": "1.0", "id": format!("e-{tag}-{i}"), "source": "bench/producer", "type": ty,
                "subject": subject, "time": "2026-11-22T12:00:00.000Z", "datacontenttype": "application/json", "data": data});
            (INPUTS[topic].to_string(), subject, serde_json::to_vec(&ev).expect("json"))
        })
        .collect()
}

/// Parses `e-<tag>-<n>` out of a payload.
fn index_of(payload: &[u8], marker: &[u8]) -> Option<usize> {
    let pos = payload.windows(marker.len()).position(|w| w == marker)?;
    let rest = &payload[pos + marker.len()..];
    let digits: Vec<u8> = rest
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

fn proc_cpu_rss(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    (ticks / 100.0, hwm / 1024.0)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Copies of the `i`-th consumed record at `rate` copies per record: deterministic, and over n
/// records the total is floor(n × rate).
fn copies(i: u64, rate: f64) -> u64 {
    ((i + 1) as f64 * rate).floor() as u64 - (i as f64 * rate).floor() as u64
}

// ------------------------------------------------------------------------------------ reader ---

/// What the reader tells the phase as it reads.
enum Seen {
    /// A warm-up record on this topic.
    Warm(String),
    /// The result record of measured event i.
    Result(usize, Instant),
}

/// Shared between the reader thread and the phase.
struct ReaderShared {
    base: Instant,
    /// Set at the start of producing: records from then on are counted.
    counting: AtomicBool,
    stop: AtomicBool,
    /// Nanoseconds after `base` + 1 of the last record received (0: none yet).
    last_any: AtomicU64,
    /// The same, of the last record received while counting.
    last_counted: AtomicU64,
}

impl ReaderShared {
    fn new() -> Arc<Self> {
        Arc::new(ReaderShared {
            base: Instant::now(),
            counting: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            last_any: AtomicU64::new(0),
            last_counted: AtomicU64::new(0),
        })
    }
    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64 + 1
    }
    fn at(&self, stamp: u64) -> Option<Instant> {
        (stamp > 0).then(|| self.base + Duration::from_nanos(stamp - 1))
    }
    fn last_any(&self) -> Option<Instant> {
        self.at(self.last_any.load(Ordering::Acquire))
    }
    fn last_counted(&self) -> Option<Instant> {
        self.at(self.last_counted.load(Ordering::Acquire))
    }
}

struct ReaderSpec {
    brokers: String,
    topics: Vec<String>,
    results_topic: String,
    warm_topics: Vec<String>,
    /// Tag of the measured events (ids `e-<tag>-<n>`); warm-up events are `e-warm<tag>-<n>`.
    tag: String,
    /// Classify switchyard's records by hop (needed for the limit's shape).
    classify: bool,
}

/// Reads every output topic from the beginning (the broker is fresh each phase), reports warm-up
/// and result records, and counts records and bytes per (topic, hop) once counting starts.
fn spawn_reader(
    spec: ReaderSpec,
    shared: Arc<ReaderShared>,
    tx: mpsc::Sender<Seen>,
) -> std::thread::JoinHandle<BTreeMap<(String, u8), Tally>> {
    std::thread::spawn(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &spec.brokers)
            .set("group.id", "bench-reader")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("reader consumer");
        // All topics' metadata at once: asking for one topic by name could auto-create it.
        let started = Instant::now();
        let parts: Vec<(String, i32)> = loop {
            let found: Vec<(String, i32)> = c
                .fetch_metadata(None, Duration::from_secs(5))
                .map(|md| {
                    md.topics()
                        .iter()
                        .filter(|t| spec.topics.iter().any(|n| n == t.name()))
                        .flat_map(|t| {
                            t.partitions()
                                .iter()
                                .map(|p| (t.name().to_string(), p.id()))
                                .collect::<Vec<_>>()
                        })
                        .collect()
                })
                .unwrap_or_default();
            let missing: Vec<&String> = spec
                .topics
                .iter()
                .filter(|t| !found.iter().any(|(n, _)| n == *t))
                .collect();
            if missing.is_empty() {
                break found;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the reader found no partitions of {missing:?} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &parts {
            tpl.add_partition_offset(t, *p, Offset::Beginning)
                .expect("assignment");
        }
        c.assign(&tpl).expect("reader assign");
        let warm_marker = format!("e-warm{}-", spec.tag).into_bytes();
        let marker = format!("e-{}-", spec.tag).into_bytes();
        let mut tallies: BTreeMap<(String, u8), Tally> = BTreeMap::new();
        while !shared.stop.load(Ordering::Acquire) {
            let Some(Ok(m)) = c.poll(Duration::from_millis(20)) else {
                continue;
            };
            let now = Instant::now();
            let stamp = shared.stamp(now);
            shared.last_any.store(stamp, Ordering::Release);
            let topic = m.topic();
            let payload = m.payload().unwrap_or_default();
            if shared.counting.load(Ordering::Acquire) {
                shared.last_counted.store(stamp, Ordering::Release);
                let hop = if spec.classify {
                    switchyard_hop(topic, payload)
                } else {
                    0
                };
                tallies.entry((topic.to_string(), hop)).or_default().add(&m);
            }
            let is_result = topic == spec.results_topic;
            if is_result {
                if let Some(i) = index_of(payload, &marker) {
                    if tx.send(Seen::Result(i, now)).is_err() {
                        break;
                    }
                    continue;
                }
            }
            // Every warm-up record is reported: a second warm-up round waits for its own.
            if (is_result || spec.warm_topics.iter().any(|t| t == topic))
                && index_of(payload, &warm_marker).is_some()
                && tx.send(Seen::Warm(topic.to_string())).is_err()
            {
                break;
            }
        }
        tallies
    })
}

// ------------------------------------------------------------------------------------- redis ---

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap_or_else(|e| panic!("bad Redis URL {url}: {e}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {url}: {e}"))
}

async fn redis_info(con: &mut redis::aio::MultiplexedConnection, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query_async::<String>(con)
        .await
        .unwrap_or_else(|e| panic!("Redis INFO {section}: {e}"))
}

/// Calls per command from INFO commandstats (`cmdstat_hget:calls=12,usec=...`).
async fn command_calls(con: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, u64> {
    redis_info(con, "commandstats")
        .await
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

async fn used_memory(con: &mut redis::aio::MultiplexedConnection) -> u64 {
    redis_info(con, "memory")
        .await
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO memory has used_memory")
}

/// Per-command deltas, the bench's own commands left out.
fn calls_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter(|(k, _)| !BENCH_OWN_COMMANDS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// A stand-in for one command of the mix, on keys of `tag` (a hash tag per resource), typed so
/// that no command meets the wrong type. None: not replayable (listed in the output).
fn replay_cmd(name: &str, tag: &str, i: usize, sha: &str) -> Option<redis::Cmd> {
    let k = |kind: &str| format!("bench:{{{tag}}}:{kind}");
    let value = "v".repeat(64);
    let member = format!("m{}", i % 50);
    let mut c = redis::Cmd::new();
    match name {
        "get" | "strlen" | "exists" | "ttl" | "pttl" | "type" | "persist" | "del" | "unlink" => {
            c.arg(name).arg(k("s"));
        }
        "expire" | "pexpire" => {
            c.arg(name).arg(k("s")).arg(3_600_000);
        }
        "set" | "setnx" | "getset" => {
            c.arg(name).arg(k("s")).arg(&value);
        }
        "setex" => {
            c.arg(name).arg(k("s")).arg(3600).arg(&value);
        }
        "psetex" => {
            c.arg(name).arg(k("s")).arg(3_600_000).arg(&value);
        }
        "mget" => {
            c.arg(name).arg(k("s")).arg(k("s2"));
        }
        "mset" => {
            c.arg(name).arg(k("s")).arg(&value);
        }
        "incr" | "decr" => {
            c.arg(name).arg(k("n"));
        }
        "incrby" | "decrby" => {
            c.arg(name).arg(k("n")).arg(1);
        }
        "incrbyfloat" => {
            c.arg(name).arg(k("f")).arg(1.5);
        }
        "hget" | "hexists" | "hdel" | "hstrlen" => {
            c.arg(name).arg(k("h")).arg("f1");
        }
        "hset" | "hsetnx" | "hmset" => {
            c.arg(name).arg(k("h")).arg("f1").arg(&value);
        }
        "hmget" => {
            c.arg(name).arg(k("h")).arg("f1").arg("f2").arg("f3");
        }
        "hgetall" | "hlen" | "hkeys" | "hvals" => {
            c.arg(name).arg(k("h"));
        }
        "hincrby" => {
            c.arg(name).arg(k("h")).arg("n").arg(1);
        }
        "hincrbyfloat" => {
            c.arg(name).arg(k("h")).arg("f").arg(1.5);
        }
        "lpush" | "rpush" | "lpushx" | "rpushx" => {
            c.arg(name).arg(k("l")).arg(&value);
        }
        "ltrim" | "lrange" => {
            c.arg(name).arg(k("l")).arg(0).arg(49);
        }
        "lrem" => {
            c.arg(name).arg(k("l")).arg(1).arg(&value);
        }
        "llen" | "lpop" | "rpop" => {
            c.arg(name).arg(k("l"));
        }
        "lindex" => {
            c.arg(name).arg(k("l")).arg(0);
        }
        "zadd" => {
            c.arg(name).arg(k("z")).arg(i).arg(&member);
        }
        "zrem" | "zscore" => {
            c.arg(name).arg(k("z")).arg(&member);
        }
        "zincrby" => {
            c.arg(name).arg(k("z")).arg(1).arg(&member);
        }
        "zrange" | "zrevrange" => {
            c.arg(name).arg(k("z")).arg(0).arg(9);
        }
        "zrangebyscore" => {
            c.arg(name)
                .arg(k("z"))
                .arg("-inf")
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(10);
        }
        "zremrangebyscore" => {
            c.arg(name).arg(k("z")).arg("-inf").arg(0);
        }
        "zcard" => {
            c.arg(name).arg(k("z"));
        }
        "sadd" | "srem" | "sismember" => {
            c.arg(name).arg(k("S")).arg(&member);
        }
        "smembers" | "scard" => {
            c.arg(name).arg(k("S"));
        }
        "ping" | "time" => {
            c.arg(name);
        }
        "echo" => {
            c.arg(name).arg("x");
        }
        // A script is replayed as a no-op script; the commands it ran are in the mix on their own
        // (Redis counts Lua-internal calls), so they are replayed as direct commands.
        "eval" | "evalsha" | "eval_ro" | "evalsha_ro" => {
            c.arg("EVALSHA").arg(sha).arg(1).arg(k("s"));
        }
        "script|load" => {
            c.arg("SCRIPT").arg("LOAD").arg("return 1");
        }
        "script|exists" => {
            c.arg("SCRIPT").arg("EXISTS").arg(sha);
        }
        _ => return None,
    }
    Some(c)
}

#[derive(Debug, Clone, Serialize)]
struct ReplayResult {
    what: &'static str,
    events: usize,
    pipeline_events: usize,
    connections: usize,
    /// The mix measured in switchyard's maximum-rate phase (commands per event, by name).
    measured_commands_per_event: BTreeMap<String, f64>,
    /// Commands the replay sent per event (the mix less what it could not replay).
    replayed_commands_per_event: f64,
    /// Commands of the mix with no stand-in (connection set-up and the like), per event.
    not_replayed: BTreeMap<String, f64>,
    throughput_eps: f64,
    redis_cpu_seconds_per_1000: f64,
    errors: u64,
}

// --------------------------------------------------------------------------------- the shape ---

/// One output of a limit hop: records per consumed record and their average size.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShapeOutput {
    topic: String,
    /// The switchyard topic it mirrors.
    mirrors: String,
    per_event: f64,
    per_record: f64,
    key_bytes: f64,
    value_bytes: f64,
    headers: f64,
    header_bytes: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShapeHop {
    hop: u8,
    stage: String,
    from: Vec<String>,
    group: String,
    /// Records of `from` per input event (hop 1: 1).
    inputs_per_event: f64,
    outputs: Vec<ShapeOutput>,
}

/// Switchyard's shape, measured; the limit chain writes the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shape {
    measured_events: usize,
    records_per_event: f64,
    bytes_per_event: f64,
    /// Audit records whose stage could not be read (counted with hop 2).
    unclassified_records: u64,
    hops: Vec<ShapeHop>,
}

fn shape_from(tallies: &BTreeMap<(String, u8), Tally>, events: usize) -> Shape {
    let n = events.max(1) as f64;
    let per_event = |topic: &str| -> f64 {
        tallies
            .iter()
            .filter(|((t, _), _)| t == topic)
            .map(|(_, v)| v.records)
            .sum::<u64>() as f64
            / n
    };
    let unclassified: u64 = tallies
        .iter()
        .filter(|((_, h), _)| *h == 0)
        .map(|(_, v)| v.records)
        .sum();
    if unclassified > 0 {
        eprintln!(
            "  warning: {unclassified} switchyard records of no known hop (counted with hop 2)"
        );
    }
    let drivers: [(u8, &str, Vec<String>, f64); 3] = [
        (
            1,
            "route",
            INPUTS.iter().map(|s| s.to_string()).collect(),
            1.0,
        ),
        (
            2,
            "agents",
            vec![mirror("switchyard.tasks")],
            per_event("switchyard.tasks"),
        ),
        (
            3,
            "resolve",
            vec![mirror("switchyard.proposals")],
            per_event("switchyard.proposals"),
        ),
    ];
    let hops = drivers
        .into_iter()
        .map(|(hop, stage, from, inputs_per_event)| {
            let mut by_topic: BTreeMap<&str, Tally> = BTreeMap::new();
            for ((t, h), v) in tallies {
                let h = if *h == 0 { 2 } else { *h };
                if h == hop {
                    let e = by_topic.entry(t.as_str()).or_default();
                    e.records += v.records;
                    e.key_bytes += v.key_bytes;
                    e.value_bytes += v.value_bytes;
                    e.headers += v.headers;
                    e.header_bytes += v.header_bytes;
                }
            }
            let outputs = by_topic
                .into_iter()
                .filter(|(_, v)| v.records > 0)
                .map(|(t, v)| {
                    let r = v.records as f64;
                    let pe = r / n;
                    if inputs_per_event <= 0.0 {
                        eprintln!("  warning: hop {hop} writes {t} but reads nothing; the limit cannot mirror it");
                    }
                    ShapeOutput {
                        topic: mirror(t),
                        mirrors: t.to_string(),
                        per_event: pe,
                        per_record: if inputs_per_event > 0.0 {
                            pe / inputs_per_event
                        } else {
                            0.0
                        },
                        key_bytes: v.key_bytes as f64 / r,
                        value_bytes: v.value_bytes as f64 / r,
                        headers: v.headers as f64 / r,
                        header_bytes: v.header_bytes as f64 / r,
                    }
                })
                .collect();
            ShapeHop {
                hop,
                stage: stage.to_string(),
                from,
                group: format!("bench.limit.{hop}"),
                inputs_per_event,
                outputs,
            }
        })
        .collect();
    let total: Tally = tallies.values().fold(Tally::default(), |mut a, v| {
        a.records += v.records;
        a.key_bytes += v.key_bytes;
        a.value_bytes += v.value_bytes;
        a.header_bytes += v.header_bytes;
        a
    });
    Shape {
        measured_events: events,
        records_per_event: total.records as f64 / n,
        bytes_per_event: total.bytes() as f64 / n,
        unclassified_records: unclassified,
        hops,
    }
}

fn shape_path() -> PathBuf {
    scratch_dir().join("limit-shape.json")
}

fn write_json(path: &Path, v: &impl Serialize) {
    let text = serde_json::to_string_pretty(v).expect("serialisable");
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

// --------------------------------------------------------------------------------- the bench ---

struct Bench {
    brokers: String,
    redis: String,
    events: usize,
    resources: usize,
    partitions: HashMap<String, i32>,
    /// Switchyard's shape, once its maximum-rate phase has run (or loaded for BENCH_ONLY=limit).
    shape: Option<Shape>,
}

/// One sample of the CPU counters during a phase.
struct Sample {
    at: Instant,
    own: f64,
    broker: f64,
    redis: f64,
}

fn sample(pids: &[u32]) -> (Sample, f64) {
    let at = Instant::now();
    let (own, rss) = pids
        .iter()
        .map(|p| proc_cpu_rss(*p))
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    (
        Sample {
            at,
            own,
            broker: stack_pid("tansu").map(|p| proc_cpu_rss(p).0).unwrap_or(0.0),
            redis: stack_pid("redis").map(|p| proc_cpu_rss(p).0).unwrap_or(0.0),
        },
        rss,
    )
}

/// Where the record batches a system's producers sent are counted (librdkafka statistics).
enum BatchProbe {
    /// `switchyard_produce_batches_total` on each process's `/metrics` (port).
    Metrics(Vec<u16>),
    /// One file per producing process (a limit hop, a peer stage) holding its running total.
    Files(PathBuf),
}

impl BatchProbe {
    /// The batches sent so far; `None` where not counted (a switchyard build without the metric).
    async fn batches(&self) -> Option<u64> {
        match self {
            BatchProbe::Metrics(ports) => {
                // A process that has sent nothing has no series yet (0); no series on any process
                // is a build without the counter (None).
                let client = reqwest::Client::new();
                let mut total = 0u64;
                let mut known = false;
                for port in ports {
                    let text = client
                        .get(format!("http://127.0.0.1:{port}/metrics"))
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await
                        .ok()?
                        .text()
                        .await
                        .ok()?;
                    for line in text.lines() {
                        if let Some(rest) = line.strip_prefix("switchyard_produce_batches_total{") {
                            let v = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
                            total += v as u64;
                            known = true;
                        }
                    }
                }
                known.then_some(total)
            }
            BatchProbe::Files(dir) => {
                // One file per process, replaced whole (written to `.tmp`, renamed); a process
                // that has not reported yet has none.
                let mut total = 0u64;
                for entry in std::fs::read_dir(dir).ok()?.flatten() {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "tmp") {
                        continue;
                    }
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        total += text.trim().parse::<u64>().ok()?;
                    }
                }
                Some(total)
            }
        }
    }
}

/// `name` under the scratch directory, emptied.
fn empty_scratch_dir(name: &str) -> PathBuf {
    let dir = scratch_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A loopback port free right now (for a child's HTTP listener).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A limit hop's producer context: adds the record batches librdkafka reports sending (statistics
/// every second) to a running total kept in a file, which the bench reads.
struct BatchCounter {
    file: Option<PathBuf>,
    total: std::sync::atomic::AtomicU64,
}

impl rdkafka::ClientContext for BatchCounter {
    fn stats(&self, stats: rdkafka::Statistics) {
        let sent: i64 = stats.topics.values().map(|t| t.batchcnt.cnt.max(0)).sum();
        let total = self.total.fetch_add(sent as u64, Ordering::Relaxed) + sent as u64;
        if let Some(f) = &self.file {
            let tmp = f.with_extension("tmp");
            if std::fs::write(&tmp, total.to_string()).is_ok() {
                let _ = std::fs::rename(&tmp, f);
            }
        }
    }
}

/// The processes under test. Dropped without `terminate` (a panic), they are killed, so a failed
/// run leaves nothing running.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.0 {
            if let Ok(None) = p.try_wait() {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
    }
}

fn terminate(procs: &mut [Child]) {
    for p in procs.iter() {
        let _ = Command::new("kill")
            .args(["-TERM", &p.id().to_string()])
            .status();
    }
    for p in procs.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match p.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    eprintln!("  process {} ignored SIGTERM for 30 s: killing it", p.id());
                    let _ = p.kill();
                    let _ = p.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

fn new_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("load producer")
}

/// Produces events as fast as possible (rate None) or at a fixed rate; returns when each was
/// handed to the client.
async fn produce(
    producer: &FutureProducer,
    events: &[(String, String, Vec<u8>)],
    rate: Option<f64>,
    t0: Instant,
) -> Vec<Option<Instant>> {
    let mut sent_at: Vec<Option<Instant>> = vec![None; events.len()];
    let mut inflight = Vec::with_capacity(1024);
    for (i, (topic, key, payload)) in events.iter().enumerate() {
        if let Some(r) = rate {
            let due = t0 + Duration::from_secs_f64(i as f64 / r);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        loop {
            match producer.send_result(FutureRecord::to(topic).key(key).payload(payload)) {
                Ok(f) => {
                    inflight.push(f);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        sent_at[i] = Some(Instant::now());
        if inflight.len() >= 1024 {
            for f in inflight.drain(..) {
                let _ = f.await;
            }
        }
    }
    for f in inflight.drain(..) {
        let _ = f.await;
    }
    let _ = producer.flush(Duration::from_secs(10));
    sent_at
}

impl Bench {
    async fn restart_stack(&self) {
        let stack = root().join("deploy/local/stack.sh");
        let ok = Command::new(&stack)
            .arg("restart-broker")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "restarting the broker ({}) failed", stack.display());
        let mut con = redis_conn(&self.redis).await;
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut con)
            .await
            .expect("Redis FLUSHALL");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    /// Creates topics with the given partition counts; an existing topic is fine.
    async fn create_topics(&self, topics: &[(String, i32)]) {
        let a = admin(&self.brokers);
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(1)))
            .collect();
        let res = a
            .create_topics(new.iter(), &AdminOptions::new())
            .await
            .expect("create topics");
        for r in res {
            if let Err((t, code)) = r {
                assert!(
                    code == RDKafkaErrorCode::TopicAlreadyExists,
                    "creating topic {t} failed: {code}"
                );
            }
        }
    }

    /// Topics whose warm-up records show the last stage has joined its group, besides the results
    /// topic (waited for up to 20 s more). Switchyard runs every stage in one process.
    fn warm_topics(&self, system: System) -> Vec<String> {
        match system {
            System::Limit => self
                .shape
                .iter()
                .flat_map(|s| s.hops.iter().filter(|h| h.hop == 3))
                .flat_map(|h| h.outputs.iter().map(|o| o.topic.clone()))
                .filter(|t| t != "limit.audit")
                .collect(),
            System::Switchyard => vec![],
            System::Peer => vec!["peer.actions".into()],
        }
    }

    fn input_topics(&self) -> Vec<(String, i32)> {
        INPUTS
            .iter()
            .map(|t| (t.to_string(), partitions_of(&self.partitions, t)))
            .collect()
    }

    /// The bench's switchyard config: deploy/bench/switchyard.yaml (the shipped config's built-in
    /// flow, the one the peer implements; deploy/switchyard.yaml in trees that predate it) with
    /// absolute paths, warn-level logs and budgets too large to bind. `consumer_extra` adds
    /// librdkafka consumer settings; `batch_stats` asks the producer for statistics every second
    /// (the batches-sent counter the phases read; left at the shipped 5 s under callgrind, where
    /// every report's parse would be counted).
    fn config_file(
        &self,
        name: &str,
        consumer_extra: &[(&str, &str)],
        batch_stats: bool,
    ) -> PathBuf {
        let own = tree().join("deploy/bench/switchyard.yaml");
        let src = if own.exists() {
            own
        } else {
            tree().join("deploy/switchyard.yaml")
        };
        let base = std::fs::read_to_string(&src)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
        let topics = tree().join("topics").display().to_string();
        let schemas = tree().join("schemas").display().to_string();
        let mut cfg = base
            .replace("../../topics", &topics)
            .replace("../../schemas", &schemas)
            .replace("../topics", &topics)
            .replace("../schemas", &schemas)
            .replace("level: info", "level: warn")
            .replace(
                "linger.ms: \"5\"",
                &format!(
                    "linger.ms: \"{}\"\n    max.in.flight.requests.per.connection: \"{}\"{}",
                    linger_ms(),
                    max_in_flight(),
                    if batch_stats {
                        "\n    statistics.interval.ms: \"1000\""
                    } else {
                        ""
                    }
                ),
            )
            .replace(
                "fetch.wait.max.ms: \"20\"",
                &format!("fetch.wait.max.ms: \"{}\"", fetch_wait_ms()),
            )
            .replace("max_calls: 100000", "max_calls: 100000000")
            .replace("max_cost: 500.0", "max_cost: 100000000.0");
        for (k, v) in consumer_extra {
            let anchor = "  consumer:\n";
            assert!(
                cfg.contains(anchor),
                "{} has no kafka.consumer section",
                src.display()
            );
            cfg = cfg.replacen(anchor, &format!("{anchor}    {k}: \"{v}\"\n"), 1);
        }
        let path = scratch_dir().join(name);
        std::fs::write(&path, cfg)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    fn topics_apply(&self, cfg: &Path) {
        let out = Command::new(switchyard_bin())
            .arg("--config")
            .arg(cfg)
            .args(["topics", "apply"])
            .env("SWITCHYARD_KAFKA_BROKERS", &self.brokers)
            .output()
            .expect("run switchyard topics apply");
        assert!(
            out.status.success(),
            "switchyard topics apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the system under test; returns its processes and where their produce batches are
    /// counted.
    async fn start(&self, spec: &PhaseSpec) -> (Vec<Child>, BatchProbe) {
        match spec.system {
            System::Switchyard => {
                let cfg = self.config_file("switchyard.yaml", &[], true);
                self.topics_apply(&cfg);
                let ports: Vec<u16> = (0..spec.processes).map(|_| free_port()).collect();
                let procs = ports
                    .iter()
                    .map(|port| {
                        Command::new(switchyard_bin())
                            .arg("--config")
                            .arg(&cfg)
                            .arg("run")
                            .env("SWITCHYARD_KAFKA_BROKERS", &self.brokers)
                            .env("SWITCHYARD_REDIS_URL", &self.redis)
                            .env("SWITCHYARD_HTTP_LISTEN", format!("127.0.0.1:{port}"))
                            .stderr(Stdio::null())
                            .spawn()
                            .expect("start switchyard run")
                    })
                    .collect();
                (procs, BatchProbe::Metrics(ports))
            }
            System::Limit => {
                let shape = self
                    .shape
                    .as_ref()
                    .expect("the limit needs switchyard's shape: run switchyard's maximum first");
                let mut topics = self.input_topics();
                topics.extend(
                    SY_OUTPUTS
                        .iter()
                        .map(|t| (mirror(t), partitions_of(&self.partitions, t))),
                );
                self.create_topics(&topics).await;
                let path = scratch_dir().join("limit-shape.run.json");
                write_json(&path, shape);
                let batches = empty_scratch_dir("limit-batches");
                (
                    vec![
                        Command::new(std::env::current_exe().expect("own executable"))
                            .arg("--limit-chain")
                            .arg(&self.brokers)
                            .arg(&path)
                            .env("BENCH_LIMIT_BATCHES_DIR", &batches)
                            .spawn()
                            .expect("start the limit chain"),
                    ],
                    BatchProbe::Files(batches),
                )
            }
            System::Peer => {
                let mut topics = self.input_topics();
                topics.extend(
                    PEER_OUTPUTS
                        .iter()
                        .map(|(t, m)| (t.to_string(), partitions_of(&self.partitions, m))),
                );
                self.create_topics(&topics).await;
                let python = env_or("BENCH_PEER_PYTHON", "python3");
                let batches = empty_scratch_dir("peer-batches");
                let procs = ["route", "agent", "resolve"]
                    .iter()
                    .map(|stage| {
                        Command::new(&python)
                            .arg(root().join("deploy/bench/peer/app.py"))
                            .args([
                                stage,
                                "--brokers",
                                &self.brokers,
                                "--redis",
                                &self.redis,
                                "--prefix",
                                "peer",
                                "--inputs",
                                &INPUTS.join(","),
                                "--fetch-wait-ms",
                                &fetch_wait_ms(),
                                "--max-in-flight",
                                &max_in_flight(),
                            ])
                            .env("BENCH_PEER_BATCHES_DIR", &batches)
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .expect("start the peer")
                    })
                    .collect();
                (procs, BatchProbe::Files(batches))
            }
        }
    }

    /// Sends warm-up events until their result arrives (every group has joined), waits up to 20 s
    /// more for records on the system's last-stage topics, then until the outputs are quiet.
    async fn warm_up(
        &self,
        spec: &PhaseSpec,
        producer: &FutureProducer,
        rx: &mpsc::Receiver<Seen>,
        shared: &ReaderShared,
        round: usize,
    ) {
        let warm = make_events_from(&format!("warm{}", spec.tag), 3 * round, 3, 3);
        let mut results_seen = false;
        let mut extra_seen: Vec<String> = Vec::new();
        let extra = self.warm_topics(spec.system);
        let start = Instant::now();
        let mut results_at = None;
        let mut last_send: Option<Instant> = None;
        while start.elapsed() < Duration::from_secs(90) {
            if !results_seen && last_send.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                for (topic, key, payload) in &warm {
                    // Bounded: a delivery can otherwise wait message.timeout.ms (5 minutes).
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        producer.send(
                            FutureRecord::to(topic).key(key).payload(payload),
                            Duration::from_secs(5),
                        ),
                    )
                    .await;
                }
                last_send = Some(Instant::now());
            }
            if let Ok(Seen::Warm(t)) = rx.recv_timeout(Duration::from_millis(200)) {
                if t == spec.system.results_topic() {
                    results_seen = true;
                    results_at = Some(Instant::now());
                } else if !extra_seen.contains(&t) {
                    extra_seen.push(t);
                }
            }
            let extra_done = extra.is_empty() || !extra_seen.is_empty();
            if results_seen
                && (extra_done || results_at.is_some_and(|t| t.elapsed() > Duration::from_secs(20)))
            {
                break;
            }
        }
        assert!(
            results_seen,
            "{} produced no result for the warm-up events within 90 s",
            spec.system.name()
        );
        // Stragglers of the warm-up must not be counted as the phase's records.
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(20) {
            let quiet = shared
                .last_any()
                .is_none_or(|t| t.elapsed() > Duration::from_secs(2));
            if quiet {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        while rx.try_recv().is_ok() {}
    }

    async fn phase(&self, spec: &PhaseSpec) -> PhaseOutcome {
        self.restart_stack().await;
        let (procs, probe) = self.start(spec).await;
        let mut procs = Procs(procs);
        let pids: Vec<u32> = procs.0.iter().map(Child::id).collect();
        let producer = new_producer(&self.brokers);
        let shared = ReaderShared::new();
        let (tx, rx) = mpsc::channel::<Seen>();
        let reader = spawn_reader(
            ReaderSpec {
                brokers: self.brokers.clone(),
                topics: spec.system.outputs(),
                results_topic: spec.system.results_topic().to_string(),
                warm_topics: self.warm_topics(spec.system),
                tag: spec.tag.clone(),
                classify: spec.system == System::Switchyard,
            },
            shared.clone(),
            tx,
        );
        // Warm-up: events through the whole flow (group joins), not measured. Several processes
        // in one group rebalance as each joins: wait for that, then warm up again.
        self.warm_up(spec, &producer, &rx, &shared, 0).await;
        if spec.processes > 1 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            self.warm_up(spec, &producer, &rx, &shared, 1).await;
        }
        let mut con = redis_conn(&self.redis).await;
        let calls0 = command_calls(&mut con).await;
        let mem0 = used_memory(&mut con).await;
        let (s0, _) = sample(&pids);
        let batches0 = probe.batches().await;
        let events = make_events(&spec.tag, spec.events, spec.resources);
        shared.counting.store(true, Ordering::Release);
        let t0 = Instant::now();
        let sent_at = produce(&producer, &events, spec.rate, t0).await;
        let mut arrived: HashMap<usize, Instant> = HashMap::with_capacity(events.len());
        let mut samples = vec![s0];
        let mut peak_rss = 0.0f64;
        let mut last_result = Instant::now();
        let take_sample = |samples: &mut Vec<Sample>, peak: &mut f64| {
            let (s, rss) = sample(&pids);
            *peak = peak.max(rss);
            samples.push(s);
        };
        // Every result record, or 30 s without one.
        while arrived.len() < events.len() && last_result.elapsed() < Duration::from_secs(30) {
            while let Ok(seen) = rx.try_recv() {
                if let Seen::Result(i, at) = seen {
                    if i < events.len() {
                        arrived.entry(i).or_insert(at);
                        last_result = Instant::now();
                    }
                }
            }
            take_sample(&mut samples, &mut peak_rss);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if arrived.len() < events.len() {
            eprintln!(
                "  warning: {} of {} results arrived ({} wrote no more within 30 s)",
                arrived.len(),
                events.len(),
                spec.system.name()
            );
        }
        // Then every other record: the clock stops at the last record on any output topic.
        let waiting = Instant::now();
        loop {
            take_sample(&mut samples, &mut peak_rss);
            let quiet = shared.last_counted().is_none_or(|t| t.elapsed() >= QUIET);
            if quiet {
                break;
            }
            if waiting.elapsed() > Duration::from_secs(120) {
                eprintln!(
                    "  warning: outputs still not quiet after 120 s; stopping the clock here"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let calls1 = command_calls(&mut con).await;
        // 3 s after the last output (the steady pass's settle, below): the producers, reporting
        // every second, have counted every batch of the phase.
        tokio::time::sleep(QUIET).await;
        let batches1 = probe.batches().await;
        let (steady, mem1) = if spec.steady {
            // Measured running: 3 s after the first pass's last output, then after the second's.
            let mem1 = used_memory(&mut con).await;
            let steady = self
                .steady_pass(spec, &producer, &rx, &shared, &mut con, events.len(), mem1)
                .await;
            (Some(steady), mem1)
        } else {
            (None, 0)
        };
        shared.stop.store(true, Ordering::Release);
        let tallies = reader.join().expect("reader thread");
        terminate(&mut procs.0);
        let mem1 = if spec.steady {
            mem1
        } else {
            // What Redis keeps once the system has stopped (and its clients are gone).
            tokio::time::sleep(Duration::from_secs(3)).await;
            used_memory(&mut con).await
        };

        let last_output = shared.last_counted().unwrap_or(t0);
        // CPU up to the last output record (the quiet wait after it is not the system's work).
        let s1 = samples
            .iter()
            .find(|s| s.at >= last_output)
            .or(samples.last())
            .expect("samples");
        let s0 = &samples[0];
        let n = events.len() as f64;
        let per_1k = |a: f64, b: f64| (b - a) / (n / 1000.0);
        let mut lat: Vec<f64> = arrived
            .iter()
            .filter_map(|(i, at)| {
                sent_at
                    .get(*i)
                    .copied()
                    .flatten()
                    .map(|s| at.saturating_duration_since(s).as_secs_f64() * 1000.0)
            })
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let last_res = arrived.values().max().copied().unwrap_or(t0);
        let span = |end: Instant| end.saturating_duration_since(t0).as_secs_f64().max(1e-6);
        let total: Tally = tallies.values().fold(Tally::default(), |mut a, v| {
            a.records += v.records;
            a.key_bytes += v.key_bytes;
            a.value_bytes += v.value_bytes;
            a.header_bytes += v.header_bytes;
            a
        });
        let delta = calls_delta(&calls0, &calls1);
        let result = PhaseResult {
            system: spec.system.key(),
            offered_rate: spec.rate,
            events: events.len(),
            resources: spec.resources,
            processes: procs.0.len(),
            received: arrived.len(),
            throughput_eps: n / span(last_output),
            throughput_to_last_result_eps: n / span(last_res),
            p50_ms: pct(&lat, 0.50),
            p95_ms: pct(&lat, 0.95),
            p99_ms: pct(&lat, 0.99),
            max_ms: lat.last().copied().unwrap_or(f64::NAN),
            cpu_seconds_per_1000: per_1k(s0.own, s1.own),
            peak_rss_mb: peak_rss,
            broker_cpu_seconds_per_1000: per_1k(s0.broker, s1.broker),
            redis_cpu_seconds_per_1000: per_1k(s0.redis, s1.redis),
            records_per_event: total.records as f64 / n,
            batches_per_event: batches0
                .zip(batches1)
                .map(|(a, b)| b.saturating_sub(a) as f64 / n),
            bytes_per_event: total.bytes() as f64 / n,
            redis_commands_per_event: delta.values().sum::<u64>() as f64 / n,
            redis_bytes_retained_per_event: (mem1 as f64 - mem0 as f64) / n,
            steady,
        };
        PhaseOutcome {
            result,
            tallies,
            redis_mix: delta.into_iter().map(|(k, v)| (k, v as f64 / n)).collect(),
        }
    }

    /// The second pass of a steady phase: events `n..2n` of the generator (the same resources),
    /// uncounted in the phase's records and bytes; Redis commands and memory over it.
    #[allow(clippy::too_many_arguments)]
    async fn steady_pass(
        &self,
        spec: &PhaseSpec,
        producer: &FutureProducer,
        rx: &mpsc::Receiver<Seen>,
        shared: &ReaderShared,
        con: &mut redis::aio::MultiplexedConnection,
        n: usize,
        mem1: u64,
    ) -> Steady {
        shared.counting.store(false, Ordering::Release);
        let calls1 = command_calls(con).await;
        let events = make_events_from(&spec.tag, n, n, spec.resources);
        produce(producer, &events, spec.rate, Instant::now()).await;
        let mut got = std::collections::HashSet::new();
        let mut last = Instant::now();
        while got.len() < events.len() && last.elapsed() < Duration::from_secs(30) {
            while let Ok(seen) = rx.try_recv() {
                if let Seen::Result(i, _) = seen {
                    if i >= n && got.insert(i) {
                        last = Instant::now();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if got.len() < events.len() {
            eprintln!(
                "  warning: steady pass: {} of {} results arrived",
                got.len(),
                events.len()
            );
        }
        let waiting = Instant::now();
        while shared.last_any().is_some_and(|t| t.elapsed() < QUIET)
            && waiting.elapsed() < Duration::from_secs(120)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let calls2 = command_calls(con).await;
        tokio::time::sleep(QUIET).await;
        let mem2 = used_memory(con).await;
        let m = events.len() as f64;
        let delta = calls_delta(&calls1, &calls2);
        Steady {
            events: events.len(),
            received: got.len(),
            redis_commands_per_event: delta.values().sum::<u64>() as f64 / m,
            redis_bytes_retained_per_event: (mem2 as f64 - mem1 as f64) / m,
            redis_mix: delta.into_iter().map(|(k, v)| (k, v as f64 / m)).collect(),
        }
    }

    /// Replays a per-event Redis command mix, pipelined (REPLAY_PIPELINE_EVENTS events per
    /// pipeline, REPLAY_CONNECTIONS connections), on dummy keys with a hash tag per resource.
    async fn redis_replay(&self, mix: &BTreeMap<String, f64>, events: usize) -> ReplayResult {
        self.restart_stack().await;
        let mut con = redis_conn(&self.redis).await;
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg("return 1")
            .query_async(&mut con)
            .await
            .expect("SCRIPT LOAD");
        let mut replayable: Vec<(String, f64)> = Vec::new();
        let mut not_replayed = BTreeMap::new();
        for (name, rate) in mix {
            if replay_cmd(name, "r0", 0, &sha).is_some() {
                replayable.push((name.clone(), *rate));
            } else {
                not_replayed.insert(name.clone(), *rate);
            }
        }
        // The pipelines are built before the clock starts: the figure is Redis's, not the cost of
        // formatting commands on the same 2 cores.
        let resources = self.resources.max(1);
        let mut per_conn: Vec<Vec<redis::Pipeline>> = vec![Vec::new(); REPLAY_CONNECTIONS];
        let mut sent = 0u64;
        for (p, first) in (0..events).step_by(REPLAY_PIPELINE_EVENTS).enumerate() {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for e in first..(first + REPLAY_PIPELINE_EVENTS).min(events) {
                let tag = format!("r{}", (e * 7919) % resources);
                for (name, rate) in &replayable {
                    for _ in 0..copies(e as u64, *rate) {
                        if let Some(c) = replay_cmd(name, &tag, e, &sha) {
                            pipe.add_command(c);
                            sent += 1;
                        }
                    }
                }
            }
            per_conn[p % REPLAY_CONNECTIONS].push(pipe);
        }
        let mut conns = Vec::new();
        for _ in 0..REPLAY_CONNECTIONS {
            conns.push(redis_conn(&self.redis).await);
        }
        let redis0 = stack_pid("redis").map(|p| proc_cpu_rss(p).0).unwrap_or(0.0);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for (mut con, pipes) in conns.into_iter().zip(per_conn) {
            tasks.push(tokio::spawn(async move {
                let mut errors = 0u64;
                for pipe in pipes {
                    let replies: Vec<redis::RedisResult<redis::Value>> =
                        pipe.query_async(&mut con).await.expect("Redis pipeline");
                    errors += replies.iter().filter(|r| r.is_err()).count() as u64;
                }
                errors
            }));
        }
        let mut errors = 0;
        for t in tasks {
            errors += t.await.expect("replay task");
        }
        let elapsed = t0.elapsed().as_secs_f64().max(1e-6);
        let redis1 = stack_pid("redis").map(|p| proc_cpu_rss(p).0).unwrap_or(0.0);
        if errors > 0 {
            eprintln!("  warning: {errors} replayed Redis commands failed");
        }
        ReplayResult {
            what:
                "switchyard's per-event Redis command mix (measured at its maximum rate), pipelined",
            events,
            pipeline_events: REPLAY_PIPELINE_EVENTS,
            connections: REPLAY_CONNECTIONS,
            measured_commands_per_event: mix.clone(),
            replayed_commands_per_event: sent as f64 / events as f64,
            not_replayed,
            throughput_eps: events as f64 / elapsed,
            redis_cpu_seconds_per_1000: (redis1 - redis0) / (events as f64 / 1000.0),
            errors,
        }
    }

    /// Switchyard at maximum rate with 1, 100 and 10,000 resources, and with 1 and 3 processes
    /// in one consumer group (10,000 resources).
    fn scaling(&self, run: &mut impl FnMut(PhaseSpec) -> PhaseOutcome) -> serde_json::Value {
        let events = env_num("BENCH_SCALING_EVENTS", self.events);
        let spec = |tag: &str, resources: usize, processes: usize| PhaseSpec {
            system: System::Switchyard,
            rate: None,
            tag: tag.to_string(),
            events,
            resources,
            processes,
            steady: false,
        };
        let mut by_resources = Vec::new();
        let mut one_process_10k = None;
        for r in [1usize, 100, 10_000] {
            let out = run(spec(&format!("res{r}"), r, 1)).result;
            if r == 10_000 {
                one_process_10k = Some(out.clone());
            }
            by_resources.push(out);
        }
        let three = run(spec("proc3", 10_000, 3)).result;
        let by_processes = vec![
            one_process_10k.expect("the 10,000-resource phase ran"),
            three,
        ];
        json!({
            "events_per_phase": events,
            "by_resources": by_resources,
            "by_processes": by_processes,
        })
    }

    /// Instructions per input event of the switchyard process under callgrind (see
    /// deploy/bench/instructions.sh).
    async fn instructions(&self) {
        let events_n: usize = env_num("INSTR_EVENTS", 3000);
        let resources: usize = env_num("INSTR_RESOURCES", 1000);
        let warm_fraction: f64 = env_num("INSTR_WARM_FRACTION", 0.1);
        let timeout = Duration::from_secs(env_num("INSTR_TIMEOUT_S", 1800));
        let warm_n = ((events_n as f64 * warm_fraction).ceil() as usize).clamp(1, events_n - 1);
        let started = Instant::now();
        self.restart_stack().await;
        // Under callgrind the process runs ~50x slower: generous session and poll timeouts keep
        // the groups from rebalancing while it is measured (a rebalance would be counted).
        let cfg = self.config_file(
            "switchyard-callgrind.yaml",
            &[("max.poll.interval.ms", "1800000")],
            false,
        );
        self.topics_apply(&cfg);
        let dir = scratch_dir().join("callgrind");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let log_path = dir.join("valgrind.log");
        let log = std::fs::File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let bin = switchyard_bin();
        // --instr-atstart=no: nothing is counted until `callgrind_control -i on`. (With
        // --collect-atstart=no instead, collection stays off and `-i on` cannot turn it on:
        // callgrind_control has no switch for collection, and every dump says 0 Ir.)
        let mut procs = Procs(vec![Command::new("valgrind")
            .args([
                "--tool=callgrind",
                "--instr-atstart=no",
                &format!("--callgrind-out-file={}/callgrind.out.%p", dir.display()),
                &bin,
                "--config",
            ])
            .arg(&cfg)
            .arg("run")
            .env("SWITCHYARD_KAFKA_BROKERS", &self.brokers)
            .env("SWITCHYARD_REDIS_URL", &self.redis)
            .env("SWITCHYARD_HTTP_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start valgrind (is it installed?)")]);
        let child = &mut procs.0[0];
        let pid = child.id();
        eprintln!(
            "instructions: switchyard under callgrind (pid {pid}, log {})",
            log_path.display()
        );
        let tag = "instr";
        let shared = ReaderShared::new();
        let (tx, rx) = mpsc::channel::<Seen>();
        let reader = spawn_reader(
            ReaderSpec {
                brokers: self.brokers.clone(),
                topics: System::Switchyard.outputs(),
                results_topic: System::Switchyard.results_topic().to_string(),
                warm_topics: vec![],
                tag: tag.to_string(),
                classify: false,
            },
            shared.clone(),
            tx,
        );
        let producer = new_producer(&self.brokers);
        let events = make_events(tag, events_n, resources);
        let mut arrived = vec![false; events_n];
        let mut arrived_n = 0usize;
        let fail = |child: &mut Child, msg: String| -> ! { instr_fail(child, &log_path, msg) };
        // Waits until `want` results have arrived and the outputs have been quiet for `quiet`.
        let wait_for = |child: &mut Child,
                        arrived: &mut Vec<bool>,
                        arrived_n: &mut usize,
                        want: usize,
                        quiet: Duration,
                        what: &str| {
            let mut last_progress = Instant::now();
            loop {
                if let Ok(Some(st)) = child.try_wait() {
                    fail(
                        child,
                        format!("switchyard exited ({st}) while waiting for {what}"),
                    );
                }
                if started.elapsed() > timeout {
                    fail(
                        child,
                        format!(
                            "timed out after {} s (INSTR_TIMEOUT_S) waiting for {what}: {}/{want} results",
                            timeout.as_secs(),
                            arrived_n
                        ),
                    );
                }
                if last_progress.elapsed() > Duration::from_secs(300) {
                    fail(
                        child,
                        format!(
                            "no result for 300 s while waiting for {what}: {}/{want}",
                            arrived_n
                        ),
                    );
                }
                while let Ok(seen) = rx.try_recv() {
                    if let Seen::Result(i, _) = seen {
                        if i < arrived.len() && !arrived[i] {
                            arrived[i] = true;
                            *arrived_n += 1;
                            last_progress = Instant::now();
                        }
                    }
                }
                let quiet_now = shared.last_any().is_none_or(|t| t.elapsed() >= quiet);
                if *arrived_n >= want && quiet_now {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        // Warm-up: the first events through the whole flow while nothing is counted.
        eprintln!("instructions: warm-up with {warm_n} events (not counted)");
        produce(&producer, &events[..warm_n], None, Instant::now()).await;
        wait_for(
            child,
            &mut arrived,
            &mut arrived_n,
            warm_n,
            Duration::from_secs(5),
            "the warm-up results",
        );
        if arrived_n != warm_n {
            eprintln!(
                "instructions: warning: {arrived_n} results after the warm-up, expected {warm_n}"
            );
        }
        let before_on = arrived_n;
        let control = |child: &mut Child, args: &[&str]| {
            let mut c = Command::new("callgrind_control")
                .args(args)
                .arg(pid.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run callgrind_control (is valgrind installed?)");
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                match c.try_wait() {
                    Ok(Some(st)) if st.success() => return,
                    Ok(Some(st)) => {
                        let out = c.wait_with_output().map(|o| {
                            format!(
                                "{}{}",
                                String::from_utf8_lossy(&o.stdout),
                                String::from_utf8_lossy(&o.stderr)
                            )
                        });
                        fail(
                            child,
                            format!(
                                "callgrind_control {args:?} failed ({st}): {}",
                                out.unwrap_or_default()
                            ),
                        );
                    }
                    Ok(None) if Instant::now() > deadline => {
                        let _ = c.kill();
                        fail(child, format!("callgrind_control {args:?} hung for 120 s"));
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                    Err(e) => fail(child, format!("callgrind_control {args:?}: {e}")),
                }
            }
        };
        control(child, &["-i", "on"]);
        control(child, &["-z"]);
        // An idle window first: what the process spends polling with nothing to do (librdkafka's
        // fetch loops, timers). Under valgrind the measured window lasts ~50x longer than natively,
        // so this share is inflated; it is reported, and subtracted in a second figure.
        let idle_window = Duration::from_secs(5);
        let idle_at = Instant::now();
        tokio::time::sleep(idle_window).await;
        control(child, &["--dump=idle"]);
        let idle_wall = idle_at.elapsed().as_secs_f64();
        let on_at = Instant::now();
        eprintln!(
            "instructions: counting on; producing the other {} events",
            events_n - warm_n
        );
        produce(&producer, &events[warm_n..], None, Instant::now()).await;
        wait_for(
            child,
            &mut arrived,
            &mut arrived_n,
            events_n,
            Duration::from_secs(5),
            "every result and a quiet output",
        );
        control(child, &["--dump=measured"]);
        let measured_wall = on_at.elapsed().as_secs_f64();
        control(child, &["-i", "off"]);
        shared.stop.store(true, Ordering::Release);
        let _ = reader.join();
        terminate(&mut procs.0);
        let (ir_total, dumps) = callgrind_ir(&dir, "measured");
        let (ir_idle, _) = callgrind_ir(&dir, "idle");
        assert!(
            ir_total > 0,
            "no callgrind dump with instructions in {} (see {})",
            dir.display(),
            log_path.display()
        );
        let measured_events = arrived_n - before_on;
        let per_event = ir_total as f64 / measured_events.max(1) as f64;
        let idle_per_second = ir_idle as f64 / idle_wall.max(1e-6);
        let busy_per_event = (ir_total as f64 - idle_per_second * measured_wall).max(0.0)
            / measured_events.max(1) as f64;
        println!(
            "instructions per input event (switchyard, all threads, callgrind Ir): {per_event:.0}  ({ir_total} Ir over {measured_events} events in {measured_wall:.0} s under valgrind; {warm_n} warm-up events not counted)"
        );
        println!(
            "  of which idle polling: {idle_per_second:.0} Ir/s with nothing to do; less that: {busy_per_event:.0} per event"
        );
        // Valgrind's virtual CPU has no SHA extensions, so sha2 takes its software path here;
        // the real process hashes with SHA-NI where the CPU has it (this machine's does).
        let sha_per_event = callgrind_inclusive(&dumps, SHA256_COMPRESS)
            .map(|ir| ir as f64 / measured_events.max(1) as f64);
        match sha_per_event {
            Some(n) => println!(
                "  of which SHA-256 in software (valgrind hides SHA-NI; the real process uses it where the CPU has it): {n:.0} per event"
            ),
            None => println!(
                "  SHA-256's share not found (callgrind_annotate missing, or no {SHA256_COMPRESS:?} in the dump)"
            ),
        }
        let doc = json!({
            "instructions_per_event": per_event,
            "instructions_per_event_less_idle": busy_per_event,
            "idle_instructions_per_second": idle_per_second,
            "sha256_software_instructions_per_event": sha_per_event,
            "ir_total": ir_total,
            "events_measured": measured_events,
            "events_warm_up": warm_n,
            "resources": resources,
            "measured_wall_seconds_under_valgrind": measured_wall,
            "method": "switchyard run (release build, the bench's config) under valgrind --tool=callgrind --instr-atstart=no; warm-up events first (their results and a quiet output awaited), then callgrind_control -i on and -z, a 5 s idle window dumped (idle), the remaining events produced at once, every result and 5 s of quiet output awaited, callgrind_control --dump (measured); instructions_per_event = Ir of the measured dump (every thread, idle polling during the window included) / events produced while counting; instructions_per_event_less_idle subtracts the idle rate × the window's length; sha256_software_instructions_per_event is the part of instructions_per_event spent in sha2's compression function, which runs in software under valgrind (its virtual CPU has no SHA extensions) and with SHA-NI in the real process where the CPU has them",
            "dumps": dumps,
            "valgrind": Command::new("valgrind").arg("--version").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
            "switchyard_bin": bin,
            "switchyard_tree": tree(),
            "git": git_rev(),
            "machine": machine(),
        });
        let out_dir = out_dir();
        let path = out_dir.join("instructions.json");
        write_json(&path, &doc);
        println!("wrote {}", path.display());
    }
}

/// Sum of the Ir totals of the callgrind dumps in `dir` triggered by `--dump=<label>`, and the
/// files summed.
fn callgrind_ir(dir: &Path, label: &str) -> (u64, Vec<String>) {
    let trigger = format!("desc: Trigger: dump {label}");
    let mut total = 0u64;
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if !text.lines().any(|l| l.trim_end() == trigger) {
            continue;
        }
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("totals:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{} has no totals line", path.display()));
        files.push(path.display().to_string());
    }
    (total, files)
}

/// sha2's SHA-256 compression function, as `callgrind_annotate` names it.
const SHA256_COMPRESS: &str = "sha256.rs:sha2::sha256::compress256 [";

/// Inclusive Ir of the function `callgrind_annotate` names with `symbol` (a substring of its
/// line), summed over `dumps`; `None` when no dump names it (or the tool is missing).
fn callgrind_inclusive(dumps: &[String], symbol: &str) -> Option<u64> {
    let found: Vec<u64> = dumps
        .iter()
        .filter_map(|d| {
            let out = Command::new("callgrind_annotate")
                .args(["--inclusive=yes", "--threshold=100", "--auto=no", d])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.contains(symbol))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.replace(',', "").parse::<u64>().ok())
        })
        .collect();
    (!found.is_empty()).then(|| found.iter().sum())
}

/// Stops the valgrind'ed switchyard and fails with the end of valgrind's log.
fn instr_fail(child: &mut Child, log_path: &Path, msg: String) -> ! {
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    panic!(
        "instructions: {msg}\n--- {} (last lines) ---\n{}",
        log_path.display(),
        lines[lines.len().saturating_sub(30)..].join("\n")
    );
}

// --------------------------------------------------------------------------- the limit chain ---

/// The id of the event a record is about: the first `"id":"..."` (input CloudEvents serialise
/// `data` before `id`, and no data field is called id; the limit's own records start with it).
fn event_id(payload: &[u8]) -> &[u8] {
    const NEEDLE: &[u8] = b"\"id\":\"";
    let Some(pos) = payload.windows(NEEDLE.len()).position(|w| w == NEEDLE) else {
        return b"";
    };
    let rest = &payload[pos + NEEDLE.len()..];
    let end = rest.iter().position(|b| *b == b'"').unwrap_or(rest.len());
    &rest[..end]
}

/// A record of `value_bytes` bytes carrying the event id: {"id":"<id>","pad":"xxx..."}.
fn limit_payload(id: &[u8], value_bytes: usize) -> Vec<u8> {
    let (head, mid, tail) = (b"{\"id\":\"", b"\",\"pad\":\"", b"\"}");
    let fixed = head.len() + id.len() + mid.len() + tail.len();
    let mut v = Vec::with_capacity(value_bytes.max(fixed));
    v.extend_from_slice(head);
    v.extend_from_slice(id);
    v.extend_from_slice(mid);
    v.resize(v.len() + value_bytes.saturating_sub(fixed), b'x');
    v.extend_from_slice(tail);
    v
}

/// Headers totalling `bytes` (names + values) in `count` headers.
fn limit_headers(count: f64, bytes: f64) -> OwnedHeaders {
    let n = count.round() as usize;
    let mut h = OwnedHeaders::new_with_capacity(n);
    if n == 0 {
        return h;
    }
    let names: Vec<String> = (0..n).map(|i| format!("h{i}")).collect();
    let name_bytes: usize = names.iter().map(String::len).sum();
    let values = (bytes.round() as usize).saturating_sub(name_bytes);
    for (i, name) in names.iter().enumerate() {
        let len = values / n + usize::from(i < values % n);
        h = h.insert(Header {
            key: name,
            value: Some("v".repeat(len).as_str()),
        });
    }
    h
}

/// One hop of the limit chain: consume, write this hop's shape (records per consumed record, of
/// the measured sizes, keyed by the consumed record's key), store the offset only after every one
/// of them is delivered. Nothing else.
fn limit_hop(brokers: String, hop: ShapeHop) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &hop.group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.offset.store", "false")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", fetch_wait_ms())
            .create()
            .expect("limit consumer");
        // As switchyard's producer: acks=all, idempotent, the same linger.
        let counter = BatchCounter {
            file: std::env::var_os("BENCH_LIMIT_BATCHES_DIR")
                .map(|d| PathBuf::from(d).join(format!("hop{}", hop.hop))),
            total: Default::default(),
        };
        let p: FutureProducer<BatchCounter> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", linger_ms())
            .set("max.in.flight.requests.per.connection", max_in_flight())
            .set("statistics.interval.ms", "1000")
            .create_with_context(counter)
            .expect("limit producer");
        let topics: Vec<&str> = hop.from.iter().map(String::as_str).collect();
        c.subscribe(&topics).expect("limit subscribe");
        let outs: Vec<(ShapeOutput, OwnedHeaders, usize)> = hop
            .outputs
            .iter()
            .map(|o| {
                (
                    o.clone(),
                    limit_headers(o.headers, o.header_bytes),
                    o.value_bytes.round() as usize,
                )
            })
            .collect();
        let mut consumed = 0u64;
        let mut failed = 0u64;
        let mut pending: VecDeque<(String, i32, i64, Vec<DeliveryFuture>)> = VecDeque::new();
        loop {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(5)) {
                let key = m.key().unwrap_or_default();
                let id = event_id(m.payload().unwrap_or_default());
                let mut futs = Vec::new();
                for (o, headers, value_bytes) in &outs {
                    for _ in 0..copies(consumed, o.per_record) {
                        let payload = limit_payload(id, *value_bytes);
                        loop {
                            let rec = FutureRecord::to(&o.topic)
                                .key(key)
                                .payload(&payload)
                                .headers(headers.clone());
                            match p.send_result(rec) {
                                Ok(f) => {
                                    futs.push(f);
                                    break;
                                }
                                Err((
                                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                                    _,
                                )) => {
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                                Err((e, _)) => panic!("limit: producing to {}: {e}", o.topic),
                            }
                        }
                    }
                }
                consumed += 1;
                pending.push_back((m.topic().to_string(), m.partition(), m.offset(), futs));
            }
            while let Some((_, _, _, futs)) = pending.front_mut() {
                futs.retain_mut(|f| match f.now_or_never() {
                    None => true,
                    Some(Ok(Ok(_))) => false,
                    Some(_) => {
                        failed += 1;
                        if failed <= 5 {
                            eprintln!("limit hop {}: a delivery failed", hop.hop);
                        }
                        false
                    }
                });
                if !futs.is_empty() {
                    break;
                }
                let (t, part, off, _) = pending.pop_front().expect("front");
                let _ = c.store_offset(&t, part, off);
            }
        }
    })
}

/// The limit chain: switchyard's three hops with its records and bytes, as raw consume → produce.
fn limit_chain(brokers: &str, shape_file: &Path) {
    let text = std::fs::read_to_string(shape_file)
        .unwrap_or_else(|e| panic!("limit: cannot read {}: {e}", shape_file.display()));
    let shape: Shape = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("limit: {} is not a shape: {e}", shape_file.display()));
    let hops: Vec<_> = shape
        .hops
        .into_iter()
        .map(|h| limit_hop(brokers.to_string(), h))
        .collect();
    for h in hops {
        let _ = h.join();
    }
}

// ------------------------------------------------------------------------------------- main ---

/// Producer `linger.ms` of both the limit chain and switchyard (BENCH_LINGER_MS, default 5, as in
/// deploy/bench/switchyard.yaml).
fn linger_ms() -> String {
    env_or("BENCH_LINGER_MS", "5")
}

/// Producer `max.in.flight.requests.per.connection` of all three systems (BENCH_MAX_IN_FLIGHT,
/// default 5, librdkafka's).
fn max_in_flight() -> String {
    env_or("BENCH_MAX_IN_FLIGHT", "5")
}

/// Consumer `fetch.wait.max.ms` of all three systems (BENCH_FETCH_WAIT_MS, default 20, as in
/// deploy/bench/switchyard.yaml). On tansu every fetch lasts this long (half of it from 250 ms on).
fn fetch_wait_ms() -> String {
    env_or("BENCH_FETCH_WAIT_MS", "20")
}

fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env_or(
        "BENCH_OUT",
        &root().join("target/bench").display().to_string(),
    ));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({"cpu": model, "cores": cores})
}

/// The commit measured (+ "-dirty" with uncommitted changes), if git is there.
fn git_rev() -> Option<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{rev}-dirty") } else { rev })
}

fn fmt_rate(r: Option<f64>) -> String {
    r.map(|x| format!("{x:.0}")).unwrap_or_else(|| "max".into())
}

fn fmt_batches(b: Option<f64>) -> String {
    b.map_or_else(|| "-".to_string(), |b| format!("{b:.2}"))
}

fn print_line(r: &PhaseResult) {
    eprintln!(
        "  {:<12} rate {:>7} -> {:>7.0} ev/s (to last result {:>7.0}), p50 {:>8.1} ms, p99 {:>8.1} ms, received {}/{}, cpu s/1k own {:.3} broker {:.3} redis {:.3}, {:.2} records in {} batches & {:.0} B/event, redis {:.1} cmds & {:.0} B retained/event",
        r.system,
        fmt_rate(r.offered_rate),
        r.throughput_eps,
        r.throughput_to_last_result_eps,
        r.p50_ms,
        r.p99_ms,
        r.received,
        r.events,
        r.cpu_seconds_per_1000,
        r.broker_cpu_seconds_per_1000,
        r.redis_cpu_seconds_per_1000,
        r.records_per_event,
        fmt_batches(r.batches_per_event),
        r.bytes_per_event,
        r.redis_commands_per_event,
        r.redis_bytes_retained_per_event,
    );
    if let Some(st) = &r.steady {
        eprintln!(
            "  {:<12} second pass over the same resources: received {}/{}, redis {:.1} cmds & {:.0} B retained/event",
            "",
            st.received,
            st.events,
            st.redis_commands_per_event,
            st.redis_bytes_retained_per_event
        );
    }
}

fn print_table(results: &[PhaseResult]) {
    println!(
        "\n{:<12} {:>5} {:>5} {:>9} {:>10} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>9}",
        "system",
        "res",
        "procs",
        "offered/s",
        "achieved/s",
        "recv %",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "cpu s/1k",
        "rss MB",
        "brkr s/1k",
        "redis s/1k",
        "rec/ev",
        "bat/ev",
        "B/ev",
        "rcmd/ev",
        "rB kept/ev"
    );
    for r in results {
        println!(
            "{:<12} {:>5} {:>5} {:>9} {:>10.0} {:>6.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.3} {:>7.1} {:>8.3} {:>8.3} {:>7.2} {:>7} {:>7.0} {:>7.1} {:>9.0}",
            r.system,
            r.resources,
            r.processes,
            fmt_rate(r.offered_rate),
            r.throughput_eps,
            100.0 * r.received as f64 / r.events.max(1) as f64,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.max_ms,
            r.cpu_seconds_per_1000,
            r.peak_rss_mb,
            r.broker_cpu_seconds_per_1000,
            r.redis_cpu_seconds_per_1000,
            r.records_per_event,
            fmt_batches(r.batches_per_event),
            r.bytes_per_event,
            r.redis_commands_per_event,
            r.redis_bytes_retained_per_event,
        );
    }
    println!("achieved/s: events / (last record on any of the system's output topics, intermediate ones included, received − start of producing); recv %: events whose result record arrived; latency: produce → the event's result record (switchyard.results, peer.results, limit.results). CPU: seconds per 1,000 events up to the last record. rec/ev, B/ev: records and bytes (key + payload + headers) written per event; bat/ev: record batches the system's producers sent per event (librdkafka statistics; records over batches is how full they are — the broker's work follows batches); rcmd/ev: Redis commands per event (INFO commandstats, Lua-internal calls included); rB kept/ev: Redis used_memory after the phase (3 s settle) − before, per event.");
    for r in results {
        if let Some(st) = &r.steady {
            println!(
                "{:<12} second pass over the same {} resources (steady state): {:.1} Redis commands and {:.0} B retained per event ({}/{} results)",
                r.system,
                r.resources,
                st.redis_commands_per_event,
                st.redis_bytes_retained_per_event,
                st.received,
                st.events
            );
        }
    }
}

fn print_replay(r: &ReplayResult) {
    println!(
        "\nredis mix: switchyard's Redis commands per event ({:.1} replayed; Lua scripts as no-op EVALSHA plus their internal calls as direct commands), pipelined {} events per pipeline over {} connections: {:.0} events/s, Redis CPU {:.3} s per 1,000 events{}",
        r.replayed_commands_per_event,
        r.pipeline_events,
        r.connections,
        r.throughput_eps,
        r.redis_cpu_seconds_per_1000,
        if r.not_replayed.is_empty() {
            String::new()
        } else {
            format!("; not replayed: {:?}", r.not_replayed)
        }
    );
}

fn print_scaling(s: &serde_json::Value) {
    println!("\nscaling (switchyard at maximum rate):");
    for (label, key) in [
        ("by resources", "by_resources"),
        ("by processes", "by_processes"),
    ] {
        for p in s[key].as_array().into_iter().flatten() {
            println!(
                "  {label}: resources {:>5}, processes {}: {:>7.0} ev/s, p99 {:>8.1} ms, cpu s/1k {:.3}, peak rss {:.0} MB, received {}/{}",
                p["resources"].as_u64().unwrap_or(0),
                p["processes"].as_u64().unwrap_or(0),
                p["throughput_eps"].as_f64().unwrap_or(f64::NAN),
                p["p99_ms"].as_f64().unwrap_or(f64::NAN),
                p["cpu_seconds_per_1000"].as_f64().unwrap_or(f64::NAN),
                p["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
                p["received"].as_u64().unwrap_or(0),
                p["events"].as_u64().unwrap_or(0),
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--limit-chain") {
        let brokers = args.get(2).map(String::as_str).unwrap_or("127.0.0.1:9092");
        let shape = args
            .get(3)
            .map(PathBuf::from)
            .expect("usage: --limit-chain BROKERS SHAPE.json");
        limit_chain(brokers, &shape);
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets once as a smoke test; the benchmark itself
        // runs only under `cargo bench` (deploy/bench/run.sh).
        println!("e2e benchmark: run it with `cargo bench --bench e2e` (deploy/bench/run.sh)");
        return;
    }
    let Ok(brokers) = std::env::var("SWITCHYARD_KAFKA_BROKERS") else {
        eprintln!("e2e benchmark: set SWITCHYARD_KAFKA_BROKERS/SWITCHYARD_REDIS_URL (deploy/bench/run.sh does); skipping");
        return;
    };
    let mut bench = Bench {
        brokers,
        redis: env_or("SWITCHYARD_REDIS_URL", "redis://127.0.0.1:6379/"),
        events: env_num("BENCH_EVENTS", 20000),
        resources: env_num("BENCH_RESOURCES", 10000),
        partitions: topic_partitions(),
        shape: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if args.iter().any(|a| a == "--instructions") {
        rt.block_on(bench.instructions());
        return;
    }
    let fractions: Vec<f64> = env_or("BENCH_FRACTIONS", "0.25,0.5,0.75")
        .split(',')
        .map(|f| {
            f.trim()
                .parse()
                .unwrap_or_else(|_| panic!("BENCH_FRACTIONS: {f:?} is not a number"))
        })
        .collect();
    let with_peer = std::env::var("BENCH_PEER_PYTHON").is_ok();
    let only = env_or("BENCH_ONLY", "");
    let with_scaling = match env_or("BENCH_SCALING", "").as_str() {
        "" => only.is_empty() || only == "scaling",
        v => v != "0",
    };
    eprintln!(
        "e2e benchmark: {} events over {} resources per phase",
        bench.events, bench.resources
    );
    let mut results: Vec<PhaseResult> = Vec::new();
    let max_spec = |system: System, tag: &str, b: &Bench| PhaseSpec {
        system,
        rate: None,
        tag: tag.to_string(),
        events: b.events,
        resources: b.resources,
        processes: 1,
        steady: system != System::Limit,
    };
    // Switchyard's maximum rate first: its shape is what the limit chain writes and its Redis
    // command mix is what the replay sends.
    let run_switchyard_max = |bench: &mut Bench, results: &mut Vec<PhaseResult>| {
        let out = rt.block_on(bench.phase(&max_spec(System::Switchyard, "smax", bench)));
        print_line(&out.result);
        let shape = shape_from(&out.tallies, out.result.events);
        write_json(&shape_path(), &shape);
        bench.shape = Some(shape);
        results.push(out.result.clone());
        out
    };
    match only.as_str() {
        "" => {}
        // Profiling aids: one part of the run, no JSON or plot.
        "switchyard" => {
            let out = run_switchyard_max(&mut bench, &mut results);
            print_table(&results);
            let mix = |m: &BTreeMap<String, f64>| {
                m.iter()
                    .filter(|(_, v)| **v >= 0.005)
                    .map(|(k, v)| format!("{k} {v:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "switchyard Redis commands per event: {}",
                mix(&out.redis_mix)
            );
            if let Some(st) = &out.result.steady {
                println!("  second pass (steady state): {}", mix(&st.redis_mix));
            }
            return;
        }
        "limit" => {
            match std::fs::read_to_string(shape_path()) {
                Ok(text) => {
                    bench.shape = Some(serde_json::from_str(&text).unwrap_or_else(|e| {
                        panic!("{} is not a shape: {e}", shape_path().display())
                    }));
                    eprintln!(
                        "  the limit writes switchyard's shape from {}",
                        shape_path().display()
                    );
                }
                Err(_) => {
                    eprintln!(
                        "  no {} yet: measuring switchyard's shape first",
                        shape_path().display()
                    );
                    run_switchyard_max(&mut bench, &mut results);
                }
            }
            let out = rt.block_on(bench.phase(&max_spec(System::Limit, "only", &bench)));
            print_line(&out.result);
            results.push(out.result);
            print_table(&results);
            return;
        }
        "peer" => {
            let out = rt.block_on(bench.phase(&max_spec(System::Peer, "only", &bench)));
            print_line(&out.result);
            results.push(out.result);
            print_table(&results);
            return;
        }
        "redis" => {
            let sy = run_switchyard_max(&mut bench, &mut results);
            let replay = rt.block_on(
                bench.redis_replay(&sy.redis_mix, env_num("BENCH_REDIS_EVENTS", bench.events)),
            );
            print_table(&results);
            print_replay(&replay);
            return;
        }
        "scaling" => {}
        other => panic!("BENCH_ONLY={other:?}: use switchyard, limit, peer, redis or scaling"),
    }
    if only == "scaling" {
        let scaling = bench.scaling(&mut |spec| {
            let out = rt.block_on(bench.phase(&spec));
            print_line(&out.result);
            out
        });
        print_scaling(&scaling);
        return;
    }
    let sy = run_switchyard_max(&mut bench, &mut results);
    let bench = bench;
    let run = |spec: PhaseSpec, results: &mut Vec<PhaseResult>| {
        let out = rt.block_on(bench.phase(&spec));
        print_line(&out.result);
        results.push(out.result.clone());
        out
    };
    let sy_tp = sy.result.throughput_eps;
    let lim = run(max_spec(System::Limit, "lmax", &bench), &mut results).result;
    let peer = with_peer.then(|| run(max_spec(System::Peer, "pmax", &bench), &mut results).result);
    let replay =
        rt.block_on(bench.redis_replay(&sy.redis_mix, env_num("BENCH_REDIS_EVENTS", bench.events)));
    print_replay(&replay);
    // Fixed-rate phases offer at most ~20 s of load (enough samples for p99, bounded run time).
    let fixed = |system: System, rate: f64, tag: String, b: &Bench| PhaseSpec {
        system,
        rate: Some(rate),
        tag,
        events: b.events.min(((rate * 20.0) as usize).max(2000)),
        resources: b.resources,
        processes: 1,
        steady: false,
    };
    for (i, f) in fractions.iter().enumerate() {
        let rate = (sy_tp * f).max(1.0);
        run(
            fixed(System::Switchyard, rate, format!("s{i}"), &bench),
            &mut results,
        );
        run(
            fixed(System::Limit, rate, format!("l{i}"), &bench),
            &mut results,
        );
    }
    if let Some(p) = &peer {
        for (i, f) in fractions.iter().enumerate() {
            let rate = (p.throughput_eps * f).max(1.0);
            run(
                fixed(System::Peer, rate, format!("p{i}"), &bench),
                &mut results,
            );
        }
    }
    let scaling = with_scaling.then(|| {
        bench.scaling(&mut |spec| {
            let out = rt.block_on(bench.phase(&spec));
            print_line(&out.result);
            out
        })
    });
    let at_half = |sys: &str| {
        results
            .iter()
            .find(|r| {
                r.system == sys
                    && r.offered_rate
                        .is_some_and(|x| (x - sy_tp * 0.5).abs() < 1.0)
            })
            .cloned()
    };
    let ratios = json!({
        "throughput_switchyard_over_limit": sy_tp / lim.throughput_eps,
        "throughput_switchyard_over_peer": peer.as_ref().map(|p| sy_tp / p.throughput_eps),
        "p99_at_half_switchyard_over_limit": at_half("switchyard").zip(at_half("limit")).map(|(s, l)| s.p99_ms / l.p99_ms),
        "peak_rss_mb_switchyard_max_rate": sy.result.peak_rss_mb,
    });
    print_table(&results);
    print_replay(&replay);
    if let Some(s) = &scaling {
        print_scaling(s);
    }
    println!(
        "\nratios: {}",
        serde_json::to_string_pretty(&ratios).unwrap_or_default()
    );
    let doc = json!({
        "events_per_phase": bench.events,
        "resources": bench.resources,
        "machine": machine(),
        "git": git_rev(),
        "switchyard_bin": switchyard_bin(),
        "switchyard_tree": tree(),
        "definitions": {
            "throughput_eps": "events / (the last record on any of the system's output topics, intermediate topics, actions, approvals and audit included, received by the reader − start of producing)",
            "throughput_to_last_result_eps": "the same, up to the last result record (the previous definition)",
            "latency": "per event, produce → its result record (switchyard.results, peer.results, limit.results)",
            "limit": "a raw rdkafka chain with switchyard's 3 hops, topics, partition counts, and, per hop and topic, its records per input event and average record size (limit_shape); offsets stored after delivery",
            "cpu_seconds_per_1000": "CPU seconds per 1,000 events from the start of producing to the last output record",
            "records_per_event": "records the system wrote (all its output and intermediate topics) per input event",
            "batches_per_event": "record batches the system's producers sent per input event (librdkafka statistics: switchyard's switchyard_produce_batches_total, the limit's and the peer's statistics callbacks); null where not counted",
            "bytes_per_event": "bytes (key + payload + headers) of those records per input event",
            "redis_commands_per_event": "delta of INFO commandstats calls (Lua-internal calls included, as Redis counts them; the bench's own INFO/FLUSHALL excluded) per input event",
            "redis_bytes_retained_per_event": "INFO memory used_memory 3 s after the system stopped (phases with a steady pass: 3 s after its last output, still running), minus before producing, per input event; the first pass creates every resource's state",
            "steady": "maximum-rate phases of switchyard and the peer: a second pass of as many events over the same resources right after the first, the system still running; Redis commands per event and used_memory 3 s after its last output minus 3 s after the first pass's, per event (steady state: what a long-running system keeps per event once its resources exist)",
        },
        "phases": results,
        "limit_shape": bench.shape,
        "redis_mix": replay,
        "scaling": scaling,
        "ratios": ratios,
    });
    let path = out_dir().join("e2e.json");
    write_json(&path, &doc);
    println!("wrote {}", path.display());
}
