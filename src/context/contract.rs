//! The contract every [`ContextStore`] meets; run against the memory store (unit test) and Redis
//! (integration test).
#![doc(hidden)]

use serde_json::json;

use super::{
    CommitResult, ContextConfig, ContextStore, Fact, Outcome, Prior, ResourceKey, Snapshot,
};
use crate::records::AgentResponse;
use crate::store::Place;

pub fn config() -> ContextConfig {
    ContextConfig {
        ttl_seconds: 3600,
        max_events: 3,
        remember_tasks: 3,
        outcome_ttl_seconds: None,
        ..Default::default()
    }
}

fn fact(v: serde_json::Value, by: &str) -> Fact {
    Fact {
        value: v,
        by: by.into(),
        task_id: "t".into(),
        at: "2026-01-01T00:00:00Z".into(),
    }
}

fn outcome(status: &str) -> Outcome {
    Outcome {
        status: status.into(),
        attempts: 1,
        duration_ms: 5,
        context_version: 0,
        response: AgentResponse::default(),
        error: None,
        refusals: vec![],
        at: "2026-01-01T00:00:00Z".into(),
        ran: None,
        ..Default::default()
    }
}

/// Runs every contract check; `ns` keeps runs apart (use a fresh value per run).
pub async fn run_all<S: ContextStore>(store: &S, ns: &str) {
    let a = ResourceKey::new(format!("{ns}-tenant"), "svc-a");
    let b = ResourceKey::new(format!("{ns}-tenant"), "svc-b");
    let other_tenant = ResourceKey::new(format!("{ns}-other"), "svc-a");

    // Empty resource: version 0, nothing known.
    let s = store.snapshot(&a).await.expect("snapshot");
    assert_eq!(s.version, 0);
    assert!(s.facts.is_empty());
    assert_eq!(store.read(&a, "t1").await.expect("read").0, Prior::New);

    // A commit with facts bumps the version and is visible immediately.
    let r = store
        .commit(
            &a,
            "t1",
            &[("deployment".into(), fact(json!({"v": 2}), "deploy-guard"))],
            Some(&json!({"id": "e1"})),
            &outcome("succeeded"),
            None,
        )
        .await
        .expect("commit");
    assert_eq!(
        r,
        CommitResult::Applied {
            version: 1,
            kept: false
        }
    );
    let s = store.snapshot(&a).await.expect("snapshot");
    assert_eq!(s.version, 1);
    assert_eq!(s.facts["deployment"].value, json!({"v": 2}));
    assert_eq!(s.facts["deployment"].by, "deploy-guard");
    assert_eq!(s.recent_events, vec![json!({"id": "e1"})]);

    // The same task again: recognised, nothing changes.
    let r = store
        .commit(
            &a,
            "t1",
            &[("deployment".into(), fact(json!({"v": 3}), "x"))],
            None,
            &outcome("succeeded"),
            None,
        )
        .await
        .expect("commit");
    assert!(matches!(r, CommitResult::AlreadyRecorded(o) if o.status == "succeeded"));
    assert_eq!(store.snapshot(&a).await.expect("snapshot").version, 1);
    // The combined read sees the same outcome and context.
    let (o, snap) = store.read(&a, "t1").await.expect("read");
    assert!(matches!(o, Prior::Recorded(o) if o.status == "succeeded"));
    assert_eq!(snap.version, 1);
    let (none, _) = store.read(&a, "never-ran").await.expect("read");
    assert_eq!(none, Prior::New);

    // Once its input is committed, the outcome is forgotten; the task stays known as finished, and
    // committing it again (a zombie, an upstream copy) changes nothing.
    store
        .forget(&[(a.clone(), "t1".to_string())])
        .await
        .expect("forget");
    assert_eq!(store.read(&a, "t1").await.expect("read").0, Prior::Finished);
    let r = store
        .commit(
            &a,
            "t1",
            &[("deployment".into(), fact(json!({"v": 9}), "zombie"))],
            None,
            &outcome("succeeded"),
            None,
        )
        .await
        .expect("commit");
    assert_eq!(r, CommitResult::Finished);
    assert_eq!(store.snapshot(&a).await.expect("snapshot").version, 1);

    // A commit without facts records the outcome but keeps the version.
    let r = store
        .commit(
            &a,
            "t2",
            &[],
            Some(&json!({"id": "e2"})),
            &outcome("failed"),
            None,
        )
        .await
        .expect("commit");
    assert_eq!(
        r,
        CommitResult::Applied {
            version: 1,
            kept: false
        }
    );

    // Versions increase monotonically; later writes win per key.
    let r = store
        .commit(
            &a,
            "t3",
            &[
                ("deployment".into(), fact(json!({"v": 4}), "deploy-guard")),
                ("sla".into(), fact(json!({"active": true}), "sla-responder")),
            ],
            None,
            &outcome("succeeded"),
            None,
        )
        .await
        .expect("commit");
    assert_eq!(
        r,
        CommitResult::Applied {
            version: 2,
            kept: false
        }
    );
    let s = store.snapshot(&a).await.expect("snapshot");
    assert_eq!(s.facts["deployment"].value, json!({"v": 4}));
    assert_eq!(s.facts.len(), 2);
    assert_eq!(
        s.key_versions["deployment"], 2,
        "the version at which each key last changed"
    );
    assert_eq!(s.key_versions["sla"], 2);

    // Recent events: most recent first, capped, no duplicates.
    for i in 3..7 {
        store
            .commit(
                &a,
                &format!("e-t{i}"),
                &[],
                Some(&json!({"id": format!("e{i}")})),
                &outcome("succeeded"),
                None,
            )
            .await
            .expect("commit");
    }
    store
        .commit(
            &a,
            "e-dup",
            &[],
            Some(&json!({"id": "e6"})),
            &outcome("succeeded"),
            None,
        )
        .await
        .expect("commit");
    let s = store.snapshot(&a).await.expect("snapshot");
    assert_eq!(
        s.recent_events,
        vec![
            json!({"id": "e6"}),
            json!({"id": "e5"}),
            json!({"id": "e4"})
        ]
    );

    // Resources and tenants are isolated.
    assert_eq!(store.snapshot(&b).await.expect("snapshot").version, 0);
    assert_eq!(
        store
            .snapshot(&other_tenant)
            .await
            .expect("snapshot")
            .version,
        0
    );
    assert_eq!(
        store.read(&other_tenant, "t1").await.expect("read").0,
        Prior::New
    );

    // Only the last `remember_tasks` (3) finished tasks are remembered once forgotten.
    let done: Vec<(ResourceKey, String)> = ["e-t5", "e-t6", "e-dup", "t1", "t2", "t3"]
        .iter()
        .map(|t| (a.clone(), t.to_string()))
        .collect();
    store.forget(&done).await.expect("forget");
    // Pushed out of the full list but not forgotten: still recorded.
    assert_eq!(
        store.read(&a, "e-t4").await.expect("read").0,
        Prior::Recorded(Box::new(outcome("succeeded")))
    );
    assert_eq!(
        store.read(&a, "e-dup").await.expect("read").0,
        Prior::Finished
    );
    assert_eq!(store.read(&a, "t2").await.expect("read").0, Prior::New);

    memo_slot(store, ns).await;
}

