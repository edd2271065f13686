//! What every Redis-backed store shares: the connection and the resource key with its hash tag.
//!
//! Each store (context, resolve state, budgets, the audit chain head, agent stats) owns its own keys
//! behind a trait with an in-memory twin; this module owns only the connection and the naming of a
//! resource in keys.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

/// Requests one Redis connection may queue before callers wait (see [`RedisConn::get`]).
const REDIS_QUEUE: usize = 8192;

pub use crate::error::StoreError;

/// The `redis:` config section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://` for TLS). Overridden by `SWITCHYARD_REDIS_URL`.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// Prefix of every key switchyard writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// `rediss://` only: the CA certificate (PEM) the server's certificate must chain to, instead
    /// of the system's roots (a private CA; a managed Redis usually needs none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// `rediss://` only: a client certificate and its key (PEM), for servers that require mutual
    /// TLS (`tls-auth-clients yes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// A Redis Cluster: `url` names one or more seed nodes, comma separated
    /// (`redis://10.0.0.1:7000,redis://10.0.0.2:7000`); the rest are discovered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
}

impl RedisConfig {
    /// Problems of the section, as (item, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let tls = self.url.starts_with("rediss://");
        for (item, f) in [
            ("redis.ca_file", &self.ca_file),
            ("redis.cert_file", &self.cert_file),
            ("redis.key_file", &self.key_file),
        ] {
            let Some(f) = f else { continue };
            if !tls {
                p.push((item.into(), "applies to rediss:// URLs only".into()));
            } else {
                match std::fs::read_to_string(f) {
                    Err(e) => p.push((item.into(), format!("cannot read {}: {e}", f.display()))),
                    Ok(t) if !t.contains("-----BEGIN ") => {
                        p.push((item.into(), format!("{} is not a PEM file", f.display())))
                    }
                    Ok(_) => {}
                }
            }
        }
        let seeds: Vec<&str> = self.url.split(',').map(str::trim).collect();
        if seeds.len() > 1 && !self.cluster {
            p.push((
                "redis.url".into(),
                "names several nodes: set redis.cluster: true for a Redis Cluster".into(),
            ));
        }
        if self.cluster {
            for seed in &seeds {
                // Shown without its password.
                let s = &crate::secret::redact_url(seed).unwrap_or_else(|| seed.to_string());
                let db = s
                    .split_once("://")
                    .and_then(|(_, rest)| rest.split_once('/'))
                    .map(|(_, db)| db.trim_end_matches('/'))
                    .unwrap_or("");
                if s.starts_with("unix:") || s.starts_with("redis+unix:") {
                    p.push((
                        "redis.url".into(),
                        format!("{s}: a cluster node is host:port, not a socket"),
                    ));
                } else if !db.is_empty() && db != "0" {
                    p.push((
                        "redis.url".into(),
                        format!("{s}: a Redis Cluster has only database 0"),
                    ));
                }
            }
        }
        if self.key_prefix.contains('{') || self.key_prefix.contains('}') {
            p.push((
                "redis.key_prefix".into(),
                "must not contain { or } (keys carry their own hash tags)".into(),
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            p.push((
                "redis.cert_file".into(),
                "cert_file and key_file go together (mutual TLS)".into(),
            ));
        }
        p
    }
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/".into()
}
fn default_key_prefix() -> String {
    "switchyard".into()
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: default_redis_url(),
            key_prefix: default_key_prefix(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            cluster: false,
        }
    }
}

/// Identifies a resource: tenant plus resource id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub tenant: String,
    pub resource: String,
}

impl ResourceKey {
    pub fn new(tenant: impl Into<String>, resource: impl Into<String>) -> Self {
        ResourceKey {
            tenant: tenant.into(),
            resource: resource.into(),
        }
    }

    /// The Redis Cluster hash tag of this resource: every key of one resource carries it, so they
    /// share a slot and a script can change them together. Injective: `{`, `}`, `/`, `%` and tab in
    /// either part are percent-encoded, so no two (tenant, resource) pairs share a tag (ids without
    /// those characters keep the plain `{tenant/resource}` form).
    pub fn hash_tag(&self) -> String {
        format!("{{{}}}", self.encoded())
    }

    /// `tenant/resource` with `{`, `}`, `/` and `%` percent-encoded in each part; [`Self::decode`]
    /// reverses it.
    pub fn encoded(&self) -> String {
        format!("{}/{}", escape(&self.tenant), escape(&self.resource))
    }

