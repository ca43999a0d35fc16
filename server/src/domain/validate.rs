//! Input limits and name rules, shared by every entry point.

use std::time::Duration;

use super::error::{DomainError, DomainResult};

pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;
pub const MAX_BATCH: usize = 1000;
pub const MAX_ATTEMPTS: u32 = 100;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
pub const MIN_LEASE: Duration = Duration::from_secs(1);
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
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
        name(&format!("{field}[{key:?}]"), key, MAX_LABEL_LEN)?;
        if value.len() > MAX_LABEL_LEN {
            return Err(DomainError::invalid(
                format!("{field}[{key:?}]"),
                format!("value must be at most {MAX_LABEL_LEN} bytes"),
            ));
        }
    }
    if count > MAX_LABELS {
        return Err(DomainError::invalid(field, format!("at most {MAX_LABELS} labels")));
    }
    Ok(())
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
