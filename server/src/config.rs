//! Server settings: a TOML file (`--config`), then environment variables
//! (`TETHER_…`), then flags; each later source overrides the earlier ones,
//! and built-in defaults apply to what none of them sets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;
use crate::store::embedded::{EmbeddedOptions, SyncMode};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Where the server keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// One file under `--data-dir`, owned by one server process.
    Embedded,
    /// DynamoDB tables (`--dynamodb-*`); create them with `tether dynamodb
    /// create-tables`.
    Dynamodb,
}

/// Where the DynamoDB tables are: `tether server --store dynamodb` and
/// `tether dynamodb …`. Credentials and (unless given here) the region come
/// from the standard AWS chain (environment, profile, instance role).
#[derive(Debug, Clone, clap::Args)]
pub struct DynamoArgs {
    /// DynamoDB endpoint URL, e.g. http://127.0.0.1:8000 for DynamoDB Local
    /// [default: the region's endpoint].
    #[arg(long, env = "TETHER_DYNAMODB_ENDPOINT", value_name = "URL", value_parser = parse_endpoint)]
    pub dynamodb_endpoint: Option<String>,
    /// Prefix of every table name, so several deployments share an account.
    #[arg(long, env = "TETHER_DYNAMODB_TABLE_PREFIX", default_value = "tether-", value_parser = parse_table_prefix)]
    pub dynamodb_table_prefix: String,
    /// AWS region [default: the standard chain, e.g. AWS_REGION].
    #[arg(long, env = "TETHER_DYNAMODB_REGION", value_name = "REGION")]
    pub dynamodb_region: Option<String>,
}

impl DynamoArgs {
    pub fn dynamo_config(&self) -> crate::store::dynamodb::DynamoConfig {
        crate::store::dynamodb::DynamoConfig {
            endpoint: self.dynamodb_endpoint.clone(),
            table_prefix: self.dynamodb_table_prefix.clone(),
            region: self.dynamodb_region.clone(),
        }
    }
}

/// A DynamoDB endpoint: an http or https URL with a host.
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let uri: http::Uri = text.parse().map_err(|_| format!("{text:?} is not a URL like http://127.0.0.1:8000"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(text.to_string()),
        _ => Err(format!("{text:?} is not an http(s) URL like http://127.0.0.1:8000")),
    }
}

/// A table name prefix: DynamoDB's table name characters, short enough to
/// leave room for the table names.
pub fn parse_table_prefix(text: &str) -> Result<String, String> {
    let valid = text.len() <= 200 && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not a table prefix (at most 200 of a-z, A-Z, 0-9, _, - and .)"))
    }
}