    /// The key [`Self::encoded`] made.
    pub fn decode(s: &str) -> Option<ResourceKey> {
        let (t, r) = s.split_once('/')?;
        Some(ResourceKey::new(unescape(t)?, unescape(r)?))
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '\t' => out.push_str("%09"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        out.push(match code {
            "25" => '%',
            "2F" => '/',
            "7B" => '{',
            "7D" => '}',
            "09" => '\t',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// Memo slots per resource hash ([`Place`]): two, so that the proposals one task makes for a
/// resource (a page and a rollback), decided back to back, both find one. The stores' Lua scripts
/// name the two slots' fields themselves: change them with this.
pub const MEMO_SLOTS: usize = 2;

/// The memo slot (0-based) a hash field `<name><s>` (s = 1 ..= [`MEMO_SLOTS`]) names.
pub fn memo_field(field: &str, name: &str) -> Option<usize> {
    let s: usize = field.strip_prefix(name)?.parse().ok()?;
    (1..=MEMO_SLOTS).contains(&s).then(|| s - 1)
}

/// Where a stage's input record is, and how far its partition is delivered, for a store that keeps
/// a memo (a task's outcome, a proposal's decision) in the resource's own hash.
///
/// A memo is needed only while its input's outputs may still have to be produced again: until
/// they are delivered. So a resource's hash has [`MEMO_SLOTS`] memo slots, written by the same
/// `HSET` as the rest of the write (no command of its own, nothing to delete later): a write may
/// take one when it is empty or holds the memo of an input of the same partition that this instance
/// knows to be delivered (at or below [`Place::delivered`]: every record up to there has its outputs
/// acknowledged by the broker). Otherwise the memo goes into a key of its own, deleted once its
/// input is committed, as before. A memo found in the slot for a delivered input means the task
/// or proposal is finished (a copy further down the topic is skipped); for any other input it is
/// replayed — a new owner after a rebalance knows nothing delivered until it delivers, so it
/// replays what the previous owner may not have delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// `<topic>:<partition>` of the input record.
    pub partition: String,
    pub offset: i64,
    /// The last offset of that partition up to which every record is done (its outputs
    /// delivered), as this instance knows it; -1 when it knows none.
    pub delivered: i64,
    /// The topic's id ([`crate::kafka::topic_id`]), `""` when unknown: an offset fence written
    /// for another incarnation of the topic does not apply to this record.
    pub topic_id: String,
}

impl Place {
    /// The place of a record the consumer runtime handed over (anything else has none).
    pub fn of(rec: &crate::kafka::Input) -> Option<Place> {
        let delivered = rec.delivered.as_ref()?;
        Some(Place {
            partition: format!("{}:{}", rec.topic, rec.partition),
            offset: rec.offset,
            delivered: delivered.load(std::sync::atomic::Ordering::Acquire),
            topic_id: rec.topic_id.as_deref().unwrap_or_default().to_string(),
        })
    }

    /// `<topic>:<partition>:<offset>`, as a memo slot names its input.
    pub fn tag(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }

    /// The offset of the input `tag` (see [`Place::tag`]) when it is a delivered record of this
    /// partition.
    fn delivered_offset(&self, tag: &str) -> Option<i64> {
        let (p, o) = tag.rsplit_once(':')?;
        let o = o.parse::<i64>().ok()?;
        (p == self.partition && o <= self.delivered).then_some(o)
    }

    /// Which of a resource's [`MEMO_SLOTS`] (each the input tag of the memo it holds, or none) a
    /// write for this record takes: the first empty one, else the one holding the memo of a
    /// delivered record of this partition with the lowest offset; none while every slot holds a
    /// memo that may still be needed. (The stores' scripts apply the same rule.)
    pub fn pick_slot<'a>(&self, slots: impl IntoIterator<Item = Option<&'a str>>) -> Option<usize> {
        let mut best: Option<(usize, i64)> = None;
        for (i, tag) in slots.into_iter().enumerate() {
            let Some(tag) = tag else { return Some(i) };
            if let Some(o) = self.delivered_offset(tag) {
                if best.is_none_or(|(_, b)| o < b) {
                    best = Some((i, o));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// Whether a memo kept for the input `tag`, found by this record, is of another record of
    /// this partition that is delivered: this record is a copy of finished work.
    pub fn delivered_tag(&self, tag: &str) -> bool {
        self.delivered_offset(tag).is_some_and(|o| o != self.offset)
    }
}

/// The resources whose list of recently finished ids was full when last read (a hint kept in
/// memory, per store).
///
/// A stored outcome or decision (kept until its input is committed, and never longer than the
/// resource's hash) is written together with its id at the head of its resource's capped list of
/// finished ids, so while the list is not full an id missing from it has nothing stored, and a
/// read need not ask for it: an extra `GET` per task saved. Once the list is full (holds as many
/// ids as configured, or ever dropped one: a flag in the hash, so a larger count configured later
/// still counts it as full), an id may have been pushed out while its outcome is still stored, so
/// reads of that resource ask for it in the same round trip. A missing or wrong hint only costs
/// a command or a round trip, never a result. At most [`FullLists::MAX`] resources are remembered;
/// past that the hint starts again from nothing.
#[derive(Debug, Default)]
pub struct FullLists(std::sync::Mutex<std::collections::HashSet<String>>);

impl FullLists {
    pub const MAX: usize = 16_384;

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key`'s list was full when last read.
    pub fn full(&self, key: &str) -> bool {
        self.lock().contains(key)
    }

    /// Notes what a read of `key` found.
    pub fn note(&self, key: &str, full: bool) {
        let mut set = self.lock();
        if !full {
            set.remove(key);
        } else if !set.contains(key) {
            if set.len() >= Self::MAX {
                set.clear();
            }
            set.insert(key.to_string());
        }
    }
}

/// A lazily connected, self-reconnecting Redis connection shared by every store of the process.
///
/// Every store reaches Redis through [`RedisConn::get`], so this is where a Redis that lost its
/// state is refused: once the epoch watcher ([`watch_epoch`]) finds the marker gone, every read and
/// write fails as [`StoreError::Lost`] (records wait, nothing is skipped) until `switchyard recover`
/// has rebuilt the state.
#[derive(Clone)]
pub struct RedisConn {
    client: Client,
    manager: std::sync::Arc<OnceCell<Conn>>,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Moves on whenever Redis' state may have been replaced (lost, or a new epoch marker): what a
    /// store keeps of that state in memory is not trusted across it.
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// On a Redis Cluster: the current epoch's slot markers are all written (see [`SLOTS`]), so the
    /// scripts that create state check them.
    slot_markers: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// One Redis, or a Redis Cluster (one per connection, made once: its size does not matter).
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A connection to one Redis or to a Redis Cluster; what every store sends its commands on.
///
/// Every key a script or a transaction touches shares its resource's hash tag, so scripts run on
/// a cluster as on one node. A pipeline on a cluster is sent command by command, concurrently, each
/// to its slot's node (a pipeline of one batch spans many resources, hence many slots); the answers
/// come back in order.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// What routes a command on a cluster: its key's hash tag (`{…}`), else the key; for
/// `EVAL`/`EVALSHA`/`FCALL` the first key; empty for a command without a key.
fn routing_key(cmd: &redis::Cmd) -> Vec<u8> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect();
    let name = args
        .first()
        .map(|n| n.to_ascii_uppercase())
        .unwrap_or_default();
    let at = match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let keys = args
                .get(2)
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0);
            if keys == 0 {
                return Vec::new();
            }
            3
        }
        _ => 1,
    };
    let Some(key) = args.get(at) else {
        return Vec::new();
    };
    if let Some(open) = key.iter().position(|b| *b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|b| *b == b'}') {
            if len > 0 {
                return key[open + 1..open + 1 + len].to_vec();
            }
        }
    }
    key.to_vec()
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => {
                if pipeline.is_transaction() {
                    return c.req_packed_commands(pipeline, offset, count);
                }
                let c = c.clone();
                Box::pin(async move {
                    use futures::{StreamExt, TryStreamExt};
                    // One sub-pipeline per key (by hash tag): commands on one key keep their order
                    // and travel together to its slot's node; at most 16 in flight.
                    let cmds: Vec<&redis::Cmd> = pipeline.cmd_iter().collect();
                    let mut groups: Vec<Vec<usize>> = Vec::new();
                    let mut by_key: std::collections::HashMap<Vec<u8>, usize> = Default::default();
                    for (i, cmd) in cmds.iter().enumerate() {
                        let g = *by_key.entry(routing_key(cmd)).or_insert_with(|| {
                            groups.push(Vec::new());
                            groups.len() - 1
                        });
                        groups[g].push(i);
                    }
                    let answered: Vec<(Vec<usize>, Vec<redis::Value>)> =
                        futures::stream::iter(groups.into_iter().map(|idx| {
                            let mut c = c.clone();
                            let mut sub = redis::pipe();
                            for &i in &idx {
                                sub.add_command(cmds[i].clone());
                            }
                            async move {
                                let vals = c.req_packed_commands(&sub, 0, idx.len()).await?;
                                Ok::<_, redis::RedisError>((idx, vals))
                            }
                        }))
                        .buffer_unordered(16)
                        .try_collect()
                        .await?;
                    let mut out = vec![redis::Value::Nil; cmds.len()];
                    for (idx, vals) in answered {
                        for (i, v) in idx.into_iter().zip(vals) {
                            out[i] = v;
                        }
                    }
                    Ok(out)
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    pub fn new(url: &str) -> Result<Self, StoreError> {
        Ok(Self::with_client(Client::Single(redis::Client::open(url)?)))
    }

    /// The connection of a `redis:` section: its URL (with `cluster: true`, the seed nodes, comma
    /// separated), and for `rediss://` its CA and client certificate when set (TLS through rustls;
    /// without a CA file the system's roots, which `SSL_CERT_FILE` can replace).
    pub fn from_config(c: &RedisConfig) -> Result<Self, StoreError> {
        let read = |f: &std::path::Path| {
            std::fs::read(f)
                .map_err(|e| StoreError::Redis(format!("cannot read {}: {e}", f.display())))
        };
        let certs = if c.ca_file.is_none() && c.cert_file.is_none() {
            None
        } else {
            let root_cert = c.ca_file.as_deref().map(read).transpose()?;
            let client_tls = match (&c.cert_file, &c.key_file) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: read(cert)?,
                    client_key: read(key)?,
                }),
                _ => None,
            };
            Some(redis::TlsCertificates {
                client_tls,
                root_cert,
            })
        };
        if c.cluster {
            let seeds: Vec<&str> = c.url.split(',').map(str::trim).collect();
            let mut b = redis::cluster::ClusterClientBuilder::new(seeds)
                .connection_timeout(Duration::from_secs(2))
                .response_timeout(Duration::from_secs(2));
            if let Some(certs) = certs {
                b = b.certs(certs);
            }
            return Ok(Self::with_client(Client::Cluster(b.build()?)));
        }
        let client = match certs {
            Some(certs) => redis::Client::build_with_tls(c.url.as_str(), certs)?,
            None => redis::Client::open(c.url.as_str())?,
        };
        Ok(Self::with_client(Client::Single(client)))
    }

    fn with_client(client: Client) -> Self {
        RedisConn {
            client,
            manager: Default::default(),
            lost: Default::default(),
            generation: Default::default(),
            slot_markers: Default::default(),
        }
    }

    /// The key a guarded script checks before it creates state at `key` (a resource's resolve
    /// record, an audit chain's head), so that nothing is created on a Redis that came back empty
    /// even before the epoch watcher's next look: on a single Redis the epoch marker; on a Redis
    /// Cluster the slot marker of `key`'s slot ([`SLOTS`]), once they are all written for the current
    /// epoch (none before: the watcher alone notices then).
    pub fn guard_key(&self, prefix: &str, key: &str) -> Option<String> {
        if !self.is_cluster() {
            return Some(epoch_key(prefix));
        }
        self.slot_markers
            .load(std::sync::atomic::Ordering::Acquire)
            .then(|| slot_marker_key(prefix, key_slot(key)))
    }

    fn set_slot_markers(&self, written: bool) {
        self.slot_markers
            .store(written, std::sync::atomic::Ordering::Release);
    }

    /// Whether this is a Redis Cluster (keys of one script must then share a slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self.client, Client::Cluster(_))
    }

    /// A pipeline deleting `keys`: on a single Redis one `DEL` per 512 keys (Redis counts, and
    /// dispatches, one command for all of them); in a cluster one `DEL` per key (keys of different
    /// slots cannot share a command).
    pub fn delete_keys(&self, keys: impl IntoIterator<Item = String>) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        if self.is_cluster() {
            for k in keys {
                pipe.del(k).ignore();
            }
            return pipe;
        }
        let keys: Vec<String> = keys.into_iter().collect();
        for chunk in keys.chunks(512) {
            pipe.del(chunk).ignore();
        }
        pipe
    }

    /// Whether Redis lost its state (its epoch marker is gone) and nothing may use it.
    pub fn is_lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_lost(&self, lost: bool) {
        if lost {
            self.next_generation();
        }
        self.lost.store(lost, std::sync::atomic::Ordering::Relaxed);
    }

    /// See [`RedisConn::generation`].
    fn next_generation(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// A number that moves on whenever Redis' state may have been replaced (found lost, or another
    /// recovery's epoch marker adopted): in-memory copies of that state made under another number
    /// are not to be used.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The connection; connecting on first use. Failing to connect is an error now, a retry later.
    pub async fn get(&self) -> Result<Conn, StoreError> {
        if self.is_lost() {
            return Err(StoreError::Lost);
        }
        self.get_unguarded().await
    }

    /// The connection even while the state is lost (the epoch watcher, recovery).
    pub async fn get_unguarded(&self) -> Result<Conn, StoreError> {
        let m = self
            .manager
            .get_or_try_init(|| async {
                match &self.client {
                    Client::Single(client) => {
                        let cfg = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(Duration::from_secs(2)))
                            .set_response_timeout(Some(Duration::from_secs(2)))
                            .set_number_of_retries(2)
                            .set_max_delay(Duration::from_millis(500))
                            // The client's default queue of 50 requests stalled the whole
                            // connection under a burst (thousands of records in flight, each
                            // stage pipelining per batch): every request timed out while Redis
                            // sat idle. In-flight records are bounded by kafka.max_in_flight per
                            // stage, so a queue this deep is never the limit.
                            .set_pipeline_buffer_size(REDIS_QUEUE);
                        ConnectionManager::new_with_config(client.clone(), cfg)
                            .await
                            .map(Conn::Single)
                    }
                    Client::Cluster(client) => {
                        client.get_async_connection().await.map(Conn::Cluster)
                    }
                }
            })
            .await?;
        Ok(m.clone())
    }

    /// Whether Redis answers a PING within `timeout` (readiness).
    pub async fn ping(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            match &self.client {
                Client::Single(client) => {
                    let mut c = client.get_multiplexed_async_connection().await?;
                    redis::cmd("PING").query_async::<String>(&mut c).await
                }
                Client::Cluster(client) => {
                    let mut c = client.get_async_connection().await?;
                    redis::cmd("PING").query_async::<String>(&mut c).await
                }
            }
        })
        .await
        .is_ok_and(|r| r.is_ok())
    }
}

