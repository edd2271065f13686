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
        /// The topic is read to each partition's end; give up (an error, not a partial check)
        /// when a partition gives nothing for this long before its end (at least 30 s).
        #[arg(long, default_value_t = 30_000)]
        idle_timeout_ms: u64,
        /// With `audit.keys`: accept unsigned seals (and version 1 records) at offsets below these
        /// (`<partition>@<offset>,...`) — the trail written before signing began, and during a
        /// rolling change of the config. Any other unsigned seal is a problem (which names the
        /// partition's first signed seal).
        #[arg(long, value_delimiter = ',')]
        accept_unsigned_before: Vec<String>,
    },
}

/// `<partition>@<offset>` items of `--accept-unsigned-before`.
fn places(items: &[String]) -> Result<std::collections::HashMap<i32, i64>, String> {
    items
        .iter()
        .map(|i| {
            i.split_once('@')
                .and_then(|(p, o)| Some((p.trim().parse().ok()?, o.trim().parse().ok()?)))
                .ok_or_else(|| {
                    format!("--accept-unsigned-before: {i:?} is not <partition>@<offset>")
                })
        })
        .collect()
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), String> {
    let AuditCommand::Verify {
        topic,
        idle_timeout_ms,
        accept_unsigned_before,
    } = args.command;
    let accept_unsigned_before = places(&accept_unsigned_before)?;
    let l = ctx.load_noting()?;
    let keys = if l.config.audit.keys.is_empty() {
        None
    } else {
        Some(crate::audit::signing::Keys::load(&l.config.audit.keys)?)
    };
    if keys.is_none() && !accept_unsigned_before.is_empty() {
        return Err("--accept-unsigned-before needs audit.keys in the config".into());
    }
    let topic = topic.unwrap_or_else(|| l.config.topics.audit.clone());
    let kafka = l.config.kafka.clone();
    let t = topic.clone();
    let schemas = l.schemas.clone();
    // Read as a stream, each record kept only as far as verifying needs it (a decision's data is
    // dropped once it is hashed and classified): the topic keeps a year of records, which held
    // whole — payloads and decoded events — did not fit in memory.
    let (records, starts) = tokio::task::spawn_blocking(move || {
        let mut records = Vec::new();
        let mut starts: std::collections::HashMap<i32, i64> = Default::default();
        let mut bad = None;
        crate::kafka::read::read_each(&kafka, &t, Duration::from_millis(idle_timeout_ms), |r| {
            if bad.is_some() {
                return;
            }
            // Where each partition starts now: after 0 when retention deleted its oldest records
            // (the topic is read from its beginning, and offsets of an audit topic have no gaps).
            let s = starts.entry(r.partition).or_insert(r.offset);
            *s = (*s).min(r.offset);
            match crate::codec::decode(r.view(), &schemas) {
                Ok(ev) => records.push(
                    crate::audit::AuditRecord::decoded(r.partition, r.offset, &r.payload, ev)
                        .at(r.timestamp_ms)
                        .compact(),
                ),
                Err(e) => {
                    bad = Some(format!(
                        "{}[{}]@{}: not an audit record: {e}",
                        r.topic, r.partition, r.offset
                    ))
                }
            }
        })?;
        match bad {
            Some(e) => Err(e),
            None => Ok((records, starts)),
        }
    })
    .await
    .map_err(|e| e.to_string())??;
    let audit_types = [crate::records::types::AUDIT, crate::audit::SEAL_TYPE];
    if !records.is_empty()
        && !records
            .iter()
            .any(|r| audit_types.contains(&r.event.ty.as_str()))
    {
        let mut types: Vec<&str> = records.iter().map(|r| r.event.ty.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        return Err(format!(
            "{topic} is not an audit topic: its records are of type {}",
            types.join(", ")
        ));
    }
    // Seals are signed under the name of the audit topic they were written to: the config's
    // (also when a copy — a mirror, a restore — is checked with --topic).
    let check = crate::audit::SignatureCheck {
        keys,
        topic: l.config.topics.audit.clone(),
        accept_unsigned_before,
    };
    let v = crate::audit::verify_signed(&records, &starts, &check);
    for p in &v.problems {
        println!(
            "BROKEN {} seq {} (at {}): {}",
            p.chain, p.seq, p.at, p.message
        );
    }
    let trimmed: Vec<String> = {
        let mut t: Vec<(i32, i64)> = starts.into_iter().filter(|(_, o)| *o > 0).collect();
        t.sort_unstable();
        t.iter().map(|(p, o)| format!("{p}@{o}")).collect()
    };
    if !trimmed.is_empty() {
        println!(
            "{topic}: partitions start after their first records (retention deleted them): {}; {} gaps at the front of the trail are explained by that (not problems)",
            trimmed.join(", "),
            v.expired
        );
    }
    if check.keys.is_some() {
        println!(
            "{topic}: {} seals signed and checked, {} unsigned seals or version 1 records accepted (--accept-unsigned-before)",
            v.signed, v.unsigned
        );
    } else if v.signed_unchecked > 0 {
        println!(
            "{topic}: {} seals are signed; their signatures are not checked (no audit.keys in the config)",
            v.signed_unchecked
        );
    }
    println!(
        "{topic}: {} records, {} seals, {} chains, {} repeated deliveries skipped, {} problems",
        v.records,
        v.seals,
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