/// `tether server` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "TETHER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Where data is kept.
    #[arg(long, env = "TETHER_STORE", value_enum, default_value = "embedded")]
    pub store: StoreKind,
    /// Directory of the embedded store.
    #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub dynamodb: DynamoArgs,
    /// The key jobs' secrets are sealed with (32 bytes): every replica
    /// sharing a store needs the same file. [default: the embedded store
    /// creates `secrets.key` in its data directory; on DynamoDB, jobs with
    /// secrets are refused without one]
    #[arg(long, env = "TETHER_SECRETS_KEY_FILE", value_name = "PATH")]
    pub secrets_key_file: Option<PathBuf>,
    /// Sync only every Nth commit instead of every commit. Faster, but a
    /// crash or power loss can lose acknowledged writes. Never use it for
    /// data you care about.
    #[arg(long, env = "TETHER_UNSAFE_SYNC_EVERY", value_name = "N")]
    pub unsafe_sync_every: Option<u32>,
    /// How often agents must heartbeat.
    #[arg(long, env = "TETHER_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_heartbeat_interval)]
    pub heartbeat_interval: Duration,
    /// How long a disconnected agent keeps its jobs before they are requeued.
    #[arg(long, env = "TETHER_RECONNECT_GRACE", default_value = "15s", value_parser = parse_reconnect_grace)]
    pub reconnect_grace: Duration,
    /// How long job events are kept for WatchQueue cursors (1m to 8760h); a
    /// cursor older than that is answered OUT_OF_RANGE.
    #[arg(long, env = "TETHER_EVENT_RETENTION", default_value = "24h", value_parser = parse_event_retention)]
    pub event_retention: Duration,
    /// How long a WatchEvents stream stays quiet before a keep-alive (1s
    /// to 10m).
    #[arg(long, env = "TETHER_WATCH_KEEP_ALIVE", default_value = "15s", value_parser = parse_watch_keep_alive)]
    pub watch_keep_alive: Duration,
    /// The most output kept per dashboard job, in MiB (1 to 1024); past it
    /// one truncation marker is stored and the rest dropped.
    #[arg(long, env = "TETHER_MAX_JOB_OUTPUT_MIB", default_value_t = 16, value_parser = parse_max_job_output_mib)]
    pub max_job_output_mib: u32,
    /// DynamoDB store: how far replicas' clocks may disagree (0 to 1m).
    /// Another replica's lease is reaped only this long after it ended by
    /// this replica's clock, so a clock up to this far ahead never reaps a
    /// live lease; a larger value reaps dead replicas' jobs later.
    #[arg(long, env = "TETHER_CLOCK_SKEW_TOLERANCE", default_value = "2s", value_parser = parse_clock_skew_tolerance)]
    pub clock_skew_tolerance: Duration,
    /// Most agent streams the server holds at once [default: what the
    /// open-file limit and a quarter of the memory allow, at ~64 KiB per
    /// agent].
    #[arg(long, env = "TETHER_MAX_AGENT_STREAMS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_agent_streams: Option<u64>,
    /// Log format.
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics (`GET /metrics`) on this address; off when
    /// unset.
    #[arg(long, env = "TETHER_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Let browser pages from this origin call the API over gRPC-Web
    /// (repeatable; the environment variable takes a comma-separated list).
    /// Without it no CORS headers are sent.
    #[arg(
        long = "cors-allow-origin",
        env = "TETHER_CORS_ALLOW_ORIGINS",
        value_name = "ORIGIN",
        value_delimiter = ',',
        value_parser = parse_origin
    )]
    pub cors_allow_origins: Vec<String>,
    /// Where other replicas reach this one's gRPC port (`http://host:port`),
    /// for wake-ups between replicas sharing a DynamoDB store [default: the
    /// listen address, unless it is a wildcard such as 0.0.0.0].
    #[arg(long, env = "TETHER_ADVERTISE_ADDRESS", value_name = "URL", value_parser = parse_origin)]
    pub advertise_address: Option<String>,
    /// Read settings from this TOML file; the environment and flags
    /// override it.
    #[arg(long, env = "TETHER_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The configuration file: every server setting, each optional, keyed by
/// its flag's name (`--data-dir` is `data-dir`).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets_key_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamodb_endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamodb_table_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamodb_region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsafe_sync_every: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_grace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_retention: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch_keep_alive: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_job_output_mib: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_skew_tolerance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_agent_streams: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors_allow_origins: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_address: Option<String>,
}

/// Parses `tether server`'s flags from `argv` (the first item is the
/// program name) and applies the configuration file: for tests and tools.
pub fn load_from<I, T>(argv: I) -> anyhow::Result<ServerArgs>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let command = ServerArgs::augment_args(clap::Command::new("server").no_binary_name(false));
    let matches = command.try_get_matches_from(argv)?;
    load(&matches)
}

/// The effective settings: the values parsed into `matches` (flags,
/// environment, defaults) with the configuration file filling in what
/// neither flags nor environment set.
pub fn load(matches: &ArgMatches) -> anyhow::Result<ServerArgs> {
    let args = ServerArgs::from_arg_matches(matches)?;
    match args.config.clone() {
        None => Ok(args),
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the config file {}", path.display()))?;
            let file: FileConfig = toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("config file {}: {}", path.display(), e.to_string().trim_end()))?;
            args.with_file(&file, matches, &path)
        }
    }
}

/// Whether `id` was given on the command line or in the environment.
fn explicit(matches: &ArgMatches, id: &str) -> bool {
    !matches!(matches.value_source(id), None | Some(ValueSource::DefaultValue))
}

