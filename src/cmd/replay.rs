//! `switchyard replay`: recorded events through the pipeline again, in a sandbox, under the config
//! given with `--config` (a candidate, or the one in force); prints the decision diff against what
//! was recorded and exits 1 when decisions differ. See [`crate::replay`].

use std::sync::Arc;
use std::time::Duration;

use super::ctx::Ctx;
use crate::kafka::Input;
use crate::replay::{Recording, Report, Sandbox};

#[derive(clap::Args)]
pub struct Args {
    /// Replay this event only.
    #[arg(long)]
    pub event: Option<String>,
    /// Replay the events about this resource (their subject).
    #[arg(long)]
    pub resource: Option<String>,
    /// Replay this tenant's events only (an `--event` id found in several tenants needs it).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Events recorded since: 30m, 2h, 1d or an RFC 3339 time.
    #[arg(long, default_value = "1d")]
    pub since: String,
    /// Events recorded until (default: now): 30m (ago), 2h, 1d or an RFC 3339 time.
    #[arg(long)]
    pub until: Option<String>,
    /// Write the actions the replay decided to this topic (by default nothing is written to Kafka).
    #[arg(long)]
    pub to_topic: Option<String>,
    /// The report as one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<(), String> {
    let l = ctx.load_noting()?;
    let since = super::dlq::since_time(&a.since)?.timestamp_millis();
    let until = match &a.until {
        Some(u) => super::dlq::since_time(u)?.timestamp_millis(),
        None => i64::MAX,
    };
    if let Some(t) = &a.to_topic {
        if l.config.referenced_topics().contains(&t.as_str()) {
            return Err(format!(
                "--to-topic {t} is one of switchyard's own or input topics; name a scratch topic"
            ));
        }
    }
    let l2 = l.clone();
    let (event, resource, tenant) = (a.event.clone(), a.resource.clone(), a.tenant.clone());
    let (inputs, results, audit) = tokio::task::spawn_blocking(move || {
        let idle = Duration::from_millis(1500);
        let mut inputs: Vec<Input> = Vec::new();
        for topic in &l2.config.topics.inputs {
            let recs = crate::kafka::read::read_since(&l2.config.kafka, topic, since, idle)?;
            inputs.extend(recs.into_iter().filter(|r| {
                r.timestamp_ms.is_none_or(|t| t <= until)
                    && match crate::codec::decode(r.view(), &l2.schemas) {
                        Ok(ev) => {
                            event.as_ref().is_none_or(|e| *e == ev.id)
                                && resource
                                    .as_ref()
                                    .is_none_or(|r| ev.subject.as_deref() == Some(r.as_str()))
                                && tenant.as_ref().is_none_or(|t| t == ev.tenant())
                        }
                        // Undecodable: replayed too (the route stage dead-letters it again).
                        Err(_) => event.is_none() && resource.is_none() && tenant.is_none(),
                    }
            }));
        }
        // Recorded order: by the time each entered Kafka, then where.
        inputs.sort_by(|x, y| {
            (x.timestamp_ms, &x.topic, x.partition, x.offset).cmp(&(
                y.timestamp_ms,
                &y.topic,
                y.partition,
                y.offset,
            ))
        });
        let t = &l2.config.topics;
        let results = crate::kafka::read::read_since(&l2.config.kafka, &t.results, since, idle)?;
        let audit = crate::kafka::read::read_since(&l2.config.kafka, &t.audit, since, idle)?;
        Ok::<_, String>((inputs, results, audit))
    })
    .await
    .map_err(|e| e.to_string())??;
    if inputs.is_empty() {
        return Err(format!(
            "no recorded event to replay since {} (try --since 7d){}",
            a.since,
            match (&a.event, &a.resource) {
                (Some(e), _) => format!(" with id {e}"),
                (_, Some(r)) => format!(" about {r}"),
                _ => String::new(),
            }
        ));
    }
    if let (Some(id), None) = (&a.event, &a.tenant) {
        let tenants: std::collections::BTreeSet<String> = inputs
            .iter()
            .filter_map(|r| crate::codec::decode(r.view(), &l.schemas).ok())
            .map(|ev| ev.tenant().to_string())
            .collect();
        if tenants.len() > 1 {
            return Err(format!(
                "event id {id} is found in {} tenants ({}): say which with --tenant",
                tenants.len(),
                tenants.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let recording = Arc::new(Recording::from_records(&l, &results, &audit));
    let redis = crate::store::RedisConn::from_config(&l.config.redis)
        .map_err(|e| format!("redis.url: {e}"))?;
    let mut sandbox = Sandbox::new(&l, redis, recording)?;
    let report = sandbox.run(&inputs).await;
    if let Err(e) = sandbox.cleanup().await {
        eprintln!("warning: the sandbox's scratch keys were not all deleted ({e}); delete what is left with redis-cli --scan --pattern '{}:replay-*' | xargs redis-cli unlink", l.config.redis.key_prefix);
    }
    let report = report?;
    if let Some(topic) = &a.to_topic {
        let producer = crate::kafka::Producer::new(&crate::kafka::producer_config(&l.config.kafka))
            .map_err(|e| e.to_string())?;
        for mut o in report.actions.clone() {
            o.topic = topic.clone();
            producer
                .send(&o)
                .await
                .map_err(|e| format!("cannot write to {topic}: {e}"))?;
        }
    }
    print(&report, a.json);
    let s = &report.summary;
    // A diverged task's decisions are unknown: the config cannot be vouched for either.
    if s.changed + s.new + s.missing + s.diverged > 0 {
        return Err(format!(
            "decisions differ: {} changed, {} new, {} missing, {} task(s) diverged",
            s.changed, s.new, s.missing, s.diverged
        ));
    }
    Ok(())
}

fn print(r: &Report, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        );
        return;
    }
    let show = |d: &Option<crate::replay::Decided>| match d {
        Some(d) => format!(
            "{}{}{}",
            d.decision,
            d.rule
                .as_ref()
                .map(|r| format!(" [{r}]"))
                .unwrap_or_default(),
            d.reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
        None => "-".into(),
    };
    for row in &r.decisions {
        println!(
            "{:<8} {:<14} {:<18} {:<12} {:<16} {} -> {}",
            row.status,
            row.about.event_id,
            row.about.action,
            row.about.resource,
            row.about.agent,
            show(&row.before),
            show(&row.after)
        );
    }
    for d in &r.diverged {
        println!("diverged {} (task {}): {}", d.agent, d.task_id, d.why);
    }
    let s = &r.summary;
    println!(
        "{} events, {} tasks ({} from the recording, {} diverged), {} proposals, {} dead letters; decisions: {} same, {} changed, {} new, {} missing; {} model calls",
        s.events, s.tasks, s.replayed, s.diverged, s.proposals, s.dead_letters, s.same, s.changed, s.new, s.missing, s.model_calls
    );
}