/// The epoch marker: written once when switchyard first uses an empty Redis (or by `switchyard
/// recover`), it disappears only when Redis loses its data.
pub fn epoch_key(prefix: &str) -> String {
    format!("{prefix}:epoch")
}

/// On a Redis Cluster the epoch marker alone lives on one shard, so a *different* shard coming back
/// empty would go unnoticed. So it is written as this many shard markers too
/// (`<prefix>:epoch:{<tag>}`), marker `i` in slot `i × 16384 / SHARD_MARKERS`: any 256 contiguous
/// slots hold exactly one, so every shard owning that many holds some, and loses them with its
/// data. Once all are written, the completion key (`{<prefix>:epoch}:shards`, in the marker's own
/// slot, so lost only with it) names the epoch they were written for; from then on a missing one
/// means a shard lost its data: the epoch is torn.
pub const SHARD_MARKERS: usize = 64;

/// The shard markers' hash tags: `e<j>` with the smallest `j` whose slot is marker `i`'s.
fn shard_tags() -> &'static [String] {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let width = (16384 / SHARD_MARKERS) as u16;
    TAGS.get_or_init(|| {
        find_tags('e', SHARD_MARKERS, |slot| {
            (slot % width == 0).then_some(usize::from(slot / width))
        })
    })
}

