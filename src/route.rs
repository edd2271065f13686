//! Declarative routing: which agents an event goes to. Pure code, no I/O.
//!
//! A route matches on the input topic, a type pattern (`*` is a wildcard) and conditions on event
//! attributes or data fields; every matching route contributes its agents. An agent named by several
//! matching routes gets one task, attributed to the highest-priority route.

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::CloudEvent;
use crate::pattern::{stable_id, TypePattern};

/// A route as written in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Unique name; appears in tasks, audit records and metrics.
    pub name: String,
    /// Input topics this route applies to; empty means every input topic.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Event type patterns, `*` matching any run of characters (`deployment.*`); empty means any type.
    #[serde(default)]
    pub types: Vec<String>,
    /// Conditions that must all hold.
    #[serde(default)]
    pub when: Vec<Condition>,
    /// Agents that receive a task when the route matches.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Workflows a run of which starts when the route matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workflows: Vec<String>,
    /// Interchangeable agents one of which gets the task, chosen by scorecard and load
    /// (`{best_of: [a, b], explore: 0.1}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<Select>,
    /// Higher runs first and wins when two routes name the same agent.
    #[serde(default)]
    pub priority: i32,
}

/// `select:` of a route or a step.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Select {
    /// The interchangeable agents.
    pub best_of: Vec<String>,
    /// Share of tasks sent to a candidate drawn uniformly, whatever the scores (0–1).
    #[serde(default = "default_explore")]
    pub explore: f64,
}

fn default_explore() -> f64 {
    0.1
}

impl Select {
    /// The name a route's group goes by (task ids and dedupe use it, so a redelivered event gets
    /// the same task id whichever candidate it draws).
    pub fn group(&self) -> String {
        format!("best_of({})", self.best_of.join(","))
    }

    /// Problems as sentences; `agents` are the declared agents.
    pub fn problems(&self, agents: &[&str]) -> Vec<String> {
        let mut p = Vec::new();
        if self.best_of.is_empty() {
            p.push("select.best_of must name at least one agent".into());
        }
        for a in &self.best_of {
            if !agents.contains(&a.as_str()) {
                p.push(format!(
                    "select.best_of names {a:?}, which is not declared under agents"
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.explore) {
            p.push("select.explore must be between 0 and 1".into());
        }
        p
    }
}

/// One condition on an attribute (`type`, `subject`, `tenant`, ...) or a data field (`data.env`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// Dotted path: `subject`, `tenant`, `data.environment`, `data.items.0.name`.
    pub field: String,
    pub op: Op,
    /// Operand; not used by `exists` and `missing`; a list for `in` and `not_in`.
    #[serde(default)]
    pub value: Option<Value>,
}

/// Comparison operators of a [`Condition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Eq,
    Ne,
    In,
    NotIn,
    Exists,
    Missing,
    Gt,
    Gte,
    Lt,
    Lte,
    /// Regular expression on a string value.
    Matches,
    /// Substring of a string, or element of an array.
    Contains,
    Prefix,
}

impl Op {
    /// The name used in config files.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// A problem with one route, found when compiling it.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteProblem {
    pub route: String,
    pub message: String,
}

enum Test {
    Eq(Value),
    Ne(Value),
    In(Vec<Value>),
    NotIn(Vec<Value>),
    Exists,
    Missing,
    Cmp(Op, f64),
    Matches(Regex),
    Contains(Value),
    Prefix(String),
}

struct CompiledCondition {
    field: String,
    test: Test,
}

struct CompiledRoute {
    name: String,
    topics: Vec<String>,
    types: Vec<TypePattern>,
    when: Vec<CompiledCondition>,
    agents: Vec<String>,
    workflows: Vec<String>,
    select: Option<Select>,
    priority: i32,
}

/// One agent an event is routed to.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteMatch {
    /// The agent, or for a `best_of` group its name ([`Select::group`]).
    pub agent: String,
    pub route: String,
    pub priority: i32,
    /// Set for a `best_of` group: the route stage picks the agent.
    pub select: Option<Select>,
}

/// Compiled routes, ready to match.
pub struct Router {
    routes: Vec<CompiledRoute>,
}

