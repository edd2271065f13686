//! End-to-end benchmark: switchyard against the physical limit (a raw rdkafka chain with the same
//! number of Kafka hops) and a peer (the same flow in quixstreams + redis-py), on the same broker and
//! Redis, in one run. Prints a table and writes JSON; `deploy/bench/run.sh` sets everything up and
//! plots the result.
//!
//! Environment: SWITCHYARD_KAFKA_BROKERS, SWITCHYARD_REDIS_URL, SWITCHYARD_STACK_DIR (to restart the
//! broker between phases), BENCH_EVENTS (default 20000), BENCH_RESOURCES (10000), BENCH_FRACTIONS
//! (0.25,0.5,0.75), BENCH_PEER_PYTHON (python with quixstreams; the peer is skipped without it),
//! BENCH_OUT (directory for e2e.json, default target/bench).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;

const INPUTS: [&str; 3] = [
    "events.deployments",
    "events.sla-breaches",
    "events.cost-thresholds",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| d.to_string())
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
    fn output(self) -> &'static str {
        match self {
            System::Limit => "bench.hop2",
            System::Switchyard => "switchyard.results",
            System::Peer => "peer.results",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct PhaseResult {
    system: &'static str,
    /// Offered rate (events/s); null at maximum rate.
    offered_rate: Option<f64>,
    events: usize,
    received: usize,
    throughput_eps: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_seconds_per_1000: f64,
    peak_rss_mb: f64,
    /// CPU the broker (tansu) and Redis spent per 1,000 events in the same phase.
    broker_cpu_seconds_per_1000: f64,
    redis_cpu_seconds_per_1000: f64,
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

struct Bench {
    brokers: String,
    redis: String,
    events: usize,
    resources: usize,
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client")
}

/// The events of a phase: the three families, ~300 bytes each, over `resources` resources.
fn make_events(tag: &str, n: usize, resources: usize) -> Vec<(usize, String, String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let subject = format!("svc-{}", (i * 7919) % resources);
            let (topic, ty, data) = match i % 3 {
                0 => (0, "deployment.completed", json!({"service": subject, "version": format!("v{}", i % 97), "previous_version": format!("v{}", i % 97 + 1), "environment": "production", "actor": "ci-bot", "change_url": "https://ci.example/builds/12345"})),
                1 => (1, "sla.breached", json!({"service": subject, "slo": "availability", "objective": 99.9, "observed": 97.5, "window": "5m", "owner": "team-payments"})),
                _ => (2, "cost.threshold_exceeded", json!({"service": subject, "budget": 1000.0, "spend": 1234.5, "currency": "USD", "period": "2026-11", "threshold_pct": 120.0})),
            };
            let ev = json!({"specversion": "1.0", "id": format!("e-{tag}-{i}"), "source": "bench/producer", "type": ty,
                "subject": subject, "time": "2026-11-22T12:00:00.000Z", "datacontenttype": "application/json", "data": data});
            (topic, INPUTS[topic].to_string(), subject, serde_json::to_vec(&ev).expect("json"))
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

impl Bench {
    fn restart_stack(&self) {
        let stack = root().join("deploy/local/stack.sh");
        let ok = Command::new(&stack)
            .arg("restart-broker")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "restarting the broker failed");
        let url = self
            .redis
            .trim_end_matches('/')
            .rsplit_once(':')
            .map(|(_, p)| p.to_string())
            .unwrap_or_default();
        let _ = Command::new("redis-cli")
            .args(["-p", &url, "FLUSHALL"])
            .stdout(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(500));
    }

    async fn create_topics(&self, names: &[String], partitions: i32) {
        let a = admin(&self.brokers);
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
            .collect();
        let _ = a.create_topics(topics.iter(), &AdminOptions::new()).await;
    }

    fn config_file(&self) -> PathBuf {
        let dir = root().join("target/bench");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let base = std::fs::read_to_string(root().join("deploy/switchyard.yaml")).expect("config");
        let cfg = base
            .replace("../topics", &root().join("topics").display().to_string())
            .replace("../schemas", &root().join("schemas").display().to_string())
            .replace("level: info", "level: warn")
            .replace(
                "linger.ms: \"5\"",
                &format!("linger.ms: \"{}\"", linger_ms()),
            )
            .replace("max_calls: 100000", "max_calls: 100000000")
            .replace("max_cost: 500.0", "max_cost: 100000000.0");
        let path = dir.join("switchyard.yaml");
        std::fs::write(&path, cfg).expect("write config");
        path
    }

    /// Starts the system under test; returns its processes.
    async fn start(&self, system: System) -> Vec<Child> {
        match system {
            System::Switchyard => {
                let cfg = self.config_file();
                let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
                    .args([
                        "--config",
                        cfg.to_str().unwrap_or_default(),
                        "topics",
                        "apply",
                    ])
                    .env("SWITCHYARD_KAFKA_BROKERS", &self.brokers)
                    .output()
                    .expect("topics apply");
                assert!(
                    out.status.success(),
                    "topics apply failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                vec![Command::new(env!("CARGO_BIN_EXE_switchyard"))
                    .args(["--config", cfg.to_str().unwrap_or_default(), "run"])
                    .env("SWITCHYARD_KAFKA_BROKERS", &self.brokers)
                    .env("SWITCHYARD_REDIS_URL", &self.redis)
                    .env("SWITCHYARD_HTTP_LISTEN", "127.0.0.1:0")
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("switchyard runs")]
            }
            System::Limit => {
                let mut names: Vec<String> = INPUTS.iter().map(|s| s.to_string()).collect();
                names.extend(["bench.hop1".to_string(), "bench.hop2".to_string()]);
                self.create_topics(&names, 12).await;
                vec![Command::new(std::env::current_exe().expect("exe"))
                    .args(["--limit-chain", &self.brokers])
                    .spawn()
                    .expect("limit chain runs")]
            }
            System::Peer => {
                let mut names: Vec<String> = INPUTS.iter().map(|s| s.to_string()).collect();
                names.extend(
                    [
                        "peer.tasks",
                        "peer.results",
                        "peer.proposals",
                        "peer.actions",
                    ]
                    .map(String::from),
                );
                self.create_topics(&names, 12).await;
                let python = env_or("BENCH_PEER_PYTHON", "python3");
                ["route", "agent", "resolve"]
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
                            ])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .expect("peer runs")
                    })
                    .collect()
            }
        }
    }

    async fn phase(&self, system: System, rate: Option<f64>, tag: &str) -> PhaseResult {
        self.restart_stack();
        let mut procs = self.start(system).await;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .expect("producer");
        // Reader of the output topic, from the start (the broker is fresh).
        let out_topic = system.output().to_string();
        let brokers = self.brokers.clone();
        let n = match rate {
            Some(r) => self.events.min(((r * 20.0) as usize).max(2000)),
            None => self.events,
        };
        let warm_marker = format!("e-warm{tag}-").into_bytes();
        let marker = format!("e-{tag}-").into_bytes();
        let (tx, rx) = std::sync::mpsc::channel::<(bool, usize, Instant)>();
        let reader = std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "bench-reader")
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "10")
                .create()
                .expect("reader");
            let started = Instant::now();
            let parts = loop {
                let md = c.fetch_metadata(Some(&out_topic), Duration::from_secs(5));
                let parts: Vec<i32> = md
                    .map(|m| {
                        m.topics()
                            .iter()
                            .flat_map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
                            .collect()
                    })
                    .unwrap_or_default();
                if !parts.is_empty() || started.elapsed() > Duration::from_secs(60) {
                    break parts;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            let mut tpl = TopicPartitionList::new();
            for p in parts {
                let _ = tpl.add_partition_offset(&out_topic, p, Offset::Beginning);
            }
            c.assign(&tpl).expect("assign");
            let mut seen = 0usize;
            let mut last = Instant::now();
            loop {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(50)) {
                    let payload = m.payload().unwrap_or_default();
                    let now = Instant::now();
                    if let Some(i) = index_of(payload, &marker) {
                        seen += 1;
                        last = now;
                        if tx.send((false, i, now)).is_err() {
                            return;
                        }
                    } else if index_of(payload, &warm_marker).is_some()
                        && tx.send((true, 0, now)).is_err()
                    {
                        return;
                    }
                }
                if seen >= n || last.elapsed() > Duration::from_secs(120) {
                    return;
                }
            }
        });
        // Warm-up: one event through the whole flow (group joins), not measured.
        let warm = make_events(&format!("warm{tag}"), 3, 3);
        let warm_start = Instant::now();
        let mut warmed = false;
        while !warmed && warm_start.elapsed() < Duration::from_secs(90) {
            for (_, topic, key, payload) in &warm {
                let _ = producer
                    .send(
                        FutureRecord::to(topic).key(key).payload(payload),
                        Duration::from_secs(5),
                    )
                    .await;
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok((true, _, _)) = rx.recv_timeout(Duration::from_millis(200)) {
                    warmed = true;
                    break;
                }
            }
        }
        assert!(
            warmed,
            "{} produced no output for the warm-up events",
            system.name()
        );
        while rx.try_recv().is_ok() {}
        let cpu0: f64 = procs.iter().map(|p| proc_cpu_rss(p.id()).0).sum();
        let side_cpu = || {
            (
                stack_pid("tansu").map(|p| proc_cpu_rss(p).0).unwrap_or(0.0),
                stack_pid("redis").map(|p| proc_cpu_rss(p).0).unwrap_or(0.0),
            )
        };
        let (broker0, redis0) = side_cpu();
        // Fixed-rate phases offer at most ~20 s of load (enough samples for p99, bounded run time).
        let n = match rate {
            Some(r) => self.events.min(((r * 20.0) as usize).max(2000)),
            None => self.events,
        };
        let events = make_events(tag, n, self.resources);
        let mut sent_at: Vec<Option<Instant>> = vec![None; events.len()];
        let t0 = Instant::now();
        let mut inflight = Vec::with_capacity(1024);
        for (i, (_, topic, key, payload)) in events.iter().enumerate() {
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
        let mut arrived: HashMap<usize, Instant> = HashMap::with_capacity(events.len());
        let mut peak_rss = 0.0f64;
        let mut last_sample = Instant::now();
        while arrived.len() < events.len() {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok((false, i, at)) => {
                    arrived.entry(i).or_insert(at);
                }
                Ok(_) => {}
                Err(_) => break,
            }
            if last_sample.elapsed() > Duration::from_millis(500) {
                peak_rss = peak_rss.max(procs.iter().map(|p| proc_cpu_rss(p.id()).1).sum());
                last_sample = Instant::now();
            }
        }
        let cpu1: f64 = procs.iter().map(|p| proc_cpu_rss(p.id()).0).sum();
        let (broker1, redis1) = side_cpu();
        peak_rss = peak_rss.max(procs.iter().map(|p| proc_cpu_rss(p.id()).1).sum());
        let _ = reader.join();
        for p in &mut procs {
            let _ = Command::new("kill")
                .args(["-TERM", &p.id().to_string()])
                .status();
        }
        for p in &mut procs {
            let _ = p.wait();
        }
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
        let last = arrived.values().max().copied().unwrap_or(t0);
        let span = last.saturating_duration_since(t0).as_secs_f64().max(1e-6);
        PhaseResult {
            system: system.key(),
            offered_rate: rate,
            events: events.len(),
            received: arrived.len(),
            throughput_eps: arrived.len() as f64 / span,
            p50_ms: pct(&lat, 0.50),
            p95_ms: pct(&lat, 0.95),
            p99_ms: pct(&lat, 0.99),
            max_ms: lat.last().copied().unwrap_or(f64::NAN),
            cpu_seconds_per_1000: (cpu1 - cpu0) / (events.len() as f64 / 1000.0),
            peak_rss_mb: peak_rss,
            broker_cpu_seconds_per_1000: (broker1 - broker0) / (events.len() as f64 / 1000.0),
            redis_cpu_seconds_per_1000: (redis1 - redis0) / (events.len() as f64 / 1000.0),
        }
    }
}

