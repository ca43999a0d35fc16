//! The gRPC layer: thin adapters that translate between wire types and the
//! engine's domain calls. No scheduling logic lives here.

pub mod agent_service;
pub mod convert;
pub mod dashboard_convert;
pub mod dashboard_service;
pub mod deploy_convert;
pub mod event_cursor;
pub mod job_logs;
pub mod page_token;
pub mod queue_service;
pub mod replica_service;
pub mod session_secrets;
pub mod status;
pub mod stream_messages;
pub mod summary_convert;
mod watch;
pub mod watch_events;

pub use agent_service::AgentApi;
pub use dashboard_service::DashboardApi;
pub use queue_service::QueueApi;
pub use replica_service::ReplicaApi;
