//! Context across resources: typed, directed relations between resources (`checkout depends_on
//! payments`), the facts of related resources for agents, and an index of who has which fact.
//!
//! Relations come from the config (`context.relations.static`, never expire) and from events
//! (`context.relations.learn`: a field of an event names the resources its subject relates to;
//! kept `ttl_seconds` after the event, renewed by every event that states them again). Each
//! resource's edges are one hash in its own hash slot (`<prefix>:rel:{tenant/resource}`, fields
//! `out|<relation>|<target>` and `in|<relation>|<source>`), so a resource's neighbours, either way,
//! are one read; the reverse edge is written into the other resource's hash beside it.
//!
//! The fact index (`context.index: [sla, deployment]`) is one sorted set per tenant and key
//! (`<prefix>:idx:{tenant}:<key>`, member the resource, score the last write), added to after a
//! task's findings are committed: queries read it, never the keyspace.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::event::CloudEvent;
use crate::pattern::TypePattern;
use crate::store::{RedisConn, ResourceKey, StoreError};

/// `context.relations`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelationsConfig {
    /// Relations declared here hold for good.
    #[serde(default, rename = "static", skip_serializing_if = "Vec::is_empty")]
    pub fixed: Vec<StaticRelation>,
    /// How events teach relations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learn: Vec<LearnRule>,
    /// A learned relation is forgotten this long after the last event that stated it.
    #[serde(default = "default_relation_ttl")]
    pub ttl_seconds: u64,
    /// Related resources read for one task at most (all relations and depths together).
    #[serde(default = "default_max_related")]
    pub max_related: usize,
    /// Size of the related facts handed to one task at most (JSON bytes); the rest is cut.
    #[serde(default = "default_max_related_bytes")]
    pub max_related_bytes: usize,
}

fn default_relation_ttl() -> u64 {
    7 * 24 * 3600
}
fn default_max_related() -> usize {
    20
}
fn default_max_related_bytes() -> usize {
    16 * 1024
}

impl Default for RelationsConfig {
    fn default() -> Self {
        RelationsConfig {
            fixed: Vec::new(),
            learn: Vec::new(),
            ttl_seconds: default_relation_ttl(),
            max_related: default_max_related(),
            max_related_bytes: default_max_related_bytes(),
        }
    }
}

/// `from <relation> to`, in a tenant (default `default`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticRelation {
    pub from: String,
    pub relation: String,
    pub to: String,
    #[serde(default = "default_tenant")]
    pub tenant: String,
}

fn default_tenant() -> String {
    "default".into()
}

/// Events of these `types` whose `field` (a dotted path: a resource id or a list of them) is set
/// teach `subject <relation> <each listed resource>`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LearnRule {
    #[serde(default)]
    pub types: Vec<String>,
    pub field: String,
    pub relation: String,
    /// Resources the field may name (`*` patterns); empty: any. Whoever can publish such an
    /// event can relate its subject to these — and agents with `related:` then read and may act
    /// on them — so name what a producer may link to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

/// Index entries one query reads at most.
pub const MAX_QUERY_READS: usize = 5000;

/// Old entries of a fact index one write looks at (see [`Graph::index`]).
pub const INDEX_TRIM: usize = 2;

/// Relations one event may teach at most (the rest of a longer list is ignored).
pub const MAX_TAUGHT: usize = 64;

impl RelationsConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        };
        for (i, r) in self.fixed.iter().enumerate() {
            if !name_ok(&r.relation) || r.from.is_empty() || r.to.is_empty() {
                p.push((
                    format!("context.relations.static[{i}]"),
                    "needs from, to and a relation name of letters, digits, _ - .".into(),
                ));
            }
        }
        for (i, r) in self.learn.iter().enumerate() {
            if !name_ok(&r.relation) || r.field.is_empty() {
                p.push((
                    format!("context.relations.learn[{i}]"),
                    "needs a field and a relation name of letters, digits, _ - .".into(),
                ));
            }
            for t in &r.types {
                if let Some(m) = crate::pattern::pattern_problem(t) {
                    p.push((format!("context.relations.learn[{i}].types"), m));
                }
            }
        }
        if self.ttl_seconds == 0 || self.max_related == 0 {
            p.push((
                "context.relations".into(),
                "ttl_seconds and max_related must be at least 1".into(),
            ));
        }
        p
    }
}

