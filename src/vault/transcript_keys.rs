//! Transcript keys as records of their own. Each is wrapped twice: under its subject's
//! data key (so a shred destroys every transcript of the subject in O(1)) and then under
//! the epoch's key-store key (so that deleting the record is a crypto-shred: stale copies
//! left in sled's log, or in a copy of the data directory, die with the epoch at the next
//! rotation, which re-seals only the live ones).
//!
//! Versions before this kept the subject-wrapped key inside the body record. Those stay
//! readable; `migrate_transcript_keys` moves them out once, and gives each affected subject
//! a fresh data key, so the old copies (which only the old subject key opens) die too.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::layout::{self, Blind};
use super::records::{self, BodyRecord, Header, KeyRecord};
use super::seal::seal_err;
use super::{META_KEY_FORMAT, META_SHRED_EPOCH, TenantId, Vault, VaultError, key_err};
use crate::crypto::{Aad, RecordKind, SecretKey};
use crate::keys::KeyError;
use crate::store::{Batch, Durability};

/// The key format every new data directory has: transcript keys in their own records.
pub(super) const KEY_FORMAT_SEALED: &[u8] = b"transcript-keys-sealed";

/// Where a transcript key's outer seal belongs: rebuilt from its record's location.
pub(super) fn seal_aad(tenant: &str, transcript: &Blind, incarnation: u64) -> Aad {
    Aad::new(RecordKind::TranscriptKeySeal).bytes(tenant.as_bytes()).bytes(transcript).u64(incarnation)
}

impl Vault {
    /// Queues the record of a transcript key that `inner` holds wrapped under its
    /// subject's data key. The caller holds `epoch_guard` (shared) until it is applied.
    pub(super) fn put_transcript_key(
        &self,
        batch: &mut Batch,
        tenant: &str,
        tb: &Blind,
        incarnation: u64,
        generation: u32,
        inner: &[u8],
    ) -> Result<(), VaultError> {
        let wrapped = self.keys.seal(seal_aad(tenant, tb, incarnation), inner)?;
        batch
            .put(layout::transcript_key(tenant, tb, incarnation), records::encode(&KeyRecord { generation, wrapped })?);
        Ok(())
    }

    /// Queues the end of an incarnation's key: its record goes now; copies elsewhere die at
    /// the next rotation, which this makes due. Call [`Vault::forget_body`] once applied.
    pub(super) fn discard_transcript_key(&self, batch: &mut Batch, tenant: &str, tb: &Blind, incarnation: u64) {
        batch.delete(layout::transcript_key(tenant, tb, incarnation));
        self.mark_keys_discarded(batch);
    }

    /// Records that key material was discarded under the current epoch: a rotation is due.
    pub(super) fn mark_keys_discarded(&self, batch: &mut Batch) {
        batch.put(layout::meta(META_SHRED_EPOCH), self.keys.current_epoch().to_be_bytes().to_vec());
    }

    /// Drops a dead incarnation's cached body record (its subject-wrapped key with it).
    pub(super) fn forget_body(&self, tenant: &TenantId, tb: &Blind, incarnation: u64) {
        if let Ok(mut c) = self.bodies.lock() {
            c.pop(&(tenant.as_str().to_owned(), *tb, incarnation));
        }
    }

    /// Body records (wrapped transcript key and sealed body) of recent incarnations. A body
    /// is written once and never changed, and its key's inner wrapping neither (a rotation
    /// changes only the outer seal), so an entry is never stale; callers reach it only
    /// through a live header, and a delete or replace drops it.
    pub(super) fn body_record(&self, tenant: &TenantId, tb: &Blind, h: &Header) -> Result<Arc<BodyRecord>, VaultError> {
        let slot = (tenant.as_str().to_owned(), *tb, h.incarnation);
        if let Some(b) = self.bodies.lock().ok().and_then(|mut c| c.get(&slot).cloned()) {
            return Ok(b);
        }
        let bytes = self
            .store
            .get(&layout::body(tenant.as_str(), tb, h.incarnation))?
            .ok_or(VaultError::Corrupt("transcript body"))?;
        let mut body: BodyRecord = records::decode(&bytes, "transcript body")?;
        if body.wrapped_key.is_empty() {
            body.wrapped_key = self.inner_transcript_key(tenant.as_str(), tb, h.incarnation)?;
        }
        let body = Arc::new(body);
        if let Ok(mut c) = self.bodies.lock() {
            c.put(slot.clone(), body.clone());
        }
        // A delete (or replace) between our reads and the insert must not leave its key in
        // memory: it removes the body record in the batch that removes the key's.
        if self.store.get(&layout::body(tenant.as_str(), tb, h.incarnation))?.is_none() {
            self.forget_body(tenant, tb, h.incarnation);
            return Err(VaultError::NotFound("transcript"));
        }
        Ok(body)
    }

