//! What the registry keeps of a tenant. None of it is personal data; it is sealed at rest
//! anyway, so that nobody who can write the data directory can add a key or a network.

use serde::{Deserialize, Serialize};

use super::apikey::KeyId;
use super::cidr::Cidr;
use crate::vault::{TenantId, Timestamp};

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum TenantStatus {
    Active,
    /// Every API call is refused; data, keys and settings are kept.
    Suspended,
    /// Data shredded. The record stays as a tombstone, so the id is never reused while
    /// the old ciphertext may still be reclaimed under it.
    Deleted,
}

/// How long data is kept: stored here, enforced by the retention worker.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Purge a transcript this long after it was closed; 0 keeps it until deleted.
    pub purge_after_close_secs: u64,
    /// Close a live transcript with no new message for this long; 0 never does.
    pub close_inactive_after_secs: u64,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: KeyId,
    /// argon2id PHC string, parameters included.
    pub hash: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// The hash stays out of logs: it is what an offline guess would be checked against.
impl std::fmt::Debug for ApiKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyRecord")
            .field("id", &self.id)
            .field("created_at", &self.created_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

impl ApiKeyRecord {
    pub fn is_live(&self) -> bool {
        self.revoked_at.is_none()
    }
}

/// Public facts of a key: what `ListApiKeys` shows (never the hash).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ApiKeyInfo {
    pub id: KeyId,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

impl From<&ApiKeyRecord> for ApiKeyInfo {
    fn from(r: &ApiKeyRecord) -> Self {
        ApiKeyInfo {
            id: r.id.clone(),
            created_at: Timestamp::from_micros(r.created_at).unwrap_or(Timestamp::UNIX_EPOCH),
            revoked_at: r.revoked_at.and_then(Timestamp::from_micros),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Tenant {
    pub id: TenantId,
    pub display_name: String,
    pub status: TenantStatus,
    pub created_at: Timestamp,
    pub allowlist: Vec<Cidr>,
    pub retention: RetentionPolicy,
    pub keys: Vec<ApiKeyRecord>,
}

/// The stored form: plain types only, versioned by the enclosing envelope.
#[derive(Serialize, Deserialize)]
pub(super) struct TenantRecord {
    pub id: String,
    pub display_name: String,
    pub status: TenantStatus,
    pub created_at: i64,
    pub allowlist: Vec<String>,
    pub retention: RetentionPolicy,
    pub keys: Vec<ApiKeyRecord>,
}

impl From<&Tenant> for TenantRecord {
    fn from(t: &Tenant) -> Self {
        TenantRecord {
            id: t.id.as_str().to_owned(),
            display_name: t.display_name.clone(),
            status: t.status,
            created_at: t.created_at.micros(),
            allowlist: t.allowlist.iter().map(Cidr::to_string).collect(),
            retention: t.retention,
            keys: t.keys.clone(),
        }
    }
}
