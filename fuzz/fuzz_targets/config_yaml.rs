#![no_main]
//! Fuzz target `config_yaml`: the body is `switchyard::fuzzing::config_yaml` (shared with the corpus test).

#[path = "../alloc_bound.rs"]
mod alloc_bound;

#[global_allocator]
static ALLOC: alloc_bound::Bounded = alloc_bound::Bounded;

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::config_yaml(data));
