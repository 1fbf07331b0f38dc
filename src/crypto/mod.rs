//! Cryptographic building blocks: secret keys, the AEAD envelope, AAD and key derivation.
//! Nothing here knows about tenants or storage.

mod aad;
mod aead;
mod kdf;
mod secret;

pub use aad::{Aad, Binding, RecordKind};
/// Raw envelopes without a region: only for what predates regions (and their tests).
/// Everything sealed now goes through [`Binding`].
#[cfg(test)]
pub(crate) use aead::seal;
pub use aead::{Algorithm, ENVELOPE_OVERHEAD};
pub use kdf::{Argon2Params, blind_index, derive_key, key_from_passphrase};
pub use secret::{KEY_LEN, SecretKey, random_bytes};

/// Why a cryptographic operation failed. Never carries key or plaintext bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// The ciphertext, key or AAD does not match: tampered, moved, or the wrong key.
    #[error("authentication failed: wrong key, or the record was altered or moved")]
    Authentication,
    /// A stored envelope names a format version this build does not know.
    #[error("unknown envelope version {0}")]
    UnknownVersion(u8),
    /// A stored envelope names an algorithm this build does not know.
    #[error("unknown AEAD algorithm id {0}")]
    UnknownAlgorithm(u8),
    /// Input of the wrong shape; the text says which part.
    #[error("malformed input: {0}")]
    Malformed(&'static str),
    /// The operating system's random source failed.
    #[error("the system random number generator failed")]
    Rng,
}
