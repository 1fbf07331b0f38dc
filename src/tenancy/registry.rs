//! The tenant registry: every tenant's settings and API key hashes, held in memory for
//! the request path and written through to the store, sealed under a root-derived key.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use super::TenancyError;
use super::apikey::{self, ApiKey, KeyHashParams, KeyId};
use super::cidr::Cidr;
use super::model::{
    ApiKeyInfo, ApiKeyRecord, Hold, RetentionPolicy, Tenant, TenantRecord, TenantRecordV1, TenantStatus,
};
use crate::crypto::{self, Aad, Algorithm, Binding, RecordKind, SecretKey};
use crate::store::{KvStore, space};
use crate::vault::{Blind, HoldCheck, HoldScope};
use crate::vault::{TenantId, Timestamp};

const RECORD_V1: u8 = 1;
const RECORD_V2: u8 = 2;
/// Holds per tenant at once: a legal department's open matters, not a data store.
pub const MAX_HOLDS: usize = 1000;
/// Longest hold reason.
const MAX_REASON: usize = 500;
/// Longest display name: a business name, not an essay.
const MAX_NAME: usize = 200;
/// Networks per tenant: enough for any real deployment, small enough to check per request.
pub const MAX_ALLOWLIST: usize = 256;
/// Live keys per tenant: rotation needs two; a handful of backends may each have one.
pub const MAX_LIVE_KEYS: usize = 16;

/// A key and the tenant it belongs to, as the request path needs them: a shared
/// pointer and an index, so a request copies no hash.
#[derive(Clone, Debug)]
pub struct KeyOwner {
    pub tenant: Arc<Tenant>,
    index: usize,
}

impl KeyOwner {
    pub fn key(&self) -> &ApiKeyRecord {
        &self.tenant.keys[self.index]
    }
}

/// Where the registry's records are written: a store that anchors each one in the
/// erasure ledger first (the vault), so that a rolled-back data directory cannot bring
/// back a revoked key, a deleted tenant or a lifted suspension unnoticed.
pub trait RecordSink: Send + Sync {
    /// Stores `value` at `key` durably, anchored.
    fn put_anchored(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), TenancyError>;
}

impl RecordSink for crate::vault::Vault {
    fn put_anchored(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), TenancyError> {
        self.store_anchored(key, value).map_err(|e| TenancyError::Vault(Box::new(e)))
    }
}

pub struct Registry {
    store: Arc<dyn KvStore>,
    sink: Arc<dyn RecordSink>,
    seal_key: SecretKey,
    /// The region's sealing; its name also leads the API keys issued here.
    binding: Binding,
    alg: Algorithm,
    state: RwLock<State>,
    /// Serialises read-modify-write of records so two admin calls never lose one's change.
    write: Mutex<()>,
}

#[derive(Default)]
struct State {
    tenants: BTreeMap<String, Arc<Tenant>>,
    key_owner: HashMap<KeyId, String>,
}

impl State {
    fn install(&mut self, t: Arc<Tenant>) {
        for k in &t.keys {
            self.key_owner.insert(k.id.clone(), t.id.as_str().to_owned());
        }
        self.tenants.insert(t.id.as_str().to_owned(), t);
    }
}

fn slot(tenant: &str) -> Vec<u8> {
    let mut k = vec![space::TENANCY, tenant.len() as u8];
    k.extend_from_slice(tenant.as_bytes());
    k
}

fn aad(tenant: &str) -> Aad {
    Aad::new(RecordKind::TenantRecord).bytes(tenant.as_bytes())
}

