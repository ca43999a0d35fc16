//! Agent pools: CRUD and the scaling signal.

use super::core::Engine;
use super::{Command, Reply};
use crate::domain::{DomainError, DomainResult, Health, Pool, ScalingSignal};
use crate::store::{Write, WriteOutcome};

fn already_exists(name: &str) -> DomainError {
    DomainError::AlreadyExists(format!("pool {name:?} already exists"))
}

/// A pool field an update may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolField {
    Description,
    MinSize,
    MaxSize,
    DesiredSize,
    DefaultLabels,
}

impl Engine {
    pub fn require_pool(&self, field: &str, name: &str) -> DomainResult<&Pool> {
        self.pools.get(name).ok_or_else(|| DomainError::NotFound {
            kind: "pool",
            id: format!("{name} (in {field}; create it with CreateAgentPool)"),
        })
    }

    /// On a shared store, a pool this replica does not know may have been
    /// created through another one: the pools are read again before the
    /// name is refused. At most once per sweep interval (every sweep reads
    /// them too): requests naming made-up pools must not turn into a scan
    /// of the pools each, on the engine's loop.
    pub async fn know_pool(&mut self, name: &str) {
        if self.shared && !self.pools.contains_key(name) {
            let now = self.clock.now();
            let recent = self
                .pools_read_at
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age < self.config.sweep_interval);
            if recent {
                return;
            }
            self.pools_read_at = Some(now);
            match self.store.list_pools().await {
                Ok(pools) => self.learn_pools(pools),
                Err(e) => tracing::warn!(pool = %name, error = %e, "could not read the pools"),
            }
        }
    }

    /// The pools as the store holds them (shared store: every replica
    /// changes them).
    pub fn learn_pools(&mut self, pools: Vec<Pool>) {
        if !pools.is_empty() {
            self.pools = pools.into_iter().map(|p| (p.name.clone(), p)).collect();
        }
    }

    /// Creates a pool. On an exclusive store the engine's pools are the
    /// truth and the write joins the batch. On a shared store another
    /// replica may create the name at the same time, so the pool is
    /// written on condition that the name is free, in a task (no batch
    /// waits for it), and a refusal reaches the caller as ALREADY_EXISTS.
    pub fn create_pool(&mut self, pool: Pool, reply: Reply<Pool>) {
        let pool = match self.check_writable().and_then(|()| self.new_pool(pool)) {
            Ok(pool) => pool,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if !self.shared {
            self.persist_other(Write::PutPool(Box::new(pool.clone())));
            self.pools.insert(pool.name.clone(), pool.clone());
            self.reply_after_commit(reply, Ok(pool));
            return;
        }
        let Some(commands) = self.commands.upgrade() else {
            let _ = reply.send(Err(DomainError::Unavailable("the server is stopping".into())));
            return;
        };
        let store = self.store.clone();
        tokio::spawn(async move {
            let result = match store.write(vec![Write::CreatePool(Box::new(pool.clone()))]).await {
                Ok(outcomes) if outcomes.first() == Some(&WriteOutcome::Applied) => {
                    // The engine learns it before the caller hears of it,
                    // so the caller's next request finds it here.
                    let _ = commands.send(Command::PoolCreated { pool: Box::new(pool.clone()) }).await;
                    Ok(pool)
                }
                Ok(_) => Err(already_exists(&pool.name)),
                Err(e) => Err(super::store_error(e)),
            };
            let _ = reply.send(result);
        });
    }

    /// A pool to create, stamped and checked against what this replica knows.
    fn new_pool(&self, mut pool: Pool) -> DomainResult<Pool> {
        if self.pools.contains_key(&pool.name) {
            return Err(already_exists(&pool.name));
        }
        let now = self.clock.now();
        pool.create_time = now;
        pool.update_time = now;
        pool.validate()?;
        Ok(pool)
    }

    pub fn get_pool(&self, name: &str) -> DomainResult<Pool> {
        self.pools.get(name).cloned().ok_or_else(|| DomainError::NotFound { kind: "pool", id: name.to_string() })
    }

    pub fn list_pools(&self, after: Option<&str>, limit: usize) -> (Vec<Pool>, Option<String>) {
        let mut pools: Vec<Pool> = self
            .pools
            .values()
            .filter(|p| after.is_none_or(|a| p.name.as_str() > a))
            .take(limit + 1)
            .cloned()
            .collect();
        let next = if pools.len() > limit {
            pools.truncate(limit);
            pools.last().map(|p| p.name.clone())
        } else {
            None
        };
        (pools, next)
    }

    pub fn update_pool(&mut self, update: Pool, fields: &[PoolField]) -> DomainResult<Pool> {
        let mut pool = self.get_pool(&update.name)?;
        for field in fields {
            match field {
                PoolField::Description => pool.description = update.description.clone(),
                PoolField::MinSize => pool.min_size = update.min_size,
                PoolField::MaxSize => pool.max_size = update.max_size,
                PoolField::DesiredSize => pool.desired_size = update.desired_size,
                PoolField::DefaultLabels => pool.default_labels = update.default_labels.clone(),
            }
        }
        pool.validate()?;
        pool.update_time = self.clock.now();
        self.persist_other(Write::PutPool(Box::new(pool.clone())));
        self.pools.insert(pool.name.clone(), pool.clone());
        Ok(pool)
    }

    pub fn delete_pool(&mut self, name: &str) -> DomainResult<Pool> {
        let pool = self.get_pool(name)?;
        if name == crate::domain::DEFAULT_POOL {
            return Err(DomainError::FailedPrecondition("the default pool cannot be deleted".into()));
        }
        let live = self.pool_agents.get(name).map_or(0, |ids| {
            ids.iter().filter(|id| self.agents.get(id).is_some_and(|a| a.agent.health != Health::Terminated)).count()
        });
        if live > 0 {
            return Err(DomainError::FailedPrecondition(format!(
                "pool {name:?} has {live} live agent(s); deregister them first"
            )));
        }
        let queued = self.ready.ready_in_pool(name);
        if queued > 0 {
            return Err(DomainError::FailedPrecondition(format!(
                "pool {name:?} has {queued} queued job(s) waiting for it; cancel them first"
            )));
        }
        self.persist_other(Write::DeletePool { name: name.to_string() });
        self.pools.remove(name);
        Ok(pool)
    }

    pub fn scaling_signal(&self, name: &str) -> DomainResult<ScalingSignal> {
        let pool = self.get_pool(name)?;
        let mut current = 0u32;
        let mut slots = 0u64;
        for id in self.pool_agents.get(name).into_iter().flatten() {
            if let Some(entry) = self.agents.get(id) {
                if entry.counts_for_capacity() {
                    current += 1;
                    slots += u64::from(entry.agent.slots);
                }
            }
        }
        let queued = self.ready.ready_in_pool(name) as u64;
        let running = self.active.values().filter(|j| j.spec.routing.pool == name).count() as u64;
        Ok(ScalingSignal::compute(&pool, current, slots, queued, running))
    }
}
