//! What `switchyard context show|query` and `GET /v1/context…` answer, as JSON: one resource's
//! facts with its relations (and, on request, its related resources' facts), and queries by fact
//! (through the fact index) or by relation.

use serde_json::{json, Value};

use super::graph::{Direction, Graph};
use super::{ContextStore, StoreError};
use crate::store::ResourceKey;

/// One resource: version, facts, relations, and the facts of resources up to `depth` hops away
/// (every relation, both directions; at most `context.relations.max_related`).
pub async fn show<S: ContextStore>(
    store: &S,
    graph: &Graph,
    key: &ResourceKey,
    depth: u32,
) -> Result<Value, StoreError> {
    let snap = store.snapshot(key).await?;
    let edges = graph.neighbours(key).await?;
    let facts: serde_json::Map<String, Value> = snap
        .facts
        .iter()
        .map(|(k, f)| {
            (
                k.clone(),
                json!({"value": f.value, "by": f.by, "at": f.at, "version": snap.key_versions.get(k)}),
            )
        })
        .collect();
    let relations: Vec<Value> = edges
        .iter()
        .map(|(r, d, o)| json!({"relation": r, "direction": d.tag(), "resource": o}))
        .collect();
    let mut related = serde_json::Map::new();
    if depth > 0 {
        let mut kinds: Vec<(String, Direction)> =
            edges.iter().map(|(r, d, _)| (r.clone(), *d)).collect();
        kinds.sort();
        kinds.dedup();
        let mut left = graph.config().max_related;
        for (relation, dir) in kinds {
            let near = graph.walk(key, &relation, dir, depth, left).await?;
            left = left.saturating_sub(near.len());
            let names: Vec<String> = near.iter().map(|(r, _)| r.clone()).collect();
            let all = graph.facts_of(&key.tenant, &names).await?;
            let label = match dir {
                Direction::Out => relation.clone(),
                Direction::In => format!("{relation}_by"),
            };
            let mut m = serde_json::Map::new();
            for ((r, d), (version, fs)) in near.into_iter().zip(all) {
                let fs: serde_json::Map<String, Value> =
                    fs.into_iter().map(|(k, f)| (k, f.value)).collect();
                m.insert(r, json!({"depth": d, "version": version, "facts": fs}));
            }
            related.insert(label, Value::Object(m));
        }
    }
    Ok(json!({
        "tenant": key.tenant, "resource": key.resource, "version": snap.version,
        "facts": facts, "relations": relations, "related": related,
        "recent_events": snap.recent_events,
    }))
}

/// A context query: by fact (`fact`, optionally `path` = `equals`; needs `fact` in
/// `context.index`), or by relation (the resources `relation` links `to` in `direction`).
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub tenant: String,
    pub fact: Option<String>,
    pub path: Option<String>,
    pub equals: Option<Value>,
    pub related_to: Option<String>,
    pub relation: Option<String>,
    pub direction: Direction,
    pub depth: u32,
    pub limit: usize,
}

/// Runs a query: `{"resources": [{resource, ...}]}`, or an error message for a bad query.
pub async fn query(
    graph: &Graph,
    indexed: &[String],
    q: &Query,
) -> Result<Result<Value, String>, StoreError> {
    match (&q.fact, &q.related_to) {
        (Some(fact), None) => {
            if !indexed.iter().any(|i| i == fact) {
                return Ok(Err(format!(
                    "{fact} is not indexed: add it to context.index (indexed: {})",
                    if indexed.is_empty() {
                        "none".to_string()
                    } else {
                        indexed.join(", ")
                    }
                )));
            }
            let found = graph
                .query(
                    &q.tenant,
                    fact,
                    q.path.as_deref(),
                    q.equals.as_ref(),
                    q.limit,
                )
                .await?;
            let list: Vec<Value> = found
                .into_iter()
                .map(|(r, f)| json!({"resource": r, "value": f.value, "by": f.by, "at": f.at}))
                .collect();
            Ok(Ok(
                json!({"tenant": q.tenant, "fact": fact, "resources": list}),
            ))
        }
        (None, Some(to)) => {
            let Some(relation) = &q.relation else {
                return Ok(Err("a relation query needs relation".into()));
            };
            let key = ResourceKey::new(&q.tenant, to);
            let near = graph
                .walk(&key, relation, q.direction, q.depth.clamp(1, 3), q.limit)
                .await?;
            let list: Vec<Value> = near
                .into_iter()
                .map(|(r, d)| json!({"resource": r, "depth": d}))
                .collect();
            Ok(Ok(json!({"tenant": q.tenant, "relation": relation,
                         "direction": q.direction.tag(), "of": to, "resources": list})))
        }
        _ => Ok(Err(
            "give either fact (with path and equals to filter) or related_to with relation".into(),
        )),
    }
}
