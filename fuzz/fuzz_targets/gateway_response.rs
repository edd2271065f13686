#![no_main]
//! Fuzz target `gateway_response`: the body is `switchyard::fuzzing::gateway_response` (shared with the corpus test).

#[path = "../alloc_bound.rs"]
mod alloc_bound;

#[global_allocator]
static ALLOC: alloc_bound::Bounded = alloc_bound::Bounded;

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::gateway_response(data));