impl Registry {
    /// Loads every tenant. A record that fails to open (tampered, or sealed under
    /// another root key) stops the start: a silently missing tenant would be worse.
    pub fn open(
        store: Arc<dyn KvStore>,
        sink: Arc<dyn RecordSink>,
        seal_key: SecretKey,
        alg: Algorithm,
        binding: Binding,
    ) -> Result<Self, TenancyError> {
        let reg = Registry {
            store,
            sink,
            seal_key,
            binding,
            alg,
            state: RwLock::new(State::default()),
            write: Mutex::new(()),
        };
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = reg.store.scan(&[space::TENANCY], after.as_deref(), 256)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            let mut state = reg.state.write().map_err(|_| TenancyError::Poisoned)?;
            for (k, v) in &page {
                let name = k.get(2..).and_then(|b| std::str::from_utf8(b).ok()).ok_or(TenancyError::Corrupt)?;
                state.install(Arc::new(reg.unseal(name, v)?));
            }
        }
        Ok(reg)
    }

    fn unseal(&self, name: &str, bytes: &[u8]) -> Result<Tenant, TenancyError> {
        let plain = self.binding.open(&self.seal_key, &aad(name), bytes).map_err(|_| TenancyError::Corrupt)?;
        let rec: TenantRecord = match plain.split_first() {
            Some((&RECORD_V2, body)) => postcard::from_bytes(body).map_err(|_| TenancyError::Corrupt)?,
            Some((&RECORD_V1, body)) => {
                postcard::from_bytes::<TenantRecordV1>(body).map_err(|_| TenancyError::Corrupt)?.into()
            }
            _ => return Err(TenancyError::Corrupt),
        };
        if rec.id != name {
            return Err(TenancyError::Corrupt);
        }
        Ok(Tenant {
            id: TenantId::parse(&rec.id).map_err(|_| TenancyError::Corrupt)?,
            display_name: rec.display_name,
            status: rec.status,
            created_at: Timestamp::from_micros(rec.created_at).unwrap_or(Timestamp::UNIX_EPOCH),
            allowlist: super::cidr::parse_list(&rec.allowlist).map_err(|_| TenancyError::Corrupt)?,
            retention: rec.retention,
            keys: rec.keys,
            holds: rec.holds,
        })
    }

    fn persist(&self, t: &Tenant) -> Result<(), TenancyError> {
        let mut plain = vec![RECORD_V2];
        postcard::to_io(&TenantRecord::from(t), &mut plain).map_err(|_| TenancyError::Corrupt)?;
        let id = t.id.as_str();
        let sealed = self.binding.seal(self.alg, &self.seal_key, &aad(id), &plain)?;
        // Control-plane changes are rare and must not be lost: an issued key or a
        // revocation is durable (and anchored) before the operator hears "ok".
        self.sink.put_anchored(slot(id), sealed)
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, State>, TenancyError> {
        self.state.read().map_err(|_| TenancyError::Poisoned)
    }

    /// Applies `change` to a copy of the tenant, stores it, then publishes it.
    fn update<T>(
        &self,
        id: &TenantId,
        change: impl FnOnce(&mut Tenant) -> Result<T, TenancyError>,
    ) -> Result<(Arc<Tenant>, T), TenancyError> {
        let _w = self.write.lock().map_err(|_| TenancyError::Poisoned)?;
        let mut t = Tenant::clone(&*self.get(id)?);
        let out = change(&mut t)?;
        self.persist(&t)?;
        let t = Arc::new(t);
        self.state.write().map_err(|_| TenancyError::Poisoned)?.install(t.clone());
        Ok((t, out))
    }

    pub fn create(
        &self,
        id: TenantId,
        display_name: String,
        allowlist: Vec<Cidr>,
        retention: RetentionPolicy,
        now: Timestamp,
    ) -> Result<Arc<Tenant>, TenancyError> {
        check_name(&display_name)?;
        check_allowlist(&allowlist)?;
        check_retention(&retention)?;
        let _w = self.write.lock().map_err(|_| TenancyError::Poisoned)?;
        if let Some(old) = self.read()?.tenants.get(id.as_str()) {
            return Err(match old.status {
                TenantStatus::Deleted => TenancyError::IdRetired(id.as_str().into()),
                _ => TenancyError::AlreadyExists(id.as_str().into()),
            });
        }
        let t = Tenant {
            id,
            display_name,
            status: TenantStatus::Active,
            created_at: now,
            allowlist,
            retention,
            keys: Vec::new(),
            holds: Vec::new(),
        };
        self.persist(&t)?;
        let t = Arc::new(t);
        self.state.write().map_err(|_| TenancyError::Poisoned)?.install(t.clone());
        Ok(t)
    }

    /// A tenant that exists and is not deleted.
    pub fn get(&self, id: &TenantId) -> Result<Arc<Tenant>, TenancyError> {
        match self.read()?.tenants.get(id.as_str()) {
            Some(t) if t.status != TenantStatus::Deleted => Ok(t.clone()),
            _ => Err(TenancyError::NotFound(id.as_str().into())),
        }
    }

    /// The tenant's status, deleted ones included; `None` if the id was never used.
    pub fn status(&self, id: &TenantId) -> Result<Option<TenantStatus>, TenancyError> {
        Ok(self.read()?.tenants.get(id.as_str()).map(|t| t.status))
    }

    /// Every tenant not deleted, by id.
    pub fn list(&self) -> Result<Vec<Arc<Tenant>>, TenancyError> {
        Ok(self.read()?.tenants.values().filter(|t| t.status != TenantStatus::Deleted).cloned().collect())
    }

    pub fn set_suspended(&self, id: &TenantId, suspended: bool) -> Result<Arc<Tenant>, TenancyError> {
        Ok(self
            .update(id, |t| {
                t.status = if suspended { TenantStatus::Suspended } else { TenantStatus::Active };
                Ok(())
            })?
            .0)
    }

    /// Marks the tenant deleted and revokes its keys; the caller shreds its data.
    pub fn mark_deleted(&self, id: &TenantId, now: Timestamp) -> Result<(), TenancyError> {
        if self.status(id)? == Some(TenantStatus::Deleted) {
            return Ok(());
        }
        self.update(id, |t| {
            t.status = TenantStatus::Deleted;
            for k in t.keys.iter_mut().filter(|k| k.is_live()) {
                k.revoked_at = Some(now.micros());
            }
            t.allowlist.clear();
            Ok(())
        })?;
        Ok(())
    }

    /// Issues a new key. The argon2 hash is computed before any lock is taken.
    pub fn issue_key(
        &self,
        id: &TenantId,
        params: KeyHashParams,
        now: Timestamp,
    ) -> Result<(ApiKeyInfo, ApiKey), TenancyError> {
        self.get(id)?;
        let (key_id, key, hash) = apikey::generate(params, self.binding.region())?;
        let (_, info) = self.update(id, |t| {
            if t.keys.iter().filter(|k| k.is_live()).count() >= MAX_LIVE_KEYS {
                return Err(TenancyError::TooManyKeys(MAX_LIVE_KEYS));
            }
            let rec = ApiKeyRecord { id: key_id, hash, created_at: now.micros(), revoked_at: None };
            let info = ApiKeyInfo::from(&rec);
            t.keys.push(rec);
            Ok(info)
        })?;
        Ok((info, key))
    }

    /// Revokes a key at once; revoking it again is not an error (idempotent).
    pub fn revoke_key(&self, id: &TenantId, key_id: &KeyId, now: Timestamp) -> Result<ApiKeyInfo, TenancyError> {
        Ok(self
            .update(id, |t| {
                let k = t
                    .keys
                    .iter_mut()
                    .find(|k| &k.id == key_id)
                    .ok_or_else(|| TenancyError::KeyNotFound(key_id.as_str().into()))?;
                k.revoked_at.get_or_insert(now.micros());
                Ok(ApiKeyInfo::from(&*k))
            })?
            .1)
    }

    pub fn set_allowlist(&self, id: &TenantId, allowlist: Vec<Cidr>) -> Result<Arc<Tenant>, TenancyError> {
        check_allowlist(&allowlist)?;
        Ok(self
            .update(id, |t| {
                t.allowlist = allowlist;
                Ok(())
            })?
            .0)
    }

    pub fn set_retention(&self, id: &TenantId, retention: RetentionPolicy) -> Result<Arc<Tenant>, TenancyError> {
        check_retention(&retention)?;
        Ok(self
            .update(id, |t| {
                t.retention = retention;
                Ok(())
            })?
            .0)
    }

    /// Places a legal hold. `scope` names subjects and transcripts by blind id only. The
    /// caller holds the vault's erasure locks for what it covers while this runs.
    pub fn add_hold(
        &self,
        id: &TenantId,
        scope: HoldScope,
        reason: &str,
        now: Timestamp,
    ) -> Result<(Arc<Tenant>, Hold), TenancyError> {
        check_hold_reason(reason)?;
        let hold_id = format!("hold-{}", hex::encode(crypto::random_bytes::<8>()?));
        self.update(id, |t| {
            if t.holds.len() >= MAX_HOLDS {
                return Err(TenancyError::invalid("hold", format!("the tenant already has {MAX_HOLDS} holds")));
            }
            if let Some(same) = t.holds.iter().find(|h| h.scope == scope) {
                return Ok(same.clone()); // one hold per scope; setting it again is not an error
            }
            let hold = Hold { id: hold_id, scope, reason: reason.to_owned(), set_at: now.micros() };
            t.holds.push(hold.clone());
            Ok(hold)
        })
    }

    /// Releases a hold; what it covered is subject to retention and erasure again.
    pub fn release_hold(&self, id: &TenantId, hold_id: &str) -> Result<Hold, TenancyError> {
        Ok(self
            .update(id, |t| {
                let at = t
                    .holds
                    .iter()
                    .position(|h| h.id == hold_id)
                    .ok_or_else(|| TenancyError::HoldNotFound(hold_id.to_owned()))?;
                Ok(t.holds.remove(at))
            })?
            .1)
    }

    /// The key with this id and its tenant, deleted tenants included (their keys are revoked).
    pub fn key_owner(&self, key_id: &KeyId) -> Result<Option<KeyOwner>, TenancyError> {
        let state = self.read()?;
        let Some(tenant) = state.key_owner.get(key_id).and_then(|t| state.tenants.get(t)) else { return Ok(None) };
        let index = tenant.keys.iter().position(|k| &k.id == key_id);
        Ok(index.map(|index| KeyOwner { tenant: tenant.clone(), index }))
    }
}