impl ServerArgs {
    /// Applies `file` to every setting that `matches` did not take from the
    /// command line or the environment. `path` names the file in errors.
    pub fn with_file(mut self, file: &FileConfig, matches: &ArgMatches, path: &Path) -> anyhow::Result<ServerArgs> {
        fn value<T>(
            path: &Path,
            key: &str,
            text: &str,
            parse: impl FnOnce(&str) -> Result<T, String>,
        ) -> anyhow::Result<T> {
            parse(text).map_err(|e| anyhow::anyhow!("config file {}: key `{key}`: {e}", path.display()))
        }
        let from_file = |id: &str| !explicit(matches, id);
        if let (true, Some(v)) = (from_file("listen"), &file.listen) {
            self.listen = value(path, "listen", v, |t| {
                t.parse().map_err(|_| format!("{t:?} is not an address like 127.0.0.1:50051"))
            })?;
        }
        if let (true, Some(v)) = (from_file("store"), &file.store) {
            self.store = value(path, "store", v, |t| {
                StoreKind::from_str(t, true).map_err(|_| format!("{t:?} is not one of embedded, dynamodb"))
            })?;
        }
        if let (true, Some(v)) = (from_file("data_dir"), &file.data_dir) {
            self.data_dir = v.clone();
        }
        if let (true, Some(v)) = (from_file("secrets_key_file"), &file.secrets_key_file) {
            self.secrets_key_file = Some(v.clone());
        }
        if let (true, Some(v)) = (from_file("dynamodb_endpoint"), &file.dynamodb_endpoint) {
            self.dynamodb.dynamodb_endpoint = Some(value(path, "dynamodb-endpoint", v, parse_endpoint)?);
        }
        if let (true, Some(v)) = (from_file("dynamodb_table_prefix"), &file.dynamodb_table_prefix) {
            self.dynamodb.dynamodb_table_prefix = value(path, "dynamodb-table-prefix", v, parse_table_prefix)?;
        }
        if let (true, Some(v)) = (from_file("dynamodb_region"), &file.dynamodb_region) {
            self.dynamodb.dynamodb_region = Some(v.clone());
        }
        if let (true, Some(v)) = (from_file("unsafe_sync_every"), file.unsafe_sync_every) {
            self.unsafe_sync_every = Some(v);
        }
        if let (true, Some(v)) = (from_file("heartbeat_interval"), &file.heartbeat_interval) {
            self.heartbeat_interval = value(path, "heartbeat-interval", v, parse_heartbeat_interval)?;
        }
        if let (true, Some(v)) = (from_file("reconnect_grace"), &file.reconnect_grace) {
            self.reconnect_grace = value(path, "reconnect-grace", v, parse_reconnect_grace)?;
        }
        if let (true, Some(v)) = (from_file("event_retention"), &file.event_retention) {
            self.event_retention = value(path, "event-retention", v, parse_event_retention)?;
        }
        if let (true, Some(v)) = (from_file("watch_keep_alive"), &file.watch_keep_alive) {
            self.watch_keep_alive = value(path, "watch-keep-alive", v, parse_watch_keep_alive)?;
        }
        if let (true, Some(v)) = (from_file("max_job_output_mib"), file.max_job_output_mib) {
            self.max_job_output_mib = value(path, "max-job-output-mib", &v.to_string(), parse_max_job_output_mib)?;
        }
        if let (true, Some(v)) = (from_file("clock_skew_tolerance"), &file.clock_skew_tolerance) {
            self.clock_skew_tolerance = value(path, "clock-skew-tolerance", v, parse_clock_skew_tolerance)?;
        }
        if let (true, Some(v)) = (from_file("max_agent_streams"), file.max_agent_streams) {
            if v == 0 {
                anyhow::bail!("config file {}: key `max-agent-streams`: must be at least 1", path.display());
            }
            self.max_agent_streams = Some(v);
        }
        if let (true, Some(v)) = (from_file("log_format"), &file.log_format) {
            self.log_format = value(path, "log-format", v, |t| {
                LogFormat::from_str(t, true).map_err(|_| format!("{t:?} is not one of human, json"))
            })?;
        }
        if let (true, Some(v)) = (from_file("metrics_listen"), &file.metrics_listen) {
            self.metrics_listen = Some(value(path, "metrics-listen", v, |t| {
                t.parse().map_err(|_| format!("{t:?} is not an address like 127.0.0.1:9464"))
            })?);
        }
        if let (true, Some(v)) = (from_file("cors_allow_origins"), &file.cors_allow_origins) {
            self.cors_allow_origins =
                v.iter().map(|o| value(path, "cors-allow-origins", o, parse_origin)).collect::<anyhow::Result<_>>()?;
        }
        if let (true, Some(v)) = (from_file("advertise_address"), &file.advertise_address) {
            self.advertise_address = Some(value(path, "advertise-address", v, parse_origin)?);
        }
        Ok(self)
    }

