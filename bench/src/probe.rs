//! Measuring instruments that sit outside the server: a pass-through store
//! that counts commits, per-thread CPU time from `/proc`, peak RSS, and a raw
//! fsync probe of the data directory's file system.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use async_trait::async_trait;
use hdrhistogram::Histogram;
use tether_server::store::hooked::WriteHook;
use tether_server::store::{Store, StoreResult, Write, WriteOutcome};

/// A histogram of durations in nanoseconds, 1 ns to 100 s, 3 significant
/// digits.
pub fn ns_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
}

/// What the probe store saw.
#[derive(Default)]
pub struct StoreCounters {
    /// `Store::write` calls. The engine keeps one commit in flight at a time
    /// and is the only writer, so each call is one redb transaction and one
    /// fsync.
    pub commits: AtomicU64,
    /// Writes (job creates/updates, agents, counters) in those calls.
    pub writes: AtomicU64,
    /// Job creates/updates only.
    pub job_writes: AtomicU64,
    /// Time spent inside `write` (commit latency seen by the engine).
    pub commit_ns: Mutex<Option<Histogram<u64>>>,
}

impl StoreCounters {
    pub fn snapshot(&self) -> StoreSnapshot {
        StoreSnapshot {
            commits: self.commits.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            job_writes: self.job_writes.load(Ordering::Relaxed),
        }
    }

    /// Takes the commit latency histogram, leaving an empty one.
    pub fn take_latency(&self) -> Histogram<u64> {
        let mut guard = self.commit_ns.lock().unwrap_or_else(|e| e.into_inner());
        guard.replace(ns_histogram()).unwrap_or_else(ns_histogram)
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct StoreSnapshot {
    pub commits: u64,
    pub writes: u64,
    pub job_writes: u64,
}

impl StoreSnapshot {
    pub fn since(self, earlier: StoreSnapshot) -> StoreSnapshot {
        StoreSnapshot {
            commits: self.commits - earlier.commits,
            writes: self.writes - earlier.writes,
            job_writes: self.job_writes - earlier.job_writes,
        }
    }
}

/// Counts and times every commit of a [`HookedStore`].
///
/// [`HookedStore`]: tether_server::store::hooked::HookedStore
pub struct CommitProbe {
    pub counters: Arc<StoreCounters>,
}

#[async_trait]
impl WriteHook for CommitProbe {
    async fn write(&self, inner: &dyn Store, batch: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        let jobs = batch.iter().filter(|w| matches!(w, Write::CreateJob { .. } | Write::UpdateJob { .. })).count();
        let n = batch.len();
        let start = Instant::now();
        let result = inner.write(batch).await;
        let took = start.elapsed().as_nanos() as u64;
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.counters.writes.fetch_add(n as u64, Ordering::Relaxed);
        self.counters.job_writes.fetch_add(jobs as u64, Ordering::Relaxed);
        if let Some(h) = self.counters.commit_ns.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            h.saturating_record(took.max(1));
        }
        result
    }
}

/// CPU seconds (user + system) per thread group, from `/proc/self/task`.
/// Threads are grouped by the prefix of their name; threads that exited
/// between two snapshots are lost, so snapshots are taken while the
/// runtimes of a phase are alive.
pub fn cpu_by_group() -> BTreeMap<&'static str, f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = &stat[open + 1..close];
        // Fields after the name: state is field 3; utime and stime are 14, 15.
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let (Some(u), Some(s)) = (rest.get(11), rest.get(12)) else { continue };
        let cpu = (u.parse::<u64>().unwrap_or(0) + s.parse::<u64>().unwrap_or(0)) as f64 / ticks;
        *out.entry(group_of(name)).or_insert(0.0) += cpu;
    }
    out
}

fn group_of(thread: &str) -> &'static str {
    if thread.starts_with("srv-") {
        "server"
    } else if thread.starts_with("tether-store") {
        "store-writer"
    } else if thread.starts_with("agt-") {
        "agents"
    } else if thread.starts_with("cli-") {
        "clients"
    } else if thread.starts_with("pacer") {
        "pacer"
    } else {
        "other"
    }
}

/// Difference of two CPU snapshots.
pub fn cpu_since(after: &BTreeMap<&'static str, f64>, before: &BTreeMap<&'static str, f64>) -> BTreeMap<String, f64> {
    after.iter().map(|(k, v)| (k.to_string(), (v - before.get(k).copied().unwrap_or(0.0)).max(0.0))).collect()
}

/// VmHWM of this process in bytes (peak resident set).
pub fn peak_rss_bytes() -> anyhow::Result<u64> {
    status_bytes("VmHWM:")
}

/// The resident set of this process now (VmRSS).
pub fn rss_bytes() -> anyhow::Result<u64> {
    status_bytes("VmRSS:")
}

fn status_bytes(key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key} in /proc/self/status"))?;
    let kib: u64 = line
        .trim_start_matches(key)
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("parse {line:?}"))?;
    Ok(kib * 1024)
}

/// Resets VmHWM to the current RSS (Linux >= 4.0). Returns whether it
/// worked; if not, later peaks include earlier runs.
pub fn reset_peak_rss() -> bool {
    std::fs::OpenOptions::new().write(true).open("/proc/self/clear_refs").and_then(|mut f| f.write_all(b"5")).is_ok()
}

/// Latency of a 4 KiB write + fdatasync in `dir`, the floor under any
/// durable commit there. Returns (p50, p99) in microseconds.
pub fn fsync_probe(dir: &Path, rounds: usize, in_place: bool) -> anyhow::Result<(f64, f64)> {
    use std::os::unix::fs::FileExt as _;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let block = vec![7u8; 4096];
    if in_place {
        // Written and synced first, as the store's journal is.
        file.write_all(&vec![0u8; block.len() * rounds]).context("probe preallocation")?;
        file.sync_all().context("probe fsync")?;
    }
    let mut hist = ns_histogram();
    for round in 0..rounds {
        let start = Instant::now();
        if in_place {
            file.write_all_at(&block, (round * block.len()) as u64).context("probe write")?;
        } else {
            file.write_all(&block).context("probe write")?;
        }
        file.sync_data().context("probe fdatasync")?;
        hist.saturating_record(start.elapsed().as_nanos() as u64);
    }
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    Ok((hist.value_at_quantile(0.5) as f64 / 1e3, hist.value_at_quantile(0.99) as f64 / 1e3))
}
