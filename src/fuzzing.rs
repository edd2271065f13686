//! The bodies of the fuzz targets (`fuzz/fuzz_targets/`), shared with the corpus test
//! (`tests/fuzz_corpus.rs`) so both run exactly the same code: each takes arbitrary bytes, feeds
//! them to a decoder the production path calls, and asserts what must hold. An `Err` is fine; a
//! panic, a broken property or an allocation over the bound (enforced by the harness) is a finding.
//!
//! Inputs that carry more than one thing (a record's headers and payload, a status and a body) are
//! split by [`split_head`]: header lines (`name: value`), a blank line, then the body.

use std::sync::OnceLock;

use serde_json::{json, Map, Value};

use crate::codec::{self, Encoding, RecordView};
use crate::event::CloudEvent;
use crate::schema::{SchemaRegistry, SINGLE_OBJECT_HEADER_LEN};

/// One fuzz target: its name (the file under `fuzz/fuzz_targets/` and the corpus directory), what
/// it fuzzes, the largest input the code takes there, and its body.
pub struct Target {
    pub name: &'static str,
    pub fuzzes: &'static str,
    /// `-max_len` of its runs: the size cap the production path has in front of the decoder.
    pub max_len: usize,
    pub run: fn(&[u8]),
}

/// Kafka records: `kafka.max_record_bytes` (default 1 MiB; larger ones are dead-lettered unread).
const RECORD_CAP: usize = 1 << 20;

// `deploy/local/fuzz.sh` reads each target's `max_len` from this table: keep them literal
// (`RECORD_CAP` or `N << M`).

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "codec_structured",
        fuzzes: "codec::decode, structured JSON records",
        max_len: RECORD_CAP,
        run: codec_structured,
    },
    Target {
        name: "codec_binary",
        fuzzes: "codec::decode, binary mode (ce_* headers + data)",
        max_len: RECORD_CAP,
        run: codec_binary,
    },
    Target {
        name: "codec_avro",
        fuzzes: "codec::decode and decode_single_object, Avro single-object records",
        max_len: RECORD_CAP,
        run: codec_avro,
    },
    Target {
        name: "ingest_cloudevents",
        fuzzes: "http::ingest::parse_cloudevents (structured, batch, binary)",
        // `http.ingest.max_body_bytes`, default 1 MiB (the larger body is refused unread).
        max_len: 1 << 20,
        run: ingest_cloudevents,
    },
    Target {
        name: "ingest_alertmanager",
        fuzzes: "http::ingest::alertmanager_events",
        max_len: 1 << 20,
        run: ingest_alertmanager,
    },
    Target {
        name: "ingest_github",
        fuzzes: "http::ingest::github_delivery and github_signature_ok",
        max_len: 1 << 20,
        run: ingest_github,
    },
    Target {
        name: "agent_http_reply",
        fuzzes: "agents::http::read_reply (status + body)",
        max_len: 1 << 20,
        run: agent_http_reply,
    },
    Target {
        name: "agent_kafka_reply",
        fuzzes: "agents::kafka::parse_reply (reply records)",
        max_len: RECORD_CAP,
        run: agent_kafka_reply,
    },
    Target {
        name: "gateway_response",
        fuzzes: "gateway::providers::read_answer, error_message, agents::llm::answer_json",
        max_len: 1 << 20,
        run: gateway_response,
    },
    Target {
        name: "gateway_stream",
        fuzzes: "gateway::providers::SseBuffer, openai_chunk, anthropic::chunks (SSE)",
        max_len: 1 << 20,
        run: gateway_stream,
    },
    Target {
        name: "gateway_request",
        fuzzes: "gateway::served::read_request, anthropic::request",
        // The served endpoint's body limit (`gateway::served::MAX_BODY`).
        max_len: 4 << 20,
        run: gateway_request,
    },
    Target {
        name: "approvals_body",
        fuzzes: "axum Json<DecisionRequest>, http::approvals::answer_of, amend::check_parameters",
        // axum's default body limit: the approvals routes set none of their own.
        max_len: 2 << 20,
        run: approvals_body,
    },
    Target {
        name: "config_yaml",
        fuzzes: "config::Config::from_yaml_embedded (YAML text to a validated config)",
        // A config file has no cap; 16 KiB holds the shipped one (15.6 KiB), see README.
        max_len: 16 << 10,
        run: config_yaml,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The shipped schemas, loaded once; Avro allocations bounded as `switchyard run` bounds them.
fn schemas() -> &'static SchemaRegistry {
    static S: OnceLock<SchemaRegistry> = OnceLock::new();
    S.get_or_init(|| {
        apache_avro::util::max_allocation_bytes(RECORD_CAP);
        SchemaRegistry::from_texts(
            crate::embedded::SCHEMAS
                .iter()
                .map(|(n, t)| (*n, format!("embedded schema {n}"), *t)),
        )
        .unwrap_or_else(|e| panic!("the embedded schemas load: {e:?}"))
    })
}

