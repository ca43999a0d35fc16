//! Page tokens: opaque to clients (AIP-158), each naming the listing it
//! belongs to and where that listing resumes. A token this server did not
//! issue for that listing is refused with INVALID_ARGUMENT.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::domain::{DomainError, DomainResult};

/// Longest token accepted (the longest cursor is an id or name).
pub const MAX_PAGE_TOKEN: usize = 1024;

/// The listings that hand out tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Jobs,
    DashboardJobs,
    JobLogs,
    DeadLetters,
    Agents,
    Pools,
    Deployments,
    DeploymentEvents,
}

impl Listing {
    fn tag(self) -> &'static str {
        match self {
            Listing::Jobs => "jobs",
            Listing::DashboardJobs => "dashboard-jobs",
            Listing::JobLogs => "logs",
            Listing::DeadLetters => "dead",
            Listing::Agents => "agents",
            Listing::Pools => "pools",
            Listing::Deployments => "deployments",
            Listing::DeploymentEvents => "deployment-events",
        }
    }
}

/// The token resuming `listing` at `cursor`; empty when there is no next
/// page.
pub fn encode(listing: Listing, cursor: Option<&str>) -> String {
    match cursor {
        None => String::new(),
        Some(cursor) => URL_SAFE_NO_PAD.encode(format!("{}:{cursor}", listing.tag())),
    }
}

/// The cursor of a token for `listing`; `None` for an empty token (the
/// first page).
pub fn decode(listing: Listing, token: &str) -> DomainResult<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let foreign = || DomainError::invalid("page_token", "is not a page token this server issued for this listing");
    if token.len() > MAX_PAGE_TOKEN {
        return Err(foreign());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| foreign())?;
    let text = String::from_utf8(bytes).map_err(|_| foreign())?;
    let cursor = text.strip_prefix(listing.tag()).and_then(|rest| rest.strip_prefix(':')).ok_or_else(foreign)?;
    if cursor.is_empty() {
        return Err(foreign());
    }
    Ok(Some(cursor.to_string()))
}

/// A token whose cursor is a sequence number.
pub fn decode_seq(listing: Listing, token: &str) -> DomainResult<Option<u64>> {
    match decode(listing, token)? {
        None => Ok(None),
        Some(cursor) => cursor
            .parse()
            .map(Some)
            .map_err(|_| DomainError::invalid("page_token", "is not a page token this server issued for this listing")),
    }
}

pub fn encode_seq(listing: Listing, cursor: Option<u64>) -> String {
    encode(listing, cursor.map(|c| c.to_string()).as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_foreign_ones_are_refused() {
        let token = encode(Listing::Agents, Some("agent-7"));
        assert_eq!(decode(Listing::Agents, &token).ok(), Some(Some("agent-7".to_string())));
        assert_eq!(decode(Listing::Agents, "").ok(), Some(None));
        assert!(decode(Listing::Pools, &token).is_err(), "a token of another listing");
        assert!(decode(Listing::Agents, "agent-7").is_err(), "a raw cursor");
        assert!(decode(Listing::Agents, &"x".repeat(2000)).is_err());
        let seq = encode_seq(Listing::Jobs, Some(42));
        assert_eq!(decode_seq(Listing::Jobs, &seq).ok(), Some(Some(42)));
        assert!(decode_seq(Listing::Jobs, &encode(Listing::Jobs, Some("x"))).is_err());
        assert_eq!(encode_seq(Listing::Jobs, None), "");
    }
}
