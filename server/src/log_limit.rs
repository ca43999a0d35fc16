//! Rate-limited logging for events that can repeat thousands of times a
//! second (accept failures, refused streams): the first occurrence is
//! logged at once, later ones at most once per interval, with the number
//! suppressed in between, so the log stays readable and costs nothing when
//! it matters least.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When a repeated event may be logged again.
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    state: Mutex<LimitState>,
}

#[derive(Debug, Default)]
struct LimitState {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    pub const fn new(every: Duration) -> LogLimit {
        LogLimit { every, state: Mutex::new(LimitState { last: None, suppressed: 0 }) }
    }

    /// `Some(n)` if the event should be logged now, `n` being how many
    /// were suppressed since the last line; `None` to stay quiet.
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let due = state.last.is_none_or(|last| now.saturating_duration_since(last) >= self.every);
        if due {
            state.last = Some(now);
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_then_once_per_interval_with_the_count_suppressed() {
        let limit = LogLimit::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(limit.check(t0), Some(0));
        assert_eq!(limit.check(t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.check(t0 + Duration::from_secs(4)), None);
        assert_eq!(limit.check(t0 + Duration::from_secs(5)), Some(2));
        assert_eq!(limit.check(t0 + Duration::from_secs(6)), None);
    }
}
