//! `switchyard run`: builds the process's shared services, starts the stages of the registry
//! ([`crate::stages::STAGES`]), the HTTP server and the health checker, and shuts everything down
//! cleanly on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{RedisChainStore, Sealer};
use crate::config::Loaded;
use crate::governance::approvals::Approvals;
use crate::governance::budgets::{Budgets, RedisBudgetStore};
use crate::http::{self, Health};
use crate::kafka::runtime::{RuntimeError, StageHealth, StageSettings};
use crate::kafka::{admin_config, run_producer_config, stage_consumer_config, Producer};
use crate::records::Emitter;
use crate::resolve::store::{RedisResourceStore, ResourceStore};
use crate::stages::{self, Services};
use crate::store::RedisConn;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Stage(#[from] RuntimeError),
    /// A newer build raised the data format marker ([`crate::format`]).
    #[error("{0}")]
    Superseded(String),
}

fn settings(l: &Loaded, stage: &str, topics: Vec<String>) -> StageSettings {
    let k = &l.config.kafka;
    StageSettings {
        group_id: format!("{}.{stage}", k.group_prefix),
        topics,
        consumer: stage_consumer_config(k, &format!("{}.{stage}", k.group_prefix)),
        admin: crate::kafka::admin_config(k),
        max_in_flight: k.max_in_flight,
        max_batch: k.max_batch,
        max_record_bytes: k.max_record_bytes,
        drain_timeout: Duration::from_millis(k.drain_timeout_ms),
        dlq_topic: l.config.topics.dlq.clone(),
    }
}

/// The resolve state store of a config (shared by the resolve stage, approvals and the CLI),
/// trusting Redis only while it has its epoch marker ([`RedisResourceStore::guarded`]).
pub fn resource_store(loaded: &Loaded, conn: RedisConn) -> Arc<dyn ResourceStore> {
    Arc::new(redis_resource_store(loaded, conn).guarded())
}

/// [`resource_store`] without the epoch marker's guard: for `switchyard recover` (it writes before
/// the new marker) and replay's scratch prefix (which has none).
pub fn resource_store_unguarded(loaded: &Loaded, conn: RedisConn) -> Arc<dyn ResourceStore> {
    Arc::new(redis_resource_store(loaded, conn))
}

fn redis_resource_store(loaded: &Loaded, conn: RedisConn) -> RedisResourceStore {
    let cfg = &loaded.config;
    // Resource hashes outlive every window that reads them, any open approval's wait and a
    // decided approval's keep.
    let ttl = cfg
        .governance
        .approvals
        .record_ttl_seconds(cfg.resolve.retention_seconds());
    RedisResourceStore::new(conn, &cfg.redis.key_prefix, ttl, cfg.context.remember_tasks)
}

/// The audit sealer of a config; its seals sized to the topics' limits `producer` checks against
/// (a command sealing one record at a time has none).
pub fn sealer(loaded: &Loaded, conn: RedisConn, producer: Option<&Producer>) -> Arc<Sealer> {
    let cfg = &loaded.config;
    // Keys were checked when the config was loaded; one gone since (a file removed) leaves the
    // seals unsigned, which `audit verify` reports, rather than stopping the stages.
    let keys = crate::audit::signing::Keys::load(&cfg.audit.keys).unwrap_or_else(|e| {
        tracing::error!("audit seals go out unsigned: {e}");
        Default::default()
    });
    let sealer = Sealer::new(
        Arc::new(RedisChainStore::new(conn, &cfg.redis.key_prefix).guarded()),
        &cfg.topics.audit,
    )
    .with_keys(keys);
    Arc::new(match producer {
        Some(p) => sealer.with_limits(p.limits(), cfg.kafka.max_output_bytes()),
        None => sealer,
    })
}

/// The approvals service of a config.
pub fn approvals_of(
    loaded: &Loaded,
    resources: Arc<dyn ResourceStore>,
    sealer: Arc<Sealer>,
    emitter: &Emitter,
) -> Approvals {
    let cfg = &loaded.config;
    Approvals {
        store: resources,
        emitter: emitter.clone(),
        config: cfg.governance.approvals.clone(),
        actions_topic: cfg.topics.actions.clone(),
        approvals_topic: cfg.topics.approvals.clone(),
        proposals_topic: cfg.topics.proposals.clone(),
        tasks_topic: cfg.topics.tasks.clone(),
        sealer,
        tenants: Default::default(),
        stuck: Default::default(),
        known_tenants: cfg.governance.tenants.clone(),
        max_output_bytes: cfg.kafka.max_output_bytes(),
        delivery_timeout_seconds: cfg.kafka.delivery_timeout_ms().div_ceil(1000),
        topic_limits: Default::default(),
        stats: None,
        notifier: None,
        counts: Default::default(),
    }
}