fn place(partition: &str, offset: i64, delivered: i64) -> Place {
    Place {
        partition: partition.into(),
        offset,
        delivered,
        topic_id: String::new(),
    }
}

fn place_in(partition: &str, offset: i64, topic_id: &str) -> Place {
    Place {
        topic_id: topic_id.into(),
        ..place(partition, offset, -1)
    }
}

/// A task's outcome is kept in one of the resource's memo slots when one is free (empty, or holding
/// a delivered input of the same partition), else apart; a kept outcome is replayed for its own
/// record and anything not known delivered, and makes a copy of a delivered record finished.
async fn memo_slot<S: ContextStore>(store: &S, ns: &str) {
    let c = ResourceKey::new(format!("{ns}-tenant"), "svc-slot");
    let commit = |task: &'static str, p: Option<Place>| {
        let c = c.clone();
        async move {
            store
                .commit(&c, task, &[], None, &outcome(task), p.as_ref())
                .await
                .expect("commit")
        }
    };
    let kept = |r: CommitResult| match r {
        CommitResult::Applied { kept, .. } => kept,
        other => panic!("not applied: {other:?}"),
    };
    // An empty slot takes the outcome.
    assert!(kept(commit("s1", Some(place("tasks:0", 10, -1))).await));
    let (prior, _) = store.read(&c, "s1").await.expect("read");
    let Prior::Kept { outcome: o, input } = prior.clone() else {
        panic!("expected the kept outcome, got {prior:?}");
    };
    assert_eq!((o.status.as_str(), input.as_str()), ("s1", "tasks:0:10"));
    // Its own record again (a redelivery): replayed; a copy further down once the record is
    // delivered: finished; a copy by an instance that knows nothing delivered: replayed.
    assert!(matches!(
        prior
            .clone()
            .at(Some(&place("tasks:0", 10, 10)), &Snapshot::default()),
        Prior::Kept { .. }
    ));
    assert_eq!(
        prior
            .clone()
            .at(Some(&place("tasks:0", 12, 10)), &Snapshot::default()),
        Prior::Finished
    );
    assert!(matches!(
        prior
            .clone()
            .at(Some(&place("tasks:0", 12, 9)), &Snapshot::default()),
        Prior::Kept { .. }
    ));
    assert!(matches!(
        prior
            .clone()
            .at(Some(&place("tasks:1", 12, 99)), &Snapshot::default()),
        Prior::Kept { .. }
    ));
    assert!(matches!(
        prior.at(None, &Snapshot::default()),
        Prior::Kept { .. }
    ));
    // The same task committed again (a racing copy): the kept outcome.
    let again = commit("s1", Some(place("tasks:0", 10, -1))).await;
    assert!(matches!(again, CommitResult::AlreadyRecorded(o) if o.status == "s1"));
    // The second slot is empty: it takes the next one, whatever was delivered.
    assert!(kept(commit("s2", Some(place("tasks:0", 11, 9))).await));
    // Delivered up to 10: the slot of the outcome for 10 is taken; that task is finished.
    assert!(kept(commit("s3", Some(place("tasks:0", 12, 10))).await));
    assert_eq!(store.read(&c, "s1").await.expect("read").0, Prior::Finished);
    assert!(matches!(
        store.read(&c, "s2").await.expect("read").0,
        Prior::Kept { .. }
    ));
    // Neither slot's input delivered (11, 12): the next outcome goes apart.
    assert!(!kept(commit("s4", Some(place("tasks:0", 13, 10))).await));
    assert!(
        matches!(store.read(&c, "s4").await.expect("read").0, Prior::Recorded(o) if o.status == "s4")
    );
    // Another partition's input never frees a slot.
    assert!(!kept(commit("s5", Some(place("tasks:1", 14, 100))).await));
    assert!(matches!(
        store.read(&c, "s3").await.expect("read").0,
        Prior::Kept { .. }
    ));
    // What went apart is forgotten as before.
    store
        .forget(&[(c.clone(), "s4".to_string()), (c.clone(), "s5".to_string())])
        .await
        .expect("forget");
    assert_eq!(store.read(&c, "s4").await.expect("read").0, Prior::Finished);
    // Each partition's highest applied offset: a task at or below it with nothing kept finished
    // (its memo went only once delivered), beyond it or on another partition it is new.
    let (prior, snap) = store.read(&c, "never-kept").await.expect("read");
    assert_eq!(prior, Prior::New);
    assert_eq!(
        snap.applied,
        [("tasks:0".to_string(), 13), ("tasks:1".to_string(), 14)].into()
    );
    assert_eq!(
        prior.clone().at(Some(&place("tasks:0", 12, -1)), &snap),
        Prior::Finished
    );
    assert_eq!(
        prior.clone().at(Some(&place("tasks:0", 14, -1)), &snap),
        Prior::New
    );
    assert_eq!(prior.at(Some(&place("tasks:2", 1, -1)), &snap), Prior::New);
    assert_eq!(
        commit("never-kept", Some(place("tasks:0", 12, -1))).await,
        CommitResult::Finished,
        "a commit behind its partition's applied offset changes nothing"
    );
    // The offset noted with a topic id fences records of that incarnation of the topic (and any
    // whose id is unknown); once the topic was created again (another id) it fences nothing, and
    // the new incarnation's offsets replace it.
    assert!(matches!(
        commit("inc-a", Some(place_in("tasks:0", 20, "aa"))).await,
        CommitResult::Applied { .. }
    ));
    let (prior, snap) = store.read(&c, "never-kept").await.expect("read");
    assert_eq!(
        snap.applied_in,
        [("tasks:0".to_string(), "aa".to_string())].into()
    );
    assert_eq!(
        prior.clone().at(Some(&place_in("tasks:0", 5, "aa")), &snap),
        Prior::Finished
    );
    assert_eq!(
        prior.clone().at(Some(&place_in("tasks:0", 5, "")), &snap),
        Prior::Finished
    );
    assert_eq!(
        prior.at(Some(&place_in("tasks:0", 5, "bb")), &snap),
        Prior::New,
        "a record of the topic created again is not fenced by the old incarnation's offset"
    );
    assert!(matches!(
        commit("inc-b", Some(place_in("tasks:0", 5, "bb"))).await,
        CommitResult::Applied { .. }
    ));
    let (prior, snap) = store.read(&c, "never-kept").await.expect("read");
    assert_eq!(snap.applied.get("tasks:0"), Some(&5));
    assert_eq!(
        snap.applied_in.get("tasks:0").map(String::as_str),
        Some("bb")
    );
    assert_eq!(
        prior.at(Some(&place_in("tasks:0", 4, "bb")), &snap),
        Prior::Finished
    );
    assert_eq!(
        commit("inc-b2", Some(place_in("tasks:0", 4, "bb"))).await,
        CommitResult::Finished,
        "the new incarnation's offset fences its own records"
    );
    // A writer that does not know the id raises the offset and keeps the note (dropping it
    // would let a later incarnation's first records pass for done).
    assert!(matches!(
        commit("inc-unknown", Some(place_in("tasks:0", 9, ""))).await,
        CommitResult::Applied { .. }
    ));
    let (prior, snap) = store.read(&c, "never-kept").await.expect("read");
    assert_eq!(snap.applied.get("tasks:0"), Some(&9));
    assert_eq!(
        snap.applied_in.get("tasks:0").map(String::as_str),
        Some("bb")
    );
    assert_eq!(
        prior.at(Some(&place_in("tasks:0", 8, "cc")), &snap),
        Prior::New
    );
}
