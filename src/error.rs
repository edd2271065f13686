//! The error taxonomy of the data path: what went wrong with one record decides whether it goes to
//! the dead-letter topic, is retried, or stops the stage — in one place.
//!
//! Stores, decoders and encoders have their own error types; each converts into [`ProcessError`]
//! here (or next to the type, for types of modules above this one), so a stage writes `?` and the
//! classification is never repeated by hand.

/// What went wrong processing one record; decides dead-letter, retry or stop.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProcessError {
    /// The record can never be processed: it goes to the dead-letter topic and the partition moves on.
    #[error("{reason}: {detail}")]
    Poison {
        /// Bounded label: the dead-letter reason header and the metric label.
        reason: &'static str,
        detail: String,
    },
    /// A dependency is unavailable: the same record is retried after a backoff, never skipped.
    #[error("transient: {0}")]
    Transient(String),
    /// A bug or misconfiguration: the stage stops without committing past the record.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl ProcessError {
    /// A record that can never be processed, with a bounded `reason` label.
    pub fn poison(reason: &'static str, detail: impl Into<String>) -> Self {
        ProcessError::Poison {
            reason,
            detail: detail.into(),
        }
    }

    /// Adds what was being done to the message (`context snapshot: redis: ...`).
    pub fn context(self, what: &str) -> Self {
        match self {
            ProcessError::Poison { reason, detail } => ProcessError::Poison {
                reason,
                detail: format!("{what}: {detail}"),
            },
            ProcessError::Transient(m) => ProcessError::Transient(format!("{what}: {m}")),
            ProcessError::Fatal(m) => ProcessError::Fatal(format!("{what}: {m}")),
        }
    }
}

/// A failure of a store (Redis, or its in-memory twin).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// The store is unreachable or answered with an error: worth retrying.
    #[error("redis: {0}")]
    Redis(String),
    /// Stored data cannot be read: retrying will not help.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// Redis lost its state (the epoch marker is gone, or on a Redis Cluster some of its shard
    /// markers): nothing may use it until `switchyard recover` rebuilt it from Kafka.
    #[error("redis lost its state (its epoch marker is gone): run `switchyard recover`")]
    Lost,
}

impl StoreError {
    pub fn corrupt(what: &str, e: impl std::fmt::Display) -> Self {
        StoreError::Corrupt(format!("{what}: {e}"))
    }
}

impl From<redis::RedisError> for StoreError {
    /// A reply of the wrong shape is stored data that cannot be read, and a script that fails while
    /// running (`ERR user_script:<line>: ...`, or `WRONGTYPE` from a command it calls) fails the
    /// same way for the same data — retrying either would hold its partition for ever; anything
    /// else (a timeout, a dropped connection, another error reply) is worth retrying. Redis names
    /// the script in every error raised inside one, also a passing state of the server (`OOM` at
    /// `maxmemory`, `READONLY` after a failover, `LOADING`, `BUSY`, `MASTERDOWN`, `CLUSTERDOWN`,
    /// `TRYAGAIN`, ...): those are retried, never dead-lettered as corrupt state.
    fn from(e: redis::RedisError) -> Self {
        match e.kind() {
            redis::ErrorKind::UnexpectedReturnType => StoreError::Corrupt(e.to_string()),
            _ if script_fault(e.code(), &e.to_string()) => {
                StoreError::Corrupt(format!("a store script failed: {e}"))
            }
            _ => StoreError::Redis(e.to_string()),
        }
    }
}

/// Whether an error reply with `code` and text `message` is a script failing on its data (see
/// `From<redis::RedisError>`).
pub fn script_fault(code: Option<&str>, message: &str) -> bool {
    // Redis before 7 wraps an error a command raised inside a script as `ERR Error running script
    // ... -READONLY ...`: the wrapped code decides.
    const PASSING: [&str; 9] = [
        "-READONLY",
        "-OOM",
        "-LOADING",
        "-BUSY",
        "-MASTERDOWN",
        "-CLUSTERDOWN",
        "-TRYAGAIN",
        "-NOREPLICAS",
        "-MISCONF",
    ];
    matches!(code, Some("ERR" | "WRONGTYPE"))
        && message.contains("user_script:")
        && !PASSING.iter().any(|p| message.contains(p))
}

/// Redis being unreachable is transient (retry the record); stored data that cannot be read will not
/// get better by retrying, so it dead-letters the record instead of blocking its partition.
impl From<StoreError> for ProcessError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt(d) => ProcessError::poison("corrupt_state", d),
            e @ (StoreError::Redis(_) | StoreError::Lost) => ProcessError::Transient(e.to_string()),
        }
    }
}

/// A record switchyard built cannot be serialised: a bug, so the stage stops.
impl From<serde_json::Error> for ProcessError {
    fn from(e: serde_json::Error) -> Self {
        ProcessError::Fatal(format!("cannot serialise a record: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_are_classified_once() {
        assert!(matches!(
            ProcessError::from(StoreError::Redis("down".into())),
            ProcessError::Transient(_)
        ));
        assert!(matches!(
            ProcessError::from(StoreError::Corrupt("x".into())),
            ProcessError::Poison {
                reason: "corrupt_state",
                ..
            }
        ));
        let e = ProcessError::from(StoreError::Corrupt("bad json".into())).context("budget");
        assert_eq!(e.to_string(), "corrupt_state: budget: bad json");
        // What Redis 7 answers (redis-server 7.0, checked): a script's own failure, and passing
        // states of the server raised inside a script.
        for (code, message, fault) in [
            ("ERR", "user_script:1: attempt to index local 'x' (a nil value) script: cf0e, on @user_script:1.", true),
            ("WRONGTYPE", "Operation against a key holding the wrong kind of value script: 5d88, on @user_script:3.", true),
            ("OOM", "command not allowed when used memory > 'maxmemory'. script: 0a9f, on @user_script:1.", false),
            ("READONLY", "You can't write against a read only replica. script: 0a9f, on @user_script:1.", false),
            ("CLUSTERDOWN", "The cluster is down script: 0a9f, on @user_script:1.", false),
            ("ERR", "max number of clients reached", false),
            // Redis 6: a command's error inside a script, wrapped.
            ("ERR", "Error running script (call to f_0a9f): @user_script:1: @user_script: 1: -READONLY You can't write against a read only replica.", false),
            ("ERR", "Error running script (call to f_cf0e): @user_script:1: user_script:1: attempt to index a nil value", true),
        ] {
            assert_eq!(script_fault(Some(code), message), fault, "{code} {message}");
        }
    }
}
