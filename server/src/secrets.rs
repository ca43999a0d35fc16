//! Job secrets at rest: sealed with AES-256-GCM under the server's secrets
//! key, bound to their record's id (the additional data), so a sealed
//! value moved to another record does not open. The key lives in a file
//! only the server's user reads (created in the data directory on first
//! start of the embedded store; given with `--secrets-key-file`, the same
//! on every replica, for DynamoDB). Values are opened only to build an
//! Assignment for the agent that runs the job, and to mask its output.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// The record collection holding sealed secrets, by reference id.
pub const COLLECTION: &str = "job-secrets";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretsError {
    #[error("the secrets key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("sealed secrets were made with key {found}, this server has key {ours} (every replica needs the same --secrets-key-file)")]
    OtherKey { found: String, ours: String },
    #[error("sealed secrets do not open: they were changed, or belong to another record")]
    Tampered,
    #[error("sealing secrets failed")]
    Seal,
}

/// The server's secrets key.
pub struct SecretsKey {
    key: LessSafeKey,
    /// A fingerprint of the key (not the key): sealed values name it, so a
    /// replica with another key says so instead of "tampered".
    id: String,
    random: SystemRandom,
    hmac: ring::hmac::Key,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsKey").field("id", &self.id).finish_non_exhaustive()
    }
}

const KEY_LEN: usize = 32;

impl SecretsKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<SecretsKey, String> {
        if bytes.len() != KEY_LEN {
            return Err(format!("must hold exactly {KEY_LEN} bytes, not {}", bytes.len()));
        }
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| "is not an AES-256 key".to_string())?;
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let id = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        // A separate key for deriving reference ids, so they reveal nothing
        // of the values and are not the encryption key.
        let derived = ring::digest::digest(&ring::digest::SHA256, &[b"tether-secret-ref".as_slice(), bytes].concat());
        Ok(SecretsKey {
            key: LessSafeKey::new(unbound),
            id,
            random: SystemRandom::new(),
            hmac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
        })
    }

    /// Reads the key file, or creates it (mode 0600) with a random key when
    /// `create` and it does not exist.
    pub fn load(path: &Path, create: bool) -> Result<SecretsKey, SecretsError> {
        let err = |reason: String| SecretsError::KeyFile { path: path.display().to_string(), reason };
        match std::fs::read(path) {
            Ok(bytes) => SecretsKey::from_bytes(&bytes).map_err(err),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut bytes = [0u8; KEY_LEN];
                SystemRandom::new().fill(&mut bytes).map_err(|_| err("no randomness to make a key".into()))?;
                // Written whole under another name, synced, then renamed and
                // the directory synced: a crash leaves no key or all of it.
                let temp = path.with_extension("key.new");
                let _ = std::fs::remove_file(&temp);
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(&temp).map_err(|e| err(format!("cannot be created: {e}")))?;
                file.write_all(&bytes)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| err(format!("cannot be written: {e}")))?;
                std::fs::rename(&temp, path).map_err(|e| err(format!("cannot be put in place: {e}")))?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| err(format!("its directory cannot be synced: {e}")))?;
                }
                tracing::info!(path = %path.display(), "created the secrets key (keep it with the data: secrets do not open without it)");
                SecretsKey::from_bytes(&bytes).map_err(err)
            }
            Err(e) => Err(err(format!("cannot be read: {e}"))),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A reference id for secrets: random, or, for a request with an
    /// idempotency key, derived from the key and the values, so a repeated
    /// request refers to the same secrets and a different one does not.
    pub fn reference(&self, idempotent: Option<(&str, &BTreeMap<String, String>)>) -> String {
        match idempotent {
            None => {
                let mut bytes = [0u8; 16];
                // SystemRandom only fails when the OS has no randomness; a
                // time-ordered id is still unique then.
                if self.random.fill(&mut bytes).is_err() {
                    return crate::ids::new_id(std::time::SystemTime::now());
                }
                bytes.iter().map(|b| format!("{b:02x}")).collect()
            }
            Some((key, values)) => {
                let mut context = ring::hmac::Context::with_key(&self.hmac);
                context.update(&(key.len() as u64).to_le_bytes());
                context.update(key.as_bytes());
                for (name, value) in values {
                    for part in [name, value] {
                        context.update(&(part.len() as u64).to_le_bytes());
                        context.update(part.as_bytes());
                    }
                }
                context.sign().as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
            }
        }
    }

    /// Seals `values` for the record `reference`.
    pub fn seal(&self, reference: &str, values: &BTreeMap<String, String>) -> Result<Sealed, SecretsError> {
        let mut plain = serde_json::to_vec(values).map_err(|_| SecretsError::Seal)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).map_err(|_| SecretsError::Seal)?;
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(reference.as_bytes()), &mut plain)
            .map_err(|_| SecretsError::Seal)?;
        Ok(Sealed { key_id: self.id.clone(), nonce: nonce.to_vec(), ciphertext: plain })
    }

    /// Opens what [`SecretsKey::seal`] sealed for `reference`.
    pub fn open(&self, reference: &str, sealed: &Sealed) -> Result<BTreeMap<String, String>, SecretsError> {
        if sealed.key_id != self.id {
            return Err(SecretsError::OtherKey { found: sealed.key_id.clone(), ours: self.id.clone() });
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed.nonce).map_err(|_| SecretsError::Tampered)?;
        let mut buf = sealed.ciphertext.clone();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(reference.as_bytes()), &mut buf)
            .map_err(|_| SecretsError::Tampered)?;
        serde_json::from_slice(plain).map_err(|_| SecretsError::Tampered)
    }
}