/// Header lines (`name: value`, as bytes), then the body after the first blank line. Without a
/// blank line the whole input is the body.
pub fn split_head(data: &[u8]) -> (Vec<(String, Vec<u8>)>, &[u8]) {
    let Some(at) = data.windows(2).position(|w| w == b"\n\n") else {
        return (Vec::new(), data);
    };
    let headers = data[..at]
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let colon = line.iter().position(|b| *b == b':')?;
            let name = String::from_utf8_lossy(&line[..colon]).trim().to_string();
            let value = line[colon + 1..]
                .strip_prefix(b" ")
                .unwrap_or(&line[colon + 1..]);
            Some((name, value.to_vec()))
        })
        .collect();
    (headers, &data[at + 2..])
}

/// A decoded event written as structured JSON must decode again to the same attributes.
fn reencodes(ev: &CloudEvent, key: Option<&[u8]>) {
    let enc = codec::encode(ev, Encoding::Json, None, schemas())
        .unwrap_or_else(|e| panic!("a decoded event encodes: {e}"));
    let rec = RecordView {
        key,
        payload: &enc.payload,
        headers: &[],
    };
    let back = codec::decode(rec, schemas())
        .unwrap_or_else(|e| panic!("a decoded event, encoded, decodes again: {e}"));
    assert_eq!(
        (&back.id, &back.source, &back.ty, &back.subject, &back.time),
        (&ev.id, &ev.source, &ev.ty, &ev.subject, &ev.time)
    );
    assert_eq!(
        back.extensions.keys().collect::<Vec<_>>(),
        ev.extensions.keys().collect::<Vec<_>>()
    );
    assert_eq!(back.data.is_some(), ev.data.is_some());
}

fn decoded_ok(ev: &CloudEvent) {
    assert_eq!(ev.specversion, "1.0");
    assert!(ev.subject.as_deref().is_some_and(|s| !s.is_empty()));
    codec::validate(ev).unwrap_or_else(|e| panic!("a decoded event validates: {e}"));
}

/// A structured JSON record (the first byte chooses whether it has a key).
pub fn codec_structured(data: &[u8]) {
    let Some((&flags, payload)) = data.split_first() else {
        return;
    };
    let key = (flags & 1 == 1).then_some(&b"resource-key"[..]);
    let rec = RecordView {
        key,
        payload,
        headers: &[],
    };
    if let Ok(ev) = codec::decode(rec, schemas()) {
        decoded_ok(&ev);
        reencodes(&ev, key);
    }
}

/// A binary-mode record: header lines, a blank line, the data; `ce_specversion` is always there.
pub fn codec_binary(data: &[u8]) {
    let (mut headers, payload) = split_head(data);
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("ce_specversion"))
    {
        headers.insert(0, ("ce_specversion".into(), b"1.0".to_vec()));
    }
    let rec = RecordView {
        key: Some(b"k"),
        payload,
        headers: &headers,
    };
    if let Ok(ev) = codec::decode(rec, schemas()) {
        decoded_ok(&ev);
    }
}

