//! Tenants: who may call, from where, with which key. The registry holds the state; the
//! authenticator turns a request's credentials and address into a [`Principal`].

mod apikey;
mod auth;
mod cidr;
mod lockout;
mod model;
mod operator;
mod registry;
mod source;

pub use apikey::{ApiKey, KeyHashParams, KeyId, region_of as region_of_key};
pub use auth::{AuthConfig, AuthError, Authenticator, Denied, Principal};
pub use cidr::{Cidr, CidrError, canonical as canonical_ip, parse_list};
pub use lockout::{Culprit, Lockout, LockoutConfig, Refusal, source_of};
pub use model::{ApiKeyInfo, Hold, RetentionPolicy, Tenant, TenantStatus};
pub use operator::OperatorToken;
pub use registry::{KeyOwner, RecordSink, Registry, check_hold_reason};

use crate::crypto::CryptoError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    #[error("tenant {0:?} not found")]
    NotFound(String),
    #[error("tenant {0:?} already exists")]
    AlreadyExists(String),
    #[error("tenant id {0:?} belonged to a deleted tenant; ids are not reused")]
    IdRetired(String),
    #[error("API key {0} not found for this tenant")]
    KeyNotFound(String),
    #[error("hold_id: no hold {0} on this tenant")]
    HoldNotFound(String),
    #[error("a tenant may have at most {0} live API keys; revoke one first")]
    TooManyKeys(usize),
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The record could not be anchored and stored (erasure ledger or store).
    #[error(transparent)]
    Vault(Box<crate::vault::VaultError>),
    #[error("a tenant registry record failed verification (tampered, or another root key)")]
    Corrupt,
    #[error("internal lock poisoned")]
    Poisoned,
}

impl TenancyError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        TenancyError::InvalidArgument { field, reason: reason.into() }
    }
}
