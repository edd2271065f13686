//! Conflict resolution: one owner per concern.
//!
//! - [`rules`]: the `resolve:` config and the pure [`rules::decide`] (dedupe, merge, priority,
//!   staleness, cooldown, pending holds);
//! - [`apply`]: the pure state change a decision (and governance's [`apply::Gate`]) makes;
//! - [`store`]: the resource's resolve state in Redis — the only module that touches it — with an
//!   in-memory twin and a contract suite.
//!
//! The resolve stage (`stages/resolve.rs`) runs them in order per proposal: load, decide, governance
//! gate, apply, compare-and-set.

pub mod apply;
pub mod rules;
pub mod store;

pub use rules::ResolveConfig;
