//! `switchyard run`: wires the enabled stages, the HTTP endpoint and the health checker, and shuts
//! everything down cleanly on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::collections::HashMap;

use tokio::sync::Semaphore;

use crate::agents::http::HttpAgent;
use crate::agents::kafka::KafkaAgent;
use crate::agents::{builtin, Agent, AgentKind};
use crate::approvals::{self, run_sweeper, Approvals, DecisionsStage};
use crate::audit::Sealer;
use crate::config::Loaded;
use crate::context::redis::{RedisConn, RedisStore};
use crate::governance::Budgets;
use crate::http::{self, Health};
use crate::kafka::runtime::{run_stage, Processor, RuntimeError, StageHealth, StageSettings};
use crate::kafka::{admin_config, consumer_config, producer_config, Producer};
use crate::records::Emitter;
use crate::route::Router;
use crate::stages::agents::{AgentEntry, AgentStage};
use crate::stages::resolve::{ResolveStage, ResourceStore};
use crate::stages::route::RouteStage;

/// Stages this build has, in pipeline order.
pub const STAGES: &[&str] = &["route", "agents", "resolve"];

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Stage(#[from] RuntimeError),
}

fn settings(l: &Loaded, stage: &str, topics: Vec<String>) -> StageSettings {
    let k = &l.config.kafka;
    StageSettings {
        group_id: format!("{}.{stage}", k.group_prefix),
        topics,
        consumer: consumer_config(k, &format!("{}.{stage}", k.group_prefix)),
        max_in_flight: k.max_in_flight,
        max_record_bytes: k.max_record_bytes,
        drain_timeout: Duration::from_millis(k.drain_timeout_ms),
        dlq_topic: l.config.topics.dlq.clone(),
    }
}

