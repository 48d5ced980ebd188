//! Secrets encrypted at rest: AES-256-GCM under a key kept in a file, bound to the object's
//! store key (so a ciphertext cannot be moved to another object). Stored values carry
//! `k8s:enc:aesgcm:v1:<key name>:` before the nonce and ciphertext, as Kubernetes' own
//! encryption provider writes them; values without the prefix are read as they are.

use std::path::Path;

use anyhow::Context;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::status::ApiError;

const PREFIX: &str = "k8s:enc:aesgcm:v1:";
/// The resources whose objects are encrypted.
const ENCRYPTED: &[&str] = &["secrets"];

pub struct Codec {
    key: Option<(String, LessSafeKey)>,
    rng: SystemRandom,
}

impl Codec {
    /// No encryption: values are stored as they are.
    pub fn plain() -> Codec {
        Codec {
            key: None,
            rng: SystemRandom::new(),
        }
    }

    /// The key in `path`: 32 bytes, base64-encoded, named `key1`.
    pub fn from_file(path: &Path) -> anyhow::Result<Codec> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the encryption key {}", path.display()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .with_context(|| format!("{}: not base64", path.display()))?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| anyhow::anyhow!("{}: an AES-256 key is 32 bytes", path.display()))?;
        Ok(Codec {
            key: Some(("key1".into(), LessSafeKey::new(key))),
            rng: SystemRandom::new(),
        })
    }

    /// A new random key, base64-encoded (what `from_file` reads).
    pub fn generate() -> anyhow::Result<String> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// The value to store for `resource`'s object at `store_key`.
    pub fn seal(
        &self,
        resource: &str,
        store_key: &str,
        plain: Vec<u8>,
    ) -> Result<Vec<u8>, ApiError> {
        let Some((name, key)) = &self.key else {
            return Ok(plain);
        };
        if !ENCRYPTED.contains(&resource) {
            return Ok(plain);
        }
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| ApiError::internal("no randomness for an encryption nonce"))?;
        let mut data = plain;
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(store_key.as_bytes()),
            &mut data,
        )
        .map_err(|_| ApiError::internal("encrypting a secret failed"))?;
        let mut out = format!("{PREFIX}{name}:").into_bytes();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// The plain value of what is stored at `store_key`.
    pub fn open<'a>(
        &self,
        store_key: &[u8],
        stored: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>, ApiError> {
        let Some(rest) = stored.strip_prefix(PREFIX.as_bytes()) else {
            return Ok(std::borrow::Cow::Borrowed(stored));
        };
        let Some((name, key)) = &self.key else {
            return Err(ApiError::internal(
                "an encrypted object was found, but this apiserver has no encryption key",
            ));
        };
        let rest = rest
            .strip_prefix(name.as_bytes())
            .and_then(|r| r.strip_prefix(b":"))
            .ok_or_else(|| {
                ApiError::internal(
                    "an object is encrypted under a key this apiserver does not have",
                )
            })?;
        if rest.len() < NONCE_LEN {
            return Err(ApiError::internal("an encrypted object is truncated"));
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| ApiError::internal("an encrypted object has a bad nonce"))?;
        let mut data = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(store_key), &mut data)
            .map_err(|_| {
                ApiError::internal("an encrypted object does not decrypt (wrong key, or tampered)")
            })?;
        Ok(std::borrow::Cow::Owned(plain.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_are_bound_to_their_key() {
        let dir = std::env::temp_dir().join(format!("flotilla-crypt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        std::fs::write(&path, Codec::generate().unwrap()).unwrap();
        let c = Codec::from_file(&path).unwrap();
        let sealed = c
            .seal("secrets", "/registry/secrets/a/b", b"{\"x\":1}".to_vec())
            .unwrap();
        assert!(sealed.starts_with(b"k8s:enc:aesgcm:v1:key1:"));
        assert!(!sealed.windows(5).any(|w| w == b"\"x\":1"));
        assert_eq!(
            &*c.open(b"/registry/secrets/a/b", &sealed).unwrap(),
            b"{\"x\":1}"
        );
        assert!(c.open(b"/registry/secrets/a/c", &sealed).is_err());
        // Other resources, and values written without encryption, pass through.
        assert_eq!(c.seal("configmaps", "k", b"v".to_vec()).unwrap(), b"v");
        assert_eq!(&*c.open(b"k", b"{}").unwrap(), b"{}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
