//! Key derivation: HKDF for sub-keys, HMAC for blind indexes, argon2id for passphrases.

use argon2::{Algorithm as Argon2Alg, Argon2, Params, Version};
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{CryptoError, KEY_LEN, SecretKey};

/// Derives an independent sub-key for one purpose (`info`) from `ikm`.
pub fn derive_key(ikm: &SecretKey, info: &[u8]) -> SecretKey {
    let hk = Hkdf::<Sha256>::new(Some(b"chatvault"), ikm.expose());
    let mut okm = [0u8; KEY_LEN];
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so expand cannot fail.
    hk.expand(info, &mut okm).expect("32-byte HKDF output");
    SecretKey::from_bytes(&mut okm)
}

/// Keyed blind index: HMAC-SHA256(key, domain || 0 || value). Equal values give equal
/// indexes under one key, so lookups work without storing the value.
pub fn blind_index(key: &SecretKey, domain: &[u8], value: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose()).expect("HMAC accepts any key length");
    mac.update(domain);
    mac.update(&[0]);
    mac.update(value);
    mac.finalize().into_bytes().into()
}

/// argon2id cost, recorded beside the salt so a change of defaults never locks anyone out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Argon2Params {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Argon2Params {
    /// Stronger than the crate default: this runs once per start, not per request.
    fn default() -> Self {
        Argon2Params { memory_kib: 64 * 1024, iterations: 3, parallelism: 1 }
    }
}

/// Stretches a passphrase into a 256-bit key with argon2id.
pub fn key_from_passphrase(passphrase: &[u8], salt: &[u8], params: Argon2Params) -> Result<SecretKey, CryptoError> {
    let p = Params::new(params.memory_kib, params.iterations, params.parallelism, Some(KEY_LEN))
        .map_err(|_| CryptoError::Malformed("argon2 parameters"))?;
    let argon = Argon2::new(Argon2Alg::Argon2id, Version::V0x13, p);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    argon.hash_password_into(passphrase, salt, out.as_mut()).map_err(|_| CryptoError::Malformed("argon2 input"))?;
    SecretKey::from_slice(out.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_depend_on_purpose() {
        let root = SecretKey::from_slice(&[1; 32]).unwrap();
        let a = derive_key(&root, b"wrap");
        let b = derive_key(&root, b"check");
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose(), derive_key(&root, b"wrap").expose());
    }

    #[test]
    fn blind_index_is_keyed_and_domain_separated() {
        let k1 = SecretKey::from_slice(&[1; 32]).unwrap();
        let k2 = SecretKey::from_slice(&[2; 32]).unwrap();
        let a = blind_index(&k1, b"subject", b"alice@example.com");
        assert_eq!(a, blind_index(&k1, b"subject", b"alice@example.com"));
        assert_ne!(a, blind_index(&k2, b"subject", b"alice@example.com"));
        assert_ne!(a, blind_index(&k1, b"transcript", b"alice@example.com"));
    }

    #[test]
    fn passphrase_key_depends_on_salt() {
        let p = Argon2Params { memory_kib: 256, iterations: 1, parallelism: 1 };
        let a = key_from_passphrase(b"correct horse", b"salt-salt-salt-1", p).unwrap();
        let b = key_from_passphrase(b"correct horse", b"salt-salt-salt-2", p).unwrap();
        assert_ne!(a.expose(), b.expose());
    }
}