/// An Avro single-object record: the first byte picks a shipped schema, whose header precedes the
/// rest of the input (anything else is an unknown fingerprint, tested once by the corpus test).
pub fn codec_avro(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let mut names: Vec<&str> = schemas().names().collect();
    // In name order: the registry's own order differs between processes.
    names.sort_unstable();
    let Some(reg) = schemas().get(names[usize::from(pick) % names.len()]) else {
        return;
    };
    let mut payload = Vec::with_capacity(SINGLE_OBJECT_HEADER_LEN + body.len());
    payload.extend_from_slice(&reg.header);
    payload.extend_from_slice(body);
    let rec = RecordView {
        key: Some(b"k"),
        payload: &payload,
        headers: &[],
    };
    if let Ok(ev) = codec::decode(rec, schemas()) {
        decoded_ok(&ev);
        reencodes(&ev, Some(b"k"));
    }
    // The data of a binary-mode record, under any schema (envelope or not).
    if let Ok((r, json)) = codec::decode_single_object(&payload, schemas()) {
        assert_eq!(r.name, reg.name);
        codec::check_value_depth(&json, codec::MAX_DEPTH)
            .unwrap_or_else(|e| panic!("decoded Avro is within the depth limit: {e}"));
    }
}

/// `POST /v1/events`: the first byte picks the mode (structured, batch, binary, or header lines
/// as sent, content type included); header lines that are not valid HTTP headers are dropped.
pub fn ingest_cloudevents(data: &[u8]) {
    use crate::http::ingest::{parse_cloudevents, BATCH, MAX_BATCH_EVENTS, STRUCTURED};
    use axum::http::{HeaderMap, HeaderName, HeaderValue};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut headers = HeaderMap::new();
    let body = match mode % 4 {
        0 => {
            headers.insert("content-type", HeaderValue::from_static(STRUCTURED));
            rest
        }
        1 => {
            headers.insert("content-type", HeaderValue::from_static(BATCH));
            rest
        }
        m => {
            let (lines, body) = split_head(rest);
            for (k, v) in lines {
                if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::from_bytes(&v)) {
                    headers.append(k, v);
                }
            }
            if m == 2 && !headers.contains_key("ce-specversion") {
                headers.insert("ce-specversion", HeaderValue::from_static("1.0"));
            }
            body
        }
    };
    if let Ok(events) = parse_cloudevents(&headers, body, schemas()) {
        assert!(!events.is_empty() && events.len() <= MAX_BATCH_EVENTS);
        for ev in &events {
            decoded_ok(ev);
        }
    }
}

/// `POST /v1/ingest/alertmanager` (with a tenant label, so that path runs too).
pub fn ingest_alertmanager(data: &[u8]) {
    use crate::http::ingest::{alertmanager_events, AlertmanagerConfig};
    let cfg = AlertmanagerConfig {
        tenant_label: Some("tenant".into()),
        ..AlertmanagerConfig::default()
    };
    if let Ok(events) = alertmanager_events(&cfg, data) {
        assert!(!events.is_empty());
        for ev in &events {
            decoded_ok(ev);
            assert!(ev.ty == "sla.breached" || ev.ty == "sla.recovered");
        }
    }
}

/// `POST /v1/ingest/github`: the first byte picks the event header and the subject setting; the
/// signature check runs on the first line as the signature header.
pub fn ingest_github(data: &[u8]) {
    use crate::http::ingest::{
        github_delivery, github_signature_ok, GithubConfig, GithubDelivery, GithubSubject,
    };
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let event = ["deployment_status", "ping", "push", ""][usize::from(pick % 4)];
    let cfg = GithubConfig {
        subject: if pick & 4 == 0 {
            GithubSubject::Repository
        } else {
            GithubSubject::Environment
        },
        ..GithubConfig::default()
    };
    let secret = crate::secret::Secret::new("fuzz-secret".to_string());
    let first_line = body.split(|b| *b == b'\n').next().unwrap_or_default();
    let signature = std::str::from_utf8(first_line).ok();
    // Only a signature made with the secret passes; the fuzzer cannot forge one.
    assert!(!github_signature_ok(&secret, body, signature) || signature.is_some());
    let delivery = if pick & 8 == 0 { "d-1" } else { "" };
    if let Ok(GithubDelivery::Event(ev)) = github_delivery(&cfg, event, delivery, body) {
        decoded_ok(&ev);
        assert!(ev.ty.starts_with("deployment."));
    }
}

