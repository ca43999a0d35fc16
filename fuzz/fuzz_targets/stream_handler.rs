//! The agent stream message handler against a real engine: see
//! `tether_fuzz::stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz::stream::run(data));
