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

/// How long data is kept: stored here, enforced by the retention worker (`retention`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Purge a transcript this long after it was closed; 0 keeps it until deleted.
    pub purge_after_close_secs: u64,
    /// Close a live transcript with no new message for this long; 0 never does.
    pub close_inactive_after_secs: u64,
    /// Purge any transcript this long after it started, closed or not; 0: no limit.
    pub max_age_secs: u64,
    /// Purge a transcript as soon as it is closed (at the next retention run).
    pub purge_on_close: bool,
}

/// The longest duration a policy may name: a century, past any retention law.
pub const MAX_RETENTION_SECS: u64 = 100 * 365 * 24 * 3600;

impl RetentionPolicy {
    /// Refuses absurd durations and contradictions, naming the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, v) in [
            ("retention.purge_after_close_seconds", self.purge_after_close_secs),
            ("retention.close_inactive_after_seconds", self.close_inactive_after_secs),
            ("retention.max_age_seconds", self.max_age_secs),
        ] {
            if v > MAX_RETENTION_SECS {
                return Err((field, format!("{v} s is more than a century ({MAX_RETENTION_SECS} s); 0 means never")));
            }
        }
        if self.purge_on_close && self.purge_after_close_secs > 0 {
            return Err((
                "retention.purge_on_close",
                "contradicts purge_after_close_seconds; set one of them".to_owned(),
            ));
        }
        Ok(())
    }

    /// Whether the policy ever purges or closes anything.
    pub fn is_active(&self) -> bool {
        self.purge_after_close_secs > 0
            || self.close_inactive_after_secs > 0
            || self.max_age_secs > 0
            || self.purge_on_close
    }
}

/// The policy as records of format 1 hold it.
#[derive(Clone, Copy, Deserialize)]
pub(super) struct RetentionPolicyV1 {
    pub purge_after_close_secs: u64,
    pub close_inactive_after_secs: u64,
}

/// A legal hold on (part of) a tenant's data: nothing it covers is erased until released.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Hold {
    pub id: String,
    pub scope: crate::vault::HoldScope,
    /// Why, in the operator's words (a case reference, say): shown back, never logged.
    pub reason: String,
    pub set_at: i64,
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
    pub holds: Vec<Hold>,
}

/// The stored form: plain types only, versioned by the enclosing envelope (format 2).
#[derive(Serialize, Deserialize)]
pub(super) struct TenantRecord {
    pub id: String,
    pub display_name: String,
    pub status: TenantStatus,
    pub created_at: i64,
    pub allowlist: Vec<String>,
    pub retention: RetentionPolicy,
    pub keys: Vec<ApiKeyRecord>,
    pub holds: Vec<Hold>,
}

/// Format 1, before holds and the longer policy.
#[derive(Deserialize)]
pub(super) struct TenantRecordV1 {
    pub id: String,
    pub display_name: String,
    pub status: TenantStatus,
    pub created_at: i64,
    pub allowlist: Vec<String>,
    pub retention: RetentionPolicyV1,
    pub keys: Vec<ApiKeyRecord>,
}

impl From<TenantRecordV1> for TenantRecord {
    fn from(r: TenantRecordV1) -> Self {
        TenantRecord {
            id: r.id,
            display_name: r.display_name,
            status: r.status,
            created_at: r.created_at,
            allowlist: r.allowlist,
            retention: RetentionPolicy {
                purge_after_close_secs: r.retention.purge_after_close_secs,
                close_inactive_after_secs: r.retention.close_inactive_after_secs,
                ..RetentionPolicy::default()
            },
            keys: r.keys,
            holds: Vec::new(),
        }
    }
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
            holds: t.holds.clone(),
        }
    }
}
