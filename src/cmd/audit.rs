//! `switchyard audit verify`: reads an audit topic and checks every resource's hash chain.

use std::time::Duration;

use super::ctx::Ctx;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(clap::Subcommand)]
pub enum AuditCommand {
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

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), String> {
    let AuditCommand::Verify {
        topic,
        idle_timeout_ms,
    } = args.command;
    let l = ctx.load_noting()?;
    let topic = topic.unwrap_or_else(|| l.config.topics.audit.clone());
    let kafka = l.config.kafka.clone();
    let t = topic.clone();
    let recs = tokio::task::spawn_blocking(move || {
        crate::kafka::read::read_all(&kafka, &t, Duration::from_millis(idle_timeout_ms))
    })
    .await
    .map_err(|e| e.to_string())??;
    let mut events = Vec::new();
    for r in &recs {
        let ev = crate::codec::decode(r.view(), &l.schemas).map_err(|e| {
            format!(
                "{}[{}]@{}: not an audit record: {e}",
                r.topic, r.partition, r.offset
            )
        })?;
        events.push((r.offset, ev));
    }
    let v = crate::audit::verify(&events);
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
