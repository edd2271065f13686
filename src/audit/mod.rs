//! The audit trail: every decision is one record on `switchyard.audit`, written as bytes that depend
//! only on its input, and sealed per batch into the chain of the stage-partition that decided it.
//!
//! - [`hash`]: record hashes (SHA-256 of the bytes written) and Merkle roots; the version-1 hash of
//!   records chained one by one per resource, written before;
//! - [`sealer`]: a batch's seal record (its records' hashes and resources, their Merkle root, the
//!   previous seal's hash) and the chain heads it moves by compare-and-set, one per batch;
//! - [`signing`]: seals signed with HMAC keys (`audit.keys`), so a chain inserted by whoever can
//!   write to the topic is found;
//! - [`story`]: the records of one event or resource in order, one line of text each;
//! - [`verify`]: checking a topic of either version; a removed, altered or forked record or seal
//!   is found.
//!
//! Sealing is at-least-once without gaps: a batch's records are done (their inputs committed) only
//! when its seal is delivered too, so after a crash the inputs are redelivered and their
//! byte-identical records sealed again; the verifier drops exact repeats.

pub mod hash;
pub mod recorder;
pub mod sealer;
pub mod signing;
pub mod story;
pub mod verify;

pub use hash::{canonical_json, record_hash, seal, sealed_hash};
pub use recorder::Recorder;
pub use sealer::{
    ChainStore, Head, MemoryChainStore, RedisChainStore, SealData, Sealed, Sealer, SEAL_SCHEMA,
    SEAL_TYPE,
};
pub use verify::{
    verify, verify_retained, verify_signed, AuditRecord, ChainProblem, SignatureCheck, Verification,
};
