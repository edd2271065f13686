//! Decoding records into [`CloudEvent`]s and encoding events into records. Pure: no I/O.
//!
//! Accepted on the way in:
//! - structured JSON (`application/cloudevents+json`, or any JSON object carrying `specversion`);
//! - Kafka binary mode: attributes in `ce_*` headers, `content-type` header, the payload is the data
//!   (JSON, or Avro single-object encoded when the content type says `avro` or the marker is present);
//! - Avro single-object encoding of an envelope schema from `schemas/` (fields `specversion`, `id`,
//!   `source`, `type`, ... and `data`).
//!
//! Written: structured JSON by default, or the Avro envelope named by the topic definition.

use serde_json::{Map, Value};

use crate::event::{is_valid_extension_name, CloudEvent, SPEC_VERSION};
use crate::schema::{is_single_object, RegisteredSchema, SchemaRegistry, SINGLE_OBJECT_HEADER_LEN};

/// Content type of structured JSON CloudEvents.
pub const STRUCTURED_JSON: &str = "application/cloudevents+json";
/// Content type of records switchyard writes as Avro envelopes.
pub const STRUCTURED_AVRO: &str = "application/cloudevents+avro";
/// Header carrying the content type (CloudEvents Kafka protocol binding).
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// A record as read from Kafka, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub headers: &'a [(String, Vec<u8>)],
}

/// Why a record could not be turned into an event. [`DecodeError::reason`] is a bounded label.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is empty")]
    Empty,
    #[error("payload is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("payload is not a CloudEvent: {0}")]
    NotCloudEvent(String),
    #[error("unsupported specversion {0:?} (only 1.0)")]
    UnsupportedSpecVersion(String),
    #[error("attribute {name} is invalid: {detail}")]
    InvalidAttribute { name: String, detail: String },
    #[error("Avro payload names schema fingerprint {0} which is not in schemas/")]
    UnknownSchema(String),
    #[error("Avro payload does not match schema {schema}: {detail}")]
    MalformedAvro { schema: String, detail: String },
    #[error("data has content type {0:?} which switchyard cannot read")]
    UnsupportedContentType(String),
    #[error("event has no subject and the record has no key, so its resource is unknown")]
    MissingResource,
    #[error("JSON is nested {depth} levels deep or more; the limit is {max}")]
    TooDeep { depth: usize, max: usize },
}

impl DecodeError {
    /// Metric and dead-letter reason label.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::MalformedJson(_) => "malformed_json",
            DecodeError::NotCloudEvent(_) => "not_cloudevent",
            DecodeError::UnsupportedSpecVersion(_) => "unsupported_specversion",
            DecodeError::InvalidAttribute { .. } => "invalid_attribute",
            DecodeError::UnknownSchema(_) => "unknown_schema",
            DecodeError::MalformedAvro { .. } => "malformed_avro",
            DecodeError::UnsupportedContentType(_) => "unsupported_content_type",
            DecodeError::MissingResource => "missing_resource",
            DecodeError::TooDeep { .. } => "too_deep",
        }
    }
}

/// A record that cannot be decoded can never be processed: it goes to the dead-letter topic.
impl From<DecodeError> for crate::error::ProcessError {
    fn from(e: DecodeError) -> Self {
        crate::error::ProcessError::poison(e.reason(), e.to_string())
    }
}

/// How switchyard writes events to a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Json,
    Avro,
}

impl Encoding {
    /// The name used in topic definitions.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Avro => "avro",
        }
    }
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

fn utf8_attr(name: &str, v: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(v.to_vec()).map_err(|_| DecodeError::InvalidAttribute {
        name: name.to_string(),
        detail: "header value is not UTF-8".to_string(),
    })
}

/// How deeply an input may nest (objects and arrays). switchyard wraps an input event inside its own
/// records (a task carries the event in `data.event`, three levels down) and serde_json refuses
/// more than 128 levels, so one limit at the door, with a wide margin, keeps every record switchyard
/// writes readable by its next stage.
pub const MAX_DEPTH: usize = 64;

/// Fails when JSON text nests deeper than `max` (a scan that allocates nothing; strings are skipped).
pub fn check_json_depth(bytes: &[u8], max: usize) -> Result<(), DecodeError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return Err(DecodeError::TooDeep { depth, max });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Fails when a JSON value nests deeper than `max`.
pub fn check_value_depth(v: &Value, max: usize) -> Result<(), DecodeError> {
    fn depth(v: &Value, at: usize, max: usize) -> Result<(), DecodeError> {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => return Ok(()),
        };
        if at + 1 > max {
            return Err(DecodeError::TooDeep { depth: at + 1, max });
        }
        for c in children {
            depth(c, at + 1, max)?;
        }
        Ok(())
    }
    depth(v, 0, max)
}

/// Decodes a record into an event and fills in the resource: `subject`, or the record key when the
/// event has no subject.
pub fn decode(rec: RecordView<'_>, schemas: &SchemaRegistry) -> Result<CloudEvent, DecodeError> {
    let mut ev = if header(rec.headers, "ce_specversion").is_some() {
        decode_binary(rec, schemas)?
    } else if is_single_object(rec.payload) {
        decode_avro_envelope(rec.payload, schemas)?
    } else {
        decode_structured_json(rec.payload)?
    };
    validate(&ev)?;
    if ev.subject.as_deref().is_none_or(str::is_empty) {
        match rec.key.filter(|k| !k.is_empty()) {
            // Not lossily: two keys differing only in invalid bytes would be one resource.
            Some(k) => match std::str::from_utf8(k) {
                Ok(k) => ev.subject = Some(k.to_string()),
                Err(_) => {
                    return Err(DecodeError::InvalidAttribute {
                        name: "subject".into(),
                        detail: "absent, and the record key standing in for it is not UTF-8".into(),
                    })
                }
            },
            None => return Err(DecodeError::MissingResource),
        }
    }
    Ok(ev)
}

