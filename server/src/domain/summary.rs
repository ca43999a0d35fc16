//! The dashboard's summary figures, as aggregates kept up to date as the
//! store is written (never a scan per call): the outcomes and queue waits
//! of dashboard jobs per hour, and per service its deployments and the
//! times it took to restore a failed environment.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::job::JobState;

/// Hours of job outcomes kept (the window is the last 24).
pub const HOURS: usize = 25;
/// Queue-wait histogram bins: bin `i` holds waits under `2^(i/2)` ms, so a
/// quantile read from it is within a factor of 1.42 (the last bin: longer).
pub const WAIT_BINS: usize = 48;
/// How far back deployments are counted.
pub const DEPLOY_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);
/// The most restores a service remembers.
pub const MAX_RESTORES: usize = 50;

/// One hour of dashboard jobs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HourBucket {
    /// Hours since the epoch.
    pub hour: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// First claims, by how long the job waited for them.
    pub waits: Vec<u64>,
}

/// Dashboard jobs' outcomes and queue waits per hour, and how far the job
/// event log has been folded into them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JobStats {
    /// The event log position folded up to, per shard.
    pub cursor: Vec<u64>,
    /// Newest last, at most [`HOURS`].
    pub hours: Vec<HourBucket>,
    /// Times the log was trimmed past the cursor (events lost to the
    /// figures: the fold fell behind the retention).
    pub gaps: u64,
}

/// The figures of the last 24 hours.
#[derive(Debug, Clone, PartialEq)]
pub struct JobWindow {
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub started: u64,
    pub wait_p50: Option<Duration>,
    pub wait_p95: Option<Duration>,
}

fn hour_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 3600)
}

/// The bin of a wait.
pub fn wait_bin(wait: Duration) -> usize {
    let ms = wait.as_millis().max(1) as f64;
    // bin i: under 2^(i/2) ms
    let bin = (ms.log2() * 2.0).floor() as i64 + 1;
    bin.clamp(0, WAIT_BINS as i64 - 1) as usize
}

/// The upper bound of a bin.
pub fn bin_limit(bin: usize) -> Duration {
    Duration::from_secs_f64(2f64.powf(bin as f64 / 2.0) / 1000.0)
}

impl JobStats {
    fn bucket(&mut self, at: SystemTime) -> Option<&mut HourBucket> {
        let hour = hour_of(at);
        let newest = self.hours.last().map_or(0, |b| b.hour);
        if hour + HOURS as u64 <= newest {
            // Older than the window: not counted.
            return None;
        }
        if let Some(i) = self.hours.iter().position(|b| b.hour == hour) {
            return self.hours.get_mut(i);
        }
        let at = self.hours.partition_point(|b| b.hour < hour);
        self.hours.insert(at, HourBucket { hour, waits: vec![0; WAIT_BINS], ..Default::default() });
        while self.hours.len() > HOURS {
            self.hours.remove(0);
        }
        self.hours.iter_mut().find(|b| b.hour == hour)
    }

    /// Folds one change of a dashboard job: an end counts its outcome, a
    /// first claim its wait.
    pub fn fold(
        &mut self,
        previous: Option<JobState>,
        state: JobState,
        attempt: u32,
        created: SystemTime,
        at: SystemTime,
    ) {
        match (previous, state) {
            (Some(JobState::Queued), JobState::Claimed) if attempt == 1 => {
                let wait = at.duration_since(created).unwrap_or(Duration::ZERO);
                if let Some(b) = self.bucket(at) {
                    if let Some(slot) = b.waits.get_mut(wait_bin(wait)) {
                        *slot += 1;
                    }
                }
            }
            (Some(p), JobState::Succeeded) if p != JobState::Succeeded => {
                if let Some(b) = self.bucket(at) {
                    b.succeeded += 1;
                }
            }
            (Some(p), JobState::Failed | JobState::DeadLettered) if !p.is_terminal() => {
                if let Some(b) = self.bucket(at) {
                    b.failed += 1;
                }
            }
            (Some(p), JobState::Cancelled) if !p.is_terminal() => {
                if let Some(b) = self.bucket(at) {
                    b.cancelled += 1;
                }
            }
            _ => {}
        }
    }

    /// The last 24 hours before `now`.
    pub fn window(&self, now: SystemTime) -> JobWindow {
        let hour = hour_of(now);
        let mut w = JobWindow { succeeded: 0, failed: 0, cancelled: 0, started: 0, wait_p50: None, wait_p95: None };
        let mut waits = vec![0u64; WAIT_BINS];
        for b in self.hours.iter().filter(|b| b.hour + 24 > hour && b.hour <= hour) {
            w.succeeded += b.succeeded;
            w.failed += b.failed;
            w.cancelled += b.cancelled;
            for (total, n) in waits.iter_mut().zip(&b.waits) {
                *total += n;
            }
        }
        w.started = waits.iter().sum();
        let quantile = |q: f64| {
            let rank = ((w.started as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            waits.iter().enumerate().find_map(|(i, n)| {
                seen += n;
                (seen >= rank).then(|| bin_limit(i))
            })
        };
        if w.started > 0 {
            w.wait_p50 = quantile(0.50);
            w.wait_p95 = quantile(0.95);
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn ends_and_first_claims_are_counted_per_hour_and_read_over_a_day() {
        let mut s = JobStats::default();
        let created = at(0);
        // Two first claims after 1 s and 100 s; a retry's claim is not a wait.
        s.fold(Some(JobState::Queued), JobState::Claimed, 1, created, at(1));
        s.fold(Some(JobState::Queued), JobState::Claimed, 1, created, at(100));
        s.fold(Some(JobState::Queued), JobState::Claimed, 2, created, at(200));
        s.fold(Some(JobState::Running), JobState::Succeeded, 1, created, at(300));
        s.fold(Some(JobState::Running), JobState::Failed, 1, created, at(400));
        s.fold(Some(JobState::Queued), JobState::Cancelled, 0, created, at(500));
        s.fold(None, JobState::Queued, 0, created, at(0));
        let w = s.window(at(600));
        assert_eq!((w.succeeded, w.failed, w.cancelled, w.started), (1, 1, 1, 2));
        let p50 = w.wait_p50.expect("p50");
        assert!(p50 >= Duration::from_secs(1) && p50 < Duration::from_millis(1500), "{p50:?}");
        let p95 = w.wait_p95.expect("p95");
        assert!(p95 >= Duration::from_secs(100) && p95 < Duration::from_secs(142), "{p95:?}");
        // A day and an hour later, none of it is in the window.
        let later = s.window(at(25 * 3600));
        assert_eq!((later.succeeded, later.started, later.wait_p50), (0, 0, None));
    }

    #[test]
    fn the_buckets_keep_a_bounded_window_and_skip_what_is_older() {
        let mut s = JobStats::default();
        for h in 0..100u64 {
            s.fold(Some(JobState::Running), JobState::Succeeded, 1, at(0), at(h * 3600));
        }
        assert_eq!(s.hours.len(), HOURS);
        s.fold(Some(JobState::Running), JobState::Succeeded, 1, at(0), at(0));
        assert_eq!(s.hours.first().map(|b| b.hour), Some((1_800_000_000 / 3600) + 100 - HOURS as u64));
        assert_eq!(s.window(at(99 * 3600)).succeeded, 24);
        // Bins cover every wait.
        assert_eq!(wait_bin(Duration::ZERO), 1);
        assert_eq!(wait_bin(Duration::from_secs(1_000_000)), WAIT_BINS - 1);
        assert!(bin_limit(wait_bin(Duration::from_millis(700))) >= Duration::from_millis(700));
    }
}
