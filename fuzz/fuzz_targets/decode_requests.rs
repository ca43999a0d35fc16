//! Request decoding and validation: see `tether_fuzz::requests`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz::requests::run(data));