fn check_name(name: &str) -> Result<(), TenancyError> {
    if name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(TenancyError::invalid(
            "display_name",
            format!("at most {MAX_NAME} characters, no control characters"),
        ));
    }
    Ok(())
}

/// A hold's reason: required, short, one line.
pub fn check_hold_reason(reason: &str) -> Result<(), TenancyError> {
    if reason.trim().is_empty() || reason.chars().count() > MAX_REASON || reason.chars().any(char::is_control) {
        return Err(TenancyError::invalid(
            "reason",
            format!("required: 1 to {MAX_REASON} characters, no control characters (a case reference, say)"),
        ));
    }
    Ok(())
}

fn check_retention(r: &RetentionPolicy) -> Result<(), TenancyError> {
    r.validate().map_err(|(field, why)| TenancyError::invalid(field, why))
}

impl HoldCheck for Registry {
    // A poisoned lock still holds the state: holds are read, never lost to a panic.
    fn hold_on(&self, tenant: &str, subject: &Blind, transcript: Option<&Blind>) -> Option<String> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let t = state.tenants.get(tenant)?;
        t.holds.iter().find(|h| crate::vault::hold_covers(&h.scope, subject, transcript)).map(|h| h.id.clone())
    }

    fn any_hold(&self, tenant: &str) -> Option<String> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let holds = &state.tenants.get(tenant)?.holds;
        // The tenant-wide hold first: it is the one a tenant deletion is about.
        let hold = holds.iter().find(|h| h.scope == HoldScope::Tenant).or(holds.first());
        hold.map(|h| h.id.clone())
    }
}

fn check_allowlist(list: &[Cidr]) -> Result<(), TenancyError> {
    if list.len() > MAX_ALLOWLIST {
        return Err(TenancyError::invalid("allowlist", format!("at most {MAX_ALLOWLIST} networks")));
    }
    Ok(())
}
