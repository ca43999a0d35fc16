//! How many agent streams a server holds by default, from what one costs:
//! each connected agent holds one TCP connection (one file descriptor) and
//! about 49 KiB of server memory when idle (`tether-swarm-bench --agents
//! 10000 --connections 0` on the 2-core CI machine: HTTP/2 connection
//! buffers, the stream's tasks and the engine's agent entry; 12 KiB when
//! agents share 64 connections). 64 KiB per stream leaves headroom for
//! streams that carry traffic.
//! The default cap is what both the open-file limit and a quarter of the
//! memory allow, so a full fleet neither runs the process out of
//! descriptors (see `listener`) nor crowds out the job data it holds.

/// Server memory one connected, idle agent costs, rounded up.
pub const AGENT_STREAM_BYTES: u64 = 64 * 1024;
/// File descriptors kept for everything but agent connections: the store,
/// listeners, operators' and services' connections, reconnecting agents
/// whose old connection is not closed yet.
pub const FD_RESERVE: u64 = 256;
/// Agent streams may take this fraction (1/n) of the memory by default.
pub const MEMORY_SHARE: u64 = 4;
/// Fewest streams the default allows, however small the machine.
pub const MIN_STREAMS: u64 = 64;

/// The default cap on agent streams for an open-file limit and a memory
/// size (either unknown: not limited by it).
pub fn default_max_agent_streams(open_files: Option<u64>, memory_bytes: Option<u64>) -> usize {
    let by_fds = open_files.map_or(u64::MAX, |n| n.saturating_sub(FD_RESERVE));
    let by_memory = memory_bytes.map_or(u64::MAX, |m| m / MEMORY_SHARE / AGENT_STREAM_BYTES);
    let cap = by_fds.min(by_memory).max(MIN_STREAMS);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// The memory this process may use: the machine's, or its cgroup's limit
/// when that is smaller (containers).
pub fn memory_bytes() -> Option<u64> {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let total = Some(system.total_memory()).filter(|&m| m > 0);
    let cgroup = system.cgroup_limits().map(|l| l.total_memory).filter(|&m| m > 0);
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_smaller_of_what_descriptors_and_memory_allow() {
        const GIB: u64 = 1 << 30;
        // 24 GiB and 1,048,576 descriptors: memory decides (6 GiB / 64 KiB).
        assert_eq!(default_max_agent_streams(Some(1 << 20), Some(24 * GIB)), 98_304);
        // 1024 descriptors (a common soft limit): descriptors decide.
        assert_eq!(default_max_agent_streams(Some(1024), Some(24 * GIB)), 768);
        // A 2 GiB container.
        assert_eq!(default_max_agent_streams(Some(1 << 20), Some(2 * GIB)), 8192);
        assert_eq!(default_max_agent_streams(Some(100), Some(GIB)), MIN_STREAMS as usize);
        assert_eq!(default_max_agent_streams(None, None), usize::MAX);
        assert!(memory_bytes().is_some_and(|m| m > 0));
    }
}
