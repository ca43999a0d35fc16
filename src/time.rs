//! Conversions between `std::time` and the protobuf well-known types, held
//! to the ranges protobuf defines: a `Timestamp` lies in years 1 to 9999 and
//! a `Duration` within ±10,000 years. Values outside them are refused on the
//! way in and never produced on the way out, so everything the server
//! stores can be rendered (e.g. as JSON) by any client.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `0001-01-01T00:00:00Z`, the earliest valid `Timestamp`.
pub const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
/// `9999-12-31T23:59:59Z`, the latest valid `Timestamp` (plus nanos).
pub const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;
/// The largest valid `Duration`, in seconds (about 10,000 years).
pub const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

/// The latest time a `Timestamp` can carry: `9999-12-31T23:59:59.999999999Z`.
pub fn latest() -> SystemTime {
    UNIX_EPOCH + Duration::new(MAX_TIMESTAMP_SECONDS as u64, 999_999_999)
}

/// Why a wire time value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeError {
    /// `nanos` is outside 0..=999,999,999 (negative durations are refused
    /// before their sign is looked at).
    NanosOutOfRange,
    /// Outside the range protobuf defines for the type.
    OutOfRange,
    /// A valid protobuf value this server cannot take: a time before 1970
    /// or a negative duration.
    Negative,
}

impl std::fmt::Display for TimeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeError::NanosOutOfRange => "nanos must be between 0 and 999999999",
            TimeError::OutOfRange => "is outside the range protobuf allows",
            TimeError::Negative => "must not be negative",
        })
    }
}

/// Converts a `SystemTime` to a protobuf `Timestamp`, clamped to the valid
/// range (times before 1970 become the epoch: the server makes none).
pub fn to_timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    if since.as_secs() > MAX_TIMESTAMP_SECONDS as u64 {
        return prost_types::Timestamp { seconds: MAX_TIMESTAMP_SECONDS, nanos: 999_999_999 };
    }
    prost_types::Timestamp { seconds: since.as_secs() as i64, nanos: since.subsec_nanos() as i32 }
}

/// Converts a protobuf `Timestamp` to a `SystemTime`. A valid timestamp
/// before 1970 is reported as [`TimeError::Negative`] so the caller can
/// decide (a not-before time in the past simply means "now").
pub fn timestamp_in(ts: &prost_types::Timestamp) -> Result<SystemTime, TimeError> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(TimeError::NanosOutOfRange);
    }
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&ts.seconds) {
        return Err(TimeError::OutOfRange);
    }
    if ts.seconds < 0 {
        return Err(TimeError::Negative);
    }
    Ok(UNIX_EPOCH + Duration::new(ts.seconds as u64, ts.nanos as u32))
}

/// Converts a protobuf `Timestamp` to a `SystemTime`; `None` if it is not
/// a valid timestamp at or after 1970.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    timestamp_in(ts).ok()
}

/// Converts a `Duration` to a protobuf `Duration`, clamped to the valid
/// range.
pub fn to_duration(d: Duration) -> prost_types::Duration {
    if d.as_secs() > MAX_DURATION_SECONDS as u64 {
        return prost_types::Duration { seconds: MAX_DURATION_SECONDS, nanos: 999_999_999 };
    }
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// Converts a protobuf `Duration` to a `Duration`, refusing values outside
/// protobuf's range, negative ones and unnormalized ones.
pub fn duration_in(d: &prost_types::Duration) -> Result<Duration, TimeError> {
    if d.seconds < 0 || d.nanos < 0 {
        return if d.seconds < -MAX_DURATION_SECONDS { Err(TimeError::OutOfRange) } else { Err(TimeError::Negative) };
    }
    if d.nanos >= 1_000_000_000 {
        return Err(TimeError::NanosOutOfRange);
    }
    if d.seconds > MAX_DURATION_SECONDS {
        return Err(TimeError::OutOfRange);
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// Converts a protobuf `Duration` to a `Duration`; `None` if it is
/// negative, unnormalized or out of range.
pub fn from_duration(d: &prost_types::Duration) -> Option<Duration> {
    duration_in(d).ok()
}

/// `time + d`, saturating at [`latest`]: time arithmetic on values that
/// came from outside never panics and never leaves the renderable range.
pub fn later(time: SystemTime, d: Duration) -> SystemTime {
    time.checked_add(d).map_or_else(latest, |t| t.min(latest()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123);
        assert_eq!(from_timestamp(&to_timestamp(t)), Some(t));
    }

    #[test]
    fn negative_duration_is_refused() {
        let d = prost_types::Duration { seconds: -1, nanos: 0 };
        assert_eq!(duration_in(&d), Err(TimeError::Negative));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let ts = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert_eq!(timestamp_in(&ts(MAX_TIMESTAMP_SECONDS + 1, 0)), Err(TimeError::OutOfRange));
        assert_eq!(timestamp_in(&ts(1 << 62, 0)), Err(TimeError::OutOfRange));
        assert_eq!(timestamp_in(&ts(i64::MIN, 0)), Err(TimeError::OutOfRange));
        assert_eq!(timestamp_in(&ts(0, -1)), Err(TimeError::NanosOutOfRange));
        assert_eq!(timestamp_in(&ts(-1, 0)), Err(TimeError::Negative));
        assert!(timestamp_in(&ts(MAX_TIMESTAMP_SECONDS, 999_999_999)).is_ok());
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(duration_in(&d(i64::MAX, 0)), Err(TimeError::OutOfRange));
        assert_eq!(duration_in(&d(MAX_DURATION_SECONDS + 1, 0)), Err(TimeError::OutOfRange));
        assert_eq!(duration_in(&d(i64::MIN, 0)), Err(TimeError::OutOfRange));
        assert_eq!(duration_in(&d(0, 1_000_000_000)), Err(TimeError::NanosOutOfRange));
        assert!(duration_in(&d(MAX_DURATION_SECONDS, 999_999_999)).is_ok());
    }

    #[test]
    fn output_is_clamped_to_the_valid_range() {
        let far = UNIX_EPOCH + Duration::from_secs(1 << 40);
        assert_eq!(to_timestamp(far).seconds, MAX_TIMESTAMP_SECONDS);
        assert_eq!(to_duration(Duration::from_secs(u64::MAX)).seconds, MAX_DURATION_SECONDS);
        assert_eq!(to_timestamp(UNIX_EPOCH - Duration::from_secs(5)).seconds, 0);
    }

    #[test]
    fn later_saturates() {
        assert_eq!(later(UNIX_EPOCH, Duration::from_secs(u64::MAX)), latest());
        assert_eq!(later(latest(), Duration::from_secs(1)), latest());
        assert_eq!(later(UNIX_EPOCH, Duration::from_secs(5)), UNIX_EPOCH + Duration::from_secs(5));
    }
}
