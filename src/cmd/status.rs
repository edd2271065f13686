//! `switchyard status`: per-stage consumer lag, pending approvals and per-agent scorecards, for a
//! person.

use std::fmt::Write as _;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::ctx::Ctx;
use crate::agents::stats::scorecards;
use crate::config::Loaded;
use crate::event::now_secs;
use crate::governance::approvals::Approvals;
use crate::stages::STAGES;
use crate::store::RedisConn;

#[derive(clap::Args)]
pub struct Args {}

pub async fn run(ctx: &Ctx, _args: Args) -> Result<(), String> {
    let l = ctx.load_noting()?;
    let approvals = super::approvals::service(&l)?;
    let conn = RedisConn::from_config(&l.config.redis).map_err(|e| e.to_string())?;
    print!("{}", report(&l, &approvals, &conn).await?);
    Ok(())
}

/// Approximate lag of a consumer group on some topics: high watermark minus committed offset, summed,
/// clamped at 0 per partition. `None` when the group has committed nothing yet.
pub fn group_lag(loaded: &Loaded, group: &str, topics: &[String]) -> Result<Option<i64>, String> {
    let positions = crate::kafka::read::positions(&loaded.config.kafka, group, topics)?;
    if positions.iter().all(|(_, _, at)| at.is_none()) {
        return Ok(None);
    }
    let consumer: BaseConsumer = crate::kafka::admin_config(&loaded.config.kafka)
        .create()
        .map_err(|e| format!("cannot create consumer: {e}"))?;
    let mut total = 0;
    for (topic, partition, at) in positions {
        let (low, high) = consumer
            .fetch_watermarks(&topic, partition, Duration::from_secs(5))
            .map_err(|x| format!("watermarks of {topic}: {x}"))?;
        // A partition the group never committed on (stuck on its first record, or new) lags by
        // all it holds.
        total += (high - at.unwrap_or(low)).max(0);
    }
    Ok(Some(total))
}

fn ago(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// The whole status report as text.
pub async fn report(
    loaded: &Loaded,
    approvals: &Approvals,
    conn: &RedisConn,
) -> Result<String, String> {
    let mut out = String::new();
    let cfg = &loaded.config;
    let _ = writeln!(
        out,
        "STAGE      CONSUMER GROUP                      LAG (approx.)  TOPICS"
    );
    for def in STAGES {
        let (stage, topics) = (def.name, (def.inputs)(&cfg.topics));
        let group = format!("{}.{stage}", cfg.kafka.group_prefix);
        let (l2, g2, t2) = (loaded.clone(), group.clone(), topics.clone());
        let lag = tokio::task::spawn_blocking(move || group_lag(&l2, &g2, &t2))
            .await
            .map_err(|e| e.to_string())?;
        let lag = match lag {
            Ok(Some(n)) => n.to_string(),
            // A stage may be running and simply have read nothing yet.
            Ok(None) => "no commits yet".into(),
            Err(e) => format!("unknown ({e})"),
        };
        let _ = writeln!(
            out,
            "{stage:<10} {group:<35} {lag:<14} {}",
            topics.join(", ")
        );
    }
    let now = now_secs();
    let open = approvals.list_open().await.map_err(|e| e.to_string())?;
    let _ = writeln!(out);
    match (
        open.iter().map(|a| a.requested_at).min(),
        open.iter().map(|a| a.expires_at).min(),
    ) {
        (Some(oldest), Some(next)) => {
            let _ = writeln!(
                out,
                "APPROVALS  {} pending; oldest waiting {}, next expiry in {} (switchyard approvals list)",
                open.len(),
                ago(now - oldest),
                ago((next - now).max(0))
            );
        }
        _ => {
            let _ = writeln!(out, "APPROVALS  none pending");
        }
    }
    let prefix = &cfg.redis.key_prefix;
    let ours = crate::format::DATA_FORMAT;
    let _ = match crate::format::read(conn, prefix).await {
        Ok(Some(n)) if n > ours => writeln!(
            out,
            "FORMAT     {n}: a newer build uses this Redis (this one writes {ours}; its `run` refuses to start)"
        ),
        Ok(Some(n)) => writeln!(out, "FORMAT     {n} (this build writes {ours})"),
        Ok(None) => writeln!(
            out,
            "FORMAT     no marker yet (no instance of a build with one has started; this build writes {ours})"
        ),
        Err(e) => writeln!(out, "FORMAT     unknown ({e})"),
    };
    let names: Vec<String> = cfg.agents.keys().cloned().collect();
    let cards = scorecards(conn, &cfg.redis.key_prefix, &names, 2 * 3600)
        .await
        .map_err(|e| e.to_string())?;
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "AGENT               HEALTH    TASKS(2h)  FAILED  TIMED OUT  REFUSED  MEAN MS  COST/TASK  PROPOSALS acc/rej/appr/decl/undone  SCORE  LAST SEEN"
    );
    for c in &cards {
        let seen = c
            .last_seen
            .map(|t| format!("{} ago", ago(now - t)))
            .unwrap_or_else(|| "-".into());
        let dash = || "-".to_string();
        let _ = writeln!(
            out,
            "{:<19} {:<9} {:<10} {:<7} {:<10} {:<8} {:<8} {:<10} {:<35} {:<6.2} {seen}",
            c.agent,
            c.verdict(),
            c.calls(),
            c.failed,
            c.timed_out,
            c.refused,
            c.mean_ms().map_or_else(dash, |m| m.to_string()),
            c.cost_per_task().map_or_else(dash, |x| format!("{x:.6}")),
            format!(
                "{}/{}/{}/{}/{}",
                c.accepted, c.rejected, c.approved, c.declined, c.undone
            ),
            c.score(),
        );
        for (model, m) in &c.models {
            let _ = writeln!(
                out,
                "  model {model}: {} tasks, {} failed, cost {:.6}",
                m.calls, m.failed, m.cost
            );
        }
    }
    Ok(out)
}
