//! cargo-fuzz target `copy_batch`; what it checks is in `ctmirror_fuzz::copy_batch`
//! (`fuzz/src/harness.rs`), which `tests/fuzz_seeds.rs` also runs on every seed.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ctmirror_fuzz::copy_batch(data));
