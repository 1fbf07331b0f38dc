//! Key material as a type: zeroized on drop, redacted in `Debug`, never `Display`ed.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::CryptoError;

/// Length of every symmetric key chatvault uses (AES-256, ChaCha20, HMAC-SHA256).
pub const KEY_LEN: usize = 32;

/// A 256-bit secret key. Cloning is deliberately not offered: share it behind an `Arc`
/// so that exactly one copy exists to zeroize.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = SecretKey([0u8; KEY_LEN]);
        getrandom::fill(&mut key.0).map_err(|_| CryptoError::Rng)?;
        Ok(key)
    }

    /// Takes ownership of raw bytes; the caller's buffer is zeroized.
    pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
        let key = SecretKey(*bytes);
        bytes.zeroize();
        key
    }

    /// Copies from a slice, which must be exactly [`KEY_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let mut key = SecretKey([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return Err(CryptoError::Malformed("key length"));
        }
        key.0.copy_from_slice(bytes);
        Ok(key)
    }

    pub(crate) fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Fills a fixed-size array with CSPRNG output (nonces, salts, ids).
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|_| CryptoError::Rng)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_key_bytes() {
        let key = SecretKey::from_slice(&[0xAB; KEY_LEN]).unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn generated_keys_differ() {
        let a = SecretKey::generate().unwrap();
        let b = SecretKey::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn from_bytes_wipes_the_source_buffer() {
        let mut raw = [7u8; KEY_LEN];
        let key = SecretKey::from_bytes(&mut raw);
        assert_eq!(raw, [0u8; KEY_LEN]);
        assert_eq!(key.expose(), &[7u8; KEY_LEN]);
    }
}
