//! Engine settings.

use std::time::Duration;

/// Timing and limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How often agents must heartbeat.
    pub heartbeat_interval: Duration,
    /// How long a disconnected agent keeps its jobs.
    pub reconnect_grace: Duration,
    /// First retry backoff; doubles per attempt.
    pub backoff_base: Duration,
    /// Longest retry backoff.
    pub backoff_max: Duration,
    /// Recent metrics samples kept per agent.
    pub metrics_history: usize,
    /// Commands the engine queue holds before callers wait.
    pub command_capacity: usize,
    /// Missed heartbeats after which an agent is UNHEALTHY (one makes it
    /// DEGRADED).
    pub unhealthy_after_missed: u32,
    /// Memory or disk use (fraction) above which an agent is DEGRADED.
    pub pressure_threshold: f64,
    /// Least time between the starts of two store commits after a small
    /// one (group commit window). Zero by default: a commit starts at once
    /// when none is in flight, and what arrives meanwhile forms the next
    /// group, so a lone client's acknowledgement waits for no timer.
    pub commit_interval: Duration,
    /// The window after a commit of at least `busy_commit_writes` writes:
    /// under heavy load a wider window shares each commit's fixed cost
    /// among more writes and coalesces more transitions of one job.
    pub busy_commit_interval: Duration,
    /// Writes in a commit that make the next window `busy_commit_interval`.
    pub busy_commit_writes: usize,
    /// On a shared store: how often the store is swept for queued jobs
    /// (enqueued through other replicas, or whose wake-up was lost) and for
    /// active jobs whose lease ran out (their replica died). Jittered ±25%.
    pub sweep_interval: Duration,
    /// On a shared store: how far replicas' clocks may disagree. A replica
    /// reaps another's job only this long after its lease ended.
    pub clock_skew_tolerance: Duration,
    /// How long job events are kept (then trimmed; a watch cursor older
    /// than that is answered with a reset).
    pub event_retention: Duration,
    /// The most output bytes kept per dashboard job; past it one truncation
    /// marker is stored and the rest dropped.
    pub max_job_output_bytes: u64,
    /// How often the retention task trims the event log.
    pub event_trim_interval: Duration,
    /// On a shared store: how often an idle watcher reads the event log for
    /// changes made through other replicas (its own replica's changes wake
    /// it at once).
    pub event_poll_interval: Duration,
    /// How long a WatchEvents stream stays quiet before a keep-alive.
    pub watch_keep_alive: Duration,
}

/// The default output cap per dashboard job: 16 MiB.
pub const DEFAULT_MAX_JOB_OUTPUT_BYTES: u64 = 16 << 20;

/// The default event retention.
pub const DEFAULT_EVENT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The shortest and longest event retention accepted.
pub const MIN_EVENT_RETENTION: Duration = Duration::from_secs(60);
pub const MAX_EVENT_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            heartbeat_interval: Duration::from_secs(5),
            reconnect_grace: Duration::from_secs(15),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            metrics_history: 60,
            command_capacity: 65_536,
            unhealthy_after_missed: 3,
            pressure_threshold: 0.95,
            commit_interval: Duration::ZERO,
            busy_commit_interval: Duration::from_millis(4),
            busy_commit_writes: 64,
            sweep_interval: Duration::from_secs(1),
            clock_skew_tolerance: Duration::from_secs(2),
            event_retention: DEFAULT_EVENT_RETENTION,
            event_trim_interval: Duration::from_secs(60),
            max_job_output_bytes: DEFAULT_MAX_JOB_OUTPUT_BYTES,
            event_poll_interval: Duration::from_secs(1),
            watch_keep_alive: Duration::from_secs(15),
        }
    }
}
