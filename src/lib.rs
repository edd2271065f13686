//! switchyard: a Kafka-native orchestrator for background agents.
//!
//! Existing systems publish events to Kafka; switchyard routes them to agents, lets agents share
//! context in Redis, serialises every action on a resource through a conflict-resolution stage,
//! applies governance, and writes results back to Kafka.
//!
//! # Layout
//! Entry points use stages; stages use the domain; the domain uses the contract, the stores and the
//! error taxonomy; nothing imports an entry point or a stage (`deploy/tools/import_graph.py` checks
//! it).
//!
//! Entry points:
//! - `main.rs`: parses the command line and dispatches to [`cmd`];
//! - [`cmd`]: one module per command (run, validate, config, topics, publish, tail, status, audit,
//!   approvals, recover, workflows, context, dlq, trace/history, replay);
//! - [`app`]: `switchyard run` — builds the shared services, starts the stages of the registry, the
//!   HTTP server and the health checker, and shuts down cleanly;
//! - [`replay`]: `switchyard replay` — the stages' processors over scratch state, agents answered
//!   from the recording: the decision diff of a config against what was recorded.
//!
//! Stages:
//! - [`stages`]: the registry [`stages::STAGES`] and one module per stage (route, agents, resolve,
//!   decisions, tools).
//!
//! Domain:
//! - [`config`]: composes the sections each module owns; loads a file or the [`embedded`] default;
//!   validation that lists every problem;
//! - [`agents`]: the agent model, kinds (built-in, HTTP, Kafka, LLM), built-ins one per file, health
//!   stats;
//! - [`tools`]: external tools of LLM agents (HTTP endpoints, MCP servers), read-only or mutating,
//!   and the record of every tool call;
//! - [`context`]: the shared context store (trait, Redis, memory, contract suite);
//! - [`resolve`]: rules (pure), apply (pure), store (the only owner of the resource state);
//! - [`governance`]: access and approval rules, budgets (with holds for model calls), the approvals
//!   service;
//! - [`gateway`]: the AI gateway: providers, aliases and fallbacks, shared rate limits and
//!   cooldowns, budget holds, the served OpenAI-compatible endpoint, call accounting;
//! - [`audit`]: record hashes, sealing into per-resource chains, verification;
//! - [`http`]: the HTTP server (metrics, health), users and their roles, the approvals API, HTTP
//!   ingest (CloudEvents, Alertmanager and GitHub webhooks to input topics);
//! - [`recover`]: rebuilding Redis from the Kafka topics after Redis lost its data;
//! - [`format`]: the data format marker that keeps an older build from reading what a newer one
//!   wrote.
//!
//! Contract and foundations:
//! - [`event`]: the CloudEvents 1.0 contract; [`codec`]: records ⇄ events (JSON, binary mode, Avro);
//!   [`schema`]: Avro schemas; [`records`]: the records switchyard writes and agents' answers;
//! - [`topics`]: topic names and definitions, `topics apply`; [`route`]: pure routing rules;
//!   [`pattern`]: `*` patterns and deterministic ids;
//! - [`kafka`]: client settings, producer, and the commit-safe consumer runtime;
//! - [`store`]: the Redis connection and resource keys; [`error`]: the error taxonomy that decides
//!   dead-letter, retry or stop; [`secret`]: redacted secrets; [`telemetry`]: every metric and the
//!   log setup; [`spans`]: OpenTelemetry spans, trace context propagation and OTLP export;
//!   [`embedded`]: the shipped defaults compiled in.
//!
//! Testing: `fuzzing` (hidden): the bodies of the fuzz targets in `fuzz/`, shared with the corpus
//! test `tests/fuzz_corpus.rs`.

pub mod agents;
pub mod app;
pub mod audit;
pub mod body;
pub mod cmd;
pub mod codec;
pub mod config;
pub mod context;
pub mod embedded;
pub mod error;
pub mod event;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod governance;
pub mod http;
pub mod kafka;
pub mod pattern;
pub mod records;
pub mod recover;
pub mod replay;
pub mod resolve;
pub mod route;
pub mod schema;
pub mod secret;
pub mod spans;
pub mod stages;
pub mod store;
pub mod telemetry;
pub mod tools;
pub mod topics;
pub mod workflow;
