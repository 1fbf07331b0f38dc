//! Vault errors: client mistakes apart from server faults, so the edge can map them.

use crate::keys::{KeyError, LedgerError};
use crate::store::StoreError;

/// Why a vault operation failed. Messages never hold personal data or key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// A request field is missing, malformed or over a limit.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// No such transcript (or no such one for this tenant: the same answer).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The subject was crypto-shredded; its data can never be read again. The text
    /// says what can no longer be read.
    #[error("{0}: the subject was erased (crypto-shredded)")]
    Erased(&'static str),
    /// The request is valid but the transcript's state forbids it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A legal hold (named) covers what was to be erased; nothing was.
    #[error("legal hold {0} covers this; it is kept until the hold is released")]
    Held(String),
    /// A concurrency check the client asked for failed; re-read and retry.
    #[error("{0}")]
    Aborted(String),
    /// A bound on work in progress was reached (the text names it); retry shortly.
    #[error("{0}")]
    Busy(String),
    /// A stored record failed authentication: tampered with, moved, or keyed wrongly.
    #[error("stored {0} failed authentication: altered, moved or keyed wrongly")]
    Integrity(&'static str),
    /// A stored record is malformed or of an unknown format.
    #[error("stored {0} is corrupt or of an unknown format")]
    Corrupt(&'static str),
    /// The data directory and the key directory do not belong together.
    #[error("{0}")]
    Mismatch(String),
    /// The data directory (or the key directory) is older than the erasure ledger says it
    /// must be: restored from a backup, or rolled back. The text says what and what to do.
    #[error("{0}")]
    Rollback(String),
    /// The erasure ledger on the key volume could not be read or written.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A bug: an invariant the vault relies on did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

impl VaultError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        VaultError::InvalidArgument { field: field.into(), reason: reason.into() }
    }
}
