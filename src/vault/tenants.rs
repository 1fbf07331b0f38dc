//! Erasing a whole tenant: every key it has, so all its data is shredded at once.

use super::layout;
use super::model::TenantId;
use super::records::Garbage;
use super::{Vault, VaultError};
use crate::keys::{ErasureKind, KeyRef};
use crate::store::Batch;

/// What erasing a tenant destroyed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantErasure {
    pub subjects_shredded: u64,
    /// The key-store epoch a rotation must pass for the erasure to hold against old copies.
    pub key_epoch: u64,
}

impl Vault {
    /// Destroys the tenant's blind-index key and every subject key, O(subjects), and
    /// queues its ciphertext for reclaim. The tenant can never write again in this
    /// process; the registry keeps it from doing so after a restart.
    pub async fn erase_tenant(&self, tenant: &TenantId) -> Result<TenantErasure, VaultError> {
        let _writing = self.write_gate.read().await;
        {
            // A hold being set waits for this, or this sees it.
            let _all = self.locks.lock_all();
            self.refuse_if_tenant_held(tenant)?;
            let _init = self.tenant_key_init.lock().map_err(|_| VaultError::Internal("tenant key lock".into()))?;
            self.closed_tenants
                .write()
                .map_err(|_| VaultError::Internal("closed tenants lock".into()))?
                .insert(tenant.as_str().to_owned());
            self.cache.remove(&KeyRef::Tenant(tenant.as_str().to_owned()));
        }
        // Every writer (put, append, close, delete, shred) takes the epoch guard before the
        // tenant key and holds it until its batch is applied: once we get the guard
        // exclusively, the writers that saw the tenant open are done, and every later one
        // is refused. Nothing more is written under this tenant.
        drop(self.epoch_guard.write().map_err(|_| VaultError::Internal("epoch lock poisoned".into()))?);
        self.cache.remove_tenant(tenant.as_str());
        self.forget_subject_hints(None);
        let (subjects, epoch, counter) = self.erase_tenant_keys(tenant)?;
        self.cache.remove_tenant(tenant.as_str());
        let ticket = self.commit.ticket();
        self.erasure_durable(ticket, counter).await?;
        Ok(TenantErasure { subjects_shredded: subjects, key_epoch: epoch })
    }

    /// Deletes every key of the tenant, the first batch through the erasure ledger.
    /// Returns the subject keys destroyed, the epoch to destroy, and the ledger entry.
    fn erase_tenant_keys(&self, tenant: &TenantId) -> Result<(u64, u64, u64), VaultError> {
        let mut subjects = 0u64;
        // The epoch guard is taken per page, so no writer waits behind a waiting rotation
        // for the whole erasure. A rotation that runs between pages deletes this tenant's
        // keys instead of carrying them into its new epoch (see `erased_tenants`), so the
        // tombstone's epoch stays the one to destroy.
        let epoch = self.keys.current_epoch();
        let mut counter = None;
        for prefix in [layout::subject_keys_prefix(tenant.as_str()), layout::transcript_keys_prefix(tenant.as_str())] {
            loop {
                let _epoch = self.epoch_shared()?;
                let page = self.store.scan(&prefix, None, 1000)?;
                if page.is_empty() && counter.is_some() {
                    break;
                }
                let mut b = Batch::default();
                if prefix == layout::subject_keys_prefix(tenant.as_str()) {
                    subjects += page.len() as u64;
                }
                for (k, _) in page {
                    b.delete(k);
                }
                self.mark_keys_discarded(&mut b);
                if counter.is_none() {
                    // The first batch carries the tombstone: once it is in the ledger, a
                    // crash or a rollback is finished by replaying the whole erasure.
                    b.delete(layout::tenant_key(tenant.as_str()));
                    self.queue_garbage(&mut b, &Garbage::Tenant { tenant: tenant.as_str().to_owned() })?;
                    let token = self.tenant_token(tenant.as_str());
                    let tomb = self.tombstone(ErasureKind::Tenant, tenant.as_str(), token, self.clock.now());
                    counter = Some(self.apply_erasure(vec![tomb], b)?);
                } else {
                    self.apply(b)?;
                }
            }
        }
        Ok((subjects, epoch, counter.ok_or_else(|| VaultError::Internal("no tombstone written".into()))?))
    }
}
