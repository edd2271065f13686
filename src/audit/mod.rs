//! The audit trail: every decision is one record on `switchyard.audit`, hash-chained per resource.
//!
//! [`hash`]: the record hash and sealing (pure); [`sealer`]: sealing records into their chain where
//! they are decided, with the chain heads in a store; [`verify`]: checking chains read back.
//!
//! The stage that makes a decision seals its audit record at once ([`Sealer`]): each record gets
//! `seq` (1, 2, ... per resource), `prev_hash` (the previous record's hash) and `hash` = SHA-256 of
//! the record's canonical JSON (keys sorted, no whitespace) without `hash`. A missing, altered or
//! forked record breaks the chain; [`verify`] finds it.
//!
//! Sealing is at-least-once without gaps: the chain head moves in Redis before the record is
//! produced, and the input that caused it is committed only after the record is acknowledged, so a
//! crash in between redelivers the input, and its audit record is sealed again identically (same
//! seq, same hash, from a memo): the verifier drops exact repeats.

pub mod hash;
pub mod sealer;
pub mod verify;

pub use hash::{canonical_json, record_hash, seal, sealed_hash};
pub use sealer::{ChainStore, MemoryChainStore, RedisChainStore, Sealer};
pub use verify::{verify, ChainProblem, Verification};