/// The raw chain: two consume → produce hops, offsets stored only after delivery, nothing else.
fn limit_chain(brokers: &str) {
    let hop = |from: Vec<String>, to: &'static str, group: &'static str| {
        let brokers = brokers.to_string();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", group)
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.offset.store", "false")
                .set("session.timeout.ms", "6000")
                .set("fetch.wait.max.ms", "20")
                .create()
                .expect("consumer");
            let p: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", linger_ms())
                .set("enable.idempotence", "true")
                .create()
                .expect("producer");
            let topics: Vec<&str> = from.iter().map(String::as_str).collect();
            c.subscribe(&topics).expect("subscribe");
            let mut pending = std::collections::VecDeque::new();
            loop {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(5)) {
                    let rec = FutureRecord::to(to)
                        .payload(m.payload().unwrap_or_default())
                        .key(m.key().unwrap_or_default());
                    if let Ok(f) = p.send_result(rec) {
                        pending.push_back((m.topic().to_string(), m.partition(), m.offset(), f));
                    }
                }
                while let Some((_, _, _, f)) = pending.front_mut() {
                    use futures::FutureExt;
                    match rt.block_on(async { f.now_or_never() }) {
                        Some(_) => {
                            let (t, part, off, _) = pending.pop_front().expect("front");
                            let _ = c.store_offset(&t, part, off);
                        }
                        None => break,
                    }
                }
            }
        })
    };
    let a = hop(
        INPUTS.iter().map(|s| s.to_string()).collect(),
        "bench.hop1",
        "bench.limit.1",
    );
    let b = hop(vec!["bench.hop1".into()], "bench.hop2", "bench.limit.2");
    let _ = a.join();
    let _ = b.join();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--limit-chain") {
        limit_chain(args.get(2).map(String::as_str).unwrap_or("127.0.0.1:9092"));
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
    let bench = Bench {
        brokers,
        redis: env_or("SWITCHYARD_REDIS_URL", "redis://127.0.0.1:6379/"),
        events: env_or("BENCH_EVENTS", "20000").parse().unwrap_or(20000),
        resources: env_or("BENCH_RESOURCES", "10000").parse().unwrap_or(10000),
    };
    let fractions: Vec<f64> = env_or("BENCH_FRACTIONS", "0.25,0.5,0.75")
        .split(',')
        .filter_map(|f| f.trim().parse().ok())
        .collect();
    let with_peer = std::env::var("BENCH_PEER_PYTHON").is_ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut results = Vec::new();
    let mut run = |sys: System, rate: Option<f64>, tag: &str| {
        let r = rt.block_on(bench.phase(sys, rate, tag));
        eprintln!(
            "  {:<32} rate {:>9} -> {:>9.0} ev/s, p50 {:>8.1} ms, p99 {:>8.1} ms, received {}/{}, cpu s/1k: own {:.3} broker {:.3} redis {:.3}",
            sys.name(),
            rate.map(|r| format!("{r:.0}")).unwrap_or("max".into()),
            r.throughput_eps,
            r.p50_ms,
            r.p99_ms,
            r.received,
            r.events,
            r.cpu_seconds_per_1000,
            r.broker_cpu_seconds_per_1000,
            r.redis_cpu_seconds_per_1000
        );
        results.push(r.clone());
        r
    };
    eprintln!(
        "e2e benchmark: {} events over {} resources per phase",
        bench.events, bench.resources
    );
    match env_or("BENCH_ONLY", "").as_str() {
        // Profiling aids: one maximum-rate phase of one system.
        "switchyard" => {
            run(System::Switchyard, None, "only");
            return;
        }
        "limit" => {
            run(System::Limit, None, "only");
            return;
        }
        _ => {}
    }
    let lim = run(System::Limit, None, "lmax");
    let sy = run(System::Switchyard, None, "smax");
    let peer = with_peer.then(|| run(System::Peer, None, "pmax"));
    for (i, f) in fractions.iter().enumerate() {
        let rate = (sy.throughput_eps * f).max(1.0);
        run(System::Switchyard, Some(rate), &format!("s{i}"));
        run(System::Limit, Some(rate), &format!("l{i}"));
    }
    if let Some(p) = &peer {
        for (i, f) in fractions.iter().enumerate() {
            run(
                System::Peer,
                Some((p.throughput_eps * f).max(1.0)),
                &format!("p{i}"),
            );
        }
    }
    let at_half = |sys: &str| {
        results
            .iter()
            .find(|r| {
                r.system == sys
                    && r.offered_rate
                        .is_some_and(|x| (x - sy.throughput_eps * 0.5).abs() < 1.0)
            })
            .cloned()
    };
    let ratios = json!({
        "throughput_switchyard_over_limit": sy.throughput_eps / lim.throughput_eps,
        "throughput_switchyard_over_peer": peer.as_ref().map(|p| sy.throughput_eps / p.throughput_eps),
        "p99_at_half_switchyard_over_limit": at_half("switchyard").zip(at_half("limit")).map(|(s, l)| s.p99_ms / l.p99_ms),
        "peak_rss_mb_switchyard_max_rate": sy.peak_rss_mb,
    });
    println!(
        "\n{:<12} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10} {:>9}",
        "system",
        "offered/s",
        "achieved/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "cpu s/1k",
        "rss MB",
        "broker s/1k",
        "redis s/1k"
    );
    for r in &results {
        println!(
            "{:<12} {:>10} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.3} {:>8.1} {:>10.3} {:>9.3}",
            r.system,
            r.offered_rate.map(|x| format!("{x:.0}")).unwrap_or("max".into()),
            r.throughput_eps,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.max_ms,
            r.cpu_seconds_per_1000,
            r.peak_rss_mb,
            r.broker_cpu_seconds_per_1000,
            r.redis_cpu_seconds_per_1000
        );
    }
    println!(
        "\nratios: {}",
        serde_json::to_string_pretty(&ratios).unwrap_or_default()
    );
    let out_dir = PathBuf::from(env_or(
        "BENCH_OUT",
        &root().join("target/bench").display().to_string(),
    ));
    let _ = std::fs::create_dir_all(&out_dir);
    let doc = json!({"events_per_phase": bench.events, "resources": bench.resources, "machine": machine(), "phases": results, "ratios": ratios});
    let path = out_dir.join("e2e.json");
    if let Ok(mut f) = std::fs::File::create(&path) {
        let _ = f.write_all(
            serde_json::to_string_pretty(&doc)
                .unwrap_or_default()
                .as_bytes(),
        );
        println!("wrote {}", path.display());
    }
}

/// Producer `linger.ms` of both the limit chain and switchyard (BENCH_LINGER_MS, default 5, as in
/// deploy/switchyard.yaml).
fn linger_ms() -> String {
    env_or("BENCH_LINGER_MS", "5")
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
