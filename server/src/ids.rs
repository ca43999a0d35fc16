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

/// A UUIDv7 of `time` whose other bits come from `seed`: the same for the
/// same seed, on every replica (an id several of them may mint for one
/// thing, such as the automatic rollback of one failed deployment).
pub fn derived_id(time: SystemTime, seed: &[u8]) -> String {
    let millis = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let digest = ring::digest::digest(&ring::digest::SHA256, seed);
    let mut bits = [0u8; 10];
    bits.copy_from_slice(&digest.as_ref()[..10]);
    uuid::Builder::from_unix_timestamp_millis(millis, &bits).into_uuid().to_string()
}

/// UUIDv7 ids that sort in the order this process made them, even within
/// one millisecond or when the clock stands still or steps back (RFC 9562,
/// method 1: a 12-bit counter in `rand_a`, the time borrowed forward when
/// it runs out). Ids of different processes sort by their clocks only.
#[derive(Debug, Default)]
pub struct OrderedIds {
    last: std::sync::Mutex<(u64, u16)>,
}

const COUNTER_MAX: u16 = 0x0FFF;

impl OrderedIds {
    pub fn next(&self, now: SystemTime) -> String {
        let millis = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let (millis, counter) = {
            // A poisoned lock only means another id was being made: its
            // value is still a valid floor.
            let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let next = match *last {
                (at, counter) if millis <= at && counter < COUNTER_MAX => (at, counter + 1),
                (at, _) if millis <= at => (at.saturating_add(1), 0),
                _ => (millis, 0),
            };
            *last = next;
            next
        };
        let mut random: [u8; 10] = rand::rng().random();
        random[0] = (counter >> 8) as u8;
        random[1] = counter as u8;
        uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_repeat_for_their_seed_only() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        assert_eq!(derived_id(t, b"a"), derived_id(t, b"a"));
        assert_ne!(derived_id(t, b"a"), derived_id(t, b"b"));
        assert!(derived_id(t + std::time::Duration::from_secs(1), b"a") > derived_id(t, b"a"));
    }

    #[test]
    fn ordered_ids_sort_in_the_order_they_were_made_whatever_the_clock() {
        let ids = OrderedIds::default();
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let mut made = Vec::new();
        for i in 0..10_000u64 {
            // Still, then stepping back, then forward again.
            let now = match i {
                0..5000 => t,
                5000..7000 => t - std::time::Duration::from_secs(5),
                _ => t + std::time::Duration::from_millis(i),
            };
            made.push(ids.next(now));
        }
        let mut sorted = made.clone();
        sorted.sort();
        assert_eq!(sorted, made);
        assert!(made.iter().all(|id| uuid::Uuid::parse_str(id).map(|u| u.get_version_num()).ok() == Some(7)));
    }

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
