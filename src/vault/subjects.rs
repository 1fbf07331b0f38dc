//! Subject operations: crypto-shredding and status.

use super::layout;
use super::model::{ShredReceipt, SubjectInfo, SubjectStatus, TenantId, Timestamp};
use super::records::{self, Garbage};
use super::{META_SHRED_EPOCH, Vault, VaultError};
use crate::keys::KeyRef;
use crate::store::Batch;

impl Vault {
    /// Destroys the subject's data key: O(1) whatever the subject's data volume. Its
    /// ciphertext is reclaimed in the background; stale copies of the wrapped key in old
    /// sled segments or backups become useless once the key-store epoch rotates.
    pub async fn shred_subject(&self, tenant: &TenantId, subject_id: &str) -> Result<ShredReceipt, VaultError> {
        self.limits.id("subject_id", subject_id)?;
        let now = self.clock.now();
        let (sb, shredded, epoch, ticket) = {
            // Held until the shred is applied, so a rotation cannot re-wrap this subject's
            // key under a new epoch unnoticed: the epoch recorded is the one to destroy.
            let _epoch = self.epoch_shared()?;
            let tkey = self.tenant_key(tenant, true)?.ok_or_else(|| VaultError::Internal("tenant key".into()))?;
            let (sb, _) = self.blinds(&tkey, Some(subject_id), None);
            let _held = self.locks.lock(tenant.as_str(), &[&sb]);
            let epoch = self.keys.current_epoch();
            let mut shredded = 0;
            let mut batch = Batch::default();
            let mut evict = None;
            if let Some(mut s) = self.read_subject(tenant, &sb)?
                && s.active
            {
                evict = Some(s.generation);
                shredded = s.transcript_count;
                batch.delete(layout::subject_key(tenant.as_str(), &sb));
                self.queue_garbage(
                    &mut batch,
                    &Garbage::SubjectGeneration {
                        tenant: tenant.as_str().to_owned(),
                        subject: sb,
                        generation: s.generation,
                    },
                )?;
                s.active = false;
                s.transcript_count = 0;
                s.last_shredded_at = Some(now.micros());
                batch.put(layout::subject(tenant.as_str(), &sb), records::encode(&s)?);
                batch.put(layout::meta(META_SHRED_EPOCH), epoch.to_be_bytes().to_vec());
            }
            if !batch.is_empty() {
                self.apply(batch)?;
            }
            if let Some(generation) = evict {
                self.cache.remove(&KeyRef::Subject { tenant: tenant.as_str().to_owned(), subject: sb, generation });
                self.forget_subject_hints(None);
            }
            (sb, shredded, epoch, self.commit.ticket())
        };
        self.durable(ticket).await?;
        Ok(ShredReceipt {
            subject_blind_id: hex::encode(sb),
            shredded_at: now,
            transcripts_shredded: shredded,
            key_epoch: epoch,
        })
    }

    pub fn get_subject(&self, tenant: &TenantId, subject_id: &str) -> Result<SubjectInfo, VaultError> {
        self.limits.id("subject_id", subject_id)?;
        let unknown = |blind: String| SubjectInfo {
            subject_blind_id: blind,
            status: SubjectStatus::Unknown,
            transcript_count: 0,
            last_shredded_at: None,
        };
        let Some(tkey) = self.tenant_key(tenant, false)? else { return Ok(unknown(String::new())) };
        let (sb, _) = self.blinds(&tkey, Some(subject_id), None);
        let blind = hex::encode(sb);
        let Some(s) = self.read_subject(tenant, &sb)? else { return Ok(unknown(blind)) };
        Ok(SubjectInfo {
            subject_blind_id: blind,
            status: if s.active { SubjectStatus::Active } else { SubjectStatus::Shredded },
            transcript_count: s.transcript_count,
            last_shredded_at: s.last_shredded_at.and_then(Timestamp::from_micros),
        })
    }
}
