//! Accepting connections without spinning: the open-file limit raised to
//! what the system allows at start-up, and an accept loop that backs off
//! when the process runs out of file descriptors (or memory) instead of
//! retrying at once, logs that rate-limited and counts every failure.
//!
//! Every agent holds one TCP connection, so the open-file limit bounds the
//! fleet a server can hold: see [`fd_limit`] and the README.

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};

use crate::log_limit::LogLimit;

/// Counter of failed accepts, by kind (`resources`, `connection`, `other`).
pub const ACCEPT_ERRORS: &str = "tether_accept_errors_total";

/// First and longest wait after an accept failed for lack of resources.
const BACKOFF_FIRST: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

static ACCEPT_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// The process's open-file limit, soft and hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// The current open-file limit, if the platform tells.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
pub fn fd_limit() -> Option<FdLimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(FdLimit { soft: limit.rlim_cur as u64, hard: limit.rlim_max as u64 })
}

/// Raises the soft open-file limit to the hard one (the most an
/// unprivileged process may use) and returns the limit now in force.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
pub fn raise_fd_limit() -> io::Result<FdLimit> {
    let current = fd_limit().ok_or_else(io::Error::last_os_error)?;
    if current.soft >= current.hard {
        return Ok(current);
    }
    let wanted = libc::rlimit { rlim_cur: current.hard as libc::rlim_t, rlim_max: current.hard as libc::rlim_t };
    // SAFETY: setrlimit reads one rlimit from a struct we own.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    fd_limit().ok_or_else(io::Error::last_os_error)
}

/// A source of connections: a TCP listener, or a fake one in tests.
pub trait Accept: Send + 'static {
    type Conn: Send + 'static;
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Accept for TcpListener {
    type Conn = TcpStream;

    async fn accept(&mut self) -> io::Result<TcpStream> {
        let (stream, _) = TcpListener::accept(self).await?;
        // tonic applies its own nodelay setting only to listeners it binds.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// What a failed accept means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptFailure {
    /// Out of file descriptors or memory: retrying at once would spin.
    Resources,
    /// One connection went wrong before it was accepted; the next is fine.
    Connection,
    Other,
}

impl AcceptFailure {
    fn of(e: &io::Error) -> AcceptFailure {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptFailure::Resources,
            Some(
                libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::EINTR | libc::ETIMEDOUT,
            ) => AcceptFailure::Connection,
            _ => AcceptFailure::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            AcceptFailure::Resources => "resources",
            AcceptFailure::Connection => "connection",
            AcceptFailure::Other => "other",
        }
    }
}

/// Accepted connections for tonic's `serve_with_incoming`. Failures are
/// handled here and never passed on (tonic would retry at once): after a
/// lack of resources the loop waits, 5 ms doubling to 1 s, until an accept
/// succeeds again.
pub fn incoming<A: Accept>(acceptor: A) -> impl Stream<Item = io::Result<A::Conn>> + Send {
    futures::stream::unfold((acceptor, BACKOFF_FIRST), |(mut acceptor, mut backoff)| async move {
        loop {
            match acceptor.accept().await {
                Ok(conn) => return Some((Ok(conn), (acceptor, BACKOFF_FIRST))),
                Err(e) => {
                    let failure = AcceptFailure::of(&e);
                    metrics::counter!(ACCEPT_ERRORS, "kind" => failure.label()).increment(1);
                    if failure == AcceptFailure::Connection {
                        tracing::debug!(error = %e, "a connection failed before it was accepted");
                        continue;
                    }
                    if let Some(suppressed) = ACCEPT_LOG.check(Instant::now()) {
                        let limit = fd_limit().map(|l| l.soft);
                        tracing::warn!(
                            error = %e,
                            retry_in = ?backoff,
                            open_file_limit = ?limit,
                            suppressed,
                            "accepting connections failed; backing off (each agent holds one connection: raise the open-file limit or --max-agent-streams headroom)"
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2).min(BACKOFF_MAX);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use futures::StreamExt;

    use super::*;

    /// Fails `failures` times with `errno`, then accepts.
    struct Failing {
        errno: i32,
        failures: usize,
        calls: Arc<AtomicUsize>,
    }

    impl Accept for Failing {
        type Conn = u32;

        async fn accept(&mut self) -> io::Result<u32> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.failures {
                Err(io::Error::from_raw_os_error(self.errno))
            } else {
                Ok(7)
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_descriptors_backs_off_instead_of_spinning() {
        let calls = Arc::new(AtomicUsize::new(0));
        let acceptor = Failing { errno: libc::EMFILE, failures: usize::MAX, calls: calls.clone() };
        let mut stream = Box::pin(incoming(acceptor));
        // Ten seconds of (virtual) time out of descriptors: 5 ms doubling to
        // 1 s is eight tries in the first 1.3 s, then one a second. A loop
        // that retried at once would make millions.
        let waited = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        assert!(waited.is_err(), "no connection and no error is passed on");
        let tries = calls.load(Ordering::SeqCst);
        assert!((15..=20).contains(&tries), "{tries} accept calls in 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn recovers_once_descriptors_are_free_and_skips_aborted_connections() {
        let calls = Arc::new(AtomicUsize::new(0));
        let acceptor = Failing { errno: libc::EMFILE, failures: 3, calls: calls.clone() };
        let mut stream = Box::pin(incoming(acceptor));
        assert_eq!(stream.next().await.map(|r| r.ok()), Some(Some(7)));
        assert_eq!(calls.load(Ordering::SeqCst), 4);

        let started = tokio::time::Instant::now();
        let calls = Arc::new(AtomicUsize::new(0));
        let acceptor = Failing { errno: libc::ECONNABORTED, failures: 1000, calls: calls.clone() };
        let mut stream = Box::pin(incoming(acceptor));
        assert_eq!(stream.next().await.map(|r| r.ok()), Some(Some(7)));
        assert_eq!(started.elapsed(), Duration::ZERO, "an aborted connection is skipped without waiting");
    }

    #[test]
    fn the_fd_limit_is_readable_and_raising_it_keeps_it_within_the_hard_limit() {
        let before = fd_limit().expect("getrlimit");
        let after = raise_fd_limit().expect("setrlimit");
        assert!(after.soft >= before.soft);
        assert_eq!(after.soft, after.hard);
    }
}
