//! The data format marker: which layout of Redis state and records the instances sharing a Redis
//! write, so that an older instance never reads what a newer one wrote in a way it would misread.
//!
//! A build writes [`DATA_FORMAT`]. `switchyard run` (and `switchyard recover`) raise the marker
//! `<prefix>:format` to it when they start, never lower it, and refuse to start when it is higher:
//! a newer build uses this Redis. A running instance looks again every second
//! ([`watch_format`]); when a newer build has raised the marker, it stops, draining what it holds,
//! and exits non-zero. So in a rolling upgrade across a format change the older instances step
//! aside as soon as the first newer one starts, before any of them can take over a partition whose
//! state the newer one wrote.
//!
//! Raise [`DATA_FORMAT`] with any change an older build would misread: a memo or field it would
//! take for something else, a record it would decode wrongly. Builds before the marker (before
//! format 1) do not look at it: stop them before starting a newer one.

use std::time::Duration;

use redis::Script;
use tokio_util::sync::CancellationToken;

use crate::store::{RedisConn, StoreError};

/// The data format this build writes.
///
/// 1: memo slots in the resources' hashes (a finished task's outcome and a decided proposal's
/// decision kept in the hash until later writes take the slot; the applied-offset fence per
/// input partition) — what builds before the marker read as "finished, memo gone" and skip.
pub const DATA_FORMAT: u64 = 1;

/// The marker's key.
pub fn format_key(prefix: &str) -> String {
    format!("{prefix}:format")
}

/// Raises the marker to `ours` unless it is higher (a value that is not a number is replaced);
/// returns the format now in place.
const CLAIM: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local ours = tonumber(ARGV[1])
if cur < ours then
  redis.call('SET', KEYS[1], ARGV[1])
  return ours
end
return cur
";

/// Raises the marker to this build's format unless a newer build set it higher; returns the
/// format in place (this build's, or a newer one's).
pub async fn claim(conn: &RedisConn, prefix: &str) -> Result<u64, StoreError> {
    claim_as(conn, prefix, DATA_FORMAT).await
}

/// [`claim`] for the format `ours` (tests stand in for other builds with it).
pub async fn claim_as(conn: &RedisConn, prefix: &str, ours: u64) -> Result<u64, StoreError> {
    let mut c = conn.get_unguarded().await?;
    let n: i64 = Script::new(CLAIM)
        .key(format_key(prefix))
        .arg(ours)
        .invoke_async(&mut c)
        .await?;
    Ok(u64::try_from(n).unwrap_or(0))
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

/// Claims the marker at start: `Err` with the reason when a newer build set it. A Redis that does
/// not answer yet is not a refusal: [`watch_format`] keeps looking.
pub async fn check_at_start(conn: &RedisConn, prefix: &str) -> Result<(), String> {
    match claim(conn, prefix).await {
        Ok(found) if found > DATA_FORMAT => Err(newer_message(prefix, found)),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot check Redis's data format marker yet; checking again every second.");
            Ok(())
        }
    }
}

/// Claims the marker every `every` until `stop` (a Redis that lost its data gets it back). When a
/// newer build raised it, logs why, cancels `stop` and returns the reason.
pub async fn watch_format(
    conn: RedisConn,
    prefix: String,
    every: Duration,
    stop: CancellationToken,
) -> Option<String> {
    loop {
        match claim(&conn, &prefix).await {
            Ok(found) if found > DATA_FORMAT => {
                let why = newer_message(&prefix, found);
                tracing::error!("Stopping: {why}.");
                stop.cancel();
                return Some(why);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "Reading the data format marker failed; retrying.")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
