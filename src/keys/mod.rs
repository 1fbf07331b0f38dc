//! The key hierarchy below the root key: key-store keys in the key directory, and the
//! cache of unwrapped data keys. See SECURITY.md for the whole picture.

mod cache;
mod files;
mod keydir;
mod ledger;
mod receipts;
mod root;

use std::path::{Path, PathBuf};

pub use cache::{KeyCache, KeyRef};
pub use keydir::{FileKeyDir, KeyStore, OpenReport, wrapped_epoch};
/// Writes a small file atomically and durably (temp file 0600, fsync, rename, fsync).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    files::write_atomic(path, bytes)
}

pub use ledger::{AuditAnchor, AuditGap, ErasureKind, Ledger, LedgerError, LedgerState, Missing, Tombstone};
pub use receipts::{PUBLIC_FILE as RECEIPT_PUBLIC_FILE, ReceiptSigner, SignatureCheck, key_id_of, verify_signature};
pub use root::{PassphraseSalt, RootKey, RootKeySource, create_dev_secret, read_secret_file};

use crate::crypto::CryptoError;

/// Why a key operation failed. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The root key is not the one this key directory was created with.
    #[error("the root key does not match this key directory (key check value differs); refusing to start")]
    WrongRootKey,
    /// The root key could not be read or parsed.
    #[error("root key: {0}")]
    BadRootKey(String),
    /// A key was wrapped under an epoch whose key-store key has been destroyed.
    #[error("key-store epoch {0} has been destroyed")]
    EpochDestroyed(u64),
    /// A file in the key directory is malformed or does not belong here.
    #[error("key directory is corrupt: {0}")]
    Corrupt(String),
    /// The key directory was stamped with another region than the one configured.
    #[error("{dir} is the key directory of region {region:?}, not of {wanted:?}: keys never move between regions")]
    OtherRegion { dir: PathBuf, region: String, wanted: String },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A wrapped key failed to open.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A lock was poisoned by a panic elsewhere: a bug.
    #[error("internal lock poisoned")]
    Poisoned,
}

impl KeyError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        KeyError::Io { path: path.to_path_buf(), source }
    }
}