/// Runs the named stages until `shutdown` is cancelled or a stage fails.
pub async fn run(
    loaded: Loaded,
    stage_names: Vec<String>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let defs: Vec<&'static stages::StageDef> = stage_names
        .iter()
        .map(|n| {
            stages::find(n).ok_or_else(|| {
                AppError::Setup(format!(
                    "unknown stage {n:?} (this build has {})",
                    stages::names()
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let mut loaded = loaded;
    for warning in loaded.config.kafka.insecure().into_iter().chain(
        loaded.config.redis.url.contains("#insecure").then(|| {
            "redis: the url's #insecure fragment turns off certificate and host name checks"
                .to_string()
        }),
    ) {
        tracing::warn!("Insecure connection setting: {warning}.");
    }
    let topic_limits = read_topic_limits(&mut loaded.config).await;
    let cfg = &loaded.config;
    let instance = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("pid-{}", std::process::id()));
    crate::spans::init(&cfg.tracing, &instance).map_err(AppError::Setup)?;
    // A backstop behind the per-record bounds check: no single Avro allocation beyond what a record
    // switchyard accepts can hold.
    apache_avro::util::max_allocation_bytes(cfg.kafka.max_record_bytes.max(1 << 20));
    let producer = Producer::new(&run_producer_config(&cfg.kafka))
        .map_err(|e| AppError::Setup(format!("cannot create producer: {e}")))?;
    producer.limits().set(topic_limits);
    let refresh_limits = cfg.kafka.topic_limits_refresh_seconds;
    let emitter = Emitter::new(loaded.schemas.clone(), loaded.topics.clone());
    let redis = RedisConn::from_config(&cfg.redis)
        .map_err(|e| AppError::Setup(format!("redis.url: {e}")))?;
    let tracker = TaskTracker::new();
    // A failing stage stops the others too: the process exits non-zero and its supervisor restarts it.
    let stop = shutdown.child_token();
    crate::format::check_at_start(&redis, &cfg.redis.key_prefix)
        .await
        .map_err(AppError::Superseded)?;
    // The stages start once the marker has been claimed (`format_ready`; see `crate::format`).
    let superseded = Arc::new(std::sync::Mutex::new(None));
    let format_ready = CancellationToken::new();
    {
        let every = crate::format::LOOK_EVERY;
        let (slot, watch) = (
            superseded.clone(),
            crate::format::watch_format(
                redis.clone(),
                cfg.redis.key_prefix.clone(),
                (every, every * 5 / 2),
                format_ready.clone(),
                stop.clone(),
            ),
        );
        tracker.spawn(async move {
            if let Some(why) = watch.await {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            }
        });
    }
    let (known_epoch, history) = check_epoch(&loaded, &redis).await;
    tracker.spawn(crate::store::watch_epoch(
        redis.clone(),
        cfg.redis.key_prefix.clone(),
        known_epoch,
        history,
        Duration::from_secs(1),
        stop.clone(),
    ));
    if refresh_limits > 0 {
        tracker.spawn(refresh_topic_limits(
            cfg.clone(),
            producer.limits(),
            Duration::from_secs(refresh_limits),
            stop.clone(),
        ));
    }
    let resources = resource_store(&loaded, redis.clone());
    let sealer = sealer(&loaded, redis.clone(), Some(&producer));
    {
        // Other processes' own audit chains idle for 5 minutes (their process gone): their kept
        // seals written again, so one a crash left unsent does not leave a gap for good.
        let (sealer, emitter, producer) = (sealer.clone(), emitter.clone(), producer.clone());
        let stopping = stop.clone();
        tracker.spawn(async move {
            let repair =
                sealer.repair_idle_own_chains(&emitter, &producer, Duration::from_secs(300));
            // Not in the way of a shutdown (a broker out of reach holds each send for minutes).
            let done = tokio::select! {
                r = repair => r,
                _ = stopping.cancelled() => return,
            };
            match done {
                Ok(0) => {}
                Ok(n) => tracing::info!(chains = n, "Wrote again the last seals of idle audit chains of other processes."),
                Err(e) => tracing::warn!(error = %e, "Could not repair idle audit chains of other processes."),
            }
        });
    }
    crate::telemetry::know_agents(cfg.agents.keys().cloned());
    let stats = Arc::new(crate::agents::stats::AgentStats::new(
        redis.clone(),
        &cfg.redis.key_prefix,
    ));
    tracker.spawn(stats.clone().run(stop.clone()));
    let scoreboard = Arc::new(crate::agents::stats::Scoreboard::default());
    let candidates = cfg.best_of_agents();
    if !candidates.is_empty() {
        tracker.spawn(scoreboard.clone().run(
            redis.clone(),
            cfg.redis.key_prefix.clone(),
            candidates,
            stop.clone(),
        ));
    }
    // Approval rules' webhooks (`notify:`): only a running pipeline notifies.
    let notifier = cfg
        .governance
        .approvals
        .notifier()
        .map_err(AppError::Setup)?;
    let approvals = Arc::new(Approvals {
        stats: Some(stats.clone()),
        notifier,
        topic_limits: producer.limits(),
        ..approvals_of(&loaded, resources.clone(), sealer.clone(), &emitter)
    });
    let budgets = Arc::new(Budgets::new(
        Arc::new(RedisBudgetStore::new(redis.clone())),
        &cfg.redis.key_prefix,
        cfg.governance.budgets.clone(),
    ));
    let recorder = crate::audit::Recorder::new(emitter.clone(), sealer.clone(), producer.clone());
    let unpriced = cfg.gateway.unpriced();
    if !unpriced.is_empty() && cfg.governance.budgets.iter().any(|b| b.max_cost.is_some()) {
        tracing::warn!(candidates = %unpriced.join(", "), "Model candidates without a price in gateway.prices cost 0: no max_cost budget limits their calls.");
    }
    let gateway = gateway_of(
        &loaded,
        redis.clone(),
        budgets.clone(),
        (approvals.clone(), producer.clone()),
        crate::gateway::Recorder {
            audit: recorder.clone(),
            calls_topic: cfg.topics.llm_calls.clone(),
        },
        &tracker,
        &stop,
    )?;
    let tools = Arc::new(
        crate::tools::Toolbox::build(&cfg.tools)
            .await
            .map_err(AppError::Setup)?,
    );
    let graph = Arc::new(crate::context::graph::Graph::new(
        redis.clone(),
        &cfg.redis.key_prefix,
        cfg.context.relations.clone(),
    ));
    let redis_http = redis.clone();
    let inbox_budgets = budgets.clone();
    let services_emitter = emitter.clone();
    let services = Services {
        budgets,
        loaded: loaded.clone(),
        emitter,
        producer: producer.clone(),
        redis: redis.clone(),
        resources,
        approvals: approvals.clone(),
        sealer,
        gateway: gateway.clone(),
        tools,
        recorder: recorder.clone(),
        stats,
        scoreboard,
        graph: graph.clone(),
        tracker: tracker.clone(),
        stop: stop.clone(),
    };
    let mut health = Health {
        redis: Some(redis.clone()),
        ..Health::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), RuntimeError>>();
    for def in defs {
        let runner = (def.build)(&services)
            .await
            .map_err(|e| AppError::Setup(format!("stage {}: {e}", def.name)))?;
        let h = Arc::new(StageHealth::default());
        health.stages.push((def.name, h.clone()));
        let settings = settings(&loaded, def.name, (def.inputs)(&cfg.topics));
        let (producer, stop, tx) = (producer.clone(), stop.clone(), tx.clone());
        let format_ready = format_ready.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = format_ready.cancelled() => {}
                _ = stop.cancelled() => return,
            }
            let r = runner(settings, producer, stop.clone(), h).await;
            if r.is_err() {
                stop.cancel();
            }
            let _ = tx.send(r);
        });
    }
    drop(tx);
    let health = Arc::new(health);
    tracker.spawn(check_dependencies(
        loaded.clone(),
        redis,
        health.clone(),
        stop.clone(),
    ));
    if cfg.http.enabled {
        let addr: SocketAddr = cfg
            .http
            .listen
            .parse()
            .map_err(|e| AppError::Setup(format!("http.listen: {e}")))?;
        let listener_stop = stop.clone();
        let auth = Arc::new(
            http::auth::Auth::new(&cfg.http.users, cfg.governance.approvals.token.as_ref())
                .with_proxy_header(cfg.http.proxy_user_header.as_deref()),
        );
        let mut app = http::router(health.clone(), cfg.http.metrics_token.as_ref());
        if let Some(gw) = gateway {
            app = app.merge(crate::gateway::served::router(gw));
        }
        let context_store = Arc::new(crate::context::redis::RedisStore::new(
            redis_http.clone(),
            &cfg.redis.key_prefix,
            cfg.context.clone(),
        ));
        if cfg.http.inbox.enabled {
            app = app.merge(http::inbox::router(http::inbox::Inbox {
                gates: Arc::new(http::inbox::Gates::until(stop.clone())),
                approvals: approvals.clone(),
                producer: producer.clone(),
                auth: auth.clone(),
                redis: redis_http.clone(),
                context: context_store.clone(),
                budgets: inbox_budgets,
                settings: Arc::new(http::inbox::Settings {
                    inbox: cfg.http.inbox.clone(),
                    proxy_user_header: cfg.http.proxy_user_header.clone(),
                    public_url: cfg.governance.approvals.public_url.clone(),
                    key_prefix: cfg.redis.key_prefix.clone(),
                    kafka: cfg.kafka.clone(),
                    audit_topic: cfg.topics.audit.clone(),
                    schemas: loaded.schemas.clone(),
                }),
            }));
        }
        if cfg.http.ingest.enabled {
            app = app.merge(http::ingest::router(http::ingest::Ingest::new(
                cfg.http.ingest.clone(),
                services_emitter.clone(),
                producer.clone(),
                redis_http.clone(),
                &cfg.redis.key_prefix,
                http::ingest::claim_ms(&cfg.kafka),
            )));
        }
        let app = app
            .merge(http::approvals::router(http::approvals::Api {
                approvals,
                producer: producer.clone(),
                auth: auth.clone(),
                public_url: cfg.governance.approvals.public_url.clone(),
            }))
            .merge(http::context::router(http::context::Api {
                store: context_store,
                graph: graph.clone(),
                auth,
                indexed: cfg.context.index.clone(),
            }));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AppError::Setup(format!("cannot listen on {addr}: {e}")))?;
        let (max_connections, timeouts) = (
            cfg.http.max_connections,
            (
                Duration::from_millis(cfg.http.header_timeout_ms),
                Duration::from_millis(cfg.http.body_timeout_ms),
            ),
        );
        if let Some(admin) = &cfg.http.admin_listen {
            let admin_addr: SocketAddr = admin
                .parse()
                .map_err(|e| AppError::Setup(format!("http.admin_listen: {e}")))?;
            let admin_listener = tokio::net::TcpListener::bind(admin_addr)
                .await
                .map_err(|e| AppError::Setup(format!("cannot listen on {admin_addr}: {e}")))?;
            tracker.spawn(http::server::serve(
                admin_listener,
                http::router(health.clone(), cfg.http.metrics_token.as_ref()),
                stop.clone(),
                http::server::ADMIN_CONNECTIONS,
                timeouts,
            ));
            tracing::info!(addr = %admin_addr, "Probes and metrics also on the admin address.");
        }
        tracker.spawn(http::server::serve(
            listener,
            app,
            listener_stop,
            max_connections,
            timeouts,
        ));
        tracing::info!(%addr, "HTTP endpoint listening.");
    }
    tracker.close();
    let mut first_error = None;
    while let Some(r) = rx.recv().await {
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    }
    stop.cancel();
    tracker.wait().await;
    // Model and tool calls made until the stages stopped: their audit records go out before the
    // producer is flushed.
    recorder.drain(Duration::from_secs(15)).await;
    if let Err(e) = producer.flush(Duration::from_secs(5)) {
        tracing::warn!(error = %e, "Producer flush at shutdown failed.");
    }
    tokio::task::spawn_blocking(crate::spans::flush).await.ok();
    if let Some(why) = superseded.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(AppError::Superseded(why));
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// The `max.message.bytes` of every topic switchyard writes, read once at start, and the
/// producer's `batch.size` lowered to the smallest (less framing) when it is larger: each record is
/// then checked against its own topic's limit before it is queued ([`crate::kafka::TopicLimits`]),
/// so one a broker would refuse dead-letters its input (`output_too_large`) instead of failing its
/// delivery — which stops the stage at every restart. A broker that does not answer (or denies
/// DescribeConfigs) leaves no per-topic limits, with a warning.
async fn read_topic_limits(cfg: &mut crate::config::Config) -> Vec<(String, usize)> {
    let names = topic_names(cfg);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    match crate::topics::max_message_bytes(
        &admin_config(&cfg.kafka),
        &refs,
        Duration::from_secs(10),
        None,
    )
    .await
    {
        Ok(limits) => {
            if let Some((topic, limit)) = limits.iter().min_by_key(|(_, l)| *l) {
                if let Some(batch) = cfg.kafka.cap_batch_size(*limit) {
                    tracing::info!(%topic, max_message_bytes = limit, batch_size = batch, "A topic takes smaller batches than the producer would send: its batch.size is lowered for every topic.");
                }
            }
            for (topic, limit) in &limits {
                if *limit < cfg.kafka.max_output_bytes() {
                    tracing::info!(%topic, max_message_bytes = limit, "A topic takes smaller records than the producer writes: larger records for it go to the dead-letter topic (output_too_large).");
                }
            }
            limits
        }
        Err(e) => {
            tracing::warn!(error = %e, "Could not read the topics' max.message.bytes; records are checked only against the producer's message.max.bytes (a record a topic refuses stops its stage).");
            Vec::new()
        }
    }
}

/// Every topic the config names (whose limits are read).
fn topic_names(cfg: &crate::config::Config) -> Vec<String> {
    cfg.referenced_topics()
        .into_iter()
        .map(String::from)
        .collect()
}

/// Reads the topics' `max.message.bytes` again every `every` (`kafka.topic_limits_refresh_seconds`):
/// a limit lowered while switchyard runs, or one the brokers did not answer at start, is then
/// checked before a record is queued — a larger record dead-letters its input instead of failing
/// its delivery, which stops the stage. The producer's `batch.size` (capped at start to the
/// smallest limit) cannot change while it runs: a limit lowered below it is warned about.
async fn refresh_topic_limits(
    cfg: crate::config::Config,
    limits: crate::kafka::TopicLimits,
    every: Duration,
    stop: CancellationToken,
) {
    let names = topic_names(&cfg);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let admin = admin_config(&cfg.kafka);
    let batch_size = cfg
        .kafka
        .producer
        .get("batch.size")
        .and_then(|v| v.parse::<usize>().ok());
    let quiet = std::sync::Mutex::new(std::collections::HashSet::new());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let read = match crate::topics::max_message_bytes(
            &admin,
            &refs,
            Duration::from_secs(10),
            Some(&quiet),
        )
        .await
        {
            Ok(read) => read,
            Err(e) => {
                tracing::debug!(error = %e, "Could not read the topics' max.message.bytes again.");
                continue;
            }
        };
        for (topic, limit) in &read {
            let before = limits.configured(topic);
            if before == Some(*limit) {
                continue;
            }
            tracing::info!(%topic, before, max_message_bytes = limit, "A topic's max.message.bytes changed: its records are checked against the new one.");
            let lowest_batch =
                crate::kafka::config::BATCH_FRAMING_BYTES + batch_size.unwrap_or(1_000_000);
            if *limit < lowest_batch {
                tracing::warn!(%topic, max_message_bytes = limit, "A topic now takes smaller batches than the producer builds (batch.size): restart switchyard to lower it, or a batch of small records may be refused and stop its stage.");
            }
        }
        limits.set(read);
    }
}

/// Whether switchyard ran against this Kafka before: one of its stages' consumer groups committed
/// offsets, or its audit topic (which only switchyard writes, for everything it decides) holds or
/// held records — a group's offsets expire (Kafka forgets them 7 days after the group's last
/// member left), the topic does not. An error is no answer: the caller must not take it for "new".
async fn kafka_history(loaded: &Loaded) -> Result<bool, String> {
    let l = loaded.clone();
    tokio::task::spawn_blocking(move || {
        let kafka = &l.config.kafka;
        if crate::kafka::read::ever_written(kafka, &l.config.topics.audit)? {
            return Ok(true);
        }
        for s in crate::stages::STAGES {
            let group = format!("{}.{}", kafka.group_prefix, s.name);
            match crate::kafka::read::committed(kafka, &group, &(s.inputs)(&l.config.topics)) {
                Ok(c) if !c.is_empty() => return Ok(true),
                Ok(_) => {}
                // A group this principal may not describe (another deployment's stages): it
                // says nothing either way.
                Err(e) if e.contains("Authorization") || e.contains("AUTHORIZATION") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Checks Redis's epoch marker at start (see [`crate::store::start_epoch`]): the marker known now,
/// and whether Kafka shows history.
async fn check_epoch(loaded: &Loaded, redis: &RedisConn) -> (Option<String>, bool) {
    let prefix = &loaded.config.redis.key_prefix;
    if let Ok(Some(e)) = crate::store::read_epoch(redis, prefix).await {
        return (Some(e), true);
    }
    // Asked a few times; with no answer, Redis counts as having lost its state (a new marker
    // written on a failed lookup would let every instance resume on an empty Redis).
    let mut history = Err(String::new());
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
        history = kafka_history(loaded).await;
        if history.is_ok() {
            break;
        }
    }
    let history = history.unwrap_or_else(|e| {
        tracing::error!(error = %e, "Redis has no epoch marker and Kafka does not say whether switchyard ran against it before: taken as a lost state. Restart once Kafka answers (a new installation then starts), or run `switchyard recover`.");
        true
    });
    match crate::store::start_epoch(redis, prefix, history).await {
        Ok(crate::store::EpochStart::Known(e)) => (Some(e), history),
        Ok(crate::store::EpochStart::Fresh(e)) => {
            tracing::info!("Redis is new to switchyard; wrote its epoch marker.");
            (Some(e), history)
        }
        Ok(crate::store::EpochStart::Lost) => {
            tracing::error!("Redis lost its state: switchyard ran against this Kafka before, but Redis has no epoch marker (or, on a Redis Cluster, a shard lost its markers). Nothing is processed until `switchyard recover` rebuilds the state from Kafka (see the README).");
            (None, history)
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read Redis's epoch marker yet; checking again every second.");
            (None, history)
        }
    }
}

/// Checks Kafka and Redis every few seconds for `/readyz`.
async fn check_dependencies(
    loaded: Loaded,
    redis: RedisConn,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let kafka: Option<Arc<BaseConsumer>> = admin_config(&loaded.config.kafka)
        .create()
        .ok()
        .map(Arc::new);
    loop {
        if let Some(k) = kafka.clone() {
            let ok = tokio::task::spawn_blocking(move || {
                k.fetch_metadata(None, Duration::from_secs(3)).is_ok()
            })
            .await
            .unwrap_or(false);
            health.kafka_ok.store(ok, Ordering::Relaxed);
        }
        let ok = redis.ping(Duration::from_secs(3)).await;
        health.redis_ok.store(ok, Ordering::Relaxed);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// The AI gateway when the config (or `SWITCHYARD_LLM_BASE_URL`) declares a provider; its
/// sweeper gives back the budget holds of calls that never settled.
fn gateway_of(
    loaded: &Loaded,
    redis: RedisConn,
    budgets: Arc<Budgets>,
    approvals: (Arc<crate::governance::approvals::Approvals>, Producer),
    recorder: crate::gateway::Recorder,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Option<Arc<crate::gateway::Gateway>>, AppError> {
    let cfg = loaded.config.gateway.clone().effective();
    if cfg.providers.is_empty() {
        return Ok(None);
    }
    let gw = crate::gateway::Gateway::new(cfg, redis, &loaded.config.redis.key_prefix, budgets)
        .map_err(|e| AppError::Setup(format!("gateway: {e}")))?
        .with_recorder(recorder)
        .with_approvals(approvals.0, approvals.1);
    let gw = Arc::new(gw);
    let (sweeper, stop) = (gw.clone(), stop.clone());
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
            match sweeper.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    holds = n,
                    "Gave back the budget holds of model calls that never settled."
                ),
                Err(e) => tracing::warn!(error = %e, "Could not sweep expired budget holds."),
            }
        }
    });
    tracing::info!(models = ?gw.models(), "AI gateway ready.");
    Ok(Some(gw))
}
