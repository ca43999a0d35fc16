//! Input limits and name rules, shared by every entry point.

use std::time::Duration;

use super::error::{DomainError, DomainResult};
use super::job::JobSpec;

pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;
pub const MAX_BATCH: usize = 1000;
pub const MAX_ATTEMPTS: u32 = 100;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
pub const MIN_LEASE: Duration = Duration::from_secs(1);
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// Longest per-attempt timeout: 30 days.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most exit codes a retry policy lists.
pub const MAX_RETRY_EXIT_CODES: usize = 64;
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
pub const MAX_NAME: usize = 128;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_LEN: usize = 256;
pub const MAX_SLOTS: u32 = 1024;
pub const MAX_ERROR_LEN: usize = 16 * 1024;
pub const MAX_PAGE_SIZE: usize = 1000;
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// A name of 1..=max characters of `[A-Za-z0-9._-]`.
pub fn name(field: &str, value: &str, max: usize) -> DomainResult<()> {
    if value.is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(DomainError::invalid(field, format!("must be at most {max} characters")));
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(DomainError::invalid(field, format!("character {c:?} is not allowed; use [A-Za-z0-9._-]")));
    }
    Ok(())
}

/// Label keys follow the name rule; values are free text of bounded length.
pub fn labels<'a>(field: &str, labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> DomainResult<()> {
    let mut count = 0;
    for (key, value) in labels {
        count += 1;
        name("", key, MAX_LABEL_LEN).map_err(|e| e.under(&entry_field(field, key)))?;
        if value.len() > MAX_LABEL_LEN {
            return Err(DomainError::invalid(
                entry_field(field, key),
                format!("value must be at most {MAX_LABEL_LEN} bytes"),
            ));
        }
    }
    if count > MAX_LABELS {
        return Err(DomainError::invalid(field, format!("at most {MAX_LABELS} labels")));
    }
    Ok(())
}

/// Every limit of a job spec. Field names are those of the enqueue request;
/// the gRPC layer checks the wire form first (enums, time ranges) and this
/// for the rest, and the engine uses it on stored jobs (quarantine).
pub fn job_spec(spec: &JobSpec) -> DomainResult<()> {
    name("queue", &spec.queue, MAX_NAME)?;
    if spec.payload.len() > MAX_PAYLOAD_BYTES {
        return Err(DomainError::invalid(
            "payload",
            format!("is {} bytes; the limit is {MAX_PAYLOAD_BYTES} bytes", spec.payload.len()),
        ));
    }
    name("routing.pool", &spec.routing.pool, MAX_NAME)?;
    labels("routing.required_labels", spec.routing.required_labels.iter())?;
    if !(1..=MAX_ATTEMPTS).contains(&spec.max_attempts) {
        return Err(DomainError::invalid("max_attempts", format!("must be between 1 and {MAX_ATTEMPTS}")));
    }
    if spec.lease_duration < MIN_LEASE || spec.lease_duration > MAX_LEASE {
        return Err(DomainError::invalid("lease_duration", "must be between 1s and 1h"));
    }
    if let Some(timeout) = spec.timeout {
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(DomainError::invalid("timeout", "must be more than 0s and at most 30 days (2592000s)"));
        }
    }
    if let Some(key) = &spec.idempotency_key {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(DomainError::invalid(
                "idempotency_key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY} characters"),
            ));
        }
    }
    if spec.not_before.is_some_and(|t| t > tether::time::latest()) {
        return Err(DomainError::invalid("not_before", "must not be after 9999-12-31T23:59:59Z"));
    }
    if spec.retry.exit_codes.len() > MAX_RETRY_EXIT_CODES {
        return Err(DomainError::invalid(
            "retry_policy.exit_codes",
            format!("lists {} codes; the limit is {MAX_RETRY_EXIT_CODES}", spec.retry.exit_codes.len()),
        ));
    }
    if spec.retry.exit_codes.contains(&0) {
        return Err(DomainError::invalid("retry_policy.exit_codes", "0 is success, not a failure to retry"));
    }
    Ok(())
}

/// The field name of one map entry, `labels["key"]`; a long key is shown
/// cut (the name goes into the error message and its headers).
pub fn entry_field(field: &str, key: &str) -> String {
    format!("{field}[{}]", shown(key))
}

/// A value from the request as an error message quotes it: debug-quoted
/// and cut after 64 bytes, so an error never grows with the input (its
/// status travels in HTTP/2 trailers, which clients cap at a few KiB).
pub fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    if value.len() <= SHOWN {
        return format!("{value:?}");
    }
    let mut end = SHOWN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &value[..end], value.len())
}

/// A page size: 0 means the default.
pub fn page_size(field: &str, value: i32) -> DomainResult<usize> {
    match value {
        0 => Ok(DEFAULT_PAGE_SIZE),
        v if v < 0 => Err(DomainError::invalid(field, "must not be negative")),
        v => Ok((v as usize).min(MAX_PAGE_SIZE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("queue", "build-42.x_y", MAX_NAME).is_ok());
        assert!(name("queue", "", MAX_NAME).is_err());
        assert!(name("queue", "a b", MAX_NAME).is_err());
        assert!(name("queue", &"a".repeat(129), MAX_NAME).is_err());
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size("page_size", 0).ok(), Some(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size("page_size", 5000).ok(), Some(MAX_PAGE_SIZE));
        assert!(page_size("page_size", -1).is_err());
    }
}
