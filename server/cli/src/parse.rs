//! Parsers for the values operators type on the command line: durations,
//! times, `key=value` labels and environment variables, and the enum names
//! of priorities, job states, job statuses, agent health.
//!
//! Every parser returns `Result<_, String>` so clap can use it directly as a
//! `value_parser` and report a bad value as a usage error (exit code 2)
//! naming the flag, instead of the command failing later on the server.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tether::v1::{AgentHealth, JobStatus, Priority, QueuedJobState, RetryPolicy};

/// Parses a positive human duration such as `500ms`, `30s`, `5m`, `1h` or
/// `1h 30m`.
///
/// Zero is refused: every duration flag (lease, timeout) means "how long",
/// and a zero lease or timeout would only be refused by the server later.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration; use e.g. 500ms, 30s, 5m or 1h".into());
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}); use e.g. 500ms, 30s, 5m or 1h"))?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be greater than zero"));
    }
    // A protobuf Duration holds at most ~10,000 years; refusing more here keeps
    // `to_duration` from clamping silently.
    if d.as_secs() > 315_576_000_000 {
        return Err(format!("duration {s:?} is too long"));
    }
    Ok(d)
}

/// Parses a point in time: RFC 3339 (`2030-01-02T03:04:05Z`,
/// `2030-01-02T03:04:05.5+02:00`) or a duration from now prefixed with `+`
/// (`+5m`).
///
/// This is the entry point clap uses; it reads the clock. See
/// [`parse_time_at`] for the pure version.
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    parse_time_at(s, SystemTime::now())
}

/// Like [`parse_time`], with relative times counted from `now` (so tests do
/// not depend on the clock).
pub fn parse_time_at(s: &str, now: SystemTime) -> Result<SystemTime, String> {
    let s = s.trim();
    if let Some(rel) = s.strip_prefix('+') {
        let d = parse_duration(rel)?;
        return now.checked_add(d).ok_or_else(|| format!("time {s:?} is too far in the future"));
    }
    parse_rfc3339(s)
}

/// Parses a point in time for a listing filter: RFC 3339, or a duration
/// ago prefixed with `-` (`-1h`: an hour ago), or from now with `+`.
///
/// This is the entry point clap uses; it reads the clock. See
/// [`parse_filter_time_at`] for the pure version.
pub fn parse_filter_time(s: &str) -> Result<SystemTime, String> {
    parse_filter_time_at(s, SystemTime::now())
}

/// Like [`parse_filter_time`], with relative times counted from `now`.
pub fn parse_filter_time_at(s: &str, now: SystemTime) -> Result<SystemTime, String> {
    let s = s.trim();
    if let Some(rel) = s.strip_prefix('-') {
        let d = parse_duration(rel)?;
        return now
            .checked_sub(d)
            .filter(|t| *t >= std::time::UNIX_EPOCH)
            .ok_or_else(|| format!("time {s:?} is too far in the past"));
    }
    parse_time_at(s, now).map_err(|e| format!("{e}, or -1h for an hour ago"))
}