/// Which way an edge is followed: `out` (`checkout depends_on payments`: from checkout to
/// payments) or `in` (from payments to the resources that depend on it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Out,
    In,
}

impl Direction {
    pub fn tag(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }
}

/// An agent's `related:` entry: the facts `reads` of the resources `depth` hops away along
/// `relation`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelatedSpec {
    pub relation: String,
    #[serde(default = "one")]
    pub depth: u32,
    #[serde(default)]
    pub direction: Direction,
    pub reads: Vec<String>,
}

fn one() -> u32 {
    1
}

impl RelatedSpec {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(1..=3).contains(&self.depth) {
            p.push(format!("related ({}): depth must be 1 to 3", self.relation));
        }
        if self.reads.is_empty() {
            p.push(format!(
                "related ({}): reads must name the facts to read",
                self.relation
            ));
        }
        p
    }
}

/// One neighbour: `(relation, direction, resource)`.
pub type Edge = (String, Direction, String);

/// What a task was given of related resources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Related {
    /// `{relation: {resource: {"depth": n, "version": v, "facts": {key: value}}}}`.
    pub value: Value,
    /// `resource/key` of every fact read (audited with the task).
    pub reads: Vec<String>,
    /// Related resources (for proposals aimed at them), with the context version read.
    pub resources: BTreeSet<String>,
    pub versions: BTreeMap<String, u64>,
    /// True when `max_related` or `max_related_bytes` cut something.
    pub truncated: bool,
}

pub struct Graph {
    conn: RedisConn,
    prefix: String,
    cfg: RelationsConfig,
    /// Static edges per (tenant, resource).
    fixed: HashMap<(String, String), Vec<Edge>>,
}

/// Writes one relation hash's edges stated by one event. KEYS[1] the hash; ARGV now, the TTL,
/// the edges' expiry, their stamp, then the fields. A stamp replaces only one expiring sooner (an
/// older event, replayed or backfilled, does not shorten a live relation); the hash lives at
/// least until its latest edge expires; and once a sixteenth of the TTL has passed since its last
/// sweep (field `_swept`), expired edges are dropped, so a resource whose events keep naming new
/// targets nobody reads does not grow without bound. Returns the edges written.
static LEARN: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local now, ttl, exp, stamp = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local function expiry(v)
  if not v then return nil end
  local ok, d = pcall(cjson.decode, v)
  if ok and type(d) == 'table' then return tonumber(d.exp) end
  return nil
end
local wrote = 0
for i = 5, #ARGV do
  local old = expiry(redis.call('HGET', KEYS[1], ARGV[i]))
  if not old or exp > old then
    redis.call('HSET', KEYS[1], ARGV[i], stamp)
    wrote = wrote + 1
  end