/// `n` hash tags `<letter><j>`: for each index, the smallest `j` whose slot `index_of` maps to it.
fn find_tags(letter: char, n: usize, index_of: impl Fn(u16) -> Option<usize>) -> Vec<String> {
    let mut tags = vec![String::new(); n];
    let mut left = n;
    for j in 0u32.. {
        let t = format!("{letter}{j}");
        if let Some(i) = index_of(cluster_slot(&t)).filter(|i| tags[*i].is_empty()) {
            tags[i] = t;
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    tags
}

/// The shard markers' keys.
pub fn shard_epoch_keys(prefix: &str) -> Vec<String> {
    shard_tags()
        .iter()
        .map(|t| format!("{prefix}:epoch:{{{t}}}"))
        .collect()
}

/// The completion key: the epoch whose shard markers were all written.
fn shards_done_key(prefix: &str) -> String {
    format!("{{{}}}:shards", epoch_key(prefix))
}

/// The Redis Cluster slot of a hash tag (CRC16/XMODEM, as Redis and redis-rs compute it).
fn cluster_slot(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % 16384
}

/// The Redis Cluster slot of a key: its hash tag's (the text between the first `{` and the next
/// `}`, when not empty), else the whole key's.
pub fn key_slot(key: &str) -> u16 {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return cluster_slot(&key[open + 1..open + 1 + len]);
            }
        }
    }
    cluster_slot(key)
}

