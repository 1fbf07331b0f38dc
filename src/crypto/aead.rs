//! The one ciphertext format chatvault writes: a self-describing envelope.
//!
//! `[version=1][algorithm][nonce: 12][ciphertext][tag: 16]` — 30 bytes of overhead.
//! The algorithm travels with every record so a store written under one default
//! can be read after the default changes. Nonces are 96 random bits per
//! encryption; keys are per transcript, so no key comes near the 2^32-message
//! bound of random GCM nonces.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{CryptoError, SecretKey, random_bytes};

/// Before regions: the AAD is the record's own.
pub const ENVELOPE_V1: u8 = 1;
/// The AAD also names the region the record belongs to ([`super::Binding`]).
pub const ENVELOPE_V2: u8 = 2;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 2 + NONCE_LEN;

/// Bytes an envelope adds to its plaintext.
pub const ENVELOPE_OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// The AEAD algorithms chatvault can write; both can always be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Algorithm {
    /// AES-256-GCM: the default, several times faster than ChaCha20-Poly1305 on CPUs with AES-NI.
    #[default]
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305: for CPUs without AES instructions.
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "aes-256-gcm" => Ok(Algorithm::Aes256Gcm),
            "chacha20-poly1305" => Ok(Algorithm::ChaCha20Poly1305),
            other => Err(format!("unknown cipher {other:?}: expected aes-256-gcm or chacha20-poly1305")),
        }
    }
}

impl Algorithm {
    fn id(self) -> u8 {
        match self {
            Algorithm::Aes256Gcm => 1,
            Algorithm::ChaCha20Poly1305 => 2,
        }
    }

    fn from_id(id: u8) -> Result<Self, CryptoError> {
        match id {
            1 => Ok(Algorithm::Aes256Gcm),
            2 => Ok(Algorithm::ChaCha20Poly1305),
            other => Err(CryptoError::UnknownAlgorithm(other)),
        }
    }
}

/// Encrypts `plaintext` under `key`, binding it to `aad`, as a v1 envelope: what was
/// written before regions, kept for tests of reading it.
#[cfg(test)]
pub fn seal(alg: Algorithm, key: &SecretKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    seal_as(ENVELOPE_V1, alg, key, aad, plaintext)
}

/// [`seal`], stamping the envelope with `version`: which AAD scheme `aad` follows.
pub(super) fn seal_as(
    version: u8,
    alg: Algorithm,
    key: &SecretKey,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let nonce: [u8; NONCE_LEN] = random_bytes()?;
    let mut out = Vec::with_capacity(plaintext.len() + ENVELOPE_OVERHEAD);
    out.push(version);
    out.push(alg.id());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let body = &mut out[HEADER_LEN..];
    let tag = match alg {
        Algorithm::Aes256Gcm => {
            cipher::<Aes256Gcm>(key)?.encrypt_inout_detached(&nonce.into(), aad, body.into()).map(<[u8; TAG_LEN]>::from)
        }
        Algorithm::ChaCha20Poly1305 => cipher::<ChaCha20Poly1305>(key)?
            .encrypt_inout_detached(&nonce.into(), aad, body.into())
            .map(<[u8; TAG_LEN]>::from),
    }
    .map_err(|_| CryptoError::Malformed("plaintext too long"))?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Decrypts an envelope made by [`seal`]; fails if the key, the AAD or any byte differs.
pub fn open(key: &SecretKey, aad: &[u8], envelope: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if envelope.len() < ENVELOPE_OVERHEAD {
        return Err(CryptoError::Malformed("envelope too short"));
    }
    if !matches!(envelope[0], ENVELOPE_V1 | ENVELOPE_V2) {
        return Err(CryptoError::UnknownVersion(envelope[0]));
    }
    let alg = Algorithm::from_id(envelope[1])?;
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&envelope[2..HEADER_LEN]);
    let tag_at = envelope.len() - TAG_LEN;
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&envelope[tag_at..]);
    let mut body = Zeroizing::new(envelope[HEADER_LEN..tag_at].to_vec());
    let buf: &mut [u8] = body.as_mut_slice();
    let result = match alg {
        Algorithm::Aes256Gcm => {
            cipher::<Aes256Gcm>(key)?.decrypt_inout_detached(&nonce.into(), aad, buf.into(), &tag.into())
        }
        Algorithm::ChaCha20Poly1305 => {
            cipher::<ChaCha20Poly1305>(key)?.decrypt_inout_detached(&nonce.into(), aad, buf.into(), &tag.into())
        }
    };
    result.map_err(|_| CryptoError::Authentication)?;
    Ok(body)
}

/// The version byte of an envelope: which AAD scheme it was sealed under.
pub(super) fn version_of(envelope: &[u8]) -> Result<u8, CryptoError> {
    envelope.first().copied().ok_or(CryptoError::Malformed("envelope too short"))
}

fn cipher<C: KeyInit>(key: &SecretKey) -> Result<C, CryptoError> {
    C::new_from_slice(key.expose()).map_err(|_| CryptoError::Malformed("key length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::generate().unwrap()
    }

    #[test]
    fn both_algorithms_round_trip_with_fixed_overhead() {
        for alg in [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305] {
            let k = key();
            let sealed = seal(alg, &k, b"aad", b"hello").unwrap();
            assert_eq!(sealed.len(), 5 + ENVELOPE_OVERHEAD);
            assert_eq!(&open(&k, b"aad", &sealed).unwrap()[..], b"hello");
        }
    }

    #[test]
    fn different_aad_fails_authentication() {
        let k = key();
        let sealed = seal(Algorithm::Aes256Gcm, &k, b"tenant-a", b"hello").unwrap();
        assert!(matches!(open(&k, b"tenant-b", &sealed), Err(CryptoError::Authentication)));
    }

    #[test]
    fn wrong_key_or_flipped_bit_fails_authentication() {
        let k = key();
        let mut sealed = seal(Algorithm::ChaCha20Poly1305, &k, b"", b"hello").unwrap();
        assert!(matches!(open(&key(), b"", &sealed), Err(CryptoError::Authentication)));
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(matches!(open(&k, b"", &sealed), Err(CryptoError::Authentication)));
    }

    #[test]
    fn nonces_are_fresh_per_encryption() {
        let k = key();
        let a = seal(Algorithm::Aes256Gcm, &k, b"", b"same").unwrap();
        let b = seal(Algorithm::Aes256Gcm, &k, b"", b"same").unwrap();
        assert_ne!(a[2..HEADER_LEN], b[2..HEADER_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn unknown_version_and_algorithm_are_reported() {
        let k = key();
        let mut sealed = seal(Algorithm::Aes256Gcm, &k, b"", b"x").unwrap();
        sealed[1] = 9;
        assert!(matches!(open(&k, b"", &sealed), Err(CryptoError::UnknownAlgorithm(9))));
        sealed[0] = 7;
        assert!(matches!(open(&k, b"", &sealed), Err(CryptoError::UnknownVersion(7))));
        assert!(matches!(open(&k, b"", &[1, 1]), Err(CryptoError::Malformed(_))));
    }
}