impl Router {
    /// Compiles routes, reporting every problem found (each naming its route).
    pub fn new(specs: &[RouteSpec]) -> Result<Self, Vec<RouteProblem>> {
        let mut problems = Vec::new();
        let mut routes = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let label = if spec.name.is_empty() {
                format!("routes[{i}]")
            } else {
                format!("routes[{i}] ({})", spec.name)
            };
            let mut problem = |m: String| {
                problems.push(RouteProblem {
                    route: label.clone(),
                    message: m,
                })
            };
            if spec.name.is_empty() {
                problem("name must not be empty".into());
            }
            if specs[..i].iter().any(|s| s.name == spec.name) {
                problem(format!("name {:?} is used by an earlier route", spec.name));
            }
            if spec.agents.is_empty() && spec.workflows.is_empty() && spec.select.is_none() {
                problem(
                    "agents must name at least one agent (or workflows a workflow, or select a best_of group)"
                        .into(),
                );
            }
            for (j, t) in spec.types.iter().enumerate() {
                if let Some(m) = crate::pattern::pattern_problem(t) {
                    problem(format!("types[{j}]: {m}"));
                }
            }
            let mut when = Vec::new();
            for (j, c) in spec.when.iter().enumerate() {
                match compile_condition(c) {
                    Ok(cc) => when.push(cc),
                    Err(m) => problem(format!("when[{j}] (field {}): {m}", c.field)),
                }
            }
            routes.push(CompiledRoute {
                name: spec.name.clone(),
                topics: spec.topics.clone(),
                types: spec.types.iter().map(|t| TypePattern::new(t)).collect(),
                when,
                agents: spec.agents.clone(),
                workflows: spec.workflows.clone(),
                select: spec.select.clone(),
                priority: spec.priority,
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        // Stable: equal priorities keep config order.
        routes.sort_by_key(|r| std::cmp::Reverse(r.priority));
        Ok(Router { routes })
    }

    /// The agents an event on `topic` goes to, highest priority first, each agent once.
    pub fn route(&self, topic: &str, ev: &CloudEvent) -> Vec<RouteMatch> {
        let mut out: Vec<RouteMatch> = Vec::new();
        for r in &self.routes {
            if !r.topics.is_empty() && !r.topics.iter().any(|t| t == topic) {
                continue;
            }
            if !r.types.is_empty() && !r.types.iter().any(|p| p.matches(&ev.ty)) {
                continue;
            }
            if !r.when.iter().all(|c| eval(c, ev)) {
                continue;
            }
            for a in &r.agents {
                if !out.iter().any(|m| &m.agent == a) {
                    out.push(RouteMatch {
                        agent: a.clone(),
                        route: r.name.clone(),
                        priority: r.priority,
                        select: None,
                    });
                }
            }
            if let Some(sel) = &r.select {
                let group = sel.group();
                if !out.iter().any(|m| m.agent == group) {
                    out.push(RouteMatch {
                        agent: group,
                        route: r.name.clone(),
                        priority: r.priority,
                        select: Some(sel.clone()),
                    });
                }
            }
        }
        out
    }

    /// The workflows an event on `topic` starts: `(workflow, route, priority)`, highest priority
    /// first, each workflow once.
    pub fn workflows(&self, topic: &str, ev: &CloudEvent) -> Vec<(String, String, i32)> {
        let mut out: Vec<(String, String, i32)> = Vec::new();
        for r in &self.routes {
            if r.workflows.is_empty()
                || (!r.topics.is_empty() && !r.topics.iter().any(|t| t == topic))
                || (!r.types.is_empty() && !r.types.iter().any(|p| p.matches(&ev.ty)))
                || !r.when.iter().all(|c| eval(c, ev))
            {
                continue;
            }
            for w in &r.workflows {
                if !out.iter().any(|(x, _, _)| x == w) {
                    out.push((w.clone(), r.name.clone(), r.priority));
                }
            }
        }
        out
    }

    /// Names of every agent some route refers to.
    pub fn agents(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().flat_map(|r| {
            r.agents
                .iter()
                .chain(r.select.iter().flat_map(|s| s.best_of.iter()))
                .map(String::as_str)
        })
    }

    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.name.as_str())
    }
}

