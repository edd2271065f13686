//! `switchyard workflows list|show`: workflow runs from their state in Redis.

use super::ctx::Ctx;
use crate::store::RedisConn;
use crate::workflow::runs::Runs;
use crate::workflow::RunState;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: WorkflowsCommand,
}

#[derive(clap::Subcommand)]
pub enum WorkflowsCommand {
    /// The most recent runs, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One run's timeline: every step with its agent, status, duration and error.
    Show { run_id: String },
}

fn ms_between(a: &str, b: &str) -> Option<i64> {
    let a = chrono::DateTime::parse_from_rfc3339(a).ok()?;
    let b = chrono::DateTime::parse_from_rfc3339(b).ok()?;
    Some((b - a).num_milliseconds())
}

fn duration(r: &RunState) -> String {
    r.finished_at
        .as_deref()
        .and_then(|f| ms_between(&r.started_at, f))
        .map(|ms| format!("{ms} ms"))
        .unwrap_or_else(|| "-".into())
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), String> {
    let l = ctx.load_noting()?;
    let conn = RedisConn::from_config(&l.config.redis).map_err(|e| e.to_string())?;
    let runs = Runs::new(conn, &l.config.redis.key_prefix);
    match args.command {
        WorkflowsCommand::List { limit } => {
            let list = runs.list(limit).await.map_err(|e| e.to_string())?;
            for r in &list {
                let done = r.steps.values().filter(|s| s.status != "running").count();
                println!(
                    "{}  {:<20} {:<10} resource={:<12} steps {done}/{}  started {}  took {}",
                    r.run_id,
                    r.workflow,
                    r.status,
                    r.resource,
                    r.steps.len(),
                    r.started_at,
                    duration(r)
                );
            }
            println!("{} runs", list.len());
            Ok(())
        }
        WorkflowsCommand::Show { run_id } => {
            let r = runs
                .get(&run_id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no run {run_id} (runs are kept 7 days)"))?;
            println!(
                "{} workflow {} on {} ({}) for event {}: {}, started {}, took {}, cost {:.6}",
                r.run_id,
                r.workflow,
                r.resource,
                r.tenant,
                r.event_id,
                r.status,
                r.started_at,
                duration(&r),
                r.steps.values().map(|s| s.cost).sum::<f64>()
            );
            let mut steps: Vec<_> = r.steps.iter().collect();
            steps.sort_by(|a, b| {
                a.1.finished_at
                    .as_deref()
                    .unwrap_or("~")
                    .cmp(b.1.finished_at.as_deref().unwrap_or("~"))
            });
            for (name, s) in steps {
                let at = s
                    .finished_at
                    .as_deref()
                    .and_then(|f| ms_between(&r.started_at, f))
                    .map(|ms| format!("+{ms} ms"))
                    .unwrap_or_else(|| "-".into());
                let agent = if s.agent.is_empty() {
                    "(merge)"
                } else {
                    s.agent.as_str()
                };
                let attempt = if s.attempt > 1 { " (fallback)" } else { "" };
                println!(
                    "  {at:>10}  {name:<20} {agent:<18} {:<9} {:>6} ms  cost {:.6}  findings {:<2} proposals {:<2}{attempt}{}",
                    s.status,
                    s.duration_ms,
                    s.cost,
                    s.findings.len(),
                    s.proposals.len(),
                    s.error.as_deref().map(|e| format!("  error: {e}")).unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}
