//! `switchyard dlq list|redrive`: the dead letters, and sending them through again.
//!
//! A dead letter keeps its input's payload, key and headers plus `switchyard.dlq.*` headers (reason,
//! detail, stage, source topic, partition, offset, time). `redrive` republishes each selected one
//! to its source topic — with its original key and headers — except a failed agent task
//! (`agent_failed`), whose recorded failed outcome would make the copy a no-op: it goes back as a
//! new task, `<task id>-redrive-<dlq partition>-<dlq offset>`. That id is a function of the dead
//! letter, so redriving the same dead letter twice runs the task once; and since it is a new task,
//! its records are new records in the resource's audit chain (nothing is rewritten).

use std::time::Duration;

use serde_json::{json, Value};

use super::ctx::Ctx;
use crate::config::Loaded;
use crate::event::CloudEvent;
use crate::kafka::dlq_headers::*;
use crate::kafka::{producer_config, Input, Output, Producer};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(clap::Args, Clone)]
pub struct Filter {
    /// Only dead letters with this reason (`agent_failed`, `malformed_json`, ...).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only those of this stage (`route`, `agents`, `resolve`, `decisions`).
    #[arg(long)]
    pub stage: Option<String>,
    /// Only those dead-lettered within this long (`30m`, `2h`, `1d`) or since this RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
}

#[derive(clap::Subcommand)]
pub enum DlqCommand {
    /// The dead letters, oldest first: where each came from, why, when.
    List {
        #[command(flatten)]
        filter: Filter,
        #[arg(long)]
        json: bool,
    },
    /// Send the selected dead letters through again (see the module doc); `--dry-run` only says
    /// what it would do.
    Redrive {
        #[command(flatten)]
        filter: Filter,
        #[arg(long)]
        dry_run: bool,
        /// Also those redriven before (each redrive is remembered in Redis for 30 days, so a
        /// repeated run does not send them again).
        #[arg(long)]
        again: bool,
    },
}

/// How long a redriven dead letter is remembered (the dead-letter topic's usual retention).
const REDRIVEN_KEEP_SECONDS: u64 = 30 * 24 * 3600;
/// How long a run's claim of a dead letter it is sending lasts.
const CLAIM_SECONDS: u64 = 600;
/// How a claim's mark begins.
const BEING_SENT: &str = "being sent since";

/// Where the redrive of dead letter `p@o` is remembered.
fn redriven_key(l: &Loaded, p: i32, o: i64) -> String {
    format!(
        "{}:dlq:redriven:{}:{p}:{o}",
        l.config.redis.key_prefix, l.config.topics.dlq
    )
}

/// A header of a dead letter ([`crate::kafka::dlq_headers::value`]), as text.
fn header<'a>(r: &'a Input, name: &str) -> Option<&'a str> {
    crate::kafka::dlq_headers::value(&r.headers, name).and_then(|v| std::str::from_utf8(v).ok())
}

/// `30m`, `2h`, `1d`, `45s`, or an RFC 3339 time: the earliest time it admits.
pub fn since_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let bad = || format!("--since {s:?}: give 30m, 2h, 1d or an RFC 3339 time");
    let unit = s.chars().last().ok_or_else(bad)?;
    let n: i64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => return Err(format!("--since {s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(per)
        .and_then(chrono::TimeDelta::try_seconds)
        .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
        .ok_or_else(|| format!("--since {s:?} is too far back"))
}

/// The dead letters `keep` selects, oldest first (by the time they were dead-lettered): the topic
/// is streamed, and only those are held (it keeps 30 days of them, payloads up to the broker's
/// limit — a poison-record storm is when this command is needed).
fn read_dlq(l: &Loaded, keep: impl Fn(&Input) -> bool) -> Result<Vec<Input>, String> {
    let mut all = Vec::new();
    crate::kafka::read::read_each(
        &l.config.kafka,
        &l.config.topics.dlq,
        Duration::from_secs(2),
        |r| {
            if keep(&r) {
                all.push(r)
            }
        },
    )?;
    all.sort_by(|a, b| {
        (header(a, TIME), a.partition, a.offset).cmp(&(header(b, TIME), b.partition, b.offset))
    });
    Ok(all)
}

/// Whether `f` selects dead letter `r` (its limit aside).
fn selects(f: &Filter, since: Option<chrono::DateTime<chrono::Utc>>, r: &Input) -> bool {
    f.reason
        .as_deref()
        .is_none_or(|x| header(r, REASON) == Some(x))
        && f.stage
            .as_deref()
            .is_none_or(|x| header(r, STAGE) == Some(x))
        && since.is_none_or(|s| {
            header(r, TIME)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t >= s)
        })
}

