//! Identifiers: UUIDv7 (time-ordered, 74 random bits), drawn from the
//! thread-local RNG instead of a getrandom syscall per id.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;

/// A new unique id for a job or an agent created at `now`.
pub fn new_id(now: SystemTime) -> String {
    let millis = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let random: [u8; 10] = rand::rng().random();
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_time_ordered() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let a = new_id(t);
        let b = new_id(t);
        let later = new_id(t + std::time::Duration::from_secs(1));
        assert_ne!(a, b);
        assert!(later > a && later > b);
        assert_eq!(uuid::Uuid::parse_str(&a).map(|u| u.get_version_num()).ok(), Some(7));
    }
}
