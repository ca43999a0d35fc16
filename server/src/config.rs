//! Server settings, from flags and environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::engine::EngineConfig;
use crate::store::embedded::{EmbeddedOptions, SyncMode};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// `tether server` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "TETHER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Directory of the embedded store.
    #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
    pub data_dir: PathBuf,
    /// Sync only every Nth commit instead of every commit. Faster, but a
    /// crash or power loss can lose acknowledged writes. Never use it for
    /// data you care about.
    #[arg(long, env = "TETHER_UNSAFE_SYNC_EVERY", value_name = "N")]
    pub unsafe_sync_every: Option<u32>,
    /// How often agents must heartbeat.
    #[arg(long, env = "TETHER_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// How long a disconnected agent keeps its jobs before they are requeued.
    #[arg(long, env = "TETHER_RECONNECT_GRACE", default_value = "15s", value_parser = parse_duration)]
    pub reconnect_grace: Duration,
    /// Most agent streams the server holds at once.
    #[arg(long, env = "TETHER_MAX_AGENT_STREAMS", default_value_t = 10_000)]
    pub max_agent_streams: usize,
    /// Log format.
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,
}

impl ServerArgs {
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            heartbeat_interval: self.heartbeat_interval,
            reconnect_grace: self.reconnect_grace,
            ..EngineConfig::default()
        }
    }

    pub fn store_options(&self) -> EmbeddedOptions {
        EmbeddedOptions {
            sync: match self.unsafe_sync_every {
                Some(n) if n > 1 => SyncMode::EveryNth(n),
                _ => SyncMode::Always,
            },
            ..EmbeddedOptions::default()
        }
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h` (or a bare number of seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 500ms, 30s, 5m or 1h"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}; use ms, s, m or h")),
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
