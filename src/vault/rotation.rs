//! Key-store rotation: the step that makes a shred final against old copies of the data
//! directory. New epoch (durable) → re-wrap every surviving key (durable) → destroy the
//! old key-store keys. A crash anywhere leaves both epochs in the key directory, and
//! the next open finishes the job; the old key is never destroyed before its keys are
//! re-wrapped and synced.

use super::layout::{self, KeyOwner};
use super::model::RotationReport;
use super::records::{self, KeyRecord};
use super::{META_SHRED_EPOCH, Vault, VaultError, key_err};
use crate::crypto::{Aad, RecordKind};
use crate::keys::wrapped_epoch;
use crate::store::Durability;

const REWRAP_CHUNK: usize = 512;

impl Vault {
    /// Rotates the key-store key now. Blocking: run it off the async executor.
    pub fn rotate_key_store(&self) -> Result<RotationReport, VaultError> {
        let _one = self.rotation.lock().map_err(|_| VaultError::Internal("lock".into()))?;
        let new_epoch = {
            let _switch = self.epoch_guard.write().map_err(|_| VaultError::Internal("lock".into()))?;
            self.keys.add_epoch()?
        };
        tracing::info!(new_epoch, "key-store rotation started");
        self.finish_rotation(new_epoch)
    }

    /// True if a shred happened under the current epoch: until the next rotation, a copy
    /// of the data directory taken before that shred could still open the subject.
    pub fn rotation_due(&self) -> Result<bool, VaultError> {
        let Some(bytes) = self.store.get(&layout::meta(META_SHRED_EPOCH))? else { return Ok(false) };
        let shred_epoch = u64::from_be_bytes(bytes.as_slice().try_into().map_err(|_| VaultError::Corrupt("meta"))?);
        Ok(shred_epoch >= self.keys.current_epoch())
    }

    pub(super) fn resume_rotation(&self) -> Result<(), VaultError> {
        if self.keys.epochs().len() > 1 {
            let current = self.keys.current_epoch();
            tracing::warn!(epoch = current, "finishing a key-store rotation that was interrupted");
            self.finish_rotation(current)?;
        }
        Ok(())
    }

    fn finish_rotation(&self, new_epoch: u64) -> Result<RotationReport, VaultError> {
        let prefix = layout::keys_prefix();
        let mut after: Option<Vec<u8>> = None;
        let mut rewrapped = 0u64;
        loop {
            let page = self.store.scan(&prefix, after.as_deref(), REWRAP_CHUNK)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, value) in &page {
                let rec: KeyRecord = records::decode(value, "wrapped key")?;
                if wrapped_epoch(&rec.wrapped)? >= new_epoch {
                    continue;
                }
                let aad = || key_aad(key, rec.generation);
                let plain = self.keys.unwrap(&rec.wrapped, aad()?).map_err(key_err("wrapped key"))?;
                let fresh = KeyRecord { generation: rec.generation, wrapped: self.keys.wrap(aad()?, &plain)? };
                // Swap only if unchanged: a shred deleting this key meanwhile must win.
                if self.store.compare_and_swap(key, Some(value), Some(records::encode(&fresh)?))? {
                    rewrapped += 1;
                }
            }
        }
        self.store.sync(Durability::Fsync)?;
        let destroyed = self.keys.destroy_epochs_before(new_epoch)?;
        tracing::info!(new_epoch, ?destroyed, rewrapped, "key-store rotation complete");
        Ok(RotationReport { new_epoch, destroyed_epochs: destroyed, keys_rewrapped: rewrapped })
    }
}

/// The AAD a wrapped key was sealed with, rebuilt from where it is stored.
fn key_aad(key: &[u8], generation: u32) -> Result<Aad, VaultError> {
    match layout::parse_key_owner(key) {
        Some(KeyOwner::Tenant(t)) => Ok(Aad::new(RecordKind::TenantKey).bytes(t.as_bytes())),
        Some(KeyOwner::Subject(t, s)) => Ok(Vault::subject_key_aad(&t, &s, generation)),
        None => Err(VaultError::Corrupt("wrapped key location")),
    }
}
