//! Resource sampling for heartbeats, kept off the job hot path: one
//! background task refreshes a cached sample every few seconds and
//! heartbeats copy it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, System};
use tether::v1::AgentMetrics;

use crate::state::Shared;

/// How often the cached sample is refreshed. CPU use is measured between
/// two refreshes, so this is also the CPU averaging window.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples CPU, memory and the work directory's disk.
pub(crate) struct Sampler {
    system: System,
    disks: Disks,
    workdir: PathBuf,
}

impl Sampler {
    pub(crate) fn new() -> Self {
        let workdir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        Self {
            system: System::new(),
            disks: Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage()),
            workdir,
        }
    }

    /// Refreshes only what heartbeats report (no process list).
    pub(crate) fn sample(&mut self) -> AgentMetrics {
        self.system.refresh_cpu_specifics(CpuRefreshKind::nothing().with_cpu_usage());
        self.system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let (disk_used_bytes, disk_total_bytes) = self.disk_usage();
        AgentMetrics {
            cpu_percent: f64::from(self.system.global_cpu_usage()).clamp(0.0, 100.0),
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            disk_used_bytes,
            disk_total_bytes,
            running_jobs: 0,
        }
    }

    /// The disk whose mount point is the longest prefix of the work dir.
    fn disk_usage(&mut self) -> (u64, u64) {
        let workdir: &Path = &self.workdir;
        let disk = self
            .disks
            .list_mut()
            .iter_mut()
            .filter(|d| workdir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len());
        match disk {
            Some(d) => {
                d.refresh_specifics(DiskRefreshKind::nothing().with_storage());
                let total = d.total_space();
                (total.saturating_sub(d.available_space()), total)
            }
            None => (0, 0),
        }
    }
}

/// Takes a first sample (so the first heartbeat has real numbers), then
/// starts the task refreshing it; abort the returned handle to stop it.
pub(crate) async fn start_sampler(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    let store = move |m: AgentMetrics, shared: &Shared| {
        *shared.metrics.lock().unwrap_or_else(PoisonError::into_inner) = m;
    };
    let mut sampler = None;
    if let Some((s, m)) = sample_off_thread(Sampler::new).await {
        store(m, &shared);
        sampler = Some(s);
    }
    tokio::spawn(async move {
        while let Some(s) = sampler.take() {
            tokio::time::sleep(SAMPLE_EVERY).await;
            let Some((s, m)) = sample_off_thread(move || s).await else {
                return;
            };
            store(m, &shared);
            sampler = Some(s);
        }
    })
}

/// /proc and statvfs reads are blocking I/O: keep them off the workers.
async fn sample_off_thread<F>(sampler: F) -> Option<(Sampler, AgentMetrics)>
where
    F: FnOnce() -> Sampler + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let mut s = sampler();
        let m = s.sample();
        (s, m)
    })
    .await
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_reports_memory() {
        let mut s = Sampler::new();
        let m = s.sample();
        assert!(m.memory_total_bytes > 0);
        assert!(m.memory_used_bytes <= m.memory_total_bytes);
        assert!((0.0..=100.0).contains(&m.cpu_percent));
        assert!(m.disk_used_bytes <= m.disk_total_bytes);
    }
}
