//! The stages `switchyard run` can start, and [`STAGES`], the one table that names them.
//!
//! Each stage is a [`crate::kafka::runtime::Processor`] in its own module with two functions: the
//! topics it consumes and how it is built from the process's [`Services`]. `run`, `status`,
//! readiness and telemetry all read [`STAGES`]; adding a stage is its module plus one line there.

pub mod agents;
pub mod batch;
pub mod decisions;
pub mod resolve;
pub mod route;
pub mod services;
pub mod tools;

pub use services::{runner, Runner, Services, StageDef};

use crate::config::Config;

/// Every stage of this build, in pipeline order.
pub const STAGES: &[StageDef] = &[
    StageDef {
        name: "route",
        about: "input events -> tasks, one per matched agent",
        inputs: route::inputs,
        build: route::build,
    },
    StageDef {
        name: "agents",
        about: "tasks -> agents -> proposals, results and findings",
        inputs: agents::inputs,
        build: agents::build,
    },
    StageDef {
        name: "resolve",
        about: "proposals -> conflict resolution and governance -> actions and approval requests",
        inputs: resolve::inputs,
        build: resolve::build,
    },
    StageDef {
        name: "decisions",
        about: "approval decisions from other systems; expires approvals nobody decided",
        inputs: decisions::inputs,
        build: decisions::build,
    },
    StageDef {
        name: "tools",
        about: "accepted tool.* actions -> the tool called once, with the fencing token",
        inputs: tools::inputs,
        build: tools::build,
    },
];

/// The stage named `name`.
pub fn find(name: &str) -> Option<&'static StageDef> {
    STAGES.iter().find(|s| s.name == name)
}

/// Names of every stage, comma separated (for messages).
pub fn names() -> String {
    STAGES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// Problems of the `stages:` section against this build's stages, as (path, message).
pub fn problems(config: &Config) -> Vec<(String, String)> {
    config
        .stages
        .keys()
        .filter(|name| find(name).is_none())
        .map(|name| {
            let hint = crate::pattern::closest(name, STAGES.iter().map(|s| s.name))
                .map(|c| format!("; did you mean {c:?}?"))
                .unwrap_or_default();
            (
                format!("stages.{name}"),
                format!("is not a stage of this build (it has {}){hint}", names()),
            )
        })
        .collect()
}

/// The stages the config enables (every stage unless switched off).
pub fn enabled(config: &Config) -> Vec<&'static str> {
    STAGES
        .iter()
        .filter(|s| config.stages.get(s.name).is_none_or(|t| t.enabled))
        .map(|s| s.name)
        .collect()
}