/// Decodes one of switchyard's own records whose data is a `T`: the event without its data, and
/// the data typed (`Err` with serde's message when it is not a `T`). Structured JSON is read in
/// one pass, the data straight from its bytes into `T` (no JSON value tree in between, and none
/// dropped after); anything the fast path does not take as it is (another encoding, an attribute
/// of the wrong kind, `data_base64`, data that is not a `T`) goes through [`decode`], with its
/// errors. One leniency: a field of the data that `T` does not know is only checked for JSON
/// syntax, so a value serde_json would refuse there (a lone surrogate escape, a number beyond
/// `f64`) no longer dead-letters the record.
pub fn decode_typed<T: serde::de::DeserializeOwned>(
    rec: RecordView<'_>,
    schemas: &SchemaRegistry,
) -> Result<(CloudEvent, Result<T, String>), DecodeError> {
    if header(rec.headers, "ce_specversion").is_none() && !is_single_object(rec.payload) {
        if let Some(typed) = structured_typed(rec) {
            return Ok(typed);
        }
    }
    let mut ev = decode(rec, schemas)?;
    let data = T::deserialize(ev.data.take().unwrap_or(Value::Null)).map_err(|e| e.to_string());
    Ok((ev, data))
}

/// The attributes of a structured JSON event, its data left unparsed.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    datacontenttype: Option<String>,
    #[serde(default)]
    dataschema: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a serde_json::value::RawValue>,
    #[serde(flatten)]
    extensions: Map<String, Value>,
}

/// [`decode_typed`]'s fast path: `None` sends the record down the general one (which then gives
/// the precise error, if there is one).
fn structured_typed<T: serde::de::DeserializeOwned>(
    rec: RecordView<'_>,
) -> Option<(CloudEvent, Result<T, String>)> {
    check_json_depth(rec.payload, MAX_DEPTH).ok()?;
    let env: Envelope<'_> = serde_json::from_slice(rec.payload).ok()?;
    if env.extensions.contains_key("data_base64") || env.extensions.values().any(|v| !v.is_string())
    {
        return None;
    }
    let mut ev = CloudEvent {
        specversion: env.specversion,
        id: env.id,
        source: env.source,
        ty: env.ty,
        subject: env.subject,
        time: env.time,
        datacontenttype: env.datacontenttype,
        dataschema: env.dataschema,
        data: None,
        raw_data: None,
        extensions: env.extensions,
    };
    validate(&ev).ok()?;
    if ev.subject.as_deref().is_none_or(str::is_empty) {
        let k = rec.key.filter(|k| !k.is_empty())?;
        ev.subject = Some(std::str::from_utf8(k).ok()?.to_string());
    }
    // Data that is not a `T` goes the general way too, for the same error (and reason) as ever.
    let data = match env.data {
        Some(raw) => serde_json::from_str(raw.get()).ok()?,
        None => T::deserialize(Value::Null).ok()?,
    };
    Some((ev, Ok(data)))
}

fn decode_structured_json(payload: &[u8]) -> Result<CloudEvent, DecodeError> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty);
    }
    check_json_depth(payload, MAX_DEPTH)?;
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
    let Value::Object(obj) = v else {
        return Err(DecodeError::NotCloudEvent(
            "top-level JSON value is not an object".into(),
        ));
    };
    from_object(obj)
}

