//! Time, injected: the engine reads the time and sleeps through a `Clock`,
//! so tests drive leases, backoff and timeouts with a manual clock instead of
//! sleeping.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::watch;

/// A source of wall-clock time and of timers on that time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
    /// Resolves once `now() >= deadline`.
    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()>;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()> {
        let wait = deadline.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that moves only when a test calls [`ManualClock::advance`].
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<SystemTime>>,
    changed: watch::Sender<SystemTime>,
}

impl ManualClock {
    pub fn new(start: SystemTime) -> Self {
        let (changed, _) = watch::channel(start);
        ManualClock { now: Arc::new(Mutex::new(start)), changed }
    }

    /// Moves time forward and wakes every sleeper whose deadline passed.
    pub fn advance(&self, by: Duration) {
        let now = {
            let mut guard = self.now.lock().unwrap_or_else(|e| e.into_inner());
            *guard += by;
            *guard
        };
        self.changed.send_replace(now);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()> {
        let mut rx = self.changed.subscribe();
        let now = self.now();
        Box::pin(async move {
            if now >= deadline {
                return;
            }
            // An error means the clock is gone: nothing will ever advance it.
            if rx.wait_for(|t| *t >= deadline).await.is_err() {
                futures::future::pending::<()>().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_on_advance() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH);
        let sleeper = clock.sleep_until(SystemTime::UNIX_EPOCH + Duration::from_secs(10));
        let handle = tokio::spawn(sleeper);
        clock.advance(Duration::from_secs(5));
        tokio::task::yield_now().await;
        assert!(!handle.is_finished(), "not before its deadline");
        clock.advance(Duration::from_secs(5));
        // The sleeper must wake: the join fails the test if it does not.
        tokio::time::timeout(Duration::from_secs(60), handle).await.expect("the sleeper woke").expect("join");
        assert_eq!(clock.now(), SystemTime::UNIX_EPOCH + Duration::from_secs(10));
    }
}