/// Runs the selected stages until `shutdown` is cancelled or a stage fails.
pub async fn run(
    loaded: Loaded,
    stages: Vec<String>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let cfg = &loaded.config;
    let producer = Producer::new(&producer_config(&cfg.kafka))
        .map_err(|e| AppError::Setup(format!("cannot create producer: {e}")))?;
    let emitter = Emitter::new(loaded.schemas.clone(), loaded.topics.clone());
    let tracker = TaskTracker::new();
    // A failing stage stops the others too: the process exits non-zero and its supervisor restarts it.
    let stop = shutdown.child_token();
    let mut health = Health::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), RuntimeError>>();
    let conn =
        RedisConn::new(&cfg.redis.url).map_err(|e| AppError::Setup(format!("redis.url: {e}")))?;
    let budgets = Arc::new(Budgets::new(
        conn.clone(),
        &cfg.redis.key_prefix,
        cfg.governance.budgets.clone(),
    ));
    let approvals = Arc::new(approvals_of(&loaded, conn.clone(), &emitter));

    fn spawn<P: Processor>(
        tracker: &TaskTracker,
        health: &mut Health,
        settings: StageSettings,
        p: P,
        producer: &Producer,
        stop: &CancellationToken,
        tx: &tokio::sync::mpsc::UnboundedSender<Result<(), RuntimeError>>,
    ) {
        let h = Arc::new(StageHealth::default());
        health.stages.push((p.stage(), h.clone()));
        let (producer, stop, tx) = (producer.clone(), stop.clone(), tx.clone());
        tracker.spawn(async move {
            let r = run_stage(settings, Arc::new(p), producer, stop.clone(), h).await;
            if r.is_err() {
                stop.cancel();
            }
            let _ = tx.send(r);
        });
    }

    for stage in &stages {
        match stage.as_str() {
            "route" => {
                let router = Router::new(&cfg.routes)
                    .map_err(|p| AppError::Setup(format!("routes are invalid: {p:?}")))?;
                let p = RouteStage {
                    router,
                    emitter: emitter.clone(),
                    tasks_topic: cfg.topics.tasks.clone(),
                    sealer: approvals.sealer.clone(),
                };
                spawn(
                    &tracker,
                    &mut health,
                    settings(&loaded, "route", cfg.topics.inputs.clone()),
                    p,
                    &producer,
                    &stop,
                    &tx,
                );
            }
            "agents" => {
                let agents = build_agents(&loaded, &producer, &stop).await?;
                let stats = Arc::new(crate::status::AgentStats::new(
                    conn.clone(),
                    &cfg.redis.key_prefix,
                ));
                tracker.spawn(stats.clone().run(stop.clone()));
                let p = AgentStage {
                    agents,
                    budgets: budgets.clone(),
                    stats: Some(stats.clone()),
                    store: Arc::new(RedisStore::new(
                        conn.clone(),
                        &cfg.redis.key_prefix,
                        cfg.context.retention(),
                    )),
                    emitter: emitter.clone(),
                    proposals_topic: cfg.topics.proposals.clone(),
                    results_topic: cfg.topics.results.clone(),
                    sealer: approvals.sealer.clone(),
                    dlq_topic: cfg.topics.dlq.clone(),
                    max_record_bytes: cfg.kafka.max_record_bytes,
                    unrecorded: Default::default(),
                };
                spawn(
                    &tracker,
                    &mut health,
                    settings(&loaded, "agents", vec![cfg.topics.tasks.clone()]),
                    p,
                    &producer,
                    &stop,
                    &tx,
                );
            }
            "resolve" => {
                let p = ResolveStage {
                    rules: cfg.resolve.clone(),
                    governance: Arc::new(cfg.governance.clone()),
                    budgets: budgets.clone(),
                    store: approvals.store.clone(),
                    emitter: emitter.clone(),
                    actions_topic: cfg.topics.actions.clone(),
                    approvals_topic: cfg.topics.approvals.clone(),
                    sealer: approvals.sealer.clone(),
                    decision_ttl: cfg.context.outcome_ttl_seconds,
                };
                spawn(
                    &tracker,
                    &mut health,
                    settings(&loaded, "resolve", vec![cfg.topics.proposals.clone()]),
                    p,
                    &producer,
                    &stop,
                    &tx,
                );
                let d = DecisionsStage {
                    approvals: approvals.clone(),
                };
                spawn(
                    &tracker,
                    &mut health,
                    settings(&loaded, "decisions", vec![cfg.topics.decisions.clone()]),
                    d,
                    &producer,
                    &stop,
                    &tx,
                );
                tracker.spawn(run_sweeper(
                    approvals.clone(),
                    producer.clone(),
                    Duration::from_secs(2),
                    stop.clone(),
                ));
            }
            other => {
                return Err(AppError::Setup(format!(
                    "unknown stage {other:?} (this build has {})",
                    STAGES.join(", ")
                )))
            }
        }
    }
    drop(tx);
    let health = Arc::new(health);
    tracker.spawn(check_dependencies(
        loaded.clone(),
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
        let app = http::router(health.clone()).merge(approvals::router(approvals::Api {
            approvals: approvals.clone(),
            producer: producer.clone(),
            token: cfg.governance.approvals.token.clone(),
        }));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AppError::Setup(format!("cannot listen on {addr}: {e}")))?;
        tracker.spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(async move { listener_stop.cancelled().await })
                .await
            {
                tracing::error!(error = %e, "HTTP endpoint failed.");
            }
        });
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
    if let Err(e) = producer.flush(Duration::from_secs(5)) {
        tracing::warn!(error = %e, "Producer flush at shutdown failed.");
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// The approvals service over the resolve stage's Redis state.
pub fn approvals_of(loaded: &Loaded, conn: RedisConn, emitter: &Emitter) -> Approvals {
    let cfg = &loaded.config;
    let ttl = cfg
        .resolve
        .retention_seconds()
        .max(cfg.governance.approvals.timeout_seconds)
        * 4;
    Approvals {
        store: Arc::new(ResourceStore::new(
            conn.clone(),
            &cfg.redis.key_prefix,
            ttl.max(86400),
        )),
        emitter: emitter.clone(),
        config: cfg.governance.approvals.clone(),
        actions_topic: cfg.topics.actions.clone(),
        approvals_topic: cfg.topics.approvals.clone(),
        sealer: Arc::new(Sealer::new(
            conn.clone(),
            &cfg.redis.key_prefix,
            cfg.context.outcome_ttl_seconds,
            &cfg.topics.audit,
        )),
        tenants: Default::default(),
    }
}

/// Creates every configured agent.
async fn build_agents(
    loaded: &Loaded,
    producer: &Producer,
    stop: &CancellationToken,
) -> Result<HashMap<String, AgentEntry>, AppError> {
    let mut out = HashMap::new();
    for (name, spec) in &loaded.config.agents {
        let agent: Arc<dyn Agent> = match spec.kind {
            AgentKind::Builtin => {
                let which = spec.builtin.as_deref().unwrap_or(name);
                builtin::create(which, spec).ok_or_else(|| {
                    AppError::Setup(format!("agents.{name}: no builtin {which:?}"))
                })?
            }
            AgentKind::Http => {
                let url = spec.url.as_deref().unwrap_or_default();
                Arc::new(
                    HttpAgent::new(url, spec.timeout())
                        .map_err(|e| AppError::Setup(format!("agents.{name}: {e}")))?,
                )
            }
            AgentKind::Kafka => {
                let consumer = consumer_config(&loaded.config.kafka, "unused");
                let (p, s) = (producer.clone(), stop.clone());
                let (req, reply) = (
                    spec.request_topic.clone().unwrap_or_default(),
                    spec.reply_topic.clone().unwrap_or_default(),
                );
                let agent = tokio::task::spawn_blocking(move || {
                    KafkaAgent::start(&consumer, p, &req, &reply, s)
                })
                .await
                .map_err(|e| AppError::Setup(e.to_string()))?
                .map_err(|e| AppError::Setup(format!("agents.{name}: {e}")))?;
                Arc::new(agent)
            }
        };
        out.insert(
            name.clone(),
            AgentEntry {
                spec: spec.clone(),
                agent,
                permits: Arc::new(Semaphore::new(spec.max_concurrency)),
            },
        );
    }
    Ok(out)
}

/// Checks Kafka and Redis every few seconds for `/readyz`.
async fn check_dependencies(loaded: Loaded, health: Arc<Health>, stop: CancellationToken) {
    let redis = redis::Client::open(loaded.config.redis.url.as_str()).ok();
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
        if let Some(c) = &redis {
            let ok = tokio::time::timeout(Duration::from_secs(3), async {
                let mut conn = c.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await
            })
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
            health.redis_ok.store(ok, Ordering::Relaxed);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