/// Secret values as stored: never in clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> BTreeMap<String, String> {
        [("TOKEN".to_string(), "hunter2".to_string())].into()
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_record() {
        let key = SecretsKey::from_bytes(&[7; 32]).expect("key");
        let sealed = key.seal("ref-1", &values()).expect("seal");
        assert!(!sealed.ciphertext.windows(7).any(|w| w == b"hunter2"), "not in clear");
        assert_eq!(key.open("ref-1", &sealed).ok(), Some(values()));
        assert!(matches!(key.open("ref-2", &sealed), Err(SecretsError::Tampered)), "bound to its record");
        let mut changed = sealed.clone();
        changed.ciphertext[0] ^= 1;
        assert!(matches!(key.open("ref-1", &changed), Err(SecretsError::Tampered)));
        let other = SecretsKey::from_bytes(&[8; 32]).expect("key");
        assert!(matches!(other.open("ref-1", &sealed), Err(SecretsError::OtherKey { .. })));
        let mut same_id = sealed;
        same_id.key_id = other.id().to_string();
        assert!(matches!(other.open("ref-1", &same_id), Err(SecretsError::Tampered)));
        assert!(SecretsKey::from_bytes(&[1; 31]).is_err());
    }

    #[test]
    fn references_repeat_only_for_the_same_idempotent_request() {
        let key = SecretsKey::from_bytes(&[7; 32]).expect("key");
        assert_ne!(key.reference(None), key.reference(None));
        let a = key.reference(Some(("k", &values())));
        assert_eq!(a, key.reference(Some(("k", &values()))));
        assert_ne!(a, key.reference(Some(("k2", &values()))));
        let mut other = values();
        other.insert("TOKEN".into(), "hunter3".into());
        assert_ne!(a, key.reference(Some(("k", &other))));
        let other_key = SecretsKey::from_bytes(&[9; 32]).expect("key");
        assert_ne!(a, other_key.reference(Some(("k", &values()))));
    }

    #[test]
    fn a_key_file_is_created_private_once_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.key");
        assert!(SecretsKey::load(&path, false).is_err(), "not created unless asked");
        let made = SecretsKey::load(&path, true).expect("created");
        let again = SecretsKey::load(&path, true).expect("read");
        assert_eq!(made.id(), again.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, b"short").expect("write");
        assert!(SecretsKey::load(&path, true).is_err_and(|e| e.to_string().contains("32 bytes")));
    }
}