    /// The effective settings in the configuration file's format.
    pub fn to_file_config(&self) -> FileConfig {
        FileConfig {
            listen: Some(self.listen.to_string()),
            store: self.store.to_possible_value().map(|v| v.get_name().to_string()),
            data_dir: Some(self.data_dir.clone()),
            secrets_key_file: self.secrets_key_file.clone(),
            dynamodb_endpoint: self.dynamodb.dynamodb_endpoint.clone(),
            dynamodb_table_prefix: Some(self.dynamodb.dynamodb_table_prefix.clone()),
            dynamodb_region: self.dynamodb.dynamodb_region.clone(),
            unsafe_sync_every: self.unsafe_sync_every,
            heartbeat_interval: Some(format_duration(self.heartbeat_interval)),
            reconnect_grace: Some(format_duration(self.reconnect_grace)),
            event_retention: Some(format_duration(self.event_retention)),
            watch_keep_alive: Some(format_duration(self.watch_keep_alive)),
            max_job_output_mib: Some(self.max_job_output_mib),
            clock_skew_tolerance: Some(format_duration(self.clock_skew_tolerance)),
            max_agent_streams: self.max_agent_streams,
            log_format: self.log_format.to_possible_value().map(|v| v.get_name().to_string()),
            metrics_listen: self.metrics_listen.map(|a| a.to_string()),
            cors_allow_origins: Some(self.cors_allow_origins.clone()),
            advertise_address: self.advertise_address.clone(),
        }
    }

    /// The effective settings as a TOML configuration file.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        toml::to_string(&self.to_file_config()).context("printing the configuration")
    }

    /// Where peers reach this replica: `--advertise-address`, else the
    /// address it listens on (`bound`: the port the OS chose for port 0)
    /// when that names one host.
    pub fn advertise(&self, bound: SocketAddr) -> anyhow::Result<String> {
        match &self.advertise_address {
            Some(url) => Ok(url.clone()),
            None if bound.ip().is_unspecified() => anyhow::bail!(
                "--listen {} is a wildcard address: set --advertise-address (e.g. http://10.0.1.5:{}) so other \
                 replicas can reach this one",
                self.listen,
                bound.port()
            ),
            None => Ok(format!("http://{bound}")),
        }
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            heartbeat_interval: self.heartbeat_interval,
            reconnect_grace: self.reconnect_grace,
            event_retention: self.event_retention,
            watch_keep_alive: self.watch_keep_alive,
            clock_skew_tolerance: self.clock_skew_tolerance,
            max_job_output_bytes: u64::from(self.max_job_output_mib) << 20,
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

/// Checks a CORS origin: `http://` or `https://`, a host, an optional port,
/// nothing else.
pub fn parse_origin(text: &str) -> Result<String, String> {
    let text = text.trim();
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| format!("{text:?} is not an origin like https://dash.example.com"))?;
    let valid = !rest.is_empty()
        && rest.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        && http::HeaderValue::from_str(text).is_ok();
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not an origin like https://dash.example.com (scheme, host and port only)"))
    }
}

/// Formats a duration so that [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}s", d.as_secs_f64())
    } else if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A heartbeat interval: 100 ms to 1 h.
pub fn parse_heartbeat_interval(text: &str) -> Result<Duration, String> {
    within(parse_duration(text)?, Duration::from_millis(100), Duration::from_secs(3600), text)
}

/// A reconnect grace period: 0 to 24 h.
pub fn parse_reconnect_grace(text: &str) -> Result<Duration, String> {
    within(parse_duration(text)?, Duration::ZERO, Duration::from_secs(24 * 3600), text)
}

