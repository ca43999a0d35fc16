//! The harnesses behind the fuzz targets (`fuzz_targets/`), kept in a library
//! so the seed generator (`src/bin/make_seeds.rs`) and the tests share the
//! input formats with them.
//!
//! - [`requests`]: one request message of tether.v1, picked by the first
//!   byte, decoded and validated the way its handler does it.
//! - [`stream`]: an agent session (length-delimited `ConnectRequest`s)
//!   against a real engine over the embedded store and a manual clock.
//!
//! Every invariant is an `assert!`/`panic!`: under libFuzzer a panic aborts
//! and is reported as a crash.

pub mod checks;
pub mod requests;
pub mod stream;
