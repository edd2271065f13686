//! The `switchyard` command line: one module per command, each with its `Args` and `run`.
//!
//! Adding a command: its module here, and one arm of [`Command`] (with its line in [`dispatch`]).

pub mod approvals;
pub mod audit;
pub mod config;
pub mod context;
pub mod ctx;
pub mod dlq;
pub mod publish;
pub mod recover;
pub mod replay;
pub mod run;
pub mod status;
pub mod story;
pub mod tail;
pub mod topics;
pub mod validate;
pub mod workflows;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use ctx::Ctx;

/// Kafka-native orchestrator for background agents.
///
/// Config: `--config FILE`, else `switchyard.yaml` in the current directory, else the default
/// compiled into the binary. Exit codes: 0 success, 1 failure (bad config, unreachable broker,
/// stage error), 2 bad command line.
#[derive(Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
pub struct Cli {
    /// Config file (default: ./switchyard.yaml if present, else the embedded default).
    #[arg(short, long, global = true, env = "SWITCHYARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers (wins over SWITCHYARD_KAFKA_BROKERS and kafka.brokers).
    #[arg(short = 'b', long, global = true)]
    pub brokers: Option<String>,
    /// Redis URL (wins over SWITCHYARD_REDIS_URL and redis.url).
    #[arg(long, global = true)]
    pub redis: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the pipeline stages until SIGTERM/SIGINT.
    Run(run::Args),
    /// Check the config and everything it refers to; print every problem.
    Validate(validate::Args),
    /// Show the effective config (defaults and overrides applied, secrets redacted).
    Config(config::Args),
    /// Manage topics.
    Topics(topics::Args),
    /// Publish CloudEvents, built from flags or read as JSON from a file or stdin.
    Publish(publish::Args),
    /// Print records of a topic as JSON lines.
    Tail(tail::Args),
    /// Per-stage consumer lag, pending approvals and agent health, as a table.
    Status(status::Args),
    /// Audit trail tools.
    Audit(audit::Args),
    /// Human approvals (directly against Redis and Kafka; the HTTP API does the same).
    Approvals(approvals::Args),
    /// Rebuild Redis from the Kafka topics after Redis lost its data.
    Recover(recover::Args),
    /// Workflow runs: the recent ones, one run's timeline.
    Workflows(workflows::Args),
    /// Shared context: one resource with its relations; queries by fact or relation.
    Context(context::Args),
    /// Dead letters: list them, send them through again.
    Dlq(dlq::Args),
    /// The story of one event from the audit trail: routing, tasks, model and tool calls,
    /// decisions with their rules, approvals — in order, with times.
    Trace(story::TraceArgs),
    /// The story of one resource from the audit trail, since a time.
    History(story::HistoryArgs),
    /// Recorded events through route, agents and resolve again, in a sandbox (agents answered from
    /// the recording, no Kafka output): what would the config given with --config have decided?
    /// Exits 1 when decisions differ from the recorded ones.
    Replay(replay::Args),
}

/// Runs the command.
pub async fn dispatch(cli: Cli) -> Result<(), String> {
    let ctx = Ctx {
        config: cli.config,
        brokers: cli.brokers,
        redis: cli.redis,
    };
    match cli.command {
        Command::Run(a) => run::run(&ctx, a).await,
        Command::Validate(a) => validate::run(&ctx, a),
        Command::Config(a) => config::run(&ctx, a),
        Command::Topics(a) => topics::run(&ctx, a).await,
        Command::Publish(a) => publish::run(&ctx, a).await,
        Command::Tail(a) => tail::run(&ctx, a).await,
        Command::Status(a) => status::run(&ctx, a).await,
        Command::Audit(a) => audit::run(&ctx, a).await,
        Command::Approvals(a) => approvals::run(&ctx, a).await,
        Command::Recover(a) => recover::run(&ctx, a).await,
        Command::Workflows(a) => workflows::run(&ctx, a).await,
        Command::Context(a) => context::run(&ctx, a).await,
        Command::Dlq(a) => dlq::run(&ctx, a).await,
        Command::Trace(a) => story::trace(&ctx, a).await,
        Command::History(a) => story::history(&ctx, a).await,
        Command::Replay(a) => replay::run(&ctx, a).await,
    }
}