fn compile_condition(c: &Condition) -> Result<CompiledCondition, String> {
    if c.field.is_empty() {
        return Err("field must not be empty".into());
    }
    let need = |what: &str| -> Result<Value, String> {
        c.value
            .clone()
            .ok_or_else(|| format!("op {} needs a value ({what})", c.op.name()))
    };
    let test = match c.op {
        Op::Eq => Test::Eq(need("the value to compare with")?),
        Op::Ne => Test::Ne(need("the value to compare with")?),
        Op::In | Op::NotIn => match need("a list")? {
            Value::Array(items) if c.op == Op::In => Test::In(items),
            Value::Array(items) => Test::NotIn(items),
            _ => return Err(format!("op {} needs a list value", c.op.name())),
        },
        Op::Exists => Test::Exists,
        Op::Missing => Test::Missing,
        Op::Gt | Op::Gte | Op::Lt | Op::Lte => match need("a number")?.as_f64() {
            Some(n) => Test::Cmp(c.op, n),
            None => return Err(format!("op {} needs a numeric value", c.op.name())),
        },
        Op::Matches => match need("a regular expression")? {
            Value::String(re) => {
                Test::Matches(Regex::new(&re).map_err(|e| format!("bad regular expression: {e}"))?)
            }
            _ => return Err("op matches needs a string value".into()),
        },
        Op::Contains => Test::Contains(need("the value to look for")?),
        Op::Prefix => match need("a string")? {
            Value::String(p) => Test::Prefix(p),
            _ => return Err("op prefix needs a string value".into()),
        },
    };
    Ok(CompiledCondition {
        field: c.field.clone(),
        test,
    })
}

/// Equality that treats numbers by value (1 == 1.0) and otherwise compares JSON values. Two
/// integers compare exactly (as f64, ids past 2^53 such as 9007199254740993 and ...992 were equal).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                x.as_f64() == y.as_f64()
            } else if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                x == y
            } else {
                x.as_u64().is_some() && x.as_u64() == y.as_u64()
            }
        }
        _ => a == b,
    }
}

fn eval(c: &CompiledCondition, ev: &CloudEvent) -> bool {
    let v = ev.lookup(&c.field);
    match (&c.test, v) {
        (Test::Exists, v) => v.is_some_and(|v| !v.is_null()),
        (Test::Missing, v) => v.is_none_or(|v| v.is_null()),
        (_, None) => matches!(c.test, Test::Ne(_) | Test::NotIn(_)),
        (Test::Eq(x), Some(v)) => json_eq(&v, x),
        (Test::Ne(x), Some(v)) => !json_eq(&v, x),
        (Test::In(xs), Some(v)) => xs.iter().any(|x| json_eq(&v, x)),
        (Test::NotIn(xs), Some(v)) => !xs.iter().any(|x| json_eq(&v, x)),
        (Test::Cmp(op, n), Some(v)) => match v.as_f64() {
            Some(x) => match op {
                Op::Gt => x > *n,
                Op::Gte => x >= *n,
                Op::Lt => x < *n,
                _ => x <= *n,
            },
            None => false,
        },
        (Test::Matches(re), Some(Value::String(s))) => re.is_match(&s),
        (Test::Contains(x), Some(Value::String(s))) => x.as_str().is_some_and(|x| s.contains(x)),
        (Test::Contains(x), Some(Value::Array(items))) => items.iter().any(|i| json_eq(i, x)),
        (Test::Prefix(p), Some(Value::String(s))) => s.starts_with(p.as_str()),
        _ => false,
    }
}

/// What names an input event in every id derived from it: its source and id — which identify an
/// event within its tenant — and its tenant. Two tenants' events with the same source and id are two
/// events (their tasks, proposals, actions and approvals must not share ids). The default tenant's
/// events leave the tenant out, so their ids are what they were before the tenant counted (a
/// single-tenant installation sees no change). The parts are length-prefixed and attributes carry
/// no control characters, so no event of one tenant can name another's.
pub fn event_parts(ev: &CloudEvent) -> Vec<&str> {
    match ev.tenant() {
        crate::event::DEFAULT_TENANT => vec![&ev.source, &ev.id],
        tenant => vec![tenant, &ev.source, &ev.id],
    }
}

/// Deterministic workflow id for an input event: everything the event causes shares it.
pub fn workflow_id(ev: &CloudEvent) -> String {
    format!("wf-{}", stable_id(&event_parts(ev)))
}