pub fn parse_event_retention(text: &str) -> Result<Duration, String> {
    use crate::engine::{MAX_EVENT_RETENTION, MIN_EVENT_RETENTION};
    within(parse_duration(text)?, MIN_EVENT_RETENTION, MAX_EVENT_RETENTION, text)
}

/// A WatchEvents keep-alive interval: 1s to 10m.
pub fn parse_watch_keep_alive(text: &str) -> Result<Duration, String> {
    within(parse_duration(text)?, Duration::from_secs(1), Duration::from_secs(600), text)
}

/// The output cap per dashboard job: 1 to 1024 MiB.
pub fn parse_max_job_output_mib(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} must be a whole number of MiB between 1 and 1024")),
    }
}

/// A clock skew tolerance: 0 to 1 minute.
pub fn parse_clock_skew_tolerance(text: &str) -> Result<Duration, String> {
    within(parse_duration(text)?, Duration::ZERO, Duration::from_secs(60), text)
}

fn within(d: Duration, min: Duration, max: Duration, text: &str) -> Result<Duration, String> {
    if d < min || d > max {
        return Err(format!("{text:?} must be between {} and {}", format_duration(min), format_duration(max)));
    }
    Ok(d)
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

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut file, text.as_bytes()).expect("write");
        file
    }

    fn load_with(file: &tempfile::NamedTempFile, flags: &[&str]) -> anyhow::Result<ServerArgs> {
        let path = file.path().to_str().expect("utf-8 path");
        load_from(["server", "--config", path].iter().chain(flags))
    }

    const FULL: &str = r#"
