//! `switchyard approvals list|approve|reject`: human approvals directly against Redis and Kafka
//! (the HTTP API does the same).

use std::sync::Arc;

use super::ctx::Ctx;
use crate::config::Loaded;
use crate::governance::approvals::{Approvals, Verdict};
use crate::kafka::{producer_config, Producer};
use crate::records::Emitter;
use crate::store::RedisConn;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: ApprovalsCommand,
}

#[derive(clap::Subcommand)]
pub enum ApprovalsCommand {
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

/// An open approval as `approvals list` shows it: id, status, action, resource and expiry, then
/// who proposed it, with which parameters and why (from the action it would send).
pub fn approval_lines(a: &crate::records::ApprovalData) -> String {
    let act = &a.action_record;
    let agents = match act.get("agents") {
        Some(serde_json::Value::Array(v)) => v
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(", "),
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => "-".into(),
    };
    let parameters = act
        .get("parameters")
        .map(|p| p.to_string())
        .unwrap_or_else(|| "{}".into());
    let reason = act
        .get("reason")
        .and_then(serde_json::Value::as_str)
        .filter(|r| !r.is_empty())
        .unwrap_or("-");
    format!(
        "{}  {:<10} {:<16} {:<12} action {} expires {}\n    agent: {agents}\n    parameters: {parameters}\n    reason: {reason}\n",
        a.approval_id,
        a.status,
        a.action,
        a.resource,
        a.action_id,
        chrono::DateTime::from_timestamp(a.expires_at, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default()
    )
}

/// The approvals service of a loaded config, for commands.
pub fn service(l: &Loaded) -> Result<Approvals, String> {
    let conn = RedisConn::from_config(&l.config.redis).map_err(|e| e.to_string())?;
    Ok(service_on(l, conn))
}

/// The approvals service of a loaded config on an open Redis connection.
pub fn service_on(l: &Loaded, conn: RedisConn) -> Approvals {
    let emitter = Emitter::new(l.schemas.clone(), l.topics.clone());
    let resources = crate::app::resource_store(l, conn.clone());
    let sealer: Arc<_> = crate::app::sealer(l, conn.clone(), None);
    Approvals {
        // This process serves no metrics: a running switchyard counts its decisions.
        counts: crate::governance::approvals::Counts::Relay,
        stats: Some(Arc::new(crate::agents::stats::AgentStats::new(
            conn,
            &l.config.redis.key_prefix,
        ))),
        ..crate::app::approvals_of(l, resources, sealer, &emitter)
    }
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), String> {
    let l = ctx.load_noting()?;
    let conn = RedisConn::from_config(&l.config.redis).map_err(|e| e.to_string())?;
    let approvals = service_on(&l, conn.clone());
    let (id, verdict, by, why) = match args.command {
        ApprovalsCommand::List => {
            let open = approvals.list_open().await.map_err(|e| e.to_string())?;
            for a in &open {
                print!("{}", approval_lines(a));
            }
            println!("{} open approvals", open.len());
            return Ok(());
        }
        ApprovalsCommand::Approve { id, by, why } => (id, Verdict::Approve, by, why),
        ApprovalsCommand::Reject { id, by, why } => (id, Verdict::Reject, by, why),
    };
    // A decision writes the resource's state: not in a format a newer build would misread.
    crate::format::refuse_newer(&conn, &l.config.redis.key_prefix).await?;
    // The wait's span (when tracing is on) is exported before the process exits; tracing trouble
    // never stands in the way of a decision.
    if let Err(e) = crate::spans::init(&l.config.tracing, &format!("cli-{}", std::process::id())) {
        eprintln!("warning: {e}; the approval's span is not exported");
    }
    let d = approvals
        .decide(&id, verdict, &by, &why, false, true)
        .await
        .map_err(|e| e.to_string())?;
    let producer = Producer::new(&producer_config(&l.config.kafka)).map_err(|e| e.to_string())?;
    for o in &d.outputs {
        producer.send(o).await.map_err(|e| {
            format!("decision recorded but producing failed ({e}); a running switchyard produces it within a minute, or run the command again")
        })?;
    }
    approvals.sent(&id).await.map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(crate::spans::flush).await.ok();
    if let Some(stats) = &approvals.stats {
        // The verdict counts on the proposing agents' scorecards (a running switchyard flushes
        // every second; this process is about to exit).
        if let Err(e) = stats.flush().await {
            eprintln!("warning: the verdict is not on the agents' scorecards: {e}");
        }
    }
    match (&d.action, d.fresh) {
        // Like the API's 409: the decision asked for was not made (someone decided first).
        (_, false) => {
            return Err(format!(
                "{} was already {} by {}; nothing changed",
                id,
                d.approval.status,
                d.approval.decided_by.as_deref().unwrap_or("?")
            ))
        }
        (Some(a), true) => println!(
            "{} approved: {} {} on {}; resolve sends it with the resource's next fencing token",
            id, a.action_id, a.action, a.resource
        ),
        (None, true) => println!("{} {}", id, d.approval.status),
    }
    Ok(())
}