/// The shard markers tell the epoch watcher, once a second, that a shard lost its data; in
/// between, on a Redis Cluster, the scripts that create a resource's resolve record or an audit
/// chain's head cannot look at them (a script's keys share one slot). So every slot also holds a
/// **slot marker** (`<prefix>:epochslot:{<tag>}`, this many keys, ~1.5 MB), written with the shard
/// markers, and those scripts check the one in their own key's slot as they check the epoch marker
/// on a single Redis: a shard that came back empty lost its slot markers with everything else, so
/// no record is created there on the empty state. A second completion key
/// (`{<prefix>:epoch}:slots`) names the epoch whose slot markers were all written; the scripts check
/// them only from then on ([`RedisConn::guard_key`]).
pub const SLOTS: usize = 16384;

/// The slot markers' hash tags: `s<j>` with the smallest `j` whose slot is the marker's.
fn slot_tags() -> &'static [String] {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    TAGS.get_or_init(|| find_tags('s', SLOTS, |slot| Some(usize::from(slot))))
}

/// The slot marker of `slot`.
pub fn slot_marker_key(prefix: &str, slot: u16) -> String {
    format!(
        "{prefix}:epochslot:{{{}}}",
        slot_tags()[usize::from(slot) % SLOTS]
    )
}

/// The completion key of the slot markers: the epoch whose slot markers were all written.
fn slots_done_key(prefix: &str) -> String {
    format!("{{{}}}:slots", epoch_key(prefix))
}