    /// Opens the outer seal of a transcript key record: what is left is wrapped under the
    /// subject's data key.
    fn inner_transcript_key(&self, tenant: &str, tb: &Blind, incarnation: u64) -> Result<Vec<u8>, VaultError> {
        let slot = layout::transcript_key(tenant, tb, incarnation);
        let read = || -> Result<KeyRecord, VaultError> {
            let bytes = self.store.get(&slot)?.ok_or(VaultError::Corrupt("transcript key"))?;
            records::decode(&bytes, "transcript key")
        };
        let aad = || seal_aad(tenant, tb, incarnation);
        let opened = match self.keys.open(&read()?.wrapped, aad()) {
            // A rotation re-sealed it and destroyed the epoch we read under: read again.
            Err(KeyError::EpochDestroyed(_)) => self.keys.open(&read()?.wrapped, aad()),
            other => other,
        };
        Ok(opened.map_err(key_err("transcript key"))?.to_vec())
    }

    /// Moves transcript keys kept inside body records by earlier versions into records of
    /// their own, once, before serving. Every live subject gets a fresh data key, its
    /// transcripts' keys re-wrapped under it, so that the old subject key (the only one that
    /// opens the copies in stale pages) dies at the next rotation. Each subject is one
    /// batch: a crash leaves it done or untouched, and the next open does the rest (a
    /// subject done twice just gets another key).
    pub(super) fn migrate_transcript_keys(&self) -> Result<(), VaultError> {
        let flag = layout::meta(META_KEY_FORMAT);
        if self.store.get(&flag)?.as_deref() == Some(KEY_FORMAT_SEALED) {
            return Ok(());
        }
        let subjects = self.live_subjects()?;
        if !subjects.is_empty() {
            tracing::info!(
                subjects = subjects.len(),
                "re-keying subjects and moving transcript keys out of body records (one time)"
            );
        }
        for (tenant, sb) in &subjects {
            self.rekey_subject(&TenantId::parse(tenant)?, sb)?;
        }
        let mut b = Batch::default();
        b.put(flag, KEY_FORMAT_SEALED.to_vec());
        self.store.apply(b)?;
        self.store.sync(Durability::Fsync)?;
        Ok(())
    }

    /// Every live subject. All of them are re-keyed, not only those with a live transcript
    /// whose key is still in its body: a subject whose transcripts were all deleted (or
    /// replaced) before the upgrade has stale body copies that its key still opens.
    fn live_subjects(&self) -> Result<BTreeSet<(String, Blind)>, VaultError> {
        let mut found = BTreeSet::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.store.scan(&layout::subjects_prefix(), after.as_deref(), 512)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, value) in &page {
                let subject: records::SubjectRecord = records::decode(value, "subject")?;
                let (tenant, sb) = layout::parse_subject(key).ok_or(VaultError::Corrupt("subject location"))?;
                if subject.active {
                    found.insert((tenant, sb));
                }
            }
        }
        Ok(found)
    }

    /// Gives a live subject a fresh data key and re-wraps its transcripts' keys under it,
    /// each into a record of its own; the old subject key is replaced in the same batch.
    fn rekey_subject(&self, tenant: &TenantId, sb: &Blind) -> Result<(), VaultError> {
        let _epoch = self.epoch_shared()?;
        let _held = self.locks.lock(tenant.as_str(), &[sb]);
        let Some(subj) = self.read_subject(tenant, sb)?.filter(|s| s.active) else { return Ok(()) };
        let old = match self.subject_key(tenant, sb, subj.generation) {
            Ok(k) => k,
            // Its key is gone (a tenant erased, its records not yet reclaimed): nothing to re-key.
            Err(VaultError::Erased(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let fresh = SecretKey::generate().map_err(seal_err)?;
        let mut batch = Batch::default();
        let prefix = layout::by_subject_prefix(tenant.as_str(), sb, subj.generation);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.store.scan(&prefix, after.as_deref(), 512)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, _) in &page {
                let tb = layout::trailing_blind(key).ok_or(VaultError::Corrupt("subject index"))?;
                let Some(h) = self.read_header(&layout::header(tenant.as_str(), &tb))? else { continue };
                if h.subject != *sb || h.generation != subj.generation {
                    continue;
                }
                let place = self.place(tenant, sb, &tb, h.incarnation);
                let mut body = Arc::unwrap_or_clone(self.body_record(tenant, &tb, &h)?);
                let tk = place.unwrap_transcript_key(&old, h.generation, &body.wrapped_key)?;
                let inner = place.wrap_transcript_key(self.alg, &fresh, h.generation, &tk)?;
                self.put_transcript_key(&mut batch, tenant.as_str(), &tb, h.incarnation, h.generation, &inner)?;
                body.wrapped_key = Vec::new();
                batch.put(layout::body(tenant.as_str(), &tb, h.incarnation), records::encode(&body)?);
            }
        }
        let aad = Self::subject_key_aad(tenant.as_str(), sb, subj.generation);
        let rec = KeyRecord { generation: subj.generation, wrapped: self.keys.wrap(aad, &fresh)? };
        batch.put(layout::subject_key(tenant.as_str(), sb), records::encode(&rec)?);
        self.mark_keys_discarded(&mut batch);
        self.store.apply(batch)?;
        self.forget_cached_keys(tenant, sb, subj.generation);
        Ok(())
    }
}
