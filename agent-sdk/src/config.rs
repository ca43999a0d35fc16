//! What an agent is and where it connects.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::backoff::ReconnectPolicy;
use crate::error::AgentError;

/// The configuration of an [`Agent`](crate::Agent).
///
/// Build it with [`AgentConfig::new`] and the `with_*` methods, or with a
/// struct literal over `..AgentConfig::default()`.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The server's URL, `http://host:port`: the first endpoint tried.
    pub server: String,
    /// More endpoints of the same Tether deployment (replicas sharing one
    /// store), tried after [`server`](Self::server) when a stream breaks or
    /// a connect fails, round robin. Empty for a single server. See
    /// [`Agent::run`](crate::Agent::run) for the failover policy.
    pub fallback_servers: Vec<String>,
    /// Join token or agent token, sent in Hello.
    pub credential: Option<String>,
    /// The agent's name, unique within its pool (1-128 characters). Reused
    /// on reconnect so the server maps the agent to the same id.
    pub name: String,
    /// The pool to serve; empty means "default".
    pub pool: String,
    /// Labels matched against jobs' required labels.
    pub labels: BTreeMap<String, String>,
    /// Jobs run at once (1-1024).
    pub slots: u32,
    /// The agent software's version, shown by the server.
    pub version: String,
    /// Spacing of reconnect attempts.
    pub reconnect: ReconnectPolicy,
    /// How long a handler may take to return after its job was cancelled
    /// (by the server or a timeout) before it is dropped.
    pub cancel_grace: Duration,
    /// Longest wait for the TCP connection and for the Welcome.
    pub handshake_timeout: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            server: "http://127.0.0.1:50051".into(),
            fallback_servers: Vec::new(),
            credential: None,
            name: String::new(),
            pool: "default".into(),
            labels: BTreeMap::new(),
            slots: 1,
            version: concat!("tether-agent-sdk/", env!("CARGO_PKG_VERSION")).into(),
            reconnect: ReconnectPolicy::default(),
            cancel_grace: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

impl AgentConfig {
    /// A configuration for `server` and agent `name`, defaults elsewhere.
    pub fn new(server: impl Into<String>, name: impl Into<String>) -> Self {
        Self { server: server.into(), name: name.into(), ..Self::default() }
    }

    /// Sets every endpoint at once, in failover order: the first becomes
    /// [`server`](Self::server), the rest
    /// [`fallback_servers`](Self::fallback_servers). An empty list leaves no
    /// server, which [`validate`](Self::validate) refuses.
    ///
    /// ```
    /// use tether_agent_sdk::AgentConfig;
    ///
    /// let c = AgentConfig::new("http://unused:1", "worker-1")
    ///     .with_servers(["http://replica-a:50051", "http://replica-b:50051"]);
    /// assert_eq!(c.servers().collect::<Vec<_>>(), ["http://replica-a:50051", "http://replica-b:50051"]);
    /// ```
    pub fn with_servers<I, S>(mut self, servers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut servers = servers.into_iter().map(Into::into);
        self.server = servers.next().unwrap_or_default();
        self.fallback_servers = servers.collect();
        self
    }

    /// Adds one endpoint after those already configured.
    pub fn with_fallback_server(mut self, server: impl Into<String>) -> Self {
        self.fallback_servers.push(server.into());
        self
    }

    /// Every endpoint in failover order: [`server`](Self::server), then
    /// [`fallback_servers`](Self::fallback_servers).
    pub fn servers(&self) -> impl Iterator<Item = &str> + '_ {
        std::iter::once(self.server.as_str()).chain(self.fallback_servers.iter().map(String::as_str))
    }

    /// Sets the credential.
    pub fn with_credential(mut self, credential: impl Into<String>) -> Self {
        self.credential = Some(credential.into());
        self
    }

    /// Sets the pool.
    pub fn with_pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = pool.into();
        self
    }

    /// Adds one label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the number of slots.
    pub fn with_slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Sets the version string.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the reconnect policy.
    pub fn with_reconnect(mut self, reconnect: ReconnectPolicy) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Sets the grace period of a cancelled handler.
    pub fn with_cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = grace;
        self
    }

    /// Checks what the server would refuse anyway, so a typo fails fast
    /// instead of looping on reconnects.
    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |m: String| Err(AgentError::InvalidConfig(m));
        if self.server.is_empty() {
            return bad("no server configured".into());
        }
        let mut seen = BTreeSet::new();
        for server in self.servers() {
            if !(server.starts_with("http://") || server.starts_with("https://")) {
                return bad(format!("server {server:?} must be an http:// or https:// URL"));
            }
            if server.parse::<tonic::transport::Uri>().is_err() {
                return bad(format!("server {server:?} is not a valid URL"));
            }
            if !seen.insert(server) {
                return bad(format!("server {server:?} is listed twice"));
            }
        }
        let name_len = self.name.chars().count();
        if !(1..=128).contains(&name_len) {
            return bad("name must be 1-128 characters".into());
        }
        if !(1..=1024).contains(&self.slots) {
            return bad(format!("slots must be 1-1024, got {}", self.slots));
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout must be > 0".into());
        }
        self.reconnect.validate().map_err(AgentError::InvalidConfig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_and_validation() {
        let c = AgentConfig::new("http://127.0.0.1:1", "a").with_slots(4).with_label("gpu", "no");
        assert!(c.validate().is_ok());
        assert_eq!(c.labels.get("gpu").map(String::as_str), Some("no"));
        assert!(AgentConfig::new("127.0.0.1:1", "a").validate().is_err());
        assert!(AgentConfig::new("http://127.0.0.1:1", "").validate().is_err());
        assert!(AgentConfig::new("http://127.0.0.1:1", "a").with_slots(0).validate().is_err());
        assert!(AgentConfig::new("http://127.0.0.1:1", "a").with_slots(1025).validate().is_err());
    }

    #[test]
    fn several_servers() {
        let one = AgentConfig::new("http://a:1", "n");
        assert_eq!(one.servers().collect::<Vec<_>>(), ["http://a:1"]);

        let c = one.clone().with_fallback_server("http://b:1").with_fallback_server("https://c:1");
        assert_eq!(c.servers().collect::<Vec<_>>(), ["http://a:1", "http://b:1", "https://c:1"]);
        assert!(c.validate().is_ok());

        let c =
            AgentConfig::new("http://x:1", "n").with_servers(vec!["http://b:1".to_owned(), "http://c:1".to_owned()]);
        assert_eq!((c.server.as_str(), c.fallback_servers.as_slice()), ("http://b:1", &["http://c:1".to_owned()][..]));
        assert!(c.validate().is_ok());

        let err = |c: AgentConfig| match c.validate() {
            Err(AgentError::InvalidConfig(m)) => m,
            other => panic!("expected InvalidConfig, got {other:?}"),
        };
        assert_eq!(err(one.clone().with_servers(Vec::<String>::new())), "no server configured");
        assert!(err(one.clone().with_fallback_server("b:1")).contains("\"b:1\""));
        assert!(err(one.clone().with_fallback_server("http://a:1")).contains("listed twice"));
    }
}