/// What the epoch markers say.
#[derive(Debug, Clone, PartialEq)]
pub enum Epoch {
    /// No marker.
    Absent,
    /// The marker (and on a Redis Cluster all its shard markers).
    Whole(String),
    /// The marker, but some of its shard markers are gone: a cluster shard lost its data.
    Torn(String),
}

/// Reads the epoch markers. On a Redis Cluster, shard markers not yet completed for this epoch
/// (written by a build before them, or a writer stopped half way) are written, then completed.
pub async fn epoch(conn: &RedisConn, prefix: &str) -> Result<Epoch, StoreError> {
    let mut c = conn.get_unguarded().await?;
    if !conn.is_cluster() {
        let main: Option<String> = redis::cmd("GET")
            .arg(epoch_key(prefix))
            .query_async(&mut c)
            .await?;
        return Ok(main.map_or(Epoch::Absent, Epoch::Whole));
    }
    // The marker and its completion keys share a slot: one round trip, with the shard markers.
    let mut pipe = redis::pipe();
    pipe.get(epoch_key(prefix))
        .get(shards_done_key(prefix))
        .get(slots_done_key(prefix));
    for k in shard_epoch_keys(prefix) {
        pipe.exists(k);
    }
    let reply: Vec<redis::Value> = pipe.query_async(&mut c).await?;
    let text = |v: Option<&redis::Value>| -> Option<String> {
        v.and_then(|v| redis::FromRedisValue::from_redis_value_ref(v).ok())
    };
    let Some(id) = text(reply.first()) else {
        conn.set_slot_markers(false);
        return Ok(Epoch::Absent);
    };
    let present = reply
        .iter()
        .skip(3)
        .filter(|v| matches!(v, redis::Value::Int(n) if *n > 0))
        .count();
    if text(reply.get(1)).as_deref() == Some(id.as_str()) {
        if present < SHARD_MARKERS {
            conn.set_slot_markers(false);
            return Ok(Epoch::Torn(id));
        }
    } else {
        complete_shard_markers(conn, prefix, &id).await?;
    }
    if text(reply.get(2)).as_deref() != Some(id.as_str()) {
        conn.set_slot_markers(false);
        complete_slot_markers(conn, prefix, &id).await?;
    }
    conn.set_slot_markers(true);
    Ok(Epoch::Whole(id))
}

/// Writes the missing slot markers ([`SLOTS`]), then their completion key for `id`.
async fn complete_slot_markers(conn: &RedisConn, prefix: &str, id: &str) -> Result<(), StoreError> {
    let keys = (0..SLOTS).map(|slot| slot_marker_key(prefix, slot as u16));
    complete_markers(conn, keys, &slots_done_key(prefix), id).await
}

/// Writes the missing shard markers, then the completion key for `id`.
async fn complete_shard_markers(
    conn: &RedisConn,
    prefix: &str,
    id: &str,
) -> Result<(), StoreError> {
    complete_markers(
        conn,
        shard_epoch_keys(prefix).into_iter(),
        &shards_done_key(prefix),
        id,
    )
    .await
}

/// Writes each of `markers` that is missing (`SET NX`, so none is replaced), then `done` = `id`.
async fn complete_markers(
    conn: &RedisConn,
    markers: impl Iterator<Item = String>,
    done: &str,
    id: &str,
) -> Result<(), StoreError> {
    let mut c = conn.get_unguarded().await?;
    let markers: Vec<String> = markers.collect();
    // In parts, so that one answer is never thousands of values long.
    for part in markers.chunks(2048) {
        let mut pipe = redis::pipe();
        for k in part {
            pipe.cmd("SET").arg(k).arg(id).arg("NX").ignore();
        }
        let () = pipe.query_async(&mut c).await?;
    }
    let () = redis::cmd("SET")
        .arg(done)
        .arg(id)
        .query_async(&mut c)
        .await?;
    Ok(())
}

/// The epoch marker's value while the epoch is whole (a torn one counts as gone).
pub async fn read_epoch(conn: &RedisConn, prefix: &str) -> Result<Option<String>, StoreError> {
    Ok(match epoch(conn, prefix).await? {
        Epoch::Whole(id) => Some(id),
        Epoch::Absent | Epoch::Torn(_) => None,
    })
}

/// Writes a new epoch marker unless one exists; returns the marker in place (on a Redis Cluster,
/// reading it back writes and completes its shard markers). A torn epoch is left as it is: only
/// [`renew_epoch`] (`switchyard recover`) replaces it.
pub async fn create_epoch(conn: &RedisConn, prefix: &str) -> Result<String, StoreError> {
    let id = new_epoch_id();
    let mut c = conn.get_unguarded().await?;
    let _: Option<String> = redis::cmd("SET")
        .arg(epoch_key(prefix))
        .arg(&id)
        .arg("NX")
        .query_async(&mut c)
        .await?;
    match epoch(conn, prefix).await? {
        Epoch::Whole(e) => Ok(e),
        Epoch::Torn(_) => Err(StoreError::Redis(
            "the epoch is torn (a cluster shard lost its data): run `switchyard recover`".into(),
        )),
        Epoch::Absent => Err(StoreError::Redis(
            "the epoch marker vanished as it was written".into(),
        )),
    }
}

