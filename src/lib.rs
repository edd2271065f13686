//! switchyard: a Kafka-native orchestrator for background agents.
//!
//! Existing systems publish events to Kafka; switchyard routes them to agents, lets agents share
//! context in Redis, serialises every action on a resource through a conflict-resolution stage, applies
//! governance, and writes results back to Kafka.
//!
//! # Layout
//! - [`event`]: the CloudEvents 1.0 contract; [`codec`]: records ⇄ events (JSON, binary mode, Avro);
//!   [`schema`]: Avro schemas from `schemas/`.
//! - [`config`]: the YAML config and its validation; [`topics`]: topic definitions and `topics apply`.
//! - [`kafka`]: client settings, producer, and the commit-safe consumer [`kafka::runtime`] every stage
//!   runs on, with ordered ack tracking in [`kafka::acks`].
//! - [`route`]: pure routing rules; [`stages`]: the stage processors (route, agents, ...);
//! - [`agents`]: the agent model, built-in agents, HTTP and Kafka agents; [`context`]: the shared
//!   context store (Redis, and in memory for tests);
//!   [`records`]: the records switchyard writes.
//! - [`telemetry`]: every metric and the log setup; [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`app`]: `switchyard run`; [`cli`]: `publish` and `tail`.

pub mod agents;
pub mod app;
pub mod approvals;
pub mod audit;
pub mod cli;
pub mod codec;
pub mod config;
pub mod context;
pub mod event;
pub mod governance;
pub mod http;
pub mod kafka;
pub mod records;
pub mod resolve;
pub mod route;
pub mod schema;
pub mod stages;
pub mod status;
pub mod telemetry;
pub mod topics;
