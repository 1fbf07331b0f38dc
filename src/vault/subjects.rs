//! Subject operations: crypto-shredding and status.

use super::layout::{self, Blind};
use super::model::{ShredReceipt, SubjectInfo, SubjectStatus, TenantId, Timestamp};
use super::receipts::Erased;
use super::records::{self, Garbage};
use super::{Vault, VaultError};
use crate::keys::{ErasureKind, KeyRef};
use crate::store::Batch;

impl Vault {
    /// Destroys the subject's data key: O(1) whatever the subject's data volume. Its
    /// tombstone is durable in the erasure ledger before the store deletes the key, so no
    /// later state of the data directory can serve the subject again. Its ciphertext is
    /// reclaimed in the background; stale copies of the wrapped key in old sled segments
    /// or backups become useless once the key-store epoch rotates.
    pub async fn shred_subject(&self, tenant: &TenantId, subject_id: &str) -> Result<ShredReceipt, VaultError> {
        let _writing = self.write_gate.read().await;
        self.limits.id("subject_id", subject_id)?;
        let now = self.clock.now();
        let (sb, shredded, erasure, done) = {
            // Held until the shred is applied, so a rotation cannot re-wrap this subject's
            // key under a new epoch unnoticed: the epoch recorded is the one to destroy.
            let _epoch = self.epoch_shared()?;
            let tkey = self.tenant_key(tenant, true)?.ok_or_else(|| VaultError::Internal("tenant key".into()))?;
            let (sb, _) = self.blinds(&tkey, Some(subject_id), None);
            let _held = self.locks.lock(tenant.as_str(), &[&sb]);
            self.refuse_if_held(tenant, &sb, None)?;
            let epoch = self.keys.current_epoch();
            let mut batch = Batch::default();
            let done = match self.queue_shred(tenant, &sb, now, &mut batch)? {
                Some((generation, shredded)) => {
                    let token = self.subject_token(tenant.as_str(), &sb, generation);
                    let tomb = self.tombstone(ErasureKind::Subject, tenant.as_str(), token, now);
                    let counter = self.apply_erasure(vec![tomb], batch)?;
                    self.cache.remove(&KeyRef::Subject { tenant: tenant.as_str().to_owned(), subject: sb, generation });
                    self.forget_subject_hints(None);
                    Some((shredded, counter, self.commit.ticket()))
                }
                None => None,
            };
            (sb, done.map(|d| d.0).unwrap_or(0), done.map(|(_, c, _)| (epoch, c)), done.map(|(_, c, t)| (c, t)))
        };
        if let Some((counter, ticket)) = done {
            self.erasure_durable(ticket, counter).await?;
        }
        let e = Erased {
            kind: ErasureKind::Subject,
            subject: &sb,
            transcript: None,
            at: now,
            transcripts_erased: shredded,
            done: erasure,
        };
        self.receipt(tenant, e)
    }

    /// Queues the shred of a live subject: its key goes, its records become garbage.
    /// Returns the generation destroyed and how many transcripts went with it; `None` if
    /// there is no live key (never written, or shredded already). The caller holds the
    /// subject's lock.
    pub(super) fn queue_shred(
        &self,
        tenant: &TenantId,
        sb: &Blind,
        now: Timestamp,
        batch: &mut Batch,
    ) -> Result<Option<(u32, u64)>, VaultError> {
        let Some(mut s) = self.read_subject(tenant, sb)?.filter(|s| s.active) else { return Ok(None) };
        let (generation, shredded) = (s.generation, s.transcript_count);
        batch.delete(layout::subject_key(tenant.as_str(), sb));
        self.queue_garbage(
            batch,
            &Garbage::SubjectGeneration { tenant: tenant.as_str().to_owned(), subject: *sb, generation },
        )?;
        s.active = false;
        s.transcript_count = 0;
        s.last_shredded_at = Some(now.micros());
        batch.put(layout::subject(tenant.as_str(), sb), records::encode(&s)?);
        self.mark_keys_discarded(batch);
        Ok(Some((generation, shredded)))
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
