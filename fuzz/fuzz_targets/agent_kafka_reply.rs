#![no_main]
//! Fuzz target `agent_kafka_reply`: the body is `switchyard::fuzzing::agent_kafka_reply` (shared with the corpus test).

#[path = "../alloc_bound.rs"]
mod alloc_bound;

#[global_allocator]
static ALLOC: alloc_bound::Bounded = alloc_bound::Bounded;

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::agent_kafka_reply(data));
