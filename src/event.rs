//! The event contract: CloudEvents 1.0 attributes as switchyard reads and writes them.
//!
//! Every record switchyard consumes is turned into a [`CloudEvent`] by [`crate::codec`]; every record it
//! writes is a `CloudEvent` too, so a subscriber needs nothing of ours to read it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The only CloudEvents version switchyard accepts and writes.
pub const SPEC_VERSION: &str = "1.0";

/// Event data as JSON text.
#[derive(Debug, Clone)]
pub struct RawData(Box<serde_json::value::RawValue>);

impl RawData {
    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RawData {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Serialize for RawData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// The tenant of an event without a `tenant` extension.
pub const DEFAULT_TENANT: &str = "default";

/// A CloudEvents 1.0 event. `subject` carries the resource id the event is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// RFC 3339 timestamp, validated by the codec on the way in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Data of an event switchyard writes, serialized once from its typed form (written as
    /// `data`; never read: what is read is [`CloudEvent::data`]).
    #[serde(
        rename = "data",
        skip_deserializing,
        skip_serializing_if = "Option::is_none"
    )]
    pub raw_data: Option<RawData>,
    /// Extension attributes such as `tenant` and `traceparent`.
    #[serde(flatten)]
    pub extensions: Map<String, Value>,
}

impl CloudEvent {
    /// A new event with the required attributes and JSON data.
    pub fn new(id: impl Into<String>, source: impl Into<String>, ty: impl Into<String>) -> Self {
        CloudEvent {
            specversion: SPEC_VERSION.to_string(),
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: None,
            raw_data: None,
            extensions: Map::new(),
        }
    }

    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Typed data, serialized straight to JSON text (no [`Value`] tree in between).
    pub fn with_typed_data<T: Serialize>(mut self, data: &T) -> Result<Self, serde_json::Error> {
        self.datacontenttype = Some("application/json".to_string());
        self.data = None;
        self.raw_data = Some(RawData(serde_json::value::to_raw_value(data)?));
        Ok(self)
    }

    pub fn with_data(mut self, data: Value) -> Self {
        self.datacontenttype = Some("application/json".to_string());
        self.raw_data = None;
        self.data = Some(data);
        self
    }

    pub fn with_time_now(mut self) -> Self {
        self.time = Some(now_rfc3339());
        self
    }

    /// Sets `time` (RFC 3339); an empty string means now.
    pub fn with_time(mut self, time: &str) -> Self {
        self.time = Some(if time.is_empty() {
            now_rfc3339()
        } else {
            time.to_string()
        });
        self
    }

    pub fn with_extension(mut self, name: &str, value: impl Into<String>) -> Self {
        self.extensions
            .insert(name.to_string(), Value::String(value.into()));
        self
    }

    /// A string-valued extension attribute.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.extensions.get(name).and_then(Value::as_str)
    }

    /// The tenant this event belongs to (`tenant` extension), `default` when absent.
    pub fn tenant(&self) -> &str {
        self.extension("tenant").unwrap_or(DEFAULT_TENANT)
    }

    pub fn traceparent(&self) -> Option<&str> {
        self.extension("traceparent")
    }

    /// Looks up a value by a dotted path such as `data.environment` or `subject`.
    ///
    /// Top-level names address attributes (`type`, `source`, `subject`, extensions); `data.` descends into
    /// the data object, with numeric segments indexing arrays.
    pub fn lookup(&self, path: &str) -> Option<Value> {
        let mut parts = path.split('.');
        let head = parts.next()?;
        let root: Value = match head {
            "id" => Value::String(self.id.clone()),
            "source" => Value::String(self.source.clone()),
            "type" => Value::String(self.ty.clone()),
            "subject" => Value::String(self.subject.clone()?),
            "time" => Value::String(self.time.clone()?),
            "data" => {
                let mut cur = self.data.as_ref()?;
                for seg in parts {
                    cur = match cur {
                        Value::Object(m) => m.get(seg)?,
                        Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
                        _ => return None,
                    };
                }
                return Some(cur.clone());
            }
            other => self.extensions.get(other)?.clone(),
        };
        if parts.next().is_some() {
            return None;
        }
        Some(root)
    }
}

/// Current time as an RFC 3339 string with millisecond precision (UTC).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The time decisions are made at: now, or — for `replay`, which decides each proposal at its
/// recorded time — a time its holder sets.
#[derive(Debug, Clone, Default)]
pub struct Clock(Option<std::sync::Arc<std::sync::atomic::AtomicI64>>);

impl Clock {
    /// A clock reading `at` (seconds since the epoch), which its holder sets.
    pub fn set_by(at: std::sync::Arc<std::sync::atomic::AtomicI64>) -> Self {
        Clock(Some(at))
    }

    /// Seconds since the epoch.
    pub fn secs(&self) -> i64 {
        match &self.0 {
            Some(at) => at.load(std::sync::atomic::Ordering::Relaxed),
            None => now_secs(),
        }
    }

    /// The RFC 3339 time of a decision made at `secs` (read from this clock): now, to the
    /// millisecond, unless the clock is set.
    pub fn stamp(&self, secs: i64) -> String {
        match &self.0 {
            Some(_) => chrono::DateTime::from_timestamp(secs, 0)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            None => now_rfc3339(),
        }
    }
}

/// Extension attribute names must be lower-case letters and digits (CloudEvents 1.0, section 3.1.1).
pub fn is_valid_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lookup_reads_attributes_data_and_extensions() {
        let ev = CloudEvent::new("1", "ci", "deployment.started")
            .with_subject("svc-a")
            .with_data(json!({"env": "prod", "tags": ["a", "b"], "n": {"x": 3}}))
            .with_extension("tenant", "acme");
        assert_eq!(ev.lookup("type"), Some(json!("deployment.started")));
        assert_eq!(ev.lookup("subject"), Some(json!("svc-a")));
        assert_eq!(ev.lookup("data.env"), Some(json!("prod")));
        assert_eq!(ev.lookup("data.tags.1"), Some(json!("b")));
        assert_eq!(ev.lookup("data.n.x"), Some(json!(3)));
        assert_eq!(ev.lookup("data.missing"), None);
        assert_eq!(ev.lookup("tenant"), Some(json!("acme")));
        assert_eq!(ev.lookup("type.x"), None);
        assert_eq!(ev.tenant(), "acme");
    }

    #[test]
    fn serializes_type_and_flattens_extensions() {
        let ev = CloudEvent::new("1", "ci", "t").with_extension("tenant", "acme");
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["type"], "t");
        assert_eq!(v["tenant"], "acme");
        assert!(v.get("subject").is_none());
    }
}