/// `switchyard recover`'s new epoch: written as by [`create_epoch`] where there is none; a torn one
/// is replaced — the marker moved from the torn id to a new one and its completion dropped (one
/// script on the marker's slot, so of two recoveries at once one moves it and the other finds it
/// moved), then reading it back writes the missing shard markers and completes them.
pub async fn renew_epoch(conn: &RedisConn, prefix: &str) -> Result<String, StoreError> {
    let id = renew_marker(conn, prefix).await?;
    // Every slot marker again, whatever the completion key says: one can go without any shard
    // marker (a shard owning fewer than 256 contiguous slots, an eviction), and then creation in
    // its slot is refused until it is back. (SET NX: the others stay.)
    if conn.is_cluster() {
        complete_slot_markers(conn, prefix, &id).await?;
    }
    Ok(id)
}

async fn renew_marker(conn: &RedisConn, prefix: &str) -> Result<String, StoreError> {
    let Epoch::Torn(old) = epoch(conn, prefix).await? else {
        return create_epoch(conn, prefix).await;
    };
    let mut c = conn.get_unguarded().await?;
    let _: i64 = redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
",
    )
    .key(epoch_key(prefix))
    .key(shards_done_key(prefix))
    .key(slots_done_key(prefix))
    .arg(&old)
    .arg(new_epoch_id())
    .invoke_async(&mut c)
    .await?;
    read_epoch(conn, prefix)
        .await?
        .ok_or_else(|| StoreError::Redis("the renewed epoch is not whole".into()))
}

/// A new epoch's id: random, with the time it was made.
/// When the epoch with marker `id` began (ms since the epoch): the time [`new_epoch_id`] put in it.
pub fn epoch_began_ms(id: &str) -> Option<i64> {
    let (_, at) = id.rsplit_once('@')?;
    chrono::DateTime::parse_from_rfc3339(at)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn new_epoch_id() -> String {
    format!(
        "{}@{}",
        uuid::Uuid::new_v4().simple(),
        chrono::Utc::now().to_rfc3339()
    )
}

/// What [`start_epoch`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum EpochStart {
    /// The marker is there: Redis holds the state switchyard left.
    Known(String),
    /// No marker and no history in Kafka: a new installation; a marker was written.
    Fresh(String),
    /// No marker but Kafka shows switchyard ran before: Redis lost its data.
    Lost,
}

/// Checks the marker at start: `has_history` says whether Kafka shows switchyard ran before (its
/// consumer groups committed offsets). A lost state marks the connection lost.
pub async fn start_epoch(
    conn: &RedisConn,
    prefix: &str,
    has_history: bool,
) -> Result<EpochStart, StoreError> {
    Ok(match epoch(conn, prefix).await? {
        Epoch::Whole(e) => EpochStart::Known(e),
        // A torn epoch proves one was written: lost, whatever Kafka says.
        Epoch::Torn(_) => {
            conn.set_lost(true);
            EpochStart::Lost
        }
        Epoch::Absent if has_history => {
            conn.set_lost(true);
            EpochStart::Lost
        }
        Epoch::Absent => EpochStart::Fresh(create_epoch(conn, prefix).await?),
    })
}

