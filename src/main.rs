//! The `switchyard` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use switchyard::app::{self, STAGES};
use switchyard::cli::{self, Mode, TailOptions};
use switchyard::config::{Config, Loaded};
use switchyard::event::CloudEvent;
use switchyard::kafka::admin_config;
use switchyard::telemetry::init_logging;
use switchyard::topics::{self, ApplyOutcome};

/// mimalloc instead of glibc malloc: the stages allocate many short-lived JSON values across threads,
/// where glibc spent about a third of the process's CPU (profile in the README's benchmark section).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Kafka-native orchestrator for background agents.
///
/// Exit codes: 0 success, 1 failure (bad config, unreachable broker, stage error), 2 bad command line.
#[derive(Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
struct Cli {
    /// Config file. Environment overrides: SWITCHYARD_KAFKA_BROKERS, SWITCHYARD_REDIS_URL.
    #[arg(
        short,
        long,
        global = true,
        env = "SWITCHYARD_CONFIG",
        default_value = "switchyard.yaml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline stages until SIGTERM/SIGINT.
    Run {
        /// Stages to run, comma separated (default: those enabled in the config). This build has: route, agents, resolve.
        #[arg(long, value_delimiter = ',')]
        stages: Option<Vec<String>>,
    },
    /// Check the config file and everything it refers to; print every problem.
    Validate,
    /// Manage topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Publish CloudEvents, built from flags or read as JSON from a file or stdin.
    Publish {
        /// Topic to write to.
        #[arg(short, long)]
        topic: String,
        /// Read events from this file (`-` for stdin): one JSON object, a JSON array, or JSON lines.
        #[arg(short, long, conflicts_with_all = ["ty", "data"])]
        file: Option<String>,
        /// Event type, e.g. deployment.completed.
        #[arg(long = "type", required_unless_present = "file")]
        ty: Option<String>,
        /// Resource id the event is about (also the record key).
        #[arg(long)]
        subject: Option<String>,
        /// Event source.
        #[arg(long, default_value = "switchyard-cli")]
        source: String,
        /// Event id (default: a random UUID).
        #[arg(long)]
        id: Option<String>,
        /// Event data as JSON.
        #[arg(long)]
        data: Option<String>,
        /// Tenant extension.
        #[arg(long)]
        tenant: Option<String>,
        /// Encoding on the wire.
        #[arg(long, value_enum, default_value = "structured")]
        mode: Mode,
        /// Send each line of --file verbatim, unvalidated (to exercise the dead-letter path).
        #[arg(long, requires = "file")]
        raw: bool,
    },
    /// Per-stage consumer lag, pending approvals and agent health, as a table.
    Status,
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Human approvals (directly against Redis and Kafka; the HTTP API does the same).
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// Print records of a topic as JSON lines.
    Tail {
        topic: String,
        /// Start at the oldest record instead of new ones.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many records.
        #[arg(long)]
        max: Option<usize>,
        /// Stop after this many milliseconds without a record.
        #[arg(long)]
        idle_timeout_ms: Option<u64>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every resource's hash chain on the audit topic; exit 1 when a record is missing,
    /// reordered or altered.
    Verify {
        /// Topic to check (default: topics.audit).
        #[arg(long)]
        topic: Option<String>,
        /// Stop reading after this long without a record.
        #[arg(long, default_value_t = 3000)]
        idle_timeout_ms: u64,
    },
}

#[derive(Subcommand)]
enum ApprovalsCommand {
    /// List approvals waiting for a person.
    List,
    /// Approve a pending action: it goes to switchyard.actions with a fencing token.
    Approve {
        id: String,
        #[arg(long)]
        by: String,
        #[arg(long, default_value = "")]
        why: String,
    },
    /// Reject a pending action.
    Reject {
        id: String,
        #[arg(long)]
        by: String,
        #[arg(long, default_value = "")]
        why: String,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create missing topics from the definitions; report existing ones that differ. Idempotent.
    Apply,
    /// List the topic definitions.
    List,
}

fn load(path: &std::path::Path) -> Result<Loaded, String> {
    Config::load(path).map_err(|p| p.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.trim_end());
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Validate => {
            let l = load(&cli.config)?;
            println!(
                "{} is valid: {} routes, {} topic definitions, {} schemas",
                cli.config.display(),
                l.config.routes.len(),
                l.topics.iter().count(),
                l.schemas.names().count()
            );
            Ok(())
        }
        Command::Run { stages } => {
            let l = load(&cli.config)?;
            init_logging(l.config.log.format, &l.config.log.level);
            let stages = stages.unwrap_or_else(|| {
                let mut v = Vec::new();
                if l.config.stages.route.enabled {
                    v.push("route".to_string());
                }
                if l.config.stages.agents.enabled {
                    v.push("agents".to_string());
                }
                if l.config.stages.resolve.enabled {
                    v.push("resolve".to_string());
                }
                v
            });
            for s in &stages {
                if !STAGES.contains(&s.as_str()) {
                    return Err(format!(
                        "unknown stage {s:?}; this build has {}",
                        STAGES.join(", ")
                    ));
                }
            }
            if stages.is_empty() {
                return Err("no stage to run: enable one in the config or pass --stages".into());
            }
            let shutdown = CancellationToken::new();
            tokio::spawn(wait_for_signal(shutdown.clone()));
            tracing::info!(?stages, "Switchyard starting.");
            app::run(l, stages, shutdown)
                .await
                .map_err(|e| e.to_string())
        }
        Command::Topics { command } => {
            let l = load(&cli.config)?;
            let names = l.config.topics.all();
            let defs: Vec<_> = names.iter().filter_map(|n| l.topics.get(n)).collect();
            match command {
                TopicsCommand::List => {
                    for d in defs {
                        println!(
                            "{:<28} partitions={:<3} encoding={:?} schema={} key: {}",
                            d.name,
                            d.partitions,
                            d.encoding,
                            d.schema.as_deref().unwrap_or("-"),
                            d.key
                        );
                    }
                    Ok(())
                }
                TopicsCommand::Apply => {
                    let results = topics::apply(
                        &admin_config(&l.config.kafka),
                        &defs,
                        Duration::from_secs(15),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    let (mut created, mut unchanged, mut differs) = (0, 0, 0);
                    for (name, outcome) in results {
                        match outcome {
                            ApplyOutcome::Created => {
                                created += 1;
                                println!("created   {name}");
                            }
                            ApplyOutcome::Unchanged => {
                                unchanged += 1;
                                println!("unchanged {name}");
                            }
                            ApplyOutcome::Differs(d) => {
                                differs += 1;
                                println!("differs   {name}: {}", d.join("; "));
                            }
                        }
                    }
                    println!("{created} created, {unchanged} unchanged, {differs} differ (left as they are)");
                    Ok(())
                }
            }
        }
        Command::Publish {
            topic,
            file,
            ty,
            subject,
            source,
            id,
            data,
            tenant,
            mode,
            raw,
        } => {
            let l = load(&cli.config)?;
            if raw {
                let text = cli::read_input(file.as_deref().unwrap_or("-"))?;
                return cli::publish_raw(&l, &topic, subject.as_deref().unwrap_or(""), &text).await;
            }
            let events = match file {
                Some(f) => cli::parse_events(&cli::read_input(&f)?)?,
                None => {
                    let mut ev = CloudEvent::new(
                        id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                        source,
                        ty.unwrap_or_default(),
                    )
                    .with_time_now();
                    if let Some(s) = subject.clone() {
                        ev = ev.with_subject(s);
                    }
                    if let Some(d) = data {
                        let v: Value = serde_json::from_str(&d)
                            .map_err(|e| format!("--data is not valid JSON: {e}"))?;
                        ev = ev.with_data(v);
                    }
                    if let Some(t) = tenant.clone() {
                        ev = ev.with_extension("tenant", t);
                    }
                    switchyard::codec::validate(&ev).map_err(|e| e.to_string())?;
                    vec![ev]
                }
            };
            let events: Vec<CloudEvent> = events
                .into_iter()
                .map(|mut e| {
                    if e.subject.is_none() {
                        e.subject = subject.clone();
                    }
                    e
                })
                .collect();
            cli::publish(&l, &topic, &events, mode).await
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    topic,
                    idle_timeout_ms,
                },
        } => {
            let l = load(&cli.config)?;
            let topic = topic.unwrap_or_else(|| l.config.topics.audit.clone());
            let kafka = l.config.kafka.clone();
            let t = topic.clone();
            let recs = tokio::task::spawn_blocking(move || {
                cli::read_all(&kafka, &t, Duration::from_millis(idle_timeout_ms))
            })
            .await
            .map_err(|e| e.to_string())??;
            let mut events = Vec::new();
            for r in &recs {
                let ev = switchyard::codec::decode(r.view(), &l.schemas).map_err(|e| {
                    format!(
                        "{}[{}]@{}: not an audit record: {e}",
                        r.topic, r.partition, r.offset
                    )
                })?;
                events.push((r.offset, ev));
            }
            let v = switchyard::audit::verify(&events);
            for p in &v.problems {
                println!(
                    "BROKEN {} seq {} (offset {}): {}",
                    p.resource, p.seq, p.offset, p.message
                );
            }
            println!(
                "{topic}: {} records, {} chains, {} repeated deliveries skipped, {} problems",
                v.records,
                v.chains,
                v.duplicates,
                v.problems.len()
            );
            if v.problems.is_empty() {
                Ok(())
            } else {
                Err(format!("audit chains of {topic} are broken"))
            }
        }
        Command::Status => {
            let l = load(&cli.config)?;
            let emitter = switchyard::records::Emitter::new(l.schemas.clone(), l.topics.clone());
            let conn = switchyard::context::redis::RedisConn::new(&l.config.redis.url)
                .map_err(|e| e.to_string())?;
            let approvals = app::approvals_of(&l, conn.clone(), &emitter);
            print!(
                "{}",
                switchyard::status::report(&l, &approvals, &conn).await?
            );
            Ok(())
        }
        Command::Approvals { command } => {
            let l = load(&cli.config)?;
            let emitter = switchyard::records::Emitter::new(l.schemas.clone(), l.topics.clone());
            let conn = switchyard::context::redis::RedisConn::new(&l.config.redis.url)
                .map_err(|e| e.to_string())?;
            let approvals = app::approvals_of(&l, conn, &emitter);
            let (id, verdict, by, why) = match command {
                ApprovalsCommand::List => {
                    let open = approvals.list_open().await.map_err(|e| e.to_string())?;
                    for a in &open {
                        println!(
                            "{}  {:<10} {:<16} {:<12} action {} expires {}",
                            a.approval_id,
                            a.status,
                            a.action,
                            a.resource,
                            a.action_id,
                            chrono::DateTime::from_timestamp(a.expires_at, 0)
                                .map(|t| t.to_rfc3339())
                                .unwrap_or_default()
                        );
                    }
                    println!("{} open approvals", open.len());
                    return Ok(());
                }
                ApprovalsCommand::Approve { id, by, why } => {
                    (id, switchyard::approvals::Verdict::Approve, by, why)
                }
                ApprovalsCommand::Reject { id, by, why } => {
                    (id, switchyard::approvals::Verdict::Reject, by, why)
                }
            };
            let d = approvals
                .decide(&id, verdict, &by, &why, false)
                .await
                .map_err(|e| e.to_string())?;
            let producer = switchyard::kafka::Producer::new(&switchyard::kafka::producer_config(
                &l.config.kafka,
            ))
            .map_err(|e| e.to_string())?;
            for o in &d.outputs {
                producer.send(o).await.map_err(|e| {
                    format!("decision recorded but producing failed ({e}); run the command again")
                })?;
            }
            match (&d.action, d.fresh) {
                (_, false) => println!(
                    "{} was already {} by {}",
                    id,
                    d.approval.status,
                    d.approval.decided_by.as_deref().unwrap_or("?")
                ),
                (Some(a), true) => println!(
                    "{} approved: {} {} on {} sent with fencing token {}",
                    id, a.action_id, a.action, a.resource, a.fencing_token
                ),
                (None, true) => println!("{} {}", id, d.approval.status),
            }
            Ok(())
        }
        Command::Tail {
            topic,
            from_beginning,
            max,
            idle_timeout_ms,
        } => {
            let l = load(&cli.config)?;
            let opts = TailOptions {
                from_beginning,
                max,
                idle_timeout: idle_timeout_ms.map(Duration::from_millis),
            };
            let kafka = l.config.kafka.clone();
            tokio::task::spawn_blocking(move || cli::tail(&kafka, &l, &topic, &opts))
                .await
                .map_err(|e| format!("tail failed: {e}"))?
                .map(|_| ())
        }
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "Cannot install SIGTERM handler.");
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("Shutdown requested; draining.");
    shutdown.cancel();
}