/// Parses an RFC 3339 timestamp with a `Z` or `±HH:MM` offset.
///
/// humantime only understands UTC, so the offset is split off here, the rest
/// is parsed as UTC and the offset subtracted. A time without an offset is
/// refused rather than guessed: "local or UTC?" is exactly the ambiguity that
/// makes a job run an hour early.
pub fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    let hint = "use RFC 3339 like 2030-01-02T15:04:05Z or 2030-01-02T15:04:05+02:00, or +5m for five minutes from now";
    let bad = |why: &str| format!("invalid time {s:?}: {why}; {hint}");
    let (base, offset_secs): (&str, i64) = if let Some(base) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        (base, 0)
    } else {
        let split = s.len().checked_sub(6).ok_or_else(|| bad("too short"))?;
        let (base, off) = match (s.get(..split), s.get(split..)) {
            (Some(base), Some(off)) => (base, off.as_bytes()),
            _ => return Err(bad("missing offset")),
        };
        let sign = match off[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return Err(bad("missing offset (Z or ±HH:MM)")),
        };
        let digit = |b: u8| -> Result<i64, String> {
            if b.is_ascii_digit() {
                Ok(i64::from(b - b'0'))
            } else {
                Err(bad("malformed offset"))
            }
        };
        if off[3] != b':' {
            return Err(bad("malformed offset"));
        }
        let hours = digit(off[1])? * 10 + digit(off[2])?;
        let minutes = digit(off[4])? * 10 + digit(off[5])?;
        if hours > 23 || minutes > 59 {
            return Err(bad("offset out of range"));
        }
        (base, sign * (hours * 3600 + minutes * 60))
    };
    // humantime's weak parser also accepts a trailing "Z"/"+00:00" and a
    // missing "T"; only allow what RFC 3339 allows in the part before the
    // offset so "…Z+02:00" is not read as UTC.
    if !base.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b':' | b'.' | b'T' | b't')) {
        return Err(bad("unexpected characters"));
    }
    let base = base.replace('t', "T");
    if base.len() < 19 || base.as_bytes()[10] != b'T' {
        return Err(bad("expected YYYY-MM-DDTHH:MM:SS"));
    }
    let utc = humantime::parse_rfc3339_weak(&base).map_err(|e| bad(&e.to_string()))?;
    let shift = Duration::from_secs(offset_secs.unsigned_abs());
    // A positive offset means local time is ahead of UTC: subtract it.
    let t = if offset_secs >= 0 { utc.checked_sub(shift) } else { utc.checked_add(shift) };
    t.ok_or_else(|| bad("out of range"))
}

/// Parses one `key=value` label. The key must be non-empty and free of
/// whitespace; the value may be empty (a job may require a label to be
/// present with an empty value).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let Some((key, value)) = s.split_once('=') else {
        return Err(format!("invalid label {s:?}: expected key=value"));
    };
    if key.is_empty() {
        return Err(format!("invalid label {s:?}: empty key"));
    }
    if key.chars().any(char::is_whitespace) {
        return Err(format!("invalid label {s:?}: the key contains whitespace"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Collects parsed labels into a map, refusing the same key with two
/// different values (silently keeping one would route the job somewhere the
/// operator did not ask for).
pub fn labels_to_map(labels: &[(String, String)]) -> Result<HashMap<String, String>, String> {
    pairs_to_map(labels, "label")
}

/// Parses one `NAME=value` environment variable. The name must be non-empty
/// and free of whitespace; the value may be empty or contain `=`.
pub fn parse_env_var(s: &str) -> Result<(String, String), String> {
    let Some((name, value)) = s.split_once('=') else {
        return Err(format!("invalid environment variable {s:?}: expected NAME=value"));
    };
    if name.is_empty() {
        return Err(format!("invalid environment variable {s:?}: empty name"));
    }
    if name.chars().any(char::is_whitespace) {
        return Err(format!("invalid environment variable {s:?}: the name contains whitespace"));
    }
    Ok((name.to_string(), value.to_string()))
}

/// Collects parsed environment variables into a map, refusing the same name
/// with two different values.
pub fn env_to_map(vars: &[(String, String)]) -> Result<HashMap<String, String>, String> {
    pairs_to_map(vars, "environment variable")
}

fn pairs_to_map(pairs: &[(String, String)], what: &str) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        if let Some(prev) = map.insert(k.clone(), v.clone()) {
            if &prev != v {
                return Err(format!("{what} {k:?} given twice with different values ({prev:?} and {v:?})"));
            }
        }
    }
    Ok(map)
}

/// Normalizes an enum name typed by a person: lower case, `_` and `-`
/// treated alike, and the proto prefix (`PRIORITY_`, …) optional, so both
/// `dead-lettered` and `QUEUED_JOB_STATE_DEAD_LETTERED` work.
fn normalize(s: &str, proto_prefix: &str) -> String {
    let lower = s.trim().to_ascii_lowercase().replace('_', "-");
    let prefix = proto_prefix.to_ascii_lowercase().replace('_', "-");
    match lower.strip_prefix(&prefix) {
        Some(rest) => rest.to_string(),
        None => lower,
    }
}

/// Accepted spellings of [`parse_priority`].
pub const PRIORITY_NAMES: &[&str] = &["low", "normal", "high", "critical"];

/// Parses a priority: `low`, `normal`, `high` or `critical`.
pub fn parse_priority(s: &str) -> Result<Priority, String> {
    match normalize(s, "PRIORITY_").as_str() {
        "low" => Ok(Priority::Low),
        "normal" => Ok(Priority::Normal),
        "high" => Ok(Priority::High),
        "critical" => Ok(Priority::Critical),
        _ => Err(format!("invalid priority {s:?}; expected one of: {}", PRIORITY_NAMES.join(", "))),
    }
}

/// Parses a retry policy: `any` (every retryable failure) or a
/// comma-separated list of non-zero exit codes (`75` or `2,75`).
pub fn parse_retry(s: &str) -> Result<RetryPolicy, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("any") {
        return Ok(RetryPolicy { any_failure: true, exit_codes: Vec::new() });
    }
    let mut exit_codes = Vec::new();
    for part in s.split(',') {
        let code: i32 = part
            .trim()
            .parse()
            .map_err(|_| format!("invalid retry policy {s:?}; expected `any` or exit codes such as `75` or `2,75`"))?;
        if code == 0 {
            return Err("exit code 0 is success; list the failing codes to retry".to_string());
        }
        exit_codes.push(code);
    }
    Ok(RetryPolicy { any_failure: false, exit_codes })
}