/// An HTTP agent's answer: the first two bytes are the status (100 to 999), the rest the body.
pub fn agent_http_reply(data: &[u8]) {
    let [a, b, body @ ..] = data else {
        return;
    };
    let code = 100 + u16::from_be_bytes([*a, *b]) % 900;
    let Ok(status) = reqwest::StatusCode::from_u16(code) else {
        return;
    };
    if let Ok(resp) = crate::agents::http::read_reply(status, body) {
        assert!(status.is_success());
        responds(&resp);
    }
}

/// An agent's response, once accepted, has confidences in range and serialises and reads back.
fn responds(resp: &crate::records::AgentResponse) {
    for p in &resp.proposals {
        assert!(p.confidence.is_none_or(|c| (0.0..=1.0).contains(&c)));
    }
    let text = serde_json::to_vec(resp).unwrap_or_else(|e| panic!("a response serialises: {e}"));
    serde_json::from_slice::<crate::records::AgentResponse>(&text)
        .unwrap_or_else(|e| panic!("a serialised response reads back: {e}"));
}

/// A record on a Kafka agent's reply topic (header lines, a blank line, the payload).
pub fn agent_kafka_reply(data: &[u8]) {
    let (headers, payload) = split_head(data);
    let rec = RecordView {
        key: Some(b"k"),
        payload,
        headers: &headers,
    };
    if let Some((id, Ok(resp))) = crate::agents::kafka::parse_reply(rec) {
        let _ = id;
        responds(&resp);
    }
}

