//! Microbenchmarks of the hot pure paths: decoding, routing, resolving.

use std::collections::BTreeMap;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;

use switchyard::codec::{self, Encoding, RecordView};
use switchyard::event::CloudEvent;
use switchyard::records::Impact;
use switchyard::resolve::rules::{
    decide, ActionRule, ActiveAction, ActiveStatus, Candidate, ResolveConfig, ResourceState,
};
use switchyard::route::{RouteSpec, Router};
use switchyard::schema::SchemaRegistry;

fn event() -> CloudEvent {
    CloudEvent::new("e-123456", "ci/github-actions", "deployment.completed")
        .with_subject("checkout")
        .with_data(json!({"service": "checkout", "version": "v42", "previous_version": "v41", "environment": "production", "actor": "ci-bot"}))
        .with_time_now()
        .with_extension("tenant", "acme")
}

fn benches(c: &mut Criterion) {
    let schemas =
        SchemaRegistry::load_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas"))
            .expect("schemas");
    let ev = event();
    let json_payload = codec::encode(&ev, Encoding::Json, None, &schemas)
        .expect("json")
        .payload;
    let avro_payload = codec::encode(&ev, Encoding::Avro, Some("deployment"), &schemas)
        .expect("avro")
        .payload;
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("structured_json", |b| {
        b.iter(|| {
            codec::decode(
                RecordView {
                    key: None,
                    payload: black_box(&json_payload),
                    headers: &[],
                },
                &schemas,
            )
        })
    });
    g.bench_function("avro_single_object", |b| {
        b.iter(|| {
            codec::decode(
                RecordView {
                    key: None,
                    payload: black_box(&avro_payload),
                    headers: &[],
                },
                &schemas,
            )
        })
    });
    g.bench_function("encode_json", |b| {
        b.iter(|| codec::encode(black_box(&ev), Encoding::Json, None, &schemas))
    });
    g.finish();

    // One of switchyard's own records (a task, carrying its event) in each encoding: what a stage
    // pays per record on a topic defined `json` or `avro`.
    let task = CloudEvent::new("task-1", "switchyard/route", "switchyard.task")
        .with_subject("checkout")
        .with_time_now()
        .with_extension("tenant", "acme")
        .with_data(
            json!({"task_id": "task-1", "workflow_id": "wf-1", "agent": "deploy-guard",
            "route": "deployments", "priority": 50, "resource": "checkout", "tenant": "acme",
            "event": serde_json::to_value(&ev).expect("event")}),
        );
    let task_json = codec::encode(&task, Encoding::Json, None, &schemas)
        .expect("json")
        .payload;
    let task_avro = codec::encode(&task, Encoding::Avro, Some("task"), &schemas)
        .expect("avro")
        .payload;
    let mut g = c.benchmark_group("own_record");
    g.throughput(Throughput::Elements(1));
    for (name, encoding, schema, payload) in [
        ("json", Encoding::Json, None, &task_json),
        ("avro", Encoding::Avro, Some("task"), &task_avro),
    ] {
        g.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| codec::encode(black_box(&task), encoding, schema, &schemas))
        });
        g.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| {
                codec::decode(
                    RecordView {
                        key: None,
                        payload: black_box(payload),
                        headers: &[],
                    },
                    &schemas,
                )
            })
        });
    }
    // A task record as the agents stage reads it: through a JSON value tree into the typed data
    // (how it read them before), and straight into the typed data (`codec::decode_typed`).
    let view = RecordView {
        key: None,
        payload: &task_json,
        headers: &[],
    };
    g.bench_function("task_via_value_tree", |b| {
        b.iter(|| {
            let mut ev = codec::decode(black_box(view), &schemas).expect("task");
            let t: switchyard::records::TaskData =
                serde_json::from_value(ev.data.take().unwrap_or_default()).expect("task data");
            (ev, t)
        })
    });
    g.bench_function("task_typed", |b| {
        b.iter(|| {
            codec::decode_typed::<switchyard::records::TaskData>(black_box(view), &schemas)
                .expect("task")
        })
    });
    g.finish();

    let specs: Vec<RouteSpec> = serde_yaml::from_str(
        r#"
- { name: deployments, types: ["deployment.*"], agents: [deploy-guard], priority: 50 }
- { name: sla, types: [sla.breached, sla.recovered], agents: [sla-responder], priority: 100 }
- { name: cost, types: [cost.threshold_exceeded], when: [{ field: data.spend, op: gt, value: 0 }], agents: [cost-guard] }
- { name: prod, types: ["*"], when: [{ field: data.environment, op: eq, value: production }], agents: [auditor] }
"#,
    )
    .expect("routes");
    let router = Router::new(&specs).expect("router");
    c.bench_function("route/4_routes", |b| {
        b.iter(|| router.route(black_box("events.deployments"), black_box(&ev)))
    });

    let mut actions = BTreeMap::new();
    actions.insert(
        "rollback".into(),
        ActionRule {
            priority: Some(100),
            conflicts_with: vec!["scale_down".into()],
            cooldown_seconds: 900,
            invalidated_by: vec!["deployment".into()],
            ..Default::default()
        },
    );
    actions.insert(
        "page".into(),
        ActionRule {
            merge: true,
            ..Default::default()
        },
    );
    let cfg = ResolveConfig {
        actions,
        ..Default::default()
    };
    let mut state = ResourceState::default();
    for i in 0..8 {
        state.active.push(ActiveAction {
            action_id: format!("a{i}"),
            action: if i % 2 == 0 {
                "page".into()
            } else {
                "restart".into()
            },
            priority: 10,
            status: ActiveStatus::Accepted,
            at: 1000 + i,
            params_hash: format!("h{i}"),
            parameters: json!({"i": i}),
            proposals: vec![],
            agents: vec![],
            approval_id: None,
            supersedes: Vec::new(),
        });
    }
    let cand = Candidate {
        proposal_id: "p".into(),
        agent: "sla-responder".into(),
        action: "rollback".into(),
        parameters: json!({"to": "v41"}),
        priority: 100,
        impact: Impact::High,
        context_version: 3,
    };
    c.bench_function("resolve/decide_8_active", |b| {
        b.iter(|| decide(&cfg, black_box(&state), black_box(&cand), 1100))
    });
}

criterion_group!(micro, benches);
criterion_main!(micro);