/// Deterministic task id: the same event routed to the same agent always yields the same id, so a
/// redelivered event produces a recognisable duplicate task.
pub fn task_id(ev: &CloudEvent, agent: &str) -> String {
    let mut parts = event_parts(ev);
    parts.push(agent);
    format!("task-{}", stable_id(&parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn spec(name: &str, types: &[&str], agents: &[&str], priority: i32) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            topics: vec![],
            types: types.iter().map(|s| s.to_string()).collect(),
            when: vec![],
            agents: agents.iter().map(|s| s.to_string()).collect(),
            workflows: vec![],
            select: None,
            priority,
        }
    }

    fn ev(ty: &str, data: Value) -> CloudEvent {
        CloudEvent::new("e1", "test", ty)
            .with_subject("svc")
            .with_data(data)
    }

    #[test]
    fn glob_patterns() {
        assert!(TypePattern::new("deployment.*").matches("deployment.started"));
        assert!(!TypePattern::new("deployment.*").matches("deployments"));
        assert!(TypePattern::new("*").matches(""));
        assert!(TypePattern::new("a*b*c").matches("aXbYc"));
        assert!(!TypePattern::new("a*b*c").matches("acb"));
        assert!(!TypePattern::new("ab*ba").matches("aba"));
        assert!(TypePattern::new("sla.breached").matches("sla.breached"));
        assert!(!TypePattern::new("sla.breached").matches("sla.breached2"));
    }

    #[test]
    fn routes_by_topic_type_and_conditions_with_priority() {
        let mut prod = spec("prod", &["deployment.*"], &["deploy-guard", "auditor"], 10);
        prod.topics = vec!["events.deployments".into()];
        prod.when = vec![Condition {
            field: "data.environment".into(),
            op: Op::Eq,
            value: Some(json!("production")),
        }];
        let any = spec("any", &[], &["auditor"], 1);
        let r = Router::new(&[any, prod]).unwrap();
        let e = ev("deployment.started", json!({"environment": "production"}));
        let m = r.route("events.deployments", &e);
        assert_eq!(
            m,
            vec![
                RouteMatch {
                    agent: "deploy-guard".into(),
                    route: "prod".into(),
                    priority: 10,
                    select: None,
                },
                RouteMatch {
                    agent: "auditor".into(),
                    route: "prod".into(),
                    priority: 10,
                    select: None,
                },
            ]
        );
        let staging = ev("deployment.started", json!({"environment": "staging"}));
        assert_eq!(r.route("events.deployments", &staging).len(), 1);
        assert_eq!(r.route("other", &e)[0].route, "any");
    }

    #[test]
    fn conditions() {
        let e = ev(
            "cost.threshold_exceeded",
            json!({"spend": 150.5, "tags": ["x"], "name": "api-7", "z": null}),
        );
        let check = |op: Op, field: &str, value: Option<Value>| {
            let c = compile_condition(&Condition {
                field: field.into(),
                op,
                value,
            })
            .unwrap();
            eval(&c, &e)
        };
        assert!(check(Op::Gt, "data.spend", Some(json!(100))));
        assert!(!check(Op::Lt, "data.spend", Some(json!(100))));
        assert!(check(Op::Gte, "data.spend", Some(json!(150.5))));
        assert!(check(Op::In, "subject", Some(json!(["svc", "b"]))));
        assert!(check(Op::NotIn, "data.nope", Some(json!(["svc"]))));
        assert!(check(Op::Contains, "data.tags", Some(json!("x"))));
        assert!(check(Op::Matches, "data.name", Some(json!("^api-[0-9]+$"))));
        assert!(check(Op::Prefix, "data.name", Some(json!("api-"))));
        assert!(check(Op::Missing, "data.z", None));
        assert!(check(Op::Exists, "data.name", None));
        assert!(check(Op::Ne, "data.missing", Some(json!(1))));
        assert!(!check(Op::Eq, "data.missing", Some(json!(1))));
        assert!(check(Op::Eq, "data.spend", Some(json!(150.5))));
        // Numbers by value, integers exactly (ids past 2^53 are not equal to their neighbours).
        assert!(json_eq(&json!(1), &json!(1.0)));
        assert!(json_eq(
            &json!(9007199254740993u64),
            &json!(9007199254740993u64)
        ));
        assert!(!json_eq(
            &json!(9007199254740993u64),
            &json!(9007199254740992u64)
        ));
        assert!(!json_eq(&json!(-1), &json!(u64::MAX)));
        assert!(json_eq(&json!(u64::MAX), &json!(u64::MAX)));
    }

    #[test]
    fn compile_reports_every_problem() {
        let mut bad = spec("", &[], &[], 0);
        bad.when = vec![
            Condition {
                field: "data.x".into(),
                op: Op::Gt,
                value: Some(json!("abc")),
            },
            Condition {
                field: "data.y".into(),
                op: Op::Matches,
                value: Some(json!("(")),
            },
        ];
        let dup1 = spec("a", &[], &["x"], 0);
        let dup2 = spec("a", &[], &["x"], 0);
        let problems = Router::new(&[bad, dup1, dup2]).err().unwrap();
        let text: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.route, p.message))
            .collect();
        assert_eq!(problems.len(), 5, "{text:#?}");
        assert!(text.iter().any(|t| t.contains("bad regular expression")));
        assert!(text.iter().any(|t| t.contains("routes[2] (a)")));
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let e = ev("x", json!({}));
        assert_eq!(task_id(&e, "a"), task_id(&e.clone(), "a"));
        assert_ne!(task_id(&e, "a"), task_id(&e, "b"));
        assert_ne!(stable_id(&["ab", "c"]), stable_id(&["a", "bc"]));
        assert!(workflow_id(&e).starts_with("wf-"));
        // Another tenant's event with the same source and id is another event; the default
        // tenant's ids are what they were before the tenant counted.
        let mut other = e.clone();
        other.extensions.insert("tenant".into(), json!("globex"));
        assert_ne!(task_id(&other, "a"), task_id(&e, "a"));
        assert_ne!(workflow_id(&other), workflow_id(&e));
        let mut named = e.clone();
        named.extensions.insert("tenant".into(), json!("default"));
        assert_eq!(task_id(&named, "a"), task_id(&e, "a"));
        assert_eq!(
            task_id(&e, "a"),
            format!("task-{}", stable_id(&[&e.source, &e.id, "a"]))
        );
    }

    fn arb_type() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "deployment.started",
            "deployment.completed",
            "deployment.failed",
            "sla.breached",
            "sla.recovered",
            "cost.threshold_exceeded",
            "other.thing",
        ])
        .prop_map(str::to_string)
    }

    fn arb_spec() -> impl Strategy<Value = RouteSpec> {
        (
            "[a-z]{1,6}",
            prop::collection::vec(
                prop::sample::select(vec![
                    "deployment.*",
                    "sla.*",
                    "*",
                    "cost.threshold_exceeded",
                ]),
                0..3,
            ),
            prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "d"]), 1..4),
            -5i32..5,
        )
            .prop_map(|(name, types, agents, priority)| RouteSpec {
                name,
                topics: vec![],
                types: types.into_iter().map(str::to_string).collect(),
                when: vec![],
                agents: agents.into_iter().map(str::to_string).collect(),
                workflows: vec![],
                select: None,
                priority,
            })
    }

    proptest! {
        #[test]
        fn routing_is_deterministic_unique_and_ordered(
            specs in prop::collection::vec(arb_spec(), 0..6),
            ty in arb_type(),
        ) {
            let mut seen = std::collections::HashSet::new();
            let specs: Vec<_> = specs.into_iter().filter(|s| seen.insert(s.name.clone())).collect();
            let r = Router::new(&specs).unwrap();
            let e = ev(&ty, json!({}));
            let a = r.route("events.x", &e);
            prop_assert_eq!(&a, &r.route("events.x", &e));
            let mut agents: Vec<_> = a.iter().map(|m| m.agent.clone()).collect();
            agents.sort();
            agents.dedup();
            prop_assert_eq!(agents.len(), a.len(), "an agent is routed twice");
            prop_assert!(a.windows(2).all(|w| w[0].priority >= w[1].priority));
            // Every agent of every matching route is present, and nothing else.
            for s in &specs {
                let hit = s.types.is_empty() || s.types.iter().any(|p| TypePattern::new(p).matches(&ty));
                for ag in &s.agents {
                    if hit { prop_assert!(a.iter().any(|m| &m.agent == ag)); }
                }
            }
            for m in &a {
                let s = specs.iter().find(|s| s.name == m.route).unwrap();
                prop_assert!(s.agents.contains(&m.agent));
            }
        }

        #[test]
        fn glob_star_suffix_is_prefix_test(prefix in "[a-z.]{0,8}", s in "[a-z.]{0,12}") {
            let p = TypePattern::new(&format!("{prefix}*"));
            prop_assert_eq!(p.matches(&s), s.starts_with(&prefix));
        }
    }
}