/// Builds an event from a JSON object of attributes (structured mode or a decoded Avro envelope).
fn from_object(mut obj: Map<String, Value>) -> Result<CloudEvent, DecodeError> {
    let mut take_str = |name: &str, required: bool| -> Result<Option<String>, DecodeError> {
        match obj.remove(name) {
            None | Some(Value::Null) if required => Err(DecodeError::NotCloudEvent(format!(
                "required attribute {name} is missing"
            ))),
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(DecodeError::InvalidAttribute {
                name: name.to_string(),
                detail: format!("expected a string, got {}", json_kind(&other)),
            }),
        }
    };
    let specversion = take_str("specversion", true)?.unwrap_or_default();
    let id = take_str("id", true)?.unwrap_or_default();
    let source = take_str("source", true)?.unwrap_or_default();
    let ty = take_str("type", true)?.unwrap_or_default();
    let subject = take_str("subject", false)?;
    let time = take_str("time", false)?;
    let datacontenttype = take_str("datacontenttype", false)?;
    let dataschema = take_str("dataschema", false)?;
    let data = match obj.remove("data") {
        Some(Value::Null) | None => None,
        Some(v) => Some(v),
    };
    if let Some(b64) = obj.remove("data_base64") {
        if data.is_some() {
            return Err(DecodeError::NotCloudEvent(
                "both data and data_base64 are present".into(),
            ));
        }
        // Binary data is kept as an extension string; switchyard's agents work on JSON data.
        obj.insert("database64".to_string(), b64);
    }
    // What remains are extensions; nulls are dropped as the spec allows.
    obj.retain(|_, v| !v.is_null());
    Ok(CloudEvent {
        specversion,
        id,
        source,
        ty,
        subject,
        time,
        datacontenttype,
        dataschema,
        data,
        raw_data: None,
        extensions: obj,
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn decode_binary(rec: RecordView<'_>, schemas: &SchemaRegistry) -> Result<CloudEvent, DecodeError> {
    let mut obj = Map::new();
    for (k, v) in rec.headers {
        let lower = k.to_ascii_lowercase();
        if let Some(name) = lower.strip_prefix("ce_") {
            obj.insert(name.to_string(), Value::String(utf8_attr(k, v)?));
        }
    }
    let content_type = header(rec.headers, CONTENT_TYPE_HEADER)
        .map(|v| utf8_attr(CONTENT_TYPE_HEADER, v))
        .transpose()?;
    let data = decode_data(rec.payload, content_type.as_deref(), schemas)?;
    if let Some(ct) = content_type {
        obj.insert("datacontenttype".into(), Value::String(ct));
    }
    if let Some(d) = data {
        obj.insert("data".into(), d);
    }
    from_object(obj)
}

fn decode_data(
    payload: &[u8],
    content_type: Option<&str>,
    schemas: &SchemaRegistry,
) -> Result<Option<Value>, DecodeError> {
    if payload.is_empty() {
        return Ok(None);
    }
    let ct = content_type
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if ct.contains("avro") || is_single_object(payload) {
        let (_, value) = decode_single_object(payload, schemas)?;
        return Ok(Some(value));
    }
    if ct == "application/json" || ct.ends_with("+json") || ct == "text/json" {
        // The data sits one level below the event's attributes.
        check_json_depth(payload, MAX_DEPTH - 1)?;
        let v = serde_json::from_slice(payload)
            .map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
        return Ok(Some(v));
    }
    if ct.starts_with("text/") {
        return match std::str::from_utf8(payload) {
            Ok(s) => Ok(Some(Value::String(s.to_string()))),
            Err(_) => Err(DecodeError::UnsupportedContentType(ct)),
        };
    }
    Err(DecodeError::UnsupportedContentType(ct))
}

/// Decodes an Avro single-object payload into JSON, returning the schema used.
pub fn decode_single_object<'s>(
    payload: &[u8],
    schemas: &'s SchemaRegistry,
) -> Result<(&'s RegisteredSchema, Value), DecodeError> {
    if !is_single_object(payload) {
        return Err(DecodeError::MalformedAvro {
            schema: "?".into(),
            detail: "payload does not start with the single-object marker C3 01".into(),
        });
    }
    let fp = &payload[2..SINGLE_OBJECT_HEADER_LEN];
    let reg = schemas
        .by_fingerprint(fp)
        .ok_or_else(|| DecodeError::UnknownSchema(hex::encode(fp)))?;
    let mut body = &payload[SINGLE_OBJECT_HEADER_LEN..];
    // Every length the datum declares must fit in the record before the decoder allocates for it.
    reg.check_datum_bounds(body)
        .map_err(|detail| DecodeError::MalformedAvro {
            schema: reg.name.clone(),
            detail,
        })?;
    let value = apache_avro::from_avro_datum(&reg.schema, &mut body, None).map_err(|e| {
        DecodeError::MalformedAvro {
            schema: reg.name.clone(),
            detail: e.to_string(),
        }
    })?;
    if !body.is_empty() {
        return Err(DecodeError::MalformedAvro {
            schema: reg.name.clone(),
            detail: format!("{} trailing bytes after the datum", body.len()),
        });
    }
    let json = Value::try_from(value).map_err(|e| DecodeError::MalformedAvro {
        schema: reg.name.clone(),
        detail: e.to_string(),
    })?;
    check_value_depth(&json, MAX_DEPTH)?;
    Ok((reg, json))
}

fn decode_avro_envelope(
    payload: &[u8],
    schemas: &SchemaRegistry,
) -> Result<CloudEvent, DecodeError> {
    let (reg, json) = decode_single_object(payload, schemas)?;
    match json {
        Value::Object(obj) if obj.contains_key("specversion") => {
            let mut ev = from_object(obj)?;
            if ev.datacontenttype.is_none() {
                ev.datacontenttype = Some("application/json".into());
            }
            Ok(ev)
        }
        _ => Err(DecodeError::NotCloudEvent(format!(
            "Avro schema {} is not an event envelope (no specversion field); send it in binary mode with ce_* headers",
            reg.name
        ))),
    }
}

/// Checks the attribute rules of CloudEvents 1.0.
pub fn validate(ev: &CloudEvent) -> Result<(), DecodeError> {
    if ev.specversion != SPEC_VERSION {
        return Err(DecodeError::UnsupportedSpecVersion(ev.specversion.clone()));
    }
    for (name, v) in [("id", &ev.id), ("source", &ev.source), ("type", &ev.ty)] {
        if v.is_empty() {
            return Err(DecodeError::InvalidAttribute {
                name: name.into(),
                detail: "must be a non-empty string".into(),
            });
        }
    }
    if let Some(t) = &ev.time {
        if chrono::DateTime::parse_from_rfc3339(t).is_err() {
            return Err(DecodeError::InvalidAttribute {
                name: "time".into(),
                detail: format!("{t:?} is not an RFC 3339 timestamp"),
            });
        }
    }
    for name in ev.extensions.keys() {
        if !is_valid_extension_name(name) {
            return Err(DecodeError::InvalidAttribute {
                name: name.clone(),
                detail: "extension names are lower-case letters and digits, at most 20".into(),
            });
        }
    }
    Ok(())
}

/// What an event entering switchyard (an input topic, HTTP ingest, `publish`) must also be, beyond
/// [`validate`]: attributes within their bounds — they travel in every record the event leads to,
/// and in its records' audit seals, so an unbounded one could make a record or a seal too large to
/// write — and without control characters (as CloudEvents requires; ids derived from them rely on
/// it). The subject is checked as it stands (after the record key filled it in). Only at the entry:
/// switchyard's own records, and those older builds wrote, are read without these checks.
pub fn validate_input(ev: &CloudEvent) -> Result<(), DecodeError> {
    // A tenant that is not a string would be read as `default` (CloudEvents allows integer and
    // boolean extensions): two tenants' events merged into one tenant's context and approvals.
    match ev.extensions.get("tenant") {
        Some(serde_json::Value::String(t)) if t.is_empty() => {
            return Err(DecodeError::InvalidAttribute {
                name: "tenant".into(),
                detail: "empty".into(),
            })
        }
        Some(serde_json::Value::String(_)) | None => {}
        Some(other) => {
            return Err(DecodeError::InvalidAttribute {
                name: "tenant".into(),
                detail: format!("must be a string, not {}", json_kind(other)),
            })
        }
    }
    let attributes = [
        ("id", Some(ev.id.as_str()), MAX_ID_BYTES),
        ("type", Some(ev.ty.as_str()), MAX_ID_BYTES),
        ("source", Some(ev.source.as_str()), MAX_SOURCE_BYTES),
        ("subject", ev.subject.as_deref(), MAX_SUBJECT_BYTES),
        ("tenant", ev.extension("tenant"), MAX_ID_BYTES),
    ];
    for (name, value, max) in attributes {
        let Some(v) = value else { continue };
        if v.len() > max {
            return Err(too_long(name, v.len(), max));
        }
        if v.chars().any(char::is_control) {
            return Err(DecodeError::InvalidAttribute {
                name: name.into(),
                detail: "contains a control character".into(),
            });
        }
    }
    Ok(())
}

/// Longest `id`, `type` and `tenant` accepted, in bytes ...
pub const MAX_ID_BYTES: usize = 256;
/// ... `source` ...
pub const MAX_SOURCE_BYTES: usize = 1024;
/// ... and `subject` (the resource; also when it comes from the record key). They travel in every
/// record an event leads to, and the ids, tenants and resources of a batch's records in its audit
/// seal: unbounded, one event could make a seal too large to write.
pub const MAX_SUBJECT_BYTES: usize = 512;

fn too_long(name: &str, len: usize, max: usize) -> DecodeError {
    DecodeError::InvalidAttribute {
        name: name.into(),
        detail: format!("{len} bytes long, at most {max} accepted"),
    }
}

/// Why an event could not be written (a bug or a schema that does not fit the data).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("schema {0} named by the topic definition is not in schemas/")]
    MissingSchema(String),
    #[error("event does not fit Avro schema {schema}: {detail}")]
    Avro { schema: String, detail: String },
    #[error("cannot serialize event as JSON: {0}")]
    Json(String),
}

/// A record switchyard built that cannot be encoded is a bug or a schema that does not fit: the stage
/// stops rather than skip it.
impl From<EncodeError> for crate::error::ProcessError {
    fn from(e: EncodeError) -> Self {
        crate::error::ProcessError::Fatal(e.to_string())
    }
}

/// An encoded record body plus the headers that describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub payload: Vec<u8>,
    pub content_type: &'static str,
}

