//! Build Tether agents.
//!
//! An agent holds one Connect stream to the Tether server and runs the jobs
//! the server assigns with a [`JobHandler`]. The SDK does the protocol:
//! Hello/Welcome, heartbeats with resource metrics, acks, job status
//! reports, cancellation, timeouts, reconnecting with jittered backoff
//! (failing over between several server replicas, see [`Agent::run`]),
//! resuming running jobs and re-sending unacknowledged results after a
//! reconnect, and draining.
//!
//! ```no_run
//! use tether_agent_sdk::{Agent, AgentConfig, JobContext, JobResult, LogStream};
//!
//! # async fn demo() -> Result<(), tether_agent_sdk::AgentError> {
//! let agent = Agent::new(AgentConfig::new("http://127.0.0.1:50051", "worker-1"), |job: JobContext| async move {
//!     job.log(LogStream::Stdout, "working\n".into()).await;
//!     tokio::select! {
//!         _ = job.cancelled() => JobResult::Cancelled,
//!         _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => JobResult::success("done"),
//!     }
//! });
//! let handle = agent.handle();
//! tokio::spawn(async move { println!("agent id {:?}", handle.wait_connected().await) });
//! agent.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

#![warn(missing_docs)]

mod agent;
mod backoff;
mod config;
mod connection;
mod endpoints;
mod error;
mod handle;
mod handler;
mod jobs;
mod metrics;
mod runner;
pub mod shell;
mod state;

pub use agent::Agent;
pub use backoff::ReconnectPolicy;
pub use config::AgentConfig;
pub use error::{is_retryable, AgentError};
pub use handle::{AgentHandle, AgentState};
pub use handler::{JobContext, JobHandler, JobResult, LogStream, MAX_LOG_CHUNK};
