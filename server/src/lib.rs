//! The Tether control plane.

pub mod activity;
pub mod capacity;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod deploy;
pub mod domain;
pub mod engine;
pub mod grpc;
pub mod ids;
pub mod listener;
pub mod log_limit;
pub mod secrets;
pub mod server;
pub mod store;
pub mod summary;
pub mod tail;
pub mod telemetry;
pub mod wake;