/// The dead letters `f` selects among `all`.
fn select<'a>(all: &'a [Input], f: &Filter) -> Result<Vec<&'a Input>, String> {
    let since = f.since.as_deref().map(since_time).transpose()?;
    Ok(all
        .iter()
        .filter(|r| selects(f, since, r))
        .take(f.limit)
        .collect())
}

fn summary(r: &Input) -> Value {
    json!({
        "partition": r.partition, "offset": r.offset,
        "key": r.key.as_deref().map(String::from_utf8_lossy),
        "time": header(r, TIME), "stage": header(r, STAGE), "reason": header(r, REASON),
        "detail": header(r, DETAIL),
        "source": {"topic": header(r, SOURCE_TOPIC), "partition": header(r, SOURCE_PARTITION),
                   "offset": header(r, SOURCE_OFFSET)},
        "truncated": header(r, TRUNCATED).is_some(),
    })
}

/// Whether dead letter `copy` is what redriving `original` sent, failed again: the same payload
/// (republished as it was), or a task redriven from the original's task (its id extends it).
fn copy_of(l: &Loaded, copy: &Input, original: &Input) -> bool {
    if copy.payload == original.payload {
        return true;
    }
    // The redriven task may have failed again for another reason (its copy is then no
    // `agent_failed` dead letter).
    match (task_of(l, copy), failed_task(l, original)) {
        (Some(c), Some(o)) => c.starts_with(&format!("{o}-redrive-")),
        _ => false,
    }
}

/// The task id of an `agent_failed` dead letter.
fn failed_task(l: &Loaded, r: &Input) -> Option<String> {
    if header(r, REASON) != Some("agent_failed") {
        return None;
    }
    task_of(l, r)
}

/// Whether dead letter `r` is what switchyard wrote: the record it names as its source is on that
/// topic, with the same key and bytes (a dead letter keeps both whole, or is not redriven).
fn genuine(reader: &crate::kafka::read::RecordReader, r: &Input) -> Result<(), String> {
    if [TRUNCATED, KEY_TRUNCATED, HEADERS_DROPPED]
        .iter()
        .any(|h| header(r, h).is_some())
    {
        // Cut to fit the dead-letter topic: not redriven anyway (`redrive_record` says why).
        return Ok(());
    }
    let (Some(topic), Some(p), Some(o)) = (
        header(r, SOURCE_TOPIC),
        header(r, SOURCE_PARTITION).and_then(|p| p.parse::<i32>().ok()),
        header(r, SOURCE_OFFSET).and_then(|o| o.parse::<i64>().ok()),
    ) else {
        return Err("it does not name its source record".into());
    };
    // Headers too (less what dead-lettering and redriving add): a binary-mode CloudEvent is its
    // headers (`ce_*`), so a dead letter with the source's bytes and headers of its own would
    // publish an event of anyone's choosing — any tenant, any resource, a fresh id.
    let own = |h: &[(String, Vec<u8>)]| {
        let mut v: Vec<(String, Vec<u8>)> = h
            .iter()
            .filter(|(k, _)| {
                !k.starts_with("switchyard.dlq.") && k != REDRIVEN_FROM && k != REDRIVEN_SOURCE
            })
            .cloned()
            .collect();
        v.sort();
        v
    };
    match reader.read(topic, p, o, Duration::from_secs(10))? {
        Some(src) if src.key == r.key && src.payload == r.payload => {
            if own(&src.headers) == own(&r.headers) {
                Ok(())
            } else {
                Err(format!(
                    "its headers are not those of its source record {topic}[{p}]@{o} (written to the dead-letter topic by someone else?)"
                ))
            }
        }
        Some(_) => Err(format!(
            "its source record {topic}[{p}]@{o} is not the record it holds (written to the dead-letter topic by someone else?)"
        )),
        None => Err(format!(
            "its source record {topic}[{p}]@{o} is no longer there to check it against"
        )),
    }
}

/// The task id of a dead letter holding a task, whatever its reason.
fn task_of(l: &Loaded, r: &Input) -> Option<String> {
    let ev = crate::codec::decode(r.view(), &l.schemas).ok()?;
    ev.data?.get("task_id")?.as_str().map(str::to_string)
}

