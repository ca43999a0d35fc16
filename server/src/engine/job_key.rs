//! A queued job's id as the ready set keeps it. The set holds each id
//! twice (its index and its entry): as a `String` each copy cost 24 bytes
//! plus a 48-byte heap block, a tenth of a queued job's memory. The ids
//! this server issues are UUIDs in canonical text, kept here as their 16
//! bytes, inline; any other id (older stores, tests) is kept as its text.

/// A job id, compact when it is a canonical (lowercase, hyphenated) UUID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum JobKey {
    Uuid([u8; 16]),
    Text(Box<str>),
}

impl JobKey {
    pub fn new(id: &str) -> JobKey {
        if id.len() == uuid::fmt::Hyphenated::LENGTH {
            if let Ok(parsed) = uuid::Uuid::try_parse(id) {
                let mut text = uuid::Uuid::encode_buffer();
                // Only a form that prints back as the same text.
                if parsed.hyphenated().encode_lower(&mut text) == id {
                    return JobKey::Uuid(parsed.into_bytes());
                }
            }
        }
        JobKey::Text(id.into())
    }

    /// The id as text, exactly as it was given.
    pub fn to_id(&self) -> String {
        match self {
            JobKey::Uuid(bytes) => uuid::Uuid::from_bytes(*bytes).hyphenated().to_string(),
            JobKey::Text(text) => text.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_back_exactly_as_given() {
        let issued = crate::ids::new_id(std::time::SystemTime::now());
        assert!(matches!(JobKey::new(&issued), JobKey::Uuid(_)));
        for id in [
            issued.as_str(),
            "01A250E3-D0DB-72FF-9483-0DA9F636F820",
            "01a250e3d0db72ff94830da9f636f820",
            "{01a250e3-d0db-72ff-9483-0da9f636f820}",
            "urn:uuid:01a250e3-d0db-72ff-9483-0da9f636f820",
            "job-1",
            "",
        ] {
            assert_eq!(JobKey::new(id).to_id(), id);
        }
        assert!(matches!(JobKey::new("01A250E3-D0DB-72FF-9483-0DA9F636F820"), JobKey::Text(_)));
        assert_ne!(
            JobKey::new("01A250E3-D0DB-72FF-9483-0DA9F636F820"),
            JobKey::new("01a250e3-d0db-72ff-9483-0da9f636f820")
        );
    }

    #[test]
    fn a_key_is_no_larger_than_a_string() {
        assert!(std::mem::size_of::<JobKey>() <= std::mem::size_of::<String>());
    }
}