/// Checks the epoch marker every `every` until `stop`: gone means Redis lost its data (everything
/// waits, [`StoreError::Lost`]); a new one after that means `switchyard recover` rebuilt the state
/// (everything resumes).
/// `has_history` is what the start found in Kafka: without history and without a known marker, an
/// empty Redis is a new installation and gets its marker.
pub async fn watch_epoch(
    conn: RedisConn,
    prefix: String,
    mut known: Option<String>,
    has_history: bool,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut last_warning = std::time::Instant::now() - Duration::from_secs(3600);
    loop {
        match epoch(&conn, &prefix).await {
            Ok(Epoch::Absent) if known.is_none() && !has_history && !conn.is_lost() => {
                match create_epoch(&conn, &prefix).await {
                    Ok(e) => known = Some(e),
                    Err(e) => {
                        tracing::debug!(error = %e, "Writing the epoch marker failed; retrying.")
                    }
                }
            }
            // Gone, or torn (which proves one was written: never a new installation).
            Ok(Epoch::Absent | Epoch::Torn(_)) => {
                if !conn.is_lost() || last_warning.elapsed() > Duration::from_secs(30) {
                    tracing::error!(key = %epoch_key(&prefix), "Redis lost its state (its epoch marker is gone, or on a Redis Cluster some of its shard markers): switchyard waits; rebuild the state from Kafka with `switchyard recover` (see the README, Redis must be durable).");
                    last_warning = std::time::Instant::now();
                }
                conn.set_lost(true);
            }
            Ok(Epoch::Whole(e)) if known.as_deref() != Some(e.as_str()) => {
                if conn.is_lost() {
                    tracing::info!("Redis state was recovered (a new epoch marker); resuming.");
                    conn.set_lost(false);
                } else if known.is_some() {
                    tracing::warn!(
                        "Redis has a new epoch marker (a recovery ran elsewhere); adopting it."
                    );
                    conn.next_generation();
                }
                known = Some(e);
            }
            Ok(Epoch::Whole(_)) => {}
            Err(e) => tracing::debug!(error = %e, "Reading the epoch marker failed; retrying."),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Reads an integer or numeric string out of a script reply (Lua numbers come back either way).
pub fn reply_number(v: Option<&redis::Value>) -> f64 {
    match v {
        Some(redis::Value::Int(n)) => *n as f64,
        Some(redis::Value::BulkString(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0),
        Some(redis::Value::SimpleString(s)) => s.parse().unwrap_or(0.0),
        Some(redis::Value::Double(d)) => *d,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hash_tags_never_collide() {
        // Both pairs shared one tag (and so context, resolve state and audit head) before.
        let k = |t: &str, r: &str| ResourceKey::new(t, r).hash_tag();
        assert_ne!(k("default", "p1b{1}"), k("default", "p1b_1_"));
        assert_ne!(k("a/x", "y"), k("a", "x/y"));
        assert_eq!(
            k("default", "checkout"),
            "{default/checkout}",
            "plain ids keep their keys"
        );
        assert_eq!(k("t", "a}b"), "{t/a%7Db}", "no brace ends the tag early");
    }

    #[test]
    fn shard_markers_fall_one_in_every_256_slots() {
        // Redis's own values (`CLUSTER KEYSLOT`).
        assert_eq!(cluster_slot("somekey"), 11058);
        assert_eq!(cluster_slot("foo"), 12182);
        let tags = shard_tags();
        assert_eq!(tags.len(), SHARD_MARKERS);
        for (i, t) in tags.iter().enumerate() {
            assert_eq!(
                usize::from(cluster_slot(t)),
                i * 16384 / SHARD_MARKERS,
                "{t}"
            );
        }
        let keys = shard_epoch_keys("sy");
        assert_eq!(keys[0], format!("sy:epoch:{{{}}}", tags[0]));
        // The completion key shares the marker's slot (its hash tag is the marker's name).
        assert_eq!(shards_done_key("sy"), "{sy:epoch}:shards");
    }

    #[test]
    fn every_slot_has_a_marker_in_it_and_keys_find_theirs() {
        // A key's slot is its hash tag's, as Redis computes it (`CLUSTER KEYSLOT`).
        assert_eq!(key_slot("somekey"), 11058);
        assert_eq!(key_slot("x{somekey}y:z"), 11058);
        assert_eq!(key_slot("{foo}{somekey}"), 12182, "the first tag counts");
        assert_eq!(
            key_slot("a{}b"),
            cluster_slot("a{}b"),
            "an empty tag is no tag"
        );
        assert_eq!(
            key_slot("a{b"),
            cluster_slot("a{b"),
            "an open brace is no tag"
        );
        assert_eq!(slot_tags().len(), SLOTS);
        for slot in 0..SLOTS as u16 {
            let marker = slot_marker_key("sy", slot);
            assert_eq!(key_slot(&marker), slot, "{marker}");
        }
        // Not among the shard markers the watcher counts (`<prefix>:epoch:*`), and its completion
        // key shares the epoch marker's slot.
        assert!(!slot_marker_key("sy", 0).starts_with("sy:epoch:"));
        assert_eq!(key_slot(&slots_done_key("sy")), key_slot("sy:epoch"));
        // A resource's record and an audit chain's head are guarded by their own slot's marker.
        let res = format!("sy:res:{}", ResourceKey::new("t", "checkout").hash_tag());
        assert_eq!(
            key_slot(&slot_marker_key("sy", key_slot(&res))),
            cluster_slot("t/checkout")
        );
    }

    proptest! {
        #[test]
        fn encoding_is_injective(t1 in ".{0,8}", r1 in ".{0,8}", t2 in ".{0,8}", r2 in ".{0,8}") {
            let (a, b) = (ResourceKey::new(&t1, &r1), ResourceKey::new(&t2, &r2));
            prop_assert_eq!(a.hash_tag() == b.hash_tag(), a == b);
            prop_assert_eq!(ResourceKey::decode(&a.encoded()), Some(a.clone()));
            let tag = a.hash_tag();
            prop_assert_eq!(tag[1..tag.len() - 1].find(['{', '}']), None);
        }
    }
}