/// Encodes an event as structured JSON or as the topic's Avro envelope.
pub fn encode(
    ev: &CloudEvent,
    encoding: Encoding,
    schema: Option<&str>,
    schemas: &SchemaRegistry,
) -> Result<Encoded, EncodeError> {
    match encoding {
        Encoding::Json => Ok(Encoded {
            payload: serde_json::to_vec(ev).map_err(|e| EncodeError::Json(e.to_string()))?,
            content_type: STRUCTURED_JSON,
        }),
        Encoding::Avro => {
            let name = schema.unwrap_or_default();
            let reg = schemas
                .get(name)
                .ok_or_else(|| EncodeError::MissingSchema(name.to_string()))?;
            let json = serde_json::to_value(ev).map_err(|e| EncodeError::Json(e.to_string()))?;
            Ok(Encoded {
                payload: encode_single_object(json, reg)?,
                content_type: STRUCTURED_AVRO,
            })
        }
    }
}

/// Encodes a JSON value under a registered schema, single-object framed: written directly along
/// the schema ([`RegisteredSchema::write_json`]), or, for what that does not handle, through
/// apache_avro's value tree ([`encode_via_value_tree`], which writes the same bytes).
pub fn encode_single_object(json: Value, reg: &RegisteredSchema) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&reg.header);
    if reg.write_json(&json, &mut out).is_some() {
        return Ok(out);
    }
    encode_via_value_tree(json, reg)
}

