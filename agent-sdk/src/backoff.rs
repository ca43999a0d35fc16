//! Jittered exponential backoff between reconnect attempts.

use std::time::Duration;

/// How the agent spaces out reconnect attempts.
///
/// The n-th consecutive failure waits
/// `min(initial_backoff * multiplier^n, max_backoff)`, shortened by a random
/// fraction of up to `jitter` so a fleet that lost the server at once does
/// not come back in lockstep. The sequence restarts after a Welcome.
#[derive(Clone, Debug, PartialEq)]
pub struct ReconnectPolicy {
    /// Wait after the first failure.
    pub initial_backoff: Duration,
    /// Longest wait.
    pub max_backoff: Duration,
    /// Growth factor per consecutive failure (>= 1).
    pub multiplier: f64,
    /// Fraction of the delay that is randomised away, 0..=1.
    pub jitter: f64,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl ReconnectPolicy {
    /// Checks the policy; the error names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.initial_backoff.is_zero() {
            return Err("reconnect.initial_backoff must be > 0".into());
        }
        if self.max_backoff < self.initial_backoff {
            return Err("reconnect.max_backoff must be >= initial_backoff".into());
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err("reconnect.multiplier must be a finite number >= 1".into());
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err("reconnect.jitter must be within 0..=1".into());
        }
        Ok(())
    }

    /// The delay after `failures` consecutive failures (0-based), given a
    /// uniform random `unit` in `[0, 1)`. Pure, so it can be tested.
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let max = self.max_backoff.as_secs_f64();
        // powi saturates to +inf for huge exponents; min() then caps it.
        let exp = i32::try_from(failures).unwrap_or(i32::MAX);
        let base = (self.initial_backoff.as_secs_f64() * self.multiplier.powi(exp)).min(max);
        let unit = unit.clamp(0.0, 1.0);
        Duration::from_secs_f64((base * (1.0 - self.jitter * unit)).max(0.0))
    }
}

/// The running state of a [`ReconnectPolicy`].
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: ReconnectPolicy,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(policy: ReconnectPolicy) -> Self {
        Self { policy, failures: 0 }
    }

    /// The next delay; each call counts one more failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.policy.delay(self.failures, rand::random::<f64>());
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Back to `initial_backoff` (called after a Welcome).
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ReconnectPolicy {
        ReconnectPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }

    #[test]
    fn grows_exponentially_and_caps() {
        let p = policy();
        let got: Vec<_> = (0..6).map(|n| p.delay(n, 0.0)).collect();
        let ms = |m| Duration::from_millis(m);
        assert_eq!(got, vec![ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        assert_eq!(p.delay(u32::MAX, 0.0), ms(1000));
    }

    #[test]
    fn jitter_only_shortens_within_bounds() {
        let p = policy();
        assert_eq!(p.delay(2, 0.999_999).as_millis(), 200);
        assert_eq!(p.delay(2, 0.5), Duration::from_millis(300));
        for _ in 0..1000 {
            let d = p.delay(3, rand::random());
            assert!(d >= Duration::from_millis(400) && d <= Duration::from_millis(800), "{d:?}");
        }
    }

    #[test]
    fn reset_restarts_the_sequence() {
        let mut b = Backoff::new(ReconnectPolicy { jitter: 0.0, ..policy() });
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        assert_eq!(b.next_delay(), Duration::from_millis(200));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn validation() {
        assert!(policy().validate().is_ok());
        assert!(ReconnectPolicy { multiplier: 0.5, ..policy() }.validate().is_err());
        assert!(ReconnectPolicy { jitter: 1.5, ..policy() }.validate().is_err());
        assert!(ReconnectPolicy { initial_backoff: Duration::ZERO, ..policy() }.validate().is_err());
        assert!(ReconnectPolicy { max_backoff: Duration::from_millis(1), ..policy() }.validate().is_err());
    }
}
