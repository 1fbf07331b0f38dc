//! API keys: `cvk_<region>_<key id>_<secret>`. The region and key id are public (the
//! region routes the call to its shard, the id names the key in lists and the audit
//! trail); the 256-bit secret is shown once and stored only as an argon2id hash. Keys
//! issued before regions (`cvk_<key id>_<secret>`) still verify in the region their
//! tenant's data directory became.

use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, random_bytes};

const PREFIX: &str = "cvk_";
const KEY_ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;

/// The public half of an API key: 16 hex characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct KeyId(String);

impl KeyId {
    pub fn parse(s: &str) -> Option<KeyId> {
        (s.len() == KEY_ID_HEX && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then(|| KeyId(s.into()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A whole API key as handed to a client once. Zeroized on drop, redacted in `Debug`.
pub struct ApiKey(Zeroizing<String>);

impl ApiKey {
    /// The text to give to the client; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Why a presented key is not even worth checking.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed API key: expected cvk_<region>_<16 hex key id>_<64 hex secret>")]
pub struct Malformed;

/// The region a presented key names, if it has the shape of a key that names one and the
/// name is a region name: what the router and a node route by before anything is verified.
pub fn region_of(token: &str) -> Option<&str> {
    let mut parts = token.strip_prefix(PREFIX)?.split('_');
    let (region, _id, _secret) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none() && crate::region::check_name(region).is_ok()).then_some(region)
}

/// Splits a presented key into its id and secret, checking only the shape.
pub fn parse(token: &str) -> Result<(KeyId, &str), Malformed> {
    let mut rest = token.strip_prefix(PREFIX).ok_or(Malformed)?;
    if let Some(region) = region_of(token) {
        rest = &rest[region.len() + 1..];
    }
    let (id, secret) = rest.split_once('_').ok_or(Malformed)?;
    let id = KeyId::parse(id).ok_or(Malformed)?;
    if secret.len() != SECRET_HEX || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Malformed);
    }
    Ok((id, secret))
}

/// argon2id cost of API key hashes; recorded in each hash, so changing it affects only new keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyHashParams {
    pub memory_kib: u32,
    pub iterations: u32,
}

impl Default for KeyHashParams {
    /// OWASP's argon2id minimum: the secrets are 256-bit random, so the hash guards a
    /// stolen database, not guessable passwords; verification results are cached.
    fn default() -> Self {
        KeyHashParams { memory_kib: 19 * 1024, iterations: 2 }
    }
}

/// A fresh key: its id, the whole key for the client, and the hash to store.
pub fn generate(params: KeyHashParams, region: &str) -> Result<(KeyId, ApiKey, String), CryptoError> {
    let id = KeyId(hex::encode(random_bytes::<8>()?));
    let secret = Zeroizing::new(hex::encode(random_bytes::<32>()?));
    let salt_bytes: [u8; 16] = random_bytes()?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|_| CryptoError::Malformed("argon2 salt"))?;
    let p = Params::new(params.memory_kib, params.iterations, 1, None)
        .map_err(|_| CryptoError::Malformed("argon2 parameters"))?;
    let hash = Argon2::new(Algorithm::Argon2id, Version::V0x13, p)
        .hash_password(secret.as_bytes(), &salt)
        .map_err(|_| CryptoError::Malformed("argon2 input"))?
        .to_string();
    let key = ApiKey(Zeroizing::new(format!("{PREFIX}{region}_{id}_{}", secret.as_str())));
    Ok((id, key, hash))
}

/// Checks a secret against a stored argon2id hash, with the parameters recorded in it.
/// Slow on purpose: callers cap how many run at once. `memory` is argon2's working
/// memory, reused from call to call: allocating ~19 MiB per check grows the heap of
/// every thread that ever verifies, and it stays grown.
pub fn verify(secret: &str, stored_hash: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(h) = PasswordHash::new(stored_hash) else { return false };
    if h.algorithm != argon2::ARGON2ID_IDENT {
        return false;
    }
    let (Ok(params), Some(salt), Some(expected)) = (Params::try_from(&h), h.salt, h.hash) else { return false };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else { return false };
    let version = h.version.and_then(|v| Version::try_from(v).ok()).unwrap_or(Version::V0x13);
    let mut out = Zeroizing::new(vec![0u8; expected.len()]);
    memory.resize(params.block_count(), Block::default());
    let argon = Argon2::new(Algorithm::Argon2id, version, params);
    if argon.hash_password_into_with_memory(secret.as_bytes(), salt, &mut out, &mut memory[..]).is_err() {
        return false;
    }
    out.ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> KeyHashParams {
        KeyHashParams { memory_kib: 64, iterations: 1 }
    }

    #[test]
    fn a_generated_key_verifies_and_a_changed_secret_does_not() {
        let (id, key, hash) = generate(cheap(), "eu").unwrap();
        assert!(key.expose().starts_with(&format!("cvk_eu_{id}_")));
        assert_eq!(region_of(key.expose()), Some("eu"));
        let (parsed_id, secret) = parse(key.expose()).unwrap();
        assert_eq!(parsed_id, id);
        assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{hash}");
        assert!(!hash.contains(secret));
        let mut mem = Vec::new();
        assert!(verify(secret, &hash, &mut mem));
        let mut other = secret.to_owned();
        other.replace_range(0..1, if secret.starts_with('0') { "1" } else { "0" });
        assert!(!verify(&other, &hash, &mut mem));
        assert!(!verify(secret, "not a hash", &mut mem));
        assert!(!verify(secret, &hash.replace("argon2id", "argon2i"), &mut mem));
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
    }

    #[test]
    fn malformed_keys_are_told_apart_from_wrong_ones() {
        let good = format!("cvk_{}_{}", "0123456789abcdef", "a".repeat(64));
        assert!(parse(&good).is_ok());
        assert_eq!(region_of(&good), None, "a key from before regions names none");
        let regional = format!("cvk_us_{}_{}", "0123456789abcdef", "a".repeat(64));
        assert_eq!(parse(&regional).map(|(id, _)| id), parse(&good).map(|(id, _)| id));
        assert_eq!(region_of(&format!("{regional}_x")), None);
        assert_eq!(parse(&regional.replace("cvk_us_", "cvk_US_")), Err(Malformed), "not a region name");
        for bad in [
            "",
            "Bearer x",
            &good[1..],
            &good.replace("cvk_", "cvx_"),
            &format!("cvk_{}_{}", "0123456789ABCDEF", "a".repeat(64)),
            &format!("cvk_{}_{}", "0123456789abcdef", "a".repeat(63)),
            &format!("cvk_{}_{}", "0123456789abcdef", "g".repeat(64)),
        ] {
            assert_eq!(parse(bad), Err(Malformed), "{bad:?}");
        }
    }
}