/// What redriving `r` sends, or why it cannot be redriven. `first` is the first dead letter of
/// the same task (a task's failure is dead-lettered again when its recorded outcome is replayed):
/// the new task id derives from it, so every copy redrives to the same task.
pub fn redrive_record(
    l: &Loaded,
    r: &Input,
    first: (i32, i64),
) -> Result<(Output, String), String> {
    let source = header(r, SOURCE_TOPIC).ok_or("no source topic header")?;
    // Only to a topic the stage that dead-lettered it reads: whoever can write to the dead-letter
    // topic could otherwise have the operator's credentials publish anything anywhere (actions,
    // the audit trail).
    let stage = header(r, STAGE).unwrap_or("");
    let reads = crate::stages::find(stage)
        .is_some_and(|def| (def.inputs)(&l.config.topics).iter().any(|t| t == source));
    if !reads {
        return Err(format!(
            "its source topic {source:?} is not one the {stage:?} stage reads"
        ));
    }
    if header(r, TRUNCATED).is_some() {
        return Err("its payload was cut to fit the dead-letter topic".into());
    }
    if header(r, KEY_TRUNCATED).is_some() || header(r, HEADERS_DROPPED).is_some() {
        return Err("its key or headers were cut to fit the dead-letter topic".into());
    }
    let mut headers: Vec<(String, Vec<u8>)> = r
        .headers
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("switchyard.dlq.") && k != REDRIVEN_FROM && k != REDRIVEN_SOURCE
        })
        .cloned()
        .collect();
    headers.push((
        REDRIVEN_FROM.into(),
        format!("{}@{}", r.partition, r.offset).into_bytes(),
    ));
    if let (Some(p), Some(o)) = (header(r, SOURCE_PARTITION), header(r, SOURCE_OFFSET)) {
        headers.push((
            REDRIVEN_SOURCE.into(),
            format!("{source}:{p}:{o}").into_bytes(),
        ));
    }
    if header(r, REASON) != Some("agent_failed") {
        let out = Output {
            topic: source.to_string(),
            key: r.key.clone(),
            payload: r.payload.to_vec(),
            headers,
        };
        return Ok((out, format!("republished to {source}")));
    }
    if headers
        .iter()
        .any(|(k, _)| k == crate::workflow::STEP_HEADER)
    {
        return Err(
            "a workflow step: its run has moved on; republish the run's event instead".into(),
        );
    }
    let ev = crate::codec::decode(r.view(), &l.schemas).map_err(|e| e.to_string())?;
    let mut task: crate::records::TaskData =
        serde_json::from_value(ev.data.clone().unwrap_or(Value::Null))
            .map_err(|e| format!("not a task: {e}"))?;
    let old = task.task_id.clone();
    task.task_id = format!("{old}-redrive-{}-{}", first.0, first.1);
    let mut again = CloudEvent::new(task.task_id.clone(), &ev.source, &ev.ty)
        .with_typed_data(&task)
        .map_err(|e| e.to_string())?;
    again.subject = ev.subject.clone();
    again.time = ev.time.clone();
    again.extensions = ev.extensions.clone();
    // Encoded as the topic is (JSON or Avro), with its content type; the original's other headers
    // ride along.
    let emitter = crate::records::Emitter::new(l.schemas.clone(), l.topics.clone());
    let mut out = emitter.emit(source, &again).map_err(|e| e.to_string())?;
    out.key = r.key.clone();
    for (k, v) in headers {
        if !out.headers.iter().any(|(x, _)| *x == k) {
            out.headers.push((k, v));
        }
    }
    Ok((
        out,
        format!("{old} runs again as {} on {source}", task.task_id),
    ))
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), String> {
    let l = ctx.load_noting()?;
    match args.command {
        DlqCommand::List { filter, json } => {
            let l2 = l.clone();
            let since = filter.since.as_deref().map(since_time).transpose()?;
            let f2 = filter.clone();
            let all =
                tokio::task::spawn_blocking(move || read_dlq(&l2, |r| selects(&f2, since, r)))
                    .await
                    .map_err(|e| e.to_string())??;
            // Read through the filter already: only its limit is left.
            let recs: Vec<&Input> = all.iter().take(filter.limit).collect();
            for r in &recs {
                let s = summary(r);
                if json {
                    println!("{s}");
                } else {
                    println!(
                        "{}@{:<6} {} {:<9} {:<22} from {}[{}]@{} key={}  {}",
                        r.partition,
                        r.offset,
                        s["time"].as_str().unwrap_or("-"),
                        s["stage"].as_str().unwrap_or("-"),
                        s["reason"].as_str().unwrap_or("-"),
                        s["source"]["topic"].as_str().unwrap_or("-"),
                        s["source"]["partition"].as_str().unwrap_or("-"),
                        s["source"]["offset"].as_str().unwrap_or("-"),
                        s["key"].as_str().unwrap_or("-"),
                        s["detail"]
                            .as_str()
                            .unwrap_or("")
                            .chars()
                            .take(120)
                            .collect::<String>()
                    );
                }
            }
            if !json {
                println!("{} dead letters", recs.len());
            }
            Ok(())
        }
        DlqCommand::Redrive {
            filter,
            dry_run,
            again,
        } => {
            let conn = crate::store::RedisConn::from_config(&l.config.redis)
                .map_err(|e| format!("redis.url: {e}"))?;
            // What was redriven before is remembered in Redis: one that lost its state would have
            // everything of the last 30 days sent again.
            let epoch = match crate::store::read_epoch(&conn, &l.config.redis.key_prefix).await {
                Ok(Some(e)) => e,
                Ok(None) => return Err("Redis has no epoch marker (it lost its state, or switchyard never ran against it): run `switchyard recover` first — what was redriven before is remembered only in Redis".into()),
                Err(e) => return Err(format!("cannot reach Redis to see what was redriven before: {e}")),
            };
            // What was redriven before a recovery is not remembered (recover rebuilds no redrive
            // marks): dead letters from before it are sent only with --again.
            let epoch_began = crate::store::epoch_began_ms(&epoch);
            let l2 = l.clone();
            // Every dead letter: copies of one task's failure and redriven copies are told over
            // the whole topic.
            let all = tokio::task::spawn_blocking(move || read_dlq(&l2, |_| true))
                .await
                .map_err(|e| e.to_string())??;
            // The first dead letter of each failed task, over the whole topic (whatever the
            // filter): its id names the redriven task, so copies and repeated runs agree.
            let mut first_of: std::collections::HashMap<String, (i32, i64)> = Default::default();
            for r in &all {
                if let Some(task) = failed_task(&l, r) {
                    first_of.entry(task).or_insert((r.partition, r.offset));
                }
            }
            // A dead letter redriven before whose copy failed again (the copy's dead letter names
            // it in `switchyard.redriven.from`) is not redriven again: only its newest copy is, or
            // every run would double them. The header is believed only of a genuine copy
            // ([`copy_of`]): whoever writes to an input topic could set it to hide another
            // dead letter from redrives.
            let at: std::collections::HashMap<String, &Input> = all
                .iter()
                .map(|r| (format!("{}@{}", r.partition, r.offset), r))
                .collect();
            let redriven: std::collections::HashMap<String, (i32, i64)> = all
                .iter()
                .filter_map(|r| {
                    let from = header(r, REDRIVEN_FROM)?;
                    copy_of(&l, r, at.get(from)?)
                        .then(|| (from.to_string(), (r.partition, r.offset)))
                })
                .collect();
            let recs = select(&all, &filter)?;
            let producer =
                Producer::new(&producer_config(&l.config.kafka)).map_err(|e| e.to_string())?;
            let reader = crate::kafka::read::RecordReader::new(&l.config.kafka)?;
            let (mut sent, mut skipped) = (0, 0);
            // Copies of one task's failure redrive once (under the first one's id).
            let mut done: std::collections::HashSet<String> = Default::default();
            for r in recs {
                if let Some((p, o)) = redriven.get(&format!("{}@{}", r.partition, r.offset)) {
                    skipped += 1;
                    println!(
                        "dlq {}@{}: skipped: redriven before; its copy failed again as dlq {p}@{o}",
                        r.partition, r.offset
                    );
                    continue;
                }
                let first = match failed_task(&l, r) {
                    Some(task) => {
                        let f = first_of
                            .get(&task)
                            .copied()
                            .unwrap_or((r.partition, r.offset));
                        if !done.insert(task.clone()) {
                            skipped += 1;
                            println!(
                                "dlq {}@{}: skipped: a copy of dlq {}@{} (task {task})",
                                r.partition, r.offset, f.0, f.1
                            );
                            continue;
                        }
                        f
                    }
                    None => (r.partition, r.offset),
                };
                // Remembered by the first dead letter of its task (copies share it).
                let marker = redriven_key(&l, first.0, first.1);
                let dead_lettered_ms = header(r, TIME)
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.timestamp_millis());
                if !again && matches!((dead_lettered_ms, epoch_began), (Some(t), Some(e)) if t < e)
                {
                    skipped += 1;
                    println!(
                        "dlq {}@{}: skipped: dead-lettered before Redis's state was rebuilt, which does not remember what was redriven before (--again sends it)",
                        r.partition, r.offset
                    );
                    continue;
                }
                if !again && !dry_run {
                    // Claimed before sending: two runs at once send it once. The claim lasts
                    // minutes (a run killed meanwhile leaves no lasting mark); a sent one is
                    // remembered for 30 days.
                    let mut c = conn.get().await.map_err(|e| {
                        format!("cannot reach Redis to see what was redriven before: {e}")
                    })?;
                    let claimed: Option<String> = redis::cmd("SET")
                        .arg(&marker)
                        .arg(format!("{BEING_SENT} {}", crate::event::now_rfc3339()))
                        .arg("NX")
                        .arg("EX")
                        .arg(CLAIM_SECONDS)
                        .query_async(&mut c)
                        .await
                        .map_err(|e| format!("cannot note what is redriven: {e}"))?;
                    if claimed.is_none() {
                        let when: Option<String> = redis::cmd("GET")
                            .arg(&marker)
                            .query_async(&mut c)
                            .await
                            .map_err(|e| format!("cannot read what was redriven before: {e}"))?;
                        skipped += 1;
                        let when = when.unwrap_or_default();
                        if when.starts_with(BEING_SENT) {
                            println!(
                                "dlq {}@{}: skipped: another run is sending it ({when})",
                                r.partition, r.offset
                            );
                        } else {
                            println!(
                                "dlq {}@{}: skipped: redriven before ({when}; --again sends it again)",
                                r.partition, r.offset
                            );
                        }
                        continue;
                    }
                } else if !again {
                    let mut c = conn.get().await.map_err(|e| {
                        format!("cannot reach Redis to see what was redriven before: {e}")
                    })?;
                    let when: Option<String> = redis::cmd("GET")
                        .arg(&marker)
                        .query_async(&mut c)
                        .await
                        .map_err(|e| format!("cannot read what was redriven before: {e}"))?;
                    if let Some(when) = when {
                        skipped += 1;
                        println!(
                            "dlq {}@{}: skipped: redriven before ({when}; --again sends it again)",
                            r.partition, r.offset
                        );
                        continue;
                    }
                }
                // What was claimed above and then not sent is let go again.
                let unclaim = || async {
                    if !again && !dry_run {
                        if let Ok(mut c) = conn.get().await {
                            let _ = redis::cmd("DEL")
                                .arg(&marker)
                                .query_async::<()>(&mut c)
                                .await;
                        }
                    }
                };
                // Only a dead letter whose source record is there, the same key, bytes and
                // headers: one written straight to the dead-letter topic (its headers say
                // anything) is not sent on with the operator's credentials.
                if let Err(why) = genuine(&reader, r) {
                    unclaim().await;
                    skipped += 1;
                    println!("dlq {}@{}: skipped: {why}", r.partition, r.offset);
                    continue;
                }
                match redrive_record(&l, r, first) {
                    Ok((out, what)) => {
                        if !dry_run {
                            if let Err(e) = producer.send(&out).await {
                                unclaim().await;
                                return Err(format!(
                                    "dlq {}@{}: producing failed: {e}",
                                    r.partition, r.offset
                                ));
                            }
                            // Remembered, so the next run does not send it again (a failure
                            // here is said: the record is sent, a repeat run would send it again).
                            let mark = async {
                                let mut c = conn.get().await.map_err(|e| e.to_string())?;
                                redis::cmd("SET")
                                    .arg(&marker)
                                    .arg(crate::event::now_rfc3339())
                                    .arg("EX")
                                    .arg(REDRIVEN_KEEP_SECONDS)
                                    .query_async::<()>(&mut c)
                                    .await
                                    .map_err(|e| e.to_string())
                            };
                            if let Err(e) = mark.await {
                                eprintln!(
                                    "dlq {}@{}: redriven, but not remembered as such ({e}): a repeated redrive sends it again",
                                    r.partition, r.offset
                                );
                            }
                        }
                        sent += 1;
                        println!("dlq {}@{}: {what}", r.partition, r.offset);
                    }
                    Err(why) => {
                        unclaim().await;
                        skipped += 1;
                        println!("dlq {}@{}: skipped: {why}", r.partition, r.offset);
                    }
                }
            }
            println!(
                "{} {sent} dead letters, skipped {skipped}",
                if dry_run { "would redrive" } else { "redrove" }
            );
            Ok(())
        }
    }
}