/// [`encode_single_object`] through apache_avro's value tree (`Value::from`, `resolve`,
/// `to_avro_datum`): slower, complete, and the reference the direct writer is tested against.
pub fn encode_via_value_tree(json: Value, reg: &RegisteredSchema) -> Result<Vec<u8>, EncodeError> {
    let err = |e: apache_avro::Error| EncodeError::Avro {
        schema: reg.name.clone(),
        detail: e.to_string(),
    };
    let json = json_text_fields(json, &reg.schema);
    let value = apache_avro::types::Value::from(json);
    let value = value.resolve(&reg.schema).map_err(err)?;
    let body = apache_avro::to_avro_datum(&reg.schema, value).map_err(err)?;
    let mut out = Vec::with_capacity(SINGLE_OBJECT_HEADER_LEN + body.len());
    out.extend_from_slice(&reg.header);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Avro cannot type arbitrary JSON, so schemas declare such fields (`event`, `parameters`, `detail`) as
/// `string`: objects and arrays found where the schema wants a string are written as JSON text.
fn json_text_fields(json: Value, schema: &apache_avro::Schema) -> Value {
    use apache_avro::Schema as S;
    match (json, schema) {
        (Value::Object(mut obj), S::Record(rec)) => {
            for field in &rec.fields {
                if let Some(v) = obj.remove(&field.name) {
                    obj.insert(field.name.clone(), json_text_fields(v, &field.schema));
                }
            }
            Value::Object(obj)
        }
        (v @ (Value::Object(_) | Value::Array(_)), S::String) => Value::String(v.to_string()),
        (v @ (Value::Object(_) | Value::Array(_)), S::Union(u))
            if u.variants().iter().any(|s| matches!(s, S::String))
                && !u
                    .variants()
                    .iter()
                    .any(|s| matches!(s, S::Record(_) | S::Map(_) | S::Array(_))) =>
        {
            Value::String(v.to_string())
        }
        (v, S::Union(u)) => match u.variants().iter().find(|s| matches!(s, S::Record(_))) {
            Some(inner) if v.is_object() => json_text_fields(v, inner),
            _ => v,
        },
        (v, _) => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed decode gives what the general one gives, on every shape its fast path takes or
    /// sends back: the same attributes, the same data, the same error.
    #[test]
    fn typed_decode_agrees_with_decode() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","data":{"a":[1,{"b":"x"}]}}"#,
                None,
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","tenant":"acme","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","data":{"a":1}}"#,
                Some("from-key"),
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","data":null}"#,
                None,
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r"}"#,
                None,
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","time":"2026-11-28T10:00:00Z","datacontenttype":"application/json","dataschema":"x","data":"text"}"#,
                None,
            ),
            // Handed to the general path: non-string or null extensions, data_base64, a duplicate
            // attribute, an attribute of the wrong kind.
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","count":3,"gone":null,"data":{}}"#,
                None,
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","data_base64":"AAE="}"#,
                None,
            ),
            (
                r#"{"specversion":"1.0","id":"1","id":"2","source":"s","type":"t","subject":"r","data":{}}"#,
                None,
            ),
            // Errors.
            (
                r#"{"specversion":"1.0","id":7,"source":"s","type":"t","subject":"r"}"#,
                None,
            ),
            (
                r#"{"specversion":"0.3","id":"1","source":"s","type":"t","subject":"r"}"#,
                None,
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday","subject":"r"}"#,
                None,
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","BAD":"x","subject":"r"}"#,
                None,
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#,
                None,
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","data":{"a":"#,
                None,
            ),
            (r#"[1,2]"#, None),
            ("", None),
        ];
        let schemas = SchemaRegistry::default();
        for (i, (payload, key)) in cases.iter().enumerate() {
            let rec = RecordView {
                key: key.map(str::as_bytes),
                payload: payload.as_bytes(),
                headers: &[],
            };
            // The first five take the fast path.
            assert_eq!(structured_typed::<Value>(rec).is_some(), i < 5, "{payload}");
            let general = decode(rec, &schemas).map(|mut ev| {
                let data = ev.data.take().unwrap_or(Value::Null);
                (ev, Ok::<Value, String>(data))
            });
            assert_eq!(decode_typed::<Value>(rec, &schemas), general, "{payload}");
        }
        // Typed: the same data and errors as the general path followed by `from_value`, including
        // data with a duplicate field (the general path keeps the last) and a lone surrogate.
        let typed_cases = [
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","data":{"task_id":"a","workflow_id":"w","agent":"x","route":"r","priority":1,"resource":"r","tenant":"t","event":{"id":"e"}}}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","data":{"task_id":"a","task_id":"b","workflow_id":"w","agent":"x","route":"r","priority":1,"resource":"r","tenant":"t","event":{}}}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","data":{"task_id":"\ud800","workflow_id":"w","agent":"x","route":"r","priority":1,"resource":"r","tenant":"t","event":{}}}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","data":{"task_id":"a"}}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","data":"\ud800"}"#,
        ];
        for (i, payload) in typed_cases.iter().enumerate() {
            let rec = RecordView {
                key: None,
                payload: payload.as_bytes(),
                headers: &[],
            };
            // The well-formed task takes the fast path; the others go the general way.
            assert_eq!(
                structured_typed::<crate::records::TaskData>(rec).is_some(),
                i == 0,
                "{payload}"
            );
            let general = decode(rec, &schemas).map(|mut ev| {
                let data = serde_json::from_value::<crate::records::TaskData>(
                    ev.data.take().unwrap_or_default(),
                )
                .map_err(|e| e.to_string());
                (ev, data)
            });
            let typed = decode_typed::<crate::records::TaskData>(rec, &schemas);
            assert_eq!(typed, general, "{payload}");
        }
        // Data that is not the type asked for is the caller's error, with the attributes read.
        let rec = RecordView {
            key: None,
            payload: br#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","data":{"a":1}}"#,
            headers: &[],
        };
        let (ev, data) = decode_typed::<Vec<u8>>(rec, &schemas).unwrap();
        assert_eq!(ev.subject.as_deref(), Some("r"));
        assert!(data.unwrap_err().contains("invalid type"));
    }

    #[test]
    fn depth_is_limited_at_the_door() {
        let nest = |n: usize| "[".repeat(n) + &"]".repeat(n);
        assert!(check_json_depth(nest(MAX_DEPTH).as_bytes(), MAX_DEPTH).is_ok());
        assert_eq!(
            check_json_depth(nest(MAX_DEPTH + 1).as_bytes(), MAX_DEPTH),
            Err(DecodeError::TooDeep {
                depth: MAX_DEPTH + 1,
                max: MAX_DEPTH
            })
        );
        // Brackets inside strings (and escaped quotes) do not count.
        let s = format!(r#"{{"a": "{}\"]]]", "b": [1]}}"#, "[".repeat(500));
        assert!(check_json_depth(s.as_bytes(), 3).is_ok());
        // An event whose data nests 126 levels (which serde_json alone accepts) is refused as
        // too_deep, before switchyard wraps it three levels deeper in a task.
        let deep = format!(
            r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r","data":{}}}"#,
            nest(126)
        );
        let rec = RecordView {
            key: None,
            payload: deep.as_bytes(),
            headers: &[],
        };
        let e = decode(rec, &SchemaRegistry::default()).unwrap_err();
        assert_eq!(e.reason(), "too_deep");
        let v: Value = serde_json::from_str(&nest(10)).unwrap();
        assert!(check_value_depth(&v, 10).is_ok());
        assert!(check_value_depth(&v, 9).is_err());
    }
    use proptest::prelude::*;
    use serde_json::json;

    /// A few bytes whose first string claims half a gigabyte: refused before anything is
    /// allocated for it (the decoder used to allocate 536 MB per such record).
    #[test]
    fn avro_lengths_are_bounded_by_the_record() {
        let reg = schemas();
        let deployment = reg.get("deployment").expect("deployment schema");
        let mut payload = deployment.header.to_vec();
        // zig-zag varint of 536_870_912: 1_073_741_824 = 0x4000_0000.
        payload.extend([0x80, 0x80, 0x80, 0x80, 0x04]);
        payload.extend(b"abc");
        assert!(payload.len() <= 18);
        let rec = RecordView {
            key: Some(b"k"),
            payload: &payload,
            headers: &[],
        };
        let started = std::time::Instant::now();
        let e = decode(rec, &reg).unwrap_err();
        assert_eq!(e.reason(), "malformed_avro");
        assert!(e.to_string().contains("claims 536870912 bytes"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_millis(50));
        // A well-formed record passes the same check.
        let ev = sample().with_time_now();
        let enc = encode(&ev, Encoding::Avro, Some("deployment"), &reg).unwrap();
        assert!(deployment
            .check_datum_bounds(&enc.payload[SINGLE_OBJECT_HEADER_LEN..])
            .is_ok());
    }

    fn schemas() -> SchemaRegistry {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        SchemaRegistry::load_dir(&dir).expect("repo schemas load")
    }

    fn view<'a>(
        payload: &'a [u8],
        headers: &'a [(String, Vec<u8>)],
        key: Option<&'a [u8]>,
    ) -> RecordView<'a> {
        RecordView {
            key,
            payload,
            headers,
        }
    }

    fn sample() -> CloudEvent {
        CloudEvent::new("e-1", "ci", "deployment.completed")
            .with_subject("checkout")
            .with_data(json!({"service": "checkout", "version": "v2", "previous_version": "v1"}))
            .with_extension("tenant", "acme")
            .with_extension(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
    }

    #[test]
    fn records_written_with_a_previous_schema_version_stay_readable() {
        let s = schemas();
        let result = json!({"task_id": "t-1", "workflow_id": "w", "agent": "a", "resource": "checkout",
            "tenant": "default", "status": "succeeded", "duration_ms": 3, "attempts": 1,
            "findings": [{"key": "k", "value": 1}], "proposals": ["p-1"], "error": null, "event_id": "e-1"});
        let ev = CloudEvent::new("result-t-1", "switchyard/agents", "switchyard.result")
            .with_subject("checkout")
            .with_data(result);
        // Written by an instance that knew only result.v1 (no `answer`, `agent_digest`, `ran`).
        let old = s.get("result.v1").expect("the previous version is kept");
        let payload = encode_single_object(serde_json::to_value(&ev).unwrap(), old).unwrap();
        let back = decode(view(&payload, &[], None), &s).expect("still readable");
        let r: crate::records::ResultData = serde_json::from_value(back.data.unwrap()).unwrap();
        assert_eq!((r.task_id.as_str(), r.answer, r.ran), ("t-1", None, None));
        // Written now: the current version, whose fingerprint differs.
        let now = encode(&ev, Encoding::Avro, Some("result"), &s).unwrap();
        assert_ne!(
            now.payload[..SINGLE_OBJECT_HEADER_LEN],
            payload[..SINGLE_OBJECT_HEADER_LEN]
        );
        assert!(decode(view(&now.payload, &[], None), &s).is_ok());
        // Written by an instance that knew only result.v2 (no `proposal_counts`, `warnings`).
        let v2 = s.get("result.v2").expect("the previous version is kept");
        let payload = encode_single_object(serde_json::to_value(&ev).unwrap(), v2).unwrap();
        let back = decode(view(&payload, &[], None), &s).expect("still readable");
        let r: crate::records::ResultData = serde_json::from_value(back.data.unwrap()).unwrap();
        assert_eq!((r.proposal_counts, r.warnings.len()), (None, 0));
        // The current version carries them (as JSON text) and reads them back.
        let counts = crate::records::ProposalCounts {
            proposed: 2,
            rejected: 2,
            ..Default::default()
        };
        let mut data = ev.data.clone().unwrap();
        data["proposal_counts"] = serde_json::to_value(counts).unwrap();
        data["warnings"] = json!(["2 of 2 proposals rejected"]);
        let ev = ev.with_data(data);
        let now = encode(&ev, Encoding::Avro, Some("result"), &s).unwrap();
        let back = decode(view(&now.payload, &[], None), &s).unwrap();
        let r: crate::records::ResultData = serde_json::from_value(back.data.unwrap()).unwrap();
        assert_eq!(
            (r.proposal_counts, r.warnings),
            (Some(counts), vec!["2 of 2 proposals rejected".to_string()])
        );
    }

    #[test]
    fn structured_json_round_trip() {
        let s = schemas();
        let ev = sample().with_time_now();
        let enc = encode(&ev, Encoding::Json, None, &s).unwrap();
        assert_eq!(enc.content_type, STRUCTURED_JSON);
        assert_eq!(decode(view(&enc.payload, &[], None), &s).unwrap(), ev);
    }

    #[test]
    fn binary_mode_reads_headers_and_data() {
        let headers: Vec<(String, Vec<u8>)> = [
            ("ce_specversion", "1.0"),
            ("ce_id", "b-1"),
            ("ce_source", "mon"),
            ("ce_type", "sla.breached"),
            ("ce_subject", "api"),
            ("ce_tenant", "acme"),
            ("content-type", "application/json"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        let ev = decode(view(br#"{"slo":"latency"}"#, &headers, None), &schemas()).unwrap();
        assert_eq!(ev.id, "b-1");
        assert_eq!(ev.ty, "sla.breached");
        assert_eq!(ev.subject.as_deref(), Some("api"));
        assert_eq!(ev.tenant(), "acme");
        assert_eq!(ev.data, Some(json!({"slo": "latency"})));
        assert_eq!(ev.datacontenttype.as_deref(), Some("application/json"));
    }

    #[test]
    fn binary_mode_with_avro_data() {
        let s = schemas();
        let reg = s.get("task").unwrap();
        // Any registered schema can carry the data; here a non-envelope use of the deployment data
        // is not available, so use a whole envelope as data.
        let payload = encode_single_object(
            serde_json::to_value(sample()).unwrap(),
            s.get("deployment").unwrap(),
        )
        .unwrap();
        let headers = vec![
            ("ce_specversion".to_string(), b"1.0".to_vec()),
            ("ce_id".to_string(), b"x".to_vec()),
            ("ce_source".to_string(), b"y".to_vec()),
            ("ce_type".to_string(), b"deployment.completed".to_vec()),
            ("ce_subject".to_string(), b"checkout".to_vec()),
            ("content-type".to_string(), b"application/avro".to_vec()),
        ];
        let ev = decode(view(&payload, &headers, None), &s).unwrap();
        assert_eq!(ev.data.unwrap()["data"]["version"], "v2");
        assert!(!reg.name.is_empty());
    }

    #[test]
    fn avro_envelopes_round_trip_for_every_event_family() {
        let s = schemas();
        for (schema, data) in [
            (
                "deployment",
                json!({"service": "a", "version": "v2", "previous_version": "v1", "environment": "prod"}),
            ),
            (
                "sla_breach",
                json!({"service": "a", "slo": "availability", "objective": 99.9, "observed": 97.0}),
            ),
            (
                "cost_threshold",
                json!({"service": "a", "budget": 100.0, "spend": 150.0, "currency": "EUR"}),
            ),
        ] {
            let ev = sample().with_data(data.clone()).with_time_now();
            let enc = encode(&ev, Encoding::Avro, Some(schema), &s).unwrap();
            assert!(is_single_object(&enc.payload));
            let back = decode(view(&enc.payload, &[], None), &s).unwrap();
            assert_eq!(back.id, ev.id);
            assert_eq!(back.subject, ev.subject);
            assert_eq!(back.tenant(), "acme");
            assert_eq!(back.traceparent(), ev.traceparent());
            for (k, v) in data.as_object().unwrap() {
                assert_eq!(&back.data.as_ref().unwrap()[k], v, "{schema}.{k}");
            }
        }
    }

    #[test]
    fn internal_records_encode_free_form_fields_as_json_text() {
        let s = schemas();
        let ev = CloudEvent::new("t-1", "switchyard/route", "switchyard.task")
            .with_subject("a")
            .with_data(json!({"task_id": "t-1", "workflow_id": "wf", "agent": "g", "route": "r", "priority": 5,
                "resource": "a", "tenant": "default", "event": {"id": "e", "nested": [1, 2]}}));
        let enc = encode(&ev, Encoding::Avro, Some("task"), &s).unwrap();
        let back = decode(view(&enc.payload, &[], None), &s).unwrap();
        let text = back.data.unwrap()["event"].as_str().unwrap().to_string();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"id": "e", "nested": [1, 2]})
        );
    }

    #[test]
    fn errors_name_their_reason() {
        let s = schemas();
        let cases: Vec<(&[u8], &str)> = vec![
            (b"", "empty"),
            (b"{nope", "malformed_json"),
            (b"[1]", "not_cloudevent"),
            (
                br#"{"specversion":"1.0","id":"1","source":"s"}"#,
                "not_cloudevent",
            ),
            (
                br#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#,
                "unsupported_specversion",
            ),
            (
                br#"{"specversion":"1.0","id":"","source":"s","type":"t"}"#,
                "invalid_attribute",
            ),
            (
                br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday"}"#,
                "invalid_attribute",
            ),
            (
                br#"{"specversion":"1.0","id":"1","source":"s","type":"t","Bad-Ext":"x"}"#,
                "invalid_attribute",
            ),
            (
                br#"{"specversion":"1.0","id":1,"source":"s","type":"t"}"#,
                "invalid_attribute",
            ),
            (
                br#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#,
                "missing_resource",
            ),
            (&[0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0], "unknown_schema"),
        ];
        for (payload, reason) in cases {
            let err = decode(view(payload, &[], None), &s).unwrap_err();
            assert_eq!(
                err.reason(),
                reason,
                "{:?}: {err}",
                String::from_utf8_lossy(payload)
            );
        }
        // Entering switchyard, attributes past their bound (they travel in every record and audit
        // seal) or with control characters are refused, the subject also when the key stands in
        // for it (measured as it is then); at the bound they pass. Decoding alone does not check
        // them (switchyard's own records, and older builds', stay readable).
        let input = |payload: &[u8], key: Option<&[u8]>| {
            decode(view(payload, &[], key), &s).and_then(|ev| validate_input(&ev).map(|_| ev))
        };
        let attr = |name: &str, value: String| {
            let mut v = json!({"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r"});
            v[name] = json!(value);
            v.to_string().into_bytes()
        };
        for (name, max) in [
            ("id", MAX_ID_BYTES),
            ("type", MAX_ID_BYTES),
            ("source", MAX_SOURCE_BYTES),
            ("subject", MAX_SUBJECT_BYTES),
            ("tenant", MAX_ID_BYTES),
        ] {
            assert!(input(&attr(name, "x".repeat(max)), None).is_ok(), "{name}");
            let long = attr(name, "x".repeat(max + 1));
            assert!(
                decode(view(&long, &[], None), &s).is_ok(),
                "{name}: decodes"
            );
            let err = input(&long, None).unwrap_err();
            assert_eq!(err.reason(), "invalid_attribute", "{name}: {err}");
            let err = input(&attr(name, "a\u{0}b".into()), None).unwrap_err();
            assert_eq!(err.reason(), "invalid_attribute", "{name}: {err}");
        }
        let keyed = br#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#;
        let long_key = vec![b'k'; MAX_SUBJECT_BYTES + 1];
        let err = input(keyed, Some(&long_key)).unwrap_err();
        assert_eq!(err.reason(), "invalid_attribute", "{err}");
        // A key standing in for the subject that is not UTF-8 is refused (read lossily, keys
        // differing only in invalid bytes were one resource).
        let err = input(keyed, Some(&[0xff; 200])).unwrap_err();
        assert_eq!(err.reason(), "invalid_attribute", "{err}");
        let err = input(keyed, Some(b"svc-\xff")).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
        // A tenant must be a non-empty string: a number or boolean (valid CloudEvents extension
        // types) was read as `default`, merging tenants.
        for (tenant, detail) in [
            (json!(42), "must be a string, not a number"),
            (json!(true), "must be a string, not a boolean"),
            (json!({"t": 1}), "must be a string, not an object"),
            (json!(""), "empty"),
        ] {
            let mut v = json!({"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r"});
            v["tenant"] = tenant;
            let err = input(v.to_string().as_bytes(), None).unwrap_err();
            assert_eq!(err.reason(), "invalid_attribute", "{err}");
            assert!(err.to_string().contains(detail), "{err}");
        }
        // A truncated Avro body of a known schema.
        let enc = encode(&sample(), Encoding::Avro, Some("deployment"), &s).unwrap();
        let err = decode(view(&enc.payload[..enc.payload.len() / 2], &[], None), &s).unwrap_err();
        assert_eq!(err.reason(), "malformed_avro");
        // The record key names the resource when the subject is missing.
        let ev = decode(
            view(
                br#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#,
                &[],
                Some(b"svc"),
            ),
            &s,
        )
        .unwrap();
        assert_eq!(ev.subject.as_deref(), Some("svc"));
    }

    fn arb_event() -> impl Strategy<Value = CloudEvent> {
        (
            "[a-zA-Z0-9-]{1,20}",
            "[a-z/:.]{1,20}",
            "[a-z]{1,8}\\.[a-z_]{1,12}",
            "[a-z0-9-]{1,16}",
            proptest::option::of("[a-z]{1,8}"),
            proptest::collection::btree_map("[a-z]{1,6}", any::<i64>(), 0..4),
            any::<bool>(),
        )
            .prop_map(|(id, source, ty, subject, tenant, data, with_time)| {
                let mut ev = CloudEvent::new(id, source, ty)
                    .with_subject(subject)
                    .with_data(json!(data));
                if let Some(t) = tenant {
                    ev = ev.with_extension("tenant", t);
                }
                if with_time {
                    ev = ev.with_time_now();
                }
                ev
            })
    }

    /// The repo's schemas and a few odd ones they do not exercise: floats, unions of two numbers, a
    /// named type used again by reference, enums, maps, a top-level union.
    fn schemas_and_odd_ones() -> SchemaRegistry {
        let mut s = schemas();
        let odd = [
            (
                "odd_numbers",
                r#"{"type": "record", "name": "N", "fields": [
                {"name": "f", "type": "float"}, {"name": "d", "type": "double"},
                {"name": "fd", "type": ["float", "double"]}, {"name": "il", "type": ["int", "long"]},
                {"name": "li", "type": ["null", "long", "int"]}, {"name": "nd", "type": ["null", "double"], "default": null},
                {"name": "fi", "type": ["null", "float", "int"]}]}"#,
            ),
            (
                "odd_named",
                r#"{"type": "record", "name": "E", "fields": [
                {"name": "a", "type": {"type": "record", "name": "P", "fields": [{"name": "s", "type": "string"}]}},
                {"name": "b", "type": "P"},
                {"name": "e", "type": {"type": "enum", "name": "Color", "symbols": ["red", "green"]}},
                {"name": "arr", "type": {"type": "array", "items": "P"}},
                {"name": "t", "type": "string", "default": "{}"}]}"#,
            ),
            // Left to the value tree (a reference in a union, a map): it must say so, not differ.
            (
                "odd_left",
                r#"{"type": "record", "name": "L", "fields": [
                {"name": "a", "type": {"type": "record", "name": "Q", "fields": [{"name": "s", "type": "string"}]}},
                {"name": "c", "type": ["null", "Q"]},
                {"name": "m", "type": {"type": "map", "values": "long"}}]}"#,
            ),
            (
                "odd_union",
                r#"["null", "string", {"type": "record", "name": "T", "fields": [{"name": "x", "type": "int"}]}]"#,
            ),
        ];
        for (name, text) in odd {
            s.add(name, text, "test").expect("odd schema");
        }
        s
    }

    /// xorshift: the values below are built from one proptest seed.
    fn next(rng: &mut u64) -> u64 {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    }

    /// A JSON value for `schema`, mostly fitting it, sometimes not.
    fn arbitrary_for(schema: &apache_avro::Schema, rng: &mut u64, depth: usize) -> Value {
        use apache_avro::Schema as S;
        let roll = next(rng) % 400;
        if depth > 0 && roll < 1 {
            return Value::Null;
        }
        if roll < 2 || depth > 6 {
            return match next(rng) % 6 {
                0 => json!(true),
                1 => json!(next(rng) as i64),
                2 => json!("x"),
                3 => json!({"k": [1, "two", null]}),
                4 => json!([1.5, {"a": {}}]),
                _ => json!(-0.25),
            };
        }
        match schema {
            S::Null => Value::Null,
            S::Boolean => json!(next(rng) % 2 == 0),
            S::Int => json!((next(rng) as i64) % 100_000),
            S::Long => json!(match next(rng) % 3 {
                0 => next(rng) as i64,
                1 => (next(rng) % 300) as i64 - 150,
                _ => i64::MIN,
            }),
            S::Float | S::Double => match next(rng) % 4 {
                0 => json!((next(rng) % 1000) as i64),
                1 => json!(f64::from((next(rng) % 10_000) as u32) / 7.0),
                2 => json!(next(rng) as i64),
                _ => json!(1e300),
            },
            S::String => match next(rng) % 4 {
                0 => json!(""),
                1 => json!("résumé ☃ \"quoted\" \n"),
                2 => json!({"nested": {"list": [1, 2, {"x": null}]}, "b": true}),
                _ => json!(format!("s-{}", next(rng) % 1000)),
            },
            S::Array(a) => Value::Array(
                (0..next(rng) % 4)
                    .map(|_| arbitrary_for(&a.items, rng, depth + 1))
                    .collect(),
            ),
            S::Map(m) => Value::Object(
                (0..next(rng) % 3)
                    .map(|i| (format!("k{i}"), arbitrary_for(&m.types, rng, depth + 1)))
                    .collect(),
            ),
            S::Union(u) => {
                let vs = u.variants();
                arbitrary_for(&vs[(next(rng) as usize) % vs.len()], rng, depth + 1)
            }
            S::Record(r) => {
                let mut obj = Map::new();
                for f in &r.fields {
                    if next(rng) % 64 != 0 {
                        obj.insert(f.name.clone(), arbitrary_for(&f.schema, rng, depth + 1));
                    }
                }
                Value::Object(obj)
            }
            S::Enum(e) => match next(rng) % 5 {
                0 => json!("purple"),
                _ => json!(e.symbols[(next(rng) as usize) % e.symbols.len()]),
            },
            S::Ref { .. } => match next(rng) % 3 {
                0 => json!({"s": "x"}),
                1 => json!({"s": {"k": 1}}),
                _ => json!({"x": 3}),
            },
            _ => Value::Null,
        }
    }

    /// An integer written as a float rounds once (2^60 + 2^36 + 1 rounds to 2^60 + 2^37 straight to
    /// f32, to 2^60 through f64): random values almost never hit such a case, so it is named here.
    #[test]
    fn the_direct_avro_writer_rounds_an_integer_to_float_once() {
        let s = schemas_and_odd_ones();
        let reg = s.get("odd_numbers").unwrap();
        let n: i64 = (1 << 60) + (1 << 36) + 1;
        let v = json!({"f": n, "d": n, "fd": n, "il": n, "li": n, "fi": 1.5});
        let mut direct = reg.header.to_vec();
        assert!(reg.write_json(&v, &mut direct).is_some());
        assert_eq!(direct, encode_via_value_tree(v, reg).unwrap());
    }

    /// The property below is not vacuous: most generated values are written directly (and agree).
    #[test]
    fn the_direct_avro_writer_takes_most_generated_values() {
        let s = schemas_and_odd_ones();
        let (mut direct, mut all) = (0, 0);
        for seed in 1..200u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for name in s.names() {
                let reg = s.get(name).unwrap();
                let v = arbitrary_for(&reg.schema, &mut rng, 0);
                let mut out = reg.header.to_vec();
                all += 1;
                if reg.write_json(&v, &mut out).is_some() {
                    direct += 1;
                    assert_eq!(out, encode_via_value_tree(v, reg).unwrap(), "{name}");
                }
            }
        }
        eprintln!("{direct} of {all} written directly");
        assert!(direct * 4 >= all, "{direct} of {all} written directly");
    }

    proptest! {
        #[test]
        fn json_encode_decode_is_identity(ev in arb_event()) {
            let s = SchemaRegistry::default();
            let enc = encode(&ev, Encoding::Json, None, &s).unwrap();
            prop_assert_eq!(decode(view(&enc.payload, &[], None), &s).unwrap(), ev);
        }

        /// The direct Avro writer and apache_avro's value tree write the same bytes for every value
        /// the direct writer takes, under every schema in `schemas/` (values built along the schema,
        /// with fields left out, set to null, of the wrong type, objects where text is wanted...).
        #[test]
        fn the_direct_avro_writer_matches_the_value_tree(seed in any::<u64>()) {
            let s = schemas_and_odd_ones();
            let mut rng = seed | 1;
            let mut names: Vec<&str> = s.names().collect();
            names.sort_unstable();
            for name in names {
                let reg = s.get(name).unwrap();
                for _ in 0..4 {
                    let v = arbitrary_for(&reg.schema, &mut rng, 0);
                    let mut direct = reg.header.to_vec();
                    if reg.write_json(&v, &mut direct).is_some() {
                        let tree = encode_via_value_tree(v.clone(), reg);
                        prop_assert!(tree.is_ok(), "{name}: {v}: {tree:?}");
                        prop_assert_eq!(&direct, &tree.unwrap(), "{}: {}", name, v);
                    }
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), avro in any::<bool>()) {
            let s = schemas();
            let mut payload = bytes;
            if avro && payload.len() >= 10 {
                payload[0] = 0xC3;
                payload[1] = 0x01;
                // Point at a real schema so the datum decoder sees garbage.
                let fp = &s.get("deployment").unwrap().header[2..];
                payload[2..10].copy_from_slice(fp);
            }
            let _ = decode(view(&payload, &[], None), &s);
        }
    }
}