/// Accepted spellings of [`parse_state`].
pub const STATE_NAMES: &[&str] = &["queued", "claimed", "running", "succeeded", "failed", "dead-lettered", "cancelled"];

/// Parses a queued-job state: `queued`, `claimed`, `running`, `succeeded`,
/// `failed`, `dead-lettered` or `cancelled` (`canceled` too).
pub fn parse_state(s: &str) -> Result<QueuedJobState, String> {
    match normalize(s, "QUEUED_JOB_STATE_").as_str() {
        "queued" => Ok(QueuedJobState::Queued),
        "claimed" => Ok(QueuedJobState::Claimed),
        "running" => Ok(QueuedJobState::Running),
        "succeeded" => Ok(QueuedJobState::Succeeded),
        "failed" => Ok(QueuedJobState::Failed),
        "dead-lettered" | "deadlettered" | "dead" => Ok(QueuedJobState::DeadLettered),
        "cancelled" | "canceled" => Ok(QueuedJobState::Cancelled),
        _ => Err(format!("invalid state {s:?}; expected one of: {}", STATE_NAMES.join(", "))),
    }
}

/// Accepted spellings of [`parse_job_status`].
pub const JOB_STATUS_NAMES: &[&str] = &["pending", "running", "success", "failed", "cancelled"];

/// Parses a dashboard job status: `pending`, `running`, `success`
/// (`succeeded` too), `failed` or `cancelled` (`canceled` too).
pub fn parse_job_status(s: &str) -> Result<JobStatus, String> {
    match normalize(s, "JOB_STATUS_").as_str() {
        "pending" => Ok(JobStatus::Pending),
        "running" => Ok(JobStatus::Running),
        "success" | "succeeded" => Ok(JobStatus::Success),
        "failed" => Ok(JobStatus::Failed),
        "cancelled" | "canceled" => Ok(JobStatus::Cancelled),
        _ => Err(format!("invalid status {s:?}; expected one of: {}", JOB_STATUS_NAMES.join(", "))),
    }
}

/// Accepted spellings of [`parse_health`].
pub const HEALTH_NAMES: &[&str] = &["registering", "healthy", "degraded", "unhealthy", "offline", "terminated"];