/// A request asking for JSON-schema output (Anthropic's answer comes back through a tool).
fn structured_request(yes: bool) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "messages".into(),
        json!([{"role": "user", "content": "hi"}]),
    );
    if yes {
        m.insert(
            "response_format".into(),
            json!({"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}}),
        );
    }
    m
}

/// A provider's non-streamed answer: the first byte picks OpenAI or Anthropic and whether the
/// request wanted structured output; the answer's text goes through the LLM agent's JSON reading.
pub fn gateway_response(data: &[u8]) {
    use crate::gateway::providers::{error_message, read_answer, ProviderKind};
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let kind = if pick & 1 == 0 {
        ProviderKind::Openai
    } else {
        ProviderKind::Anthropic
    };
    let request = structured_request(pick & 2 == 2);
    if let Ok((answer, usage)) = read_answer(kind, body, "m", &request) {
        assert!(answer.get("choices").is_some_and(Value::is_array));
        if let Some(u) = usage {
            let back = crate::gateway::providers::Usage::from_openai(&u.to_openai());
            assert_eq!(back, Some(u));
        }
        if let Some(text) = answer["choices"][0]["message"]["content"].as_str() {
            let _ = crate::agents::llm::answer_json(text);
        }
    }
    // The same bytes as an error answer's body.
    let message = error_message(String::from_utf8_lossy(body).into_owned());
    assert!(message.len() <= 500 + '…'.len_utf8());
}

/// A provider's streamed answer: the first byte picks OpenAI or Anthropic and the size of the
/// pieces the body arrives in; events are cut as the stream reader cuts them.
pub fn gateway_stream(data: &[u8]) {
    use crate::gateway::providers::{anthropic, openai_chunk, SseBuffer};
    use futures::StreamExt;
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let piece = usize::from(pick >> 1) % 64 + 1;
    let mut buf = SseBuffer::default();
    let mut events = Vec::new();
    for chunk in body.chunks(piece) {
        buf.push(chunk);
        while let Some(ev) = buf.next_event() {
            events.push(ev);
        }
    }
    // The body ended: what is left is one more event unless it is blank.
    if !buf.is_blank() {
        buf.push(b"\n\n");
        while let Some(ev) = buf.next_event() {
            events.push(ev);
        }
    }
    assert!(buf.is_blank());
    if pick & 1 == 0 {
        for (_, data) in &events {
            let _ = openai_chunk(data);
        }
    } else {
        let stream = futures::stream::iter(events.into_iter().map(Ok)).boxed();
        let chunks: Vec<_> =
            futures::executor::block_on(anthropic::chunks(stream, "m".into()).collect());
        for c in chunks.iter().flatten() {
            assert_eq!(c["object"], "chat.completion.chunk");
        }
    }
}

/// `POST /v1/chat/completions` of the served gateway, and the request an Anthropic provider gets.
pub fn gateway_request(data: &[u8]) {
    let Ok(req) = crate::gateway::served::read_request(data) else {
        return;
    };
    assert!(req.body.get("messages").is_some_and(Value::is_array));
    if let Ok(body) =
        crate::gateway::providers::anthropic::request(&req.model, &req.body, req.stream)
    {
        assert!(body["messages"].as_array().is_some_and(|m| !m.is_empty()));
    }
}

/// `POST /v1/approvals/{id}/{verb}`: the first byte picks the verb, the rest is the body as axum's
/// `Json` extractor reads it (an empty body: no body).
pub fn approvals_body(data: &[u8]) {
    use crate::governance::amend::{check_parameters, Answer};
    use crate::http::approvals::{answer_of, DecisionRequest};
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let verb = ["approve", "reject", "edit", "respond", "delete"][usize::from(pick % 5)];
    let req = if body.is_empty() {
        DecisionRequest::default()
    } else {
        match axum::Json::<DecisionRequest>::from_bytes(body) {
            Ok(axum::Json(r)) => r,
            Err(_) => return,
        }
    };
    match answer_of(verb, &req) {
        Ok(Answer::Edit { parameters, .. }) => {
            assert_eq!(verb, "edit");
            let _ = check_parameters(&parameters);
        }
        Ok(_) => assert_ne!(verb, "delete"),
        Err(_) => assert!(verb == "delete" || (verb == "edit" && req.parameters.is_none())),
    }
}

/// A config file's text, loaded and validated (against the embedded topics and schemas: no file
/// is read).
pub fn config_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(loaded) = crate::config::Config::from_yaml_embedded(text, |_| None) {
        // A valid config names every topic it refers to.
        for t in loaded.config.referenced_topics() {
            assert!(loaded.topics.get(t).is_some(), "topic {t}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounds_are_the_codes_bounds() {
        let max = |n: &str| target(n).map(|t| t.max_len);
        assert_eq!(
            max("gateway_request"),
            Some(crate::gateway::served::MAX_BODY)
        );
        let ingest = crate::http::ingest::IngestConfig::default().max_body_bytes;
        assert_eq!(max("ingest_cloudevents"), Some(ingest));
        let kafka: crate::kafka::KafkaConfig =
            serde_yaml::from_str("{}").unwrap_or_else(|e| panic!("defaults: {e}"));
        assert_eq!(max("codec_structured"), Some(kafka.max_record_bytes));
    }

    #[test]
    fn split_head_reads_header_lines() {
        let (h, body) = split_head(b"ce_id: 1\ncontent-type:x\n\n{}");
        assert_eq!(
            h,
            vec![
                ("ce_id".to_string(), b"1".to_vec()),
                ("content-type".to_string(), b"x".to_vec())
            ]
        );
        assert_eq!(body, b"{}");
        assert_eq!(split_head(b"{}"), (Vec::new(), &b"{}"[..]));
    }
}
