//! The data format marker: which layout of Redis state and records the instances sharing a Redis
//! write, so that an older instance never reads what a newer one wrote in a way it would misread.
//!
//! A build writes [`DATA_FORMAT`]. `switchyard run` (and `switchyard recover`) raise the marker
//! `<prefix>:format` to it, never lowering it, and refuse to start when it is higher: a newer build
//! uses this Redis. A running instance looks again every second ([`watch_format`]); when a newer
//! build has raised the marker, it stops, draining what it holds, and exits non-zero. Its stages
//! start only after its own first claim has been answered, and an instance that raised the marker
//! from an older format waits a little longer (two looks of the older ones) before its stages start.
//! So in a rolling upgrade across a format change the older instances step aside as soon as the
//! first newer one starts, before any of them can take over a partition whose state the newer one
//! wrote. `switchyard approvals approve|reject`, which write a resource's state, refuse too.
//!
//! Raise [`DATA_FORMAT`] with any change an older build would misread: a memo or field it would
//! take for something else, a record it would decode wrongly. Builds without the marker (before
//! 6fbfcb3) do not look at it, and those before memo slots (3113e27) misread format 1: stop them
//! before the first build with the marker starts. The marker goes with Redis's data: an emptied
//! Redis refuses no build until one that has the marker writes it again.

use std::time::Duration;

use redis::Script;
use tokio_util::sync::CancellationToken;

use crate::store::{RedisConn, StoreError};

/// The data format this build writes.
///
/// 1: memo slots in the resources' hashes (a finished task's outcome and a decided proposal's
/// decision kept in the hash until later writes take the slot; the applied-offset fence per
/// input partition) — what builds before memo slots read as "finished, memo gone" and skip.
/// 2: an approval's decision leaves sending its action to resolve (a release on the proposals
/// topic): an approved approval's stored action has no fencing token until resolve sends it —
/// which older builds would send again themselves, with token 0, and whose release they
/// dead-letter.
pub const DATA_FORMAT: u64 = 2;

/// How often a running instance looks at the marker.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);

/// The marker's key.
pub fn format_key(prefix: &str) -> String {
    format!("{prefix}:format")
}

/// Raises the marker to `ours` unless it is higher (a value that is not a number counts as 0);
/// returns the marker before and after.
const CLAIM: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local ours = tonumber(ARGV[1])
if cur < ours then
  redis.call('SET', KEYS[1], ARGV[1])
  return {cur, ours}
end
return {cur, cur}
";

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    /// The marker before (0: none).
    pub before: u64,
    /// The marker now: this build's format, or a newer build's.
    pub now: u64,
}

impl Claimed {
    /// A newer build set the marker: this one may not run.
    pub fn newer(&self) -> bool {
        self.now > DATA_FORMAT
    }

    /// This claim raised the marker from an older format that had one: instances of that format
    /// may still be running, and stop at their next look.
    pub fn raised_from_older(&self) -> bool {
        self.before > 0 && self.before < self.now
    }
}

/// Raises the marker to this build's format unless a newer build set it higher.
pub async fn claim(conn: &RedisConn, prefix: &str) -> Result<Claimed, StoreError> {
    claim_as(conn, prefix, DATA_FORMAT).await
}

/// [`claim`] for the format `ours` (tests stand in for other builds with it).
pub async fn claim_as(conn: &RedisConn, prefix: &str, ours: u64) -> Result<Claimed, StoreError> {
    let mut c = conn.get_unguarded().await?;
    let (before, now): (i64, i64) = Script::new(CLAIM)
        .key(format_key(prefix))
        .arg(ours)
        .invoke_async(&mut c)
        .await?;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(Claimed {
        before: n(before),
        now: n(now),
    })
}

/// The marker, when there is one (not a number: 0).
pub async fn read(conn: &RedisConn, prefix: &str) -> Result<Option<u64>, StoreError> {
    let mut c = conn.get_unguarded().await?;
    let v: Option<String> = redis::cmd("GET")
        .arg(format_key(prefix))
        .query_async(&mut c)
        .await?;
    Ok(v.map(|v| v.trim().parse().unwrap_or(0)))
}

/// Why this build may not use a Redis whose marker says `found`.
pub fn newer_message(prefix: &str, found: u64) -> String {
    format!(
        "a newer switchyard uses this Redis: its data format marker ({}) is {found}, this build \
         writes {DATA_FORMAT} and could misread what the newer one wrote; run the newer build here \
         (see the README, \"Upgrading\")",
        format_key(prefix)
    )
}

/// Refuses when the marker says a newer build uses this Redis (reads it; claims nothing): for
/// commands that write state.
pub async fn refuse_newer(conn: &RedisConn, prefix: &str) -> Result<(), String> {
    match read(conn, prefix).await.map_err(|e| e.to_string())? {
        Some(found) if found > DATA_FORMAT => Err(newer_message(prefix, found)),
        _ => Ok(()),
    }
}

/// Claims the marker at start: `Err` with the reason when a newer build set it. A Redis that does
/// not answer yet is not a refusal: [`watch_format`] keeps trying, and the stages wait for it.
pub async fn check_at_start(conn: &RedisConn, prefix: &str) -> Result<(), String> {
    match claim(conn, prefix).await {
        Ok(c) if c.newer() => Err(newer_message(prefix, c.now)),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot check Redis's data format marker yet; the stages wait until it answers.");
            Ok(())
        }
    }
}

/// Claims the marker every `every` until `stop` (a Redis that lost its data gets it back), and
/// cancels `ready` once a claim has been answered (after `settle` more when that claim raised the
/// marker from an older format, so that instances of it have looked). When a newer build raised
/// it, logs why, cancels `stop` and returns the reason.
pub async fn watch_format(
    conn: RedisConn,
    prefix: String,
    (every, settle): (Duration, Duration),
    ready: CancellationToken,
    stop: CancellationToken,
) -> Option<String> {
    let mut failing_since: Option<std::time::Instant> = None;
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        match claim(&conn, &prefix).await {
            Ok(c) if c.newer() => {
                let why = newer_message(&prefix, c.now);
                tracing::error!("Stopping: {why}.");
                stop.cancel();
                return Some(why);
            }
            Ok(c) => {
                failing_since = None;
                if !ready.is_cancelled() {
                    if c.raised_from_older() {
                        tracing::warn!(
                            from = c.before,
                            to = c.now,
                            "Raised the data format marker; instances of the older format stop at their next look. Starting the stages shortly."
                        );
                        tokio::select! {
                            _ = stop.cancelled() => return None,
                            _ = tokio::time::sleep(settle) => {}
                        }
                    }
                    ready.cancel();
                }
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_secs(5)
                    && last_warning.is_none_or(|w| w.elapsed() > Duration::from_secs(30))
                {
                    tracing::warn!(error = %e, "Cannot read the data format marker; a newer build starting now would not be noticed until it answers.");
                    last_warning = Some(std::time::Instant::now());
                } else {
                    tracing::debug!(error = %e, "Reading the data format marker failed; retrying.");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