/// Parses an agent health: `registering`, `healthy`, `degraded`,
/// `unhealthy`, `offline` or `terminated`.
pub fn parse_health(s: &str) -> Result<AgentHealth, String> {
    match normalize(s, "AGENT_HEALTH_").as_str() {
        "registering" => Ok(AgentHealth::Registering),
        "healthy" => Ok(AgentHealth::Healthy),
        "degraded" => Ok(AgentHealth::Degraded),
        "unhealthy" => Ok(AgentHealth::Unhealthy),
        "offline" => Ok(AgentHealth::Offline),
        "terminated" => Ok(AgentHealth::Terminated),
        _ => Err(format!("invalid health {s:?}; expected one of: {}", HEALTH_NAMES.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policies() {
        assert_eq!(parse_retry("any"), Ok(RetryPolicy { any_failure: true, exit_codes: vec![] }));
        assert_eq!(parse_retry("2, 75"), Ok(RetryPolicy { any_failure: false, exit_codes: vec![2, 75] }));
        assert!(parse_retry("0").is_err());
        assert!(parse_retry("sometimes").is_err());
        assert!(parse_retry("").is_err());
    }
    use std::time::UNIX_EPOCH;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 10m "), Ok(Duration::from_secs(600)));
    }

    #[test]
    fn bad_durations_are_refused_without_panicking() {
        for bad in [
            "",
            "   ",
            "30",
            "abc",
            "-5s",
            "5 parsecs",
            "0s",
            "0ms",
            "1e3s",
            "5m!",
            "⏰",
            "+5m",
            "99999999999999999999999s",
            "999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_duration("30").unwrap_err().contains("30s"));
    }

    #[test]
    fn absolute_times_parse_with_offsets() {
        let t = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        // 2030-01-02T03:04:05Z
        let base = 1_893_553_445;
        assert_eq!(parse_rfc3339("2030-01-02T03:04:05Z"), Ok(t(base)));
        assert_eq!(parse_rfc3339("2030-01-02t03:04:05z"), Ok(t(base)));
        assert_eq!(parse_rfc3339("2030-01-02T03:04:05+00:00"), Ok(t(base)));
        assert_eq!(parse_rfc3339("2030-01-02T05:04:05+02:00"), Ok(t(base)));
        assert_eq!(parse_rfc3339("2030-01-01T23:34:05-03:30"), Ok(t(base)));
        assert_eq!(parse_rfc3339("2030-01-02T03:04:05.250Z"), Ok(t(base) + Duration::from_millis(250)));
    }

    #[test]
    fn bad_absolute_times_are_refused() {
        for bad in [
            "",
            "now",
            "2030-01-02",
            "2030-01-02T03:04:05",        // no offset: ambiguous
            "2030-01-02 03:04:05Z",       // RFC 3339 wants the T
            "2030-01-02T03:04:05Z+02:00", // two offsets
            "2030-13-02T03:04:05Z",
            "2030-01-32T03:04:05Z",
            "2030-01-02T25:04:05Z",
            "2030-01-02T03:04:05+24:00",
            "2030-01-02T03:04:05+0200",
            "1960-01-02T03:04:05Z",
            "2030-01-02T03:04:05é00:00",
            "ü",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn relative_times_count_from_now() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_time_at("+5m", now), Ok(now + Duration::from_secs(300)));
        assert_eq!(parse_time_at("+1h 30m", now), Ok(now + Duration::from_secs(5400)));
        assert_eq!(parse_time_at("2030-01-02T03:04:05Z", now), Ok(UNIX_EPOCH + Duration::from_secs(1_893_553_445)));
        assert!(parse_time_at("+", now).is_err());
        assert!(parse_time_at("+0s", now).is_err());
        assert!(parse_time_at("-5m", now).is_err());
        assert!(parse_time_at("5m", now).is_err());
    }

    #[test]
    fn labels_parse() {
        assert_eq!(parse_label("os=linux"), Ok(("os".into(), "linux".into())));
        assert_eq!(parse_label("gpu="), Ok(("gpu".into(), String::new())));
        assert_eq!(parse_label("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert!(parse_label("linux").is_err());
        assert!(parse_label("=linux").is_err());
        assert!(parse_label("my key=x").is_err());
        assert!(parse_label("").is_err());
    }

    #[test]
    fn conflicting_labels_are_refused() {
        let labels = vec![
            ("os".to_string(), "linux".to_string()),
            ("os".to_string(), "linux".to_string()),
            ("arch".to_string(), "arm64".to_string()),
        ];
        let map = labels_to_map(&labels).expect("duplicates with equal values are fine");
        assert_eq!(map.len(), 2);
        let conflict = vec![("os".to_string(), "linux".to_string()), ("os".to_string(), "macos".to_string())];
        assert!(labels_to_map(&conflict).is_err());
    }

    #[test]
    fn priorities_parse() {
        assert_eq!(parse_priority("low"), Ok(Priority::Low));
        assert_eq!(parse_priority("Normal"), Ok(Priority::Normal));
        assert_eq!(parse_priority("HIGH"), Ok(Priority::High));
        assert_eq!(parse_priority("PRIORITY_CRITICAL"), Ok(Priority::Critical));
        for bad in ["", "urgent", "unspecified", "priority-unspecified", "2"] {
            let err = parse_priority(bad).expect_err(bad);
            assert!(err.contains("low, normal, high, critical"), "{err}");
        }
    }

    #[test]
    fn states_parse() {
        assert_eq!(parse_state("queued"), Ok(QueuedJobState::Queued));
        assert_eq!(parse_state("claimed"), Ok(QueuedJobState::Claimed));
        assert_eq!(parse_state("running"), Ok(QueuedJobState::Running));
        assert_eq!(parse_state("succeeded"), Ok(QueuedJobState::Succeeded));
        assert_eq!(parse_state("failed"), Ok(QueuedJobState::Failed));
        assert_eq!(parse_state("dead-lettered"), Ok(QueuedJobState::DeadLettered));
        assert_eq!(parse_state("dead_lettered"), Ok(QueuedJobState::DeadLettered));
        assert_eq!(parse_state("QUEUED_JOB_STATE_DEAD_LETTERED"), Ok(QueuedJobState::DeadLettered));
        assert_eq!(parse_state("canceled"), Ok(QueuedJobState::Cancelled));
        for bad in ["", "done", "unspecified", "queue"] {
            let err = parse_state(bad).expect_err(bad);
            assert!(err.contains("dead-lettered"), "{err}");
        }
    }

    #[test]
    fn job_statuses_parse() {
        assert_eq!(parse_job_status("pending"), Ok(JobStatus::Pending));
        assert_eq!(parse_job_status("Running"), Ok(JobStatus::Running));
        assert_eq!(parse_job_status("success"), Ok(JobStatus::Success));
        assert_eq!(parse_job_status("succeeded"), Ok(JobStatus::Success));
        assert_eq!(parse_job_status("JOB_STATUS_FAILED"), Ok(JobStatus::Failed));
        assert_eq!(parse_job_status("canceled"), Ok(JobStatus::Cancelled));
        for bad in ["", "done", "unspecified", "queued", "dead-lettered"] {
            let err = parse_job_status(bad).expect_err(bad);
            assert!(err.contains("pending, running, success, failed, cancelled"), "{err}");
        }
    }

    #[test]
    fn env_vars_parse() {
        assert_eq!(parse_env_var("A=1"), Ok(("A".into(), "1".into())));
        assert_eq!(parse_env_var("EMPTY="), Ok(("EMPTY".into(), String::new())));
        assert_eq!(parse_env_var("OPTS=a=b c"), Ok(("OPTS".into(), "a=b c".into())));
        for bad in ["A", "=1", "MY VAR=1", ""] {
            let err = parse_env_var(bad).expect_err(bad);
            assert!(err.contains("environment variable"), "{err}");
        }
        let twice = vec![("A".to_string(), "1".to_string()), ("A".to_string(), "2".to_string())];
        assert!(env_to_map(&twice).expect_err("conflict").contains("environment variable \"A\""));
        let same = vec![("A".to_string(), "1".to_string()), ("A".to_string(), "1".to_string())];
        assert_eq!(env_to_map(&same).map(|m| m.len()), Ok(1));
    }

    #[test]
    fn filter_times_may_be_in_the_past() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_filter_time_at("-1h", now), Ok(now - Duration::from_secs(3600)));
        assert_eq!(parse_filter_time_at("+5m", now), Ok(now + Duration::from_secs(300)));
        assert_eq!(
            parse_filter_time_at("2030-01-02T03:04:05Z", now),
            Ok(UNIX_EPOCH + Duration::from_secs(1_893_553_445))
        );
        assert!(parse_filter_time_at("-0s", now).is_err());
        assert!(parse_filter_time_at("-2000000s", now).is_err());
        assert!(parse_filter_time_at("1h", now).expect_err("no sign").contains("-1h"));
    }

    #[test]
    fn health_parses() {
        assert_eq!(parse_health("healthy"), Ok(AgentHealth::Healthy));
        assert_eq!(parse_health("AGENT_HEALTH_OFFLINE"), Ok(AgentHealth::Offline));
        assert!(parse_health("sick").is_err());
        assert!(parse_health("unspecified").is_err());
    }
}