listen = "127.0.0.1:6000"
data-dir = "/var/lib/tether"
unsafe-sync-every = 4
heartbeat-interval = "2s"
reconnect-grace = "1m"
max-agent-streams = 77
log-format = "json"
metrics-listen = "127.0.0.1:9464"
cors-allow-origins = ["https://dash.example.com", "http://localhost:3000"]
store = "dynamodb"
dynamodb-endpoint = "http://127.0.0.1:8000"
dynamodb-table-prefix = "prod-"
dynamodb-region = "eu-west-1"
"#;

    #[test]
    fn the_file_sets_every_setting() {
        let file = write(FULL);
        let args = load_with(&file, &[]).expect("valid");
        assert_eq!(args.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(args.data_dir, PathBuf::from("/var/lib/tether"));
        assert_eq!(args.unsafe_sync_every, Some(4));
        assert_eq!(args.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(args.reconnect_grace, Duration::from_secs(60));
        assert_eq!(args.max_agent_streams, Some(77));
        assert_eq!(args.log_format, LogFormat::Json);
        assert_eq!(args.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(args.cors_allow_origins, vec!["https://dash.example.com", "http://localhost:3000"]);
        assert_eq!(args.store, StoreKind::Dynamodb);
        assert_eq!(args.dynamodb.dynamodb_endpoint.as_deref(), Some("http://127.0.0.1:8000"));
        assert_eq!(args.dynamodb.dynamodb_table_prefix, "prod-");
        assert_eq!(args.dynamodb.dynamodb_region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn dynamodb_settings_are_checked() {
        assert!(parse_endpoint("http://127.0.0.1:8000").is_ok());
        assert!(parse_endpoint("https://dynamodb.eu-west-1.amazonaws.com").is_ok());
        for bad in ["", "127.0.0.1:8000", "ftp://x", "http://", "not a url"] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?}");
        }
        assert!(parse_table_prefix("").is_ok());
        assert!(parse_table_prefix("tether.prod_1-").is_ok());
        for bad in ["has space", "slash/", "ünicode", &"x".repeat(201)] {
            assert!(parse_table_prefix(bad).is_err(), "{bad:?}");
        }
        let err = load_with(&write("store = \"postgres\"\n"), &[]).expect_err("refused").to_string();
        assert!(err.contains("store") && err.contains("embedded, dynamodb"), "{err}");
        let err = load_with(&write("dynamodb-endpoint = \"localhost\"\n"), &[]).expect_err("refused").to_string();
        assert!(err.contains("dynamodb-endpoint"), "{err}");
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let file = write("listen = \"127.0.0.1:6000\"\nheartbeat-interval = \"2s\"\n");
        let args = load_with(
            &file,
            &[
                "--listen",
                "127.0.0.1:7000",
                "--cors-allow-origin",
                "https://a.example",
                "--cors-allow-origin",
                "https://b.example",
            ],
        )
        .expect("valid");
        assert_eq!(args.listen, "127.0.0.1:7000".parse().unwrap(), "flag over file");
        assert_eq!(args.heartbeat_interval, Duration::from_secs(2), "file over default");
        assert_eq!(args.reconnect_grace, Duration::from_secs(15), "default when nothing sets it");
        assert_eq!(args.cors_allow_origins, vec!["https://a.example", "https://b.example"]);
        assert_eq!(args.metrics_listen, None, "metrics are off unless asked for");
        // A flag equal to the default still wins over the file.
        let args = load_with(&file, &["--heartbeat-interval", "5s"]).expect("valid");
        assert_eq!(args.heartbeat_interval, Duration::from_secs(5));
    }

    #[test]
    fn bad_files_are_errors_naming_the_file_and_key() {
        let cases = [
            ("heartbeat-interval = \"5 parsecs\"\n", "heartbeat-interval"),
            ("listen = \"nowhere\"\n", "listen"),
            ("log-format = \"xml\"\n", "log-format"),
            ("cors-allow-origins = [\"*\"]\n", "cors-allow-origins"),
            ("metrics-listen = \"9464\"\n", "metrics-listen"),
            ("max-agent-streams = \"many\"\n", "max-agent-streams"),
            ("max-agent-streams = -1\n", "max-agent-streams"),
            ("max-agent-streams = 0\n", "max-agent-streams"),
            ("heartbeat-interval = \"0s\"\n", "heartbeat-interval"),
            ("reconnect-grace = \"1000h\"\n", "reconnect-grace"),
            ("listne = \"127.0.0.1:1\"\n", "listne"),
            ("listen = \n", "listen"),
        ];
        for (text, key) in cases {
            let file = write(text);
            let error = format!("{:#}", load_with(&file, &[]).expect_err(text));
            assert!(error.contains(&file.path().display().to_string()), "{text}: {error}");
            assert!(error.contains(key), "{text}: {error}");
        }
        let error =
            format!("{:#}", load_from(["server", "--config", "/nonexistent/tether.toml"]).expect_err("missing"));
        assert!(error.contains("/nonexistent/tether.toml"), "{error}");
    }

    #[test]
    fn a_flag_shadows_a_bad_file_value_only_for_its_key() {
        let file = write("heartbeat-interval = \"soon\"\n");
        let args = load_with(&file, &["--heartbeat-interval", "1s"]).expect("the flag wins");
        assert_eq!(args.heartbeat_interval, Duration::from_secs(1));
    }

    #[test]
    fn printed_config_reads_back_the_same() {
        let file = write(FULL);
        let args = load_with(&file, &["--reconnect-grace", "1500ms"]).expect("valid");
        let printed = args.to_toml().expect("toml");
        let again = load_with(&write(&printed), &[]).expect("printed config parses");
        assert_eq!(again.to_file_config(), args.to_file_config(), "{printed}");
        assert!(printed.contains("reconnect-grace = \"1500ms\""), "{printed}");
        // Defaults print every setting that has a value.
        let defaults = load_from(["server"]).expect("defaults").to_toml().expect("toml");
        for key in ["listen", "data-dir", "heartbeat-interval", "reconnect-grace", "log-format"] {
            assert!(defaults.contains(&format!("{key} = ")), "{key}: {defaults}");
        }
        // Unset, the stream cap is sized at start-up from the machine.
        assert!(!defaults.contains("max-agent-streams"), "{defaults}");
    }

    #[test]
    fn the_job_output_cap_is_bounded_and_set_by_flag_or_file() {
        assert_eq!(parse_max_job_output_mib("16"), Ok(16));
        for refused in ["0", "1025", "-1", "1.5", "", "16MiB"] {
            assert!(parse_max_job_output_mib(refused).is_err(), "{refused:?} accepted");
        }
        let default = load_from(["server"]).expect("defaults");
        assert_eq!(default.engine_config().max_job_output_bytes, 16 << 20);
        assert_eq!(default.to_file_config().max_job_output_mib, Some(16));
        let args = load_from(["server", "--max-job-output-mib", "2"]).expect("flag");
        assert_eq!(args.engine_config().max_job_output_bytes, 2 << 20);
    }

    #[test]
    fn origins() {
        assert_eq!(parse_origin("https://dash.example.com").as_deref(), Ok("https://dash.example.com"));
        assert!(parse_origin("http://localhost:3000").is_ok());
        assert!(parse_origin("*").is_err());
        assert!(parse_origin("dash.example.com").is_err());
        assert!(parse_origin("https://dash.example.com/path").is_err());
        assert!(parse_origin("https://").is_err());
    }

    #[test]
    fn durations_print_as_they_parse() {
        for d in [0, 1, 500, 1000, 1500, 60_000, 90_000, 3_600_000, 7_200_000] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{}", format_duration(d));
        }
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        let odd = Duration::from_nanos(1_500_000_001);
        assert_eq!(parse_duration(&format_duration(odd)), Ok(odd));
    }

    #[test]
    fn event_retention_is_bounded_and_set_by_flag_or_file() {
        assert_eq!(parse_event_retention("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_event_retention("1m"), Ok(Duration::from_secs(60)));
        for refused in ["59s", "0", "8761h", "", "forever", "-1h"] {
            assert!(parse_event_retention(refused).is_err(), "{refused:?} accepted");
        }
        let args = load_from(["server", "--event-retention", "2h"]).expect("flag");
        assert_eq!(args.engine_config().event_retention, Duration::from_secs(7200));
        let default = load_from(["server"]).expect("default");
        assert_eq!(default.engine_config().event_retention, crate::engine::DEFAULT_EVENT_RETENTION);
        assert_eq!(default.to_file_config().event_retention.as_deref(), Some("24h"));
    }

    #[test]
    fn clock_skew_tolerance_is_bounded_and_set_by_flag_or_file() {
        assert_eq!(parse_clock_skew_tolerance("0"), Ok(Duration::ZERO));
        assert_eq!(parse_clock_skew_tolerance("1m"), Ok(Duration::from_secs(60)));
        for refused in ["61s", "-1s", "", "soon", "1e400s"] {
            assert!(parse_clock_skew_tolerance(refused).is_err(), "{refused:?} accepted");
        }
        let default = load_from(["server"]).expect("default");
        assert_eq!(default.engine_config().clock_skew_tolerance, Duration::from_secs(2));
        assert_eq!(default.to_file_config().clock_skew_tolerance.as_deref(), Some("2s"));
        let args = load_from(["server", "--clock-skew-tolerance", "500ms"]).expect("flag");
        assert_eq!(args.engine_config().clock_skew_tolerance, Duration::from_millis(500));
        let file = write("clock-skew-tolerance = \"5s\"\n");
        assert_eq!(load_with(&file, &[]).expect("file").clock_skew_tolerance, Duration::from_secs(5));
        let bad = write("clock-skew-tolerance = \"2h\"\n");
        let err = load_with(&bad, &[]).expect_err("out of range in the file");
        assert!(format!("{err:#}").contains("clock-skew-tolerance"), "{err:#}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn replicas_advertise_the_bound_address_unless_told() {
        let args = load_from(["server", "--listen", "127.0.0.1:0"]).expect("valid");
        let bound: SocketAddr = "127.0.0.1:40123".parse().expect("valid");
        assert_eq!(args.advertise(bound).expect("valid"), "http://127.0.0.1:40123");
        let wildcard = load_from(["server", "--listen", "0.0.0.0:50051"]).expect("valid");
        let err = wildcard.advertise("0.0.0.0:50051".parse().expect("valid")).expect_err("wildcard").to_string();
        assert!(err.contains("--advertise-address"), "{err}");
        let told = load_from(["server", "--listen", "0.0.0.0:50051", "--advertise-address", "http://10.0.1.5:50051"])
            .expect("valid");
        assert_eq!(told.advertise("0.0.0.0:50051".parse().expect("valid")).expect("valid"), "http://10.0.1.5:50051");
        assert!(load_from(["server", "--advertise-address", "10.0.1.5:50051"]).is_err(), "a URL is required");
    }
}
