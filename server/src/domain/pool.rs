//! Agent pools: named groups with size bounds and default labels.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::error::{DomainError, DomainResult};

/// A pool as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    pub description: String,
    pub min_size: u32,
    pub max_size: u32,
    pub desired_size: u32,
    pub default_labels: BTreeMap<String, String>,
    pub create_time: SystemTime,
    pub update_time: SystemTime,
}

/// Largest pool size accepted.
pub const MAX_POOL_SIZE: u32 = 100_000;
/// Longest description.
pub const MAX_DESCRIPTION: usize = 1024;

impl Pool {
    /// The pool every server has, created at first start.
    pub fn default_pool(now: SystemTime) -> Pool {
        Pool {
            name: super::DEFAULT_POOL.to_string(),
            description: "The default pool".to_string(),
            min_size: 0,
            max_size: MAX_POOL_SIZE,
            desired_size: 0,
            default_labels: BTreeMap::new(),
            create_time: now,
            update_time: now,
        }
    }

    /// Checks the size bounds: min <= desired <= max <= MAX_POOL_SIZE.
    pub fn validate(&self) -> DomainResult<()> {
        if self.max_size > MAX_POOL_SIZE {
            return Err(DomainError::invalid("pool.max_size", format!("must be at most {MAX_POOL_SIZE}")));
        }
        if self.min_size > self.max_size {
            return Err(DomainError::invalid(
                "pool.min_size",
                format!("{} exceeds max_size {}", self.min_size, self.max_size),
            ));
        }
        if self.desired_size < self.min_size || self.desired_size > self.max_size {
            return Err(DomainError::invalid(
                "pool.desired_size",
                format!(
                    "{} is outside [min_size, max_size] = [{}, {}]",
                    self.desired_size, self.min_size, self.max_size
                ),
            ));
        }
        if self.description.len() > MAX_DESCRIPTION {
            return Err(DomainError::invalid("pool.description", format!("must be at most {MAX_DESCRIPTION} bytes")));
        }
        Ok(())
    }
}

/// The scaling signal of a pool and the inputs it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalingSignal {
    pub desired_agents: u32,
    pub current_agents: u32,
    pub queued_jobs: u64,
    pub running_jobs: u64,
    pub slots_per_agent: u32,
    pub min_size: u32,
    pub max_size: u32,
}

impl ScalingSignal {
    /// Agents needed to run every running and routable queued job at once,
    /// at the pool's average slots per agent, clamped to [min, max].
    pub fn compute(pool: &Pool, current_agents: u32, total_slots: u64, queued: u64, running: u64) -> ScalingSignal {
        let slots_per_agent = if current_agents == 0 {
            1
        } else {
            u32::try_from((total_slots / u64::from(current_agents)).max(1)).unwrap_or(u32::MAX)
        };
        let demand = queued + running;
        let needed = demand.div_ceil(u64::from(slots_per_agent));
        let needed = u32::try_from(needed).unwrap_or(u32::MAX);
        ScalingSignal {
            // min then max, not clamp: a stored pool with min > max must
            // not panic here.
            desired_agents: needed.max(pool.min_size).min(pool.max_size.max(pool.min_size)),
            current_agents,
            queued_jobs: queued,
            running_jobs: running,
            slots_per_agent,
            min_size: pool.min_size,
            max_size: pool.max_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(min: u32, max: u32) -> Pool {
        Pool { min_size: min, max_size: max, desired_size: min, ..Pool::default_pool(SystemTime::UNIX_EPOCH) }
    }

    #[test]
    fn empty_pools_scale_to_their_minimum() {
        let s = ScalingSignal::compute(&pool(2, 10), 0, 0, 0, 0);
        assert_eq!(s.desired_agents, 2);
    }

    #[test]
    fn busy_pools_ask_for_enough_slots() {
        // 4 agents × 4 slots, 16 running and 9 waiting: 25 jobs / 4 = 7 agents.
        let s = ScalingSignal::compute(&pool(1, 10), 4, 16, 9, 16);
        assert_eq!((s.desired_agents, s.slots_per_agent), (7, 4));
    }

    #[test]
    fn demand_beyond_max_is_clamped() {
        let s = ScalingSignal::compute(&pool(0, 3), 2, 8, 1000, 8);
        assert_eq!(s.desired_agents, 3);
    }

    #[test]
    fn bounds_are_validated() {
        assert!(pool(5, 3).validate().is_err());
        let mut p = pool(1, 3);
        p.desired_size = 4;
        assert!(p.validate().is_err());
        assert!(pool(1, 3).validate().is_ok());
    }
}