end
local swept = tonumber(redis.call('HGET', KEYS[1], '_swept') or '0') or 0
if now - swept >= ttl / 16 then
  local all = redis.call('HGETALL', KEYS[1])
  local gone = {}
  for j = 1, #all, 2 do
    local e = expiry(all[j + 1])
    if all[j] ~= '_swept' and e and e ~= 0 and e < now then gone[#gone + 1] = all[j] end
  end
  for j = 1, #gone, 1000 do
    redis.call('HDEL', KEYS[1], unpack(gone, j, math.min(j + 999, #gone)))
  end
  redis.call('HSET', KEYS[1], '_swept', tostring(now))
end
if wrote > 0 then
  local left = redis.call('TTL', KEYS[1])
  if left < exp - now then redis.call('EXPIRE', KEYS[1], math.max(exp - now, 1)) end
end
return wrote
"#,
    )
});

fn rel_key(prefix: &str, k: &ResourceKey) -> String {
    format!("{prefix}:rel:{}", k.hash_tag())
}

fn index_key(prefix: &str, tenant: &str, key: &str) -> String {
    format!(
        "{prefix}:idx:{}:{key}",
        ResourceKey::new(tenant, "").hash_tag()
    )
}

/// A JSON value at a dotted path (`data.dependencies`, `data.owner.team`).
fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, p| match v {
        Value::Object(m) => m.get(p),
        Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

impl Graph {
    pub fn new(conn: RedisConn, prefix: &str, cfg: RelationsConfig) -> Self {
        let mut fixed: HashMap<(String, String), Vec<Edge>> = HashMap::new();
        for r in &cfg.fixed {
            fixed
                .entry((r.tenant.clone(), r.from.clone()))
                .or_default()
                .push((r.relation.clone(), Direction::Out, r.to.clone()));
            fixed
                .entry((r.tenant.clone(), r.to.clone()))
                .or_default()
                .push((r.relation.clone(), Direction::In, r.from.clone()));
        }
        Graph {
            conn,
            prefix: prefix.to_string(),
            cfg,
            fixed,
        }
    }

    pub fn config(&self) -> &RelationsConfig {
        &self.cfg
    }

    /// The relations an event teaches: `(relation, target)` for its subject.
    pub fn taught(&self, ev: &CloudEvent) -> Vec<(String, String)> {
        let Some(subject) = ev.subject.as_deref().filter(|s| !s.is_empty()) else {
            return Vec::new();
        };
        let doc = json!({"data": ev.data, "type": ev.ty, "subject": subject});
        let mut out = Vec::new();
        for r in &self.cfg.learn {
            if !r.types.is_empty() && !r.types.iter().any(|t| TypePattern::new(t).matches(&ev.ty)) {
                continue;
            }
            let targets: Vec<String> = match lookup(&doc, &r.field) {
                Some(Value::String(s)) => vec![s.clone()],
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            for t in targets {
                if !t.is_empty()
                    && t != subject
                    && t.len() <= 256
                    && crate::pattern::matches_any_or_empty(&r.targets, &t)
                    && out.len() < MAX_TAUGHT
                {
                    out.push((r.relation.clone(), t));
                }
            }
        }
        out
    }

    /// Records what an event teaches (both directions), stamped with `at` (seconds; the event's
    /// time, so a redelivery writes the same). Idempotent.
    pub async fn learn(&self, ev: &CloudEvent, at: i64) -> Result<usize, StoreError> {
        let taught = self.taught(ev);
        if taught.is_empty() {
            return Ok(0);
        }
        let tenant = ev.tenant().to_string();
        let subject = ev.subject.clone().unwrap_or_default();
        let from = ResourceKey::new(&tenant, &subject);
        let now = crate::event::now_secs();
        // A producer's clock may run ahead (the time is the record's): at most five minutes are
        // believed, or one skewed event would keep its relations far past the TTL, unreplaceable.
        let at = at.min(now + 300);
        let exp = at + self.cfg.ttl_seconds as i64;
        if exp <= now {
            // An old event (a backfill, a lagging input): what it states has expired already.
            return Ok(0);
        }
        let stamp = json!({"at": at, "exp": exp, "via": ev.id}).to_string();
        // Each hash's edges in one script call (one hash slot each).
        let mut per_hash: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (relation, target) in &taught {
            let to = ResourceKey::new(&tenant, target);
            per_hash
                .entry(rel_key(&self.prefix, &from))
                .or_default()
                .push(format!("out|{relation}|{target}"));
            per_hash
                .entry(rel_key(&self.prefix, &to))
                .or_default()
                .push(format!("in|{relation}|{subject}"));
        }
        let c = self.conn.get().await?;
        let calls = per_hash.iter().map(|(key, fields)| {
            let mut c = c.clone();
            let mut inv = LEARN.prepare_invoke();
            inv.key(key)
                .arg(now)
                .arg(self.cfg.ttl_seconds)
                .arg(exp)
                .arg(&stamp);
            for f in fields {
                inv.arg(f);
            }
            async move { inv.invoke_async::<i64>(&mut c).await }
        });
        for r in futures::future::join_all(calls).await {
            r?;
        }
        Ok(taught.len())
    }

    /// The live edges of a relation hash, and the fields of expired ones.
    fn parse_edges(m: HashMap<String, String>, now: i64) -> (Vec<Edge>, Vec<String>) {
        let mut out = Vec::new();
        let mut expired = Vec::new();
        for (field, v) in m {
            let mut parts = field.splitn(3, '|');
            let (Some(dir), Some(rel), Some(other)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let exp = serde_json::from_str::<Value>(&v)
                .ok()
                .and_then(|v| v["exp"].as_i64())
                .unwrap_or(0);
            if exp != 0 && exp < now {
                expired.push(field.clone());
                continue;
            }
            let dir = if dir == "in" {
                Direction::In
            } else {
                Direction::Out
            };
            out.push((rel.to_string(), dir, other.to_string()));
        }
        (out, expired)
    }

    /// The neighbours of many resources (learned and static), one pipelined read.
    pub async fn neighbours_many(
        &self,
        keys: &[ResourceKey],
    ) -> Result<Vec<Vec<Edge>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.hgetall(rel_key(&self.prefix, k));
        }
        let mut c = self.conn.get().await?;
        let maps: Vec<HashMap<String, String>> = pipe.query_async(&mut c).await?;
        let now = crate::event::now_secs();
        // Expired edges are dropped as they are met, so a hash holds what is live (plus what
        // expired since it was last read).
        let mut prune = redis::pipe();
        let mut pruning = false;
        let out = keys
            .iter()
            .zip(maps)
            .map(|(k, m)| {
                let (mut edges, expired) = Self::parse_edges(m, now);
                if !expired.is_empty() {
                    pruning = true;
                    prune.hdel(rel_key(&self.prefix, k), expired).ignore();
                }
                if let Some(f) = self.fixed.get(&(k.tenant.clone(), k.resource.clone())) {
                    for e in f {
                        if !edges.contains(e) {
                            edges.push(e.clone());
                        }
                    }
                }
                edges.sort();
                edges
            })
            .collect();
        if pruning {
            if let Err(e) = prune.query_async::<()>(&mut c).await {
                tracing::debug!(error = %e, "Could not drop expired relations; they are skipped anyway.");
            }
        }
        Ok(out)
    }

    pub async fn neighbours(&self, k: &ResourceKey) -> Result<Vec<Edge>, StoreError> {
        Ok(self
            .neighbours_many(std::slice::from_ref(k))
            .await?
            .pop()
            .unwrap_or_default())
    }

    /// Resources `depth` hops or fewer away along `relation` in `dir`: `(resource, depth)`,
    /// nearest first, at most `max`. One read per level.
    pub async fn walk(
        &self,
        k: &ResourceKey,
        relation: &str,
        dir: Direction,
        depth: u32,
        max: usize,
    ) -> Result<Vec<(String, u32)>, StoreError> {
        let mut seen: BTreeSet<String> = BTreeSet::from([k.resource.clone()]);
        let mut out = Vec::new();
        let mut level = vec![k.clone()];
        for d in 1..=depth {
            let edges = self.neighbours_many(&level).await?;
            let mut next = Vec::new();
            for (rel, edir, other) in edges.into_iter().flatten() {
                if rel == relation && edir == dir && seen.insert(other.clone()) {
                    if out.len() >= max {
                        return Ok(out);
                    }
                    out.push((other.clone(), d));
                    next.push(ResourceKey::new(&k.tenant, other));
                }
            }
            if next.is_empty() {
                break;
            }
            level = next;
        }
        Ok(out)
    }

    /// Facts (`keys`, `*` patterns) and the context version of some resources, one pipelined
    /// read: `resource → (version, {key: Fact JSON})`.
    pub async fn facts_of(
        &self,
        tenant: &str,
        resources: &[String],
    ) -> Result<Vec<(u64, BTreeMap<String, super::fact::Fact>)>, StoreError> {
        if resources.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in resources {
            pipe.hgetall(format!(
                "{}:ctx:{}",
                self.prefix,
                ResourceKey::new(tenant, r).hash_tag()
            ));
        }
        let mut c = self.conn.get().await?;
        let maps: Vec<HashMap<String, String>> = pipe.query_async(&mut c).await?;
        Ok(maps
            .into_iter()
            .map(|m| {
                let version = m.get("_version").and_then(|v| v.parse().ok()).unwrap_or(0);
                let facts = m
                    .into_iter()
                    .filter(|(k, _)| !k.starts_with('_'))
                    .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|f| (k, f)))
                    .collect();
                (version, facts)
            })
            .collect())
    }

    /// What an agent's `related:` entries give a task on `k`.
    pub async fn related(
        &self,
        k: &ResourceKey,
        specs: &[RelatedSpec],
    ) -> Result<Related, StoreError> {
        let mut out = Related {
            value: json!({}),
            ..Default::default()
        };
        let mut budget = self.cfg.max_related;
        let mut bytes = 0usize;
        for s in specs {
            let near = self
                .walk(k, &s.relation, s.direction, s.depth, budget)
                .await?;
            budget = budget.saturating_sub(near.len());
            if budget == 0 {
                out.truncated = true;
            }
            let names: Vec<String> = near.iter().map(|(r, _)| r.clone()).collect();
            let facts = self.facts_of(&k.tenant, &names).await?;
            let label = match s.direction {
                Direction::Out => s.relation.clone(),
                Direction::In => format!("{}_by", s.relation),
            };
            for ((r, d), (version, fs)) in near.iter().zip(facts) {
                let mut shown = serde_json::Map::new();
                for (key, f) in fs {
                    if !s.reads.iter().any(|p| TypePattern::new(p).matches(&key)) {
                        continue;
                    }
                    let size = f.value.to_string().len() + key.len();
                    if bytes + size > self.cfg.max_related_bytes {
                        out.truncated = true;
                        continue;
                    }
                    bytes += size;
                    out.reads.push(format!("{r}/{key}"));
                    shown.insert(key, json!({"value": f.value, "by": f.by, "at": f.at}));
                }
                out.resources.insert(r.clone());
                out.versions.insert(r.clone(), version);
                out.value[&label][r] = json!({"depth": d, "version": version, "facts": shown});
            }
        }
        Ok(out)
    }

    /// Adds resources to the fact index of `keys` (those listed in `context.index`), and lets go
    /// of a few entries not written for `ttl_seconds` (`context.ttl_seconds`) whose fact is gone:
    /// each write looks at up to [`INDEX_TRIM`] of them per key, so the index holds about the
    /// resources that have the fact, not every resource that ever had it. One whose fact is still
    /// there (its context kept alive by other writes) moves to just inside the window, behind
    /// every entry written within it, so the next ones get looked at.
    pub async fn index(
        &self,
        k: &ResourceKey,
        keys: &[&str],
        at: i64,
        ttl_seconds: u64,
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let before = at - ttl_seconds as i64;
        let mut pipe = redis::pipe();
        for key in keys {
            let ikey = index_key(&self.prefix, &k.tenant, key);
            pipe.zadd(&ikey, &k.resource, at).ignore();
            pipe.cmd("ZRANGEBYSCORE")
                .arg(&ikey)
                .arg("-inf")
                .arg(format!("({before}"))
                .arg("LIMIT")
                .arg(0)
                .arg(INDEX_TRIM);
        }
        let mut c = self.conn.get().await?;
        let old: Vec<Vec<String>> = pipe.query_async(&mut c).await?;
        if old.iter().all(Vec::is_empty) {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut asked = Vec::new();
        for (key, names) in keys.iter().zip(&old) {
            for r in names {
                let ctx = ResourceKey::new(&k.tenant, r);
                pipe.hexists(format!("{}:ctx:{}", self.prefix, ctx.hash_tag()), *key);
                asked.push((*key, r));
            }
        }
        let there: Vec<bool> = pipe.query_async(&mut c).await?;
        let mut pipe = redis::pipe();
        for ((key, r), there) in asked.into_iter().zip(there) {
            let ikey = index_key(&self.prefix, &k.tenant, key);
            if there {
                pipe.zadd(&ikey, r, before + 1).ignore();
            } else {
                pipe.zrem(&ikey, r).ignore();
            }
        }
        Ok(pipe.query_async::<()>(&mut c).await?)
    }

    /// Resources of `tenant` that have the fact `key`, most recently written first, with the
    /// fact (the index says who may have it; the fact itself is read back, so an expired or
    /// changed fact is not reported, and index entries whose fact is gone are dropped). `path` and
    /// `equals` filter on the value. At most `limit` found, at most [`MAX_QUERY_READS`] read.
    pub async fn query(
        &self,
        tenant: &str,
        key: &str,
        path: Option<&str>,
        equals: Option<&Value>,
        limit: usize,
    ) -> Result<Vec<(String, super::fact::Fact)>, StoreError> {
        let ikey = index_key(&self.prefix, tenant, key);
        let mut c = self.conn.get().await?;
        let mut out = Vec::new();
        let (mut start, mut read) = (0usize, 0usize);
        while read < MAX_QUERY_READS && out.len() < limit {
            let names: Vec<String> = redis::cmd("ZREVRANGE")
                .arg(&ikey)
                .arg(start)
                .arg(start + 199)
                .query_async(&mut c)
                .await?;
            if names.is_empty() {
                break;
            }
            start += names.len();
            // Entries found gone are removed (the next page starts earlier), yet still count.
            read += names.len();
            let mut pipe = redis::pipe();
            for r in &names {
                pipe.hget(
                    format!(
                        "{}:ctx:{}",
                        self.prefix,
                        ResourceKey::new(tenant, r).hash_tag()
                    ),
                    key,
                );
            }
            let facts: Vec<Option<String>> = pipe.query_async(&mut c).await?;
            let mut gone = Vec::new();
            for (r, f) in names.iter().zip(facts) {
                let Some(f) = f.and_then(|f| serde_json::from_str::<super::fact::Fact>(&f).ok())
                else {
                    gone.push(r.clone());
                    continue;
                };
                let v = match path {
                    Some(p) => lookup(&f.value, p),
                    None => Some(&f.value),
                };
                if equals.is_none_or(|e| v == Some(e)) && out.len() < limit {
                    out.push((r.clone(), f));
                }
            }
            if !gone.is_empty() {
                let _: () = redis::cmd("ZREM")
                    .arg(&ikey)
                    .arg(&gone)
                    .query_async(&mut c)
                    .await?;
                start -= gone.len();
            }
        }
        Ok(out)
    }

    /// When `key` last changed on each resource related to `k` along `relation` (one hop,
    /// outgoing): `(resource, Fact)` (cross-resource staleness).
    pub async fn related_fact(
        &self,
        k: &ResourceKey,
        relation: &str,
        key: &str,
    ) -> Result<Vec<(String, super::fact::Fact)>, StoreError> {
        let near = self
            .walk(k, relation, Direction::Out, 1, self.cfg.max_related)
            .await?;
        let names: Vec<String> = near.into_iter().map(|(r, _)| r).collect();
        let facts = self.facts_of(&k.tenant, &names).await?;
        Ok(names
            .into_iter()
            .zip(facts)
            .filter_map(|(r, (_, mut fs))| fs.remove(key).map(|f| (r, f)))
            .collect())
    }
}

/// A relation key (`<relation>:<fact key>`) of a resolve rule's `invalidated_by`.
pub fn relational(entry: &str) -> Option<(&str, &str)> {
    entry.split_once(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_teach_relations_of_their_subject() {
        let cfg = RelationsConfig {
            learn: vec![LearnRule {
                types: vec!["deployment.*".into()],
                field: "data.dependencies".into(),
                relation: "depends_on".into(),
                targets: vec![],
            }],
            ..Default::default()
        };
        let conn = RedisConn::new("redis://127.0.0.1:1/").expect("url");
        let g = Graph::new(conn, "t", cfg);
        let ev = CloudEvent::new("e", "s", "deployment.completed")
            .with_subject("checkout")
            .with_data(json!({"dependencies": ["payments", "checkout", "", "ledger"]}));
        assert_eq!(
            g.taught(&ev),
            [
                ("depends_on".to_string(), "payments".to_string()),
                ("depends_on".to_string(), "ledger".to_string())
            ]
        );
        let other = CloudEvent::new("e", "s", "sla.breached").with_subject("checkout");
        assert!(g.taught(&other).is_empty());
    }

    /// Redis Cluster: a resource's relations live in its own hash slot — the same hash tag as its
    /// context hash (Redis hashes only the `{…}` part of a key).
    #[test]
    fn relation_keys_share_the_resource_slot() {
        let k = ResourceKey::new("acme", "check/out{1}");
        let tag = |key: &str| {
            let open = key.find('{').expect("tag");
            key[open..=open + key[open..].find('}').expect("end")].to_string()
        };
        let rel = rel_key("p", &k);
        let ctx = format!("p:ctx:{}", k.hash_tag());
        assert_eq!(tag(&rel), tag(&ctx));
        assert_eq!(tag(&rel), k.hash_tag());
        assert_ne!(
            tag(&rel_key("p", &ResourceKey::new("acme", "payments"))),
            tag(&rel)
        );
    }

    #[test]
    fn expired_edges_are_not_neighbours() {
        let m: HashMap<String, String> = [
            (
                "out|depends_on|b".to_string(),
                r#"{"at":1,"exp":0}"#.to_string(),
            ),
            (
                "out|depends_on|c".to_string(),
                r#"{"at":1,"exp":5}"#.to_string(),
            ),
            (
                "in|depends_on|d".to_string(),
                r#"{"at":1,"exp":99}"#.to_string(),
            ),
        ]
        .into();
        let (mut e, expired) = Graph::parse_edges(m, 10);
        e.sort();
        assert_eq!(expired, ["out|depends_on|c"]);
        assert_eq!(
            e,
            [
                ("depends_on".to_string(), Direction::Out, "b".to_string()),
                ("depends_on".to_string(), Direction::In, "d".to_string())
            ]
        );
    }
}
