//! The contract every [`ContextStore`] meets; run against the memory store (unit test) and Redis
//! (integration test).
#![doc(hidden)]

use serde_json::json;

use super::{CommitResult, ContextConfig, ContextStore, Fact, Outcome, Prior, ResourceKey};
use crate::records::AgentResponse;

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
        )
        .await
        .expect("commit");
    assert_eq!(r, CommitResult::Applied { version: 1 });
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
        )
        .await
        .expect("commit");
    assert_eq!(r, CommitResult::Applied { version: 1 });

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
        )
        .await
        .expect("commit");
    assert_eq!(r, CommitResult::Applied { version: 2 });
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
}
