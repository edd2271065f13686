//! Topic ids: which incarnation of a topic a record was read from.
//!
//! Offsets alone do not name a record: a topic deleted and created again under the same name
//! starts at offset 0 once more. The stages' fences (the agents' `_a:<topic>:<partition>`, resolve's
//! `applied:<partition>`) remember the last offset applied; read against a new incarnation they
//! would take its first records for ones already applied and acknowledge them with no output. So
//! each fence also notes the topic id (Kafka's UUID, KIP-516) it was written for, and a fence of
//! another incarnation does not apply. The consumer runtime asks for the ids when partitions are
//! assigned ([`describe`]); a broker that gives none (before Kafka 2.8) leaves the fences as they
//! were.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;

/// The ids of `topics` (lower-case hex, 32 digits) as the cluster knows them now, asked through
/// the client `rk`: a topic the broker gives no id for (or an all-zero one), or one it could not
/// describe, is left out. Blocks for at most `timeout`.
///
/// # Safety
/// `rk` must be a live librdkafka client handle for the whole call.
pub unsafe fn describe(
    rk: *mut rd::rd_kafka_t,
    topics: &[&str],
    timeout: Duration,
) -> Result<HashMap<String, String>, String> {
    let names: Vec<CString> = topics
        .iter()
        .filter_map(|t| CString::new(*t).ok())
        .collect();
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let mut ptrs: Vec<*const std::os::raw::c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY (whole block): `rk` is live (the caller's promise); every object made here is
    // destroyed before returning, the event only after the descriptions read from it are copied.
    let queue = rd::rd_kafka_queue_new(rk);
    if queue.is_null() {
        return Err("librdkafka made no queue".into());
    }
    let coll = rd::rd_kafka_TopicCollection_of_topic_names(ptrs.as_mut_ptr(), ptrs.len());
    let opts = rd::rd_kafka_AdminOptions_new(
        rk,
        rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
    );
    if !opts.is_null() {
        let mut err = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(opts, ms, err.as_mut_ptr(), err.len());
    }
    rd::rd_kafka_DescribeTopics(rk, coll, opts, queue);
    let deadline = Instant::now() + timeout;
    let mut out = Err(format!("no answer within {} ms", timeout.as_millis()));
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev =
            rd::rd_kafka_queue_poll(queue, i32::try_from(left.as_millis()).unwrap_or(i32::MAX));
        if ev.is_null() {
            break;
        }
        let res = rd::rd_kafka_event_DescribeTopics_result(ev);
        if res.is_null() {
            rd::rd_kafka_event_destroy(ev);
            if left.is_zero() {
                break;
            }
            continue;
        }
        if rd::rd_kafka_event_error(ev) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let s = rd::rd_kafka_event_error_string(ev);
            let why = if s.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            };
            out = Err(why);
        } else {
            let mut n = 0usize;
            let descs = rd::rd_kafka_DescribeTopics_result_topics(res, &mut n);
            let mut ids = HashMap::new();
            for i in 0..n {
                let d = *descs.add(i);
                if d.is_null() || !rd::rd_kafka_TopicDescription_error(d).is_null() {
                    continue;
                }
                let name = rd::rd_kafka_TopicDescription_name(d);
                let uuid = rd::rd_kafka_TopicDescription_topic_id(d);
                if name.is_null() || uuid.is_null() {
                    continue;
                }
                let hi = rd::rd_kafka_Uuid_most_significant_bits(uuid);
                let lo = rd::rd_kafka_Uuid_least_significant_bits(uuid);
                if hi == 0 && lo == 0 {
                    continue;
                }
                ids.insert(
                    CStr::from_ptr(name).to_string_lossy().into_owned(),
                    format!("{:016x}{:016x}", hi as u64, lo as u64),
                );
            }
            out = Ok(ids);
        }
        rd::rd_kafka_event_destroy(ev);
        break;
    }
    if !opts.is_null() {
        rd::rd_kafka_AdminOptions_destroy(opts);
    }
    if !coll.is_null() {
        rd::rd_kafka_TopicCollection_destroy(coll);
    }
    rd::rd_kafka_queue_destroy(queue);
    out
}

/// Whether a fence written for incarnation `stored` of a topic partition applies to a record of
/// incarnation `mine` (each `""` when unknown): only two known, different ids tell that the topic
/// was created again since.
pub fn same_incarnation(stored: Option<&str>, mine: &str) -> bool {
    match stored {
        Some(s) if !s.is_empty() && !mine.is_empty() => s == mine,
        _ => true,
    }
}

/// A fence's note of where its offsets are from when its key does not name the topic (resolve's
/// `applied_in:<partition>`): `<topic>~<id>`, or `<topic>` when the id is unknown.
pub fn source(topic: &str, id: Option<&str>) -> String {
    match id.filter(|i| !i.is_empty()) {
        Some(id) => format!("{topic}~{id}"),
        None => topic.to_string(),
    }
}

/// Whether a fence noted for `stored` (a [`source`]; none from builds before it) applies to a
/// record from `mine`: the same topic, and not two known, different ids of it.
pub fn same_source(stored: Option<&str>, mine: &str) -> bool {
    let Some(stored) = stored else { return true };
    let split = |s: &str| -> (String, String) {
        match s.split_once('~') {
            Some((t, i)) => (t.to_string(), i.to_string()),
            None => (s.to_string(), String::new()),
        }
    };
    let ((st, si), (mt, mi)) = (split(stored), split(mine));
    st == mt && same_incarnation(Some(&si), &mi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_applies_to_its_own_incarnation_only() {
        assert!(same_incarnation(None, "ab"));
        assert!(same_incarnation(Some(""), "ab"));
        assert!(same_incarnation(Some("ab"), ""));
        assert!(same_incarnation(Some("ab"), "ab"));
        assert!(!same_incarnation(Some("ab"), "cd"));

        assert_eq!(source("proposals", Some("ab")), "proposals~ab");
        assert_eq!(source("proposals", Some("")), "proposals");
        assert!(same_source(None, "proposals~ab"), "noted by an older build");
        assert!(same_source(Some("proposals~ab"), "proposals~ab"));
        assert!(
            same_source(Some("proposals"), "proposals~ab"),
            "id unknown then"
        );
        assert!(
            same_source(Some("proposals~ab"), "proposals"),
            "id unknown now"
        );
        assert!(
            !same_source(Some("proposals~ab"), "proposals~cd"),
            "created again"
        );
        assert!(
            !same_source(Some("proposals~ab"), "proposals2~ab"),
            "another topic"
        );
        assert!(
            !same_source(Some("proposals"), "proposals2"),
            "another topic"
        );
    }
}
