//! Conversions between `std::time` and the protobuf well-known types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Converts a `SystemTime` to a protobuf `Timestamp`.
pub fn to_timestamp(time: SystemTime) -> prost_types::Timestamp {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => prost_types::Timestamp {
            seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            nanos: since.subsec_nanos() as i32,
        },
        Err(_) => prost_types::Timestamp { seconds: 0, nanos: 0 },
    }
}

/// Converts a protobuf `Timestamp` to a `SystemTime`; `None` if it is out of
/// range or not normalized.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::new(ts.seconds as u64, ts.nanos as u32))
}

/// Converts a `Duration` to a protobuf `Duration`.
pub fn to_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nanos: d.subsec_nanos() as i32 }
}

/// Converts a protobuf `Duration` to a `Duration`; `None` if it is negative
/// or not normalized.
pub fn from_duration(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos) {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
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
        assert_eq!(from_duration(&d), None);
    }
}
