//! What an agent is and where it connects.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::backoff::ReconnectPolicy;
use crate::error::AgentError;

/// The configuration of an [`Agent`](crate::Agent).
///
/// Build it with [`AgentConfig::new`] and the `with_*` methods, or with a
/// struct literal over `..AgentConfig::default()`.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The server's URL, `http://host:port`.
    pub server: String,
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
        if !(self.server.starts_with("http://") || self.server.starts_with("https://")) {
            return bad(format!("server {:?} must be an http:// or https:// URL", self.server));
        }
        if self.server.parse::<tonic::transport::Uri>().is_err() {
            return bad(format!("server {:?} is not a valid URL", self.server));
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
}
