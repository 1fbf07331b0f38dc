//! What retention does to the transcripts a time index says are due: closing idle ones,
//! and purging expired ones with the same crypto-shred as DeleteTranscript — many in one
//! batch and one erasure-ledger entry, so a purge of thousands pays one sync per batch.
//! Every transcript is re-read under its subject's lock: of two purgers that found the
//! same entry, one deletes it and counts it, the other finds it gone.

use std::collections::HashMap;

use super::layout::{self, Blind, TimeIndex};
use super::records::{self, Header};
use super::times::{self, Due};
use super::{TenantId, Vault, VaultError};
use crate::keys::ErasureKind;
use crate::store::Batch;

/// What one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Transcripts deleted (or closed).
    pub done: u64,
    /// Skipped because a legal hold covers them; they stay due.
    pub held: u64,
    /// Entries whose transcript was gone or had changed: dropped or left to its new entry.
    pub stale: u64,
}

impl Vault {
    /// The header `due` names, if it is still that incarnation and readable.
    fn due_header(&self, tenant: &TenantId, due: &Due) -> Result<Option<Header>, VaultError> {
        let h = self.read_header(&layout::header(tenant.as_str(), &due.transcript))?;
        Ok(h.filter(|h| h.incarnation == due.incarnation))
    }

    /// Queues the removal of an index entry whose transcript is gone or dead.
    fn drop_stale(&self, tenant: &TenantId, which: TimeIndex, due: &Due, batch: &mut Batch) -> Result<(), VaultError> {
        match self.due_header(tenant, due)? {
            // Dead (its subject shredded): every entry of it goes.
            Some(h) => times::reindex(batch, tenant.as_str(), &due.transcript, Some(&h), None),
            // Gone or replaced: the entry is the dead one's (a replacement has its own).
            None => {
                let key = layout::time_entry(which, tenant.as_str(), due.at, &due.transcript);
                if self.store.get(&key)?.as_deref() == Some(due.incarnation.to_be_bytes().as_slice()) {
                    batch.delete(key);
                }
            }
        }
        Ok(())
    }

    /// The subjects of `due`'s transcripts as their headers say now (to lock them).
    fn subjects_of(&self, tenant: &TenantId, due: &[Due]) -> Result<Vec<Blind>, VaultError> {
        let mut subjects = Vec::new();
        for d in due {
            if let Some(h) = self.due_header(tenant, d)? {
                subjects.push(h.subject);
            }
        }
        Ok(subjects)
    }

    /// Deletes the transcripts `due` names (found in index `which`): each a crypto-shred
    /// of its key, as DeleteTranscript, all under one erasure-ledger entry. Those a hold
    /// covers are skipped.
    pub async fn purge(&self, tenant: &TenantId, which: TimeIndex, due: &[Due]) -> Result<Swept, VaultError> {
        let _writing = self.write_gate.read().await;
        let now = self.clock.now();
        let mut swept = Swept::default();
        let (erased, applied) = {
            let _epoch = self.epoch_shared()?;
            let subjects = self.subjects_of(tenant, due)?;
            let _held = self.locks.lock(tenant.as_str(), &subjects.iter().collect::<Vec<_>>());
            let mut batch = Batch::default();
            let mut tombstones = Vec::new();
            let mut erased = Vec::new();
            let mut counts = HashMap::new();
            for d in due {
                let live = match self.due_header(tenant, d)? {
                    Some(h) if subjects.contains(&h.subject) && self.check_live(tenant, &h).is_ok() => h,
                    _ => {
                        self.drop_stale(tenant, which, d, &mut batch)?;
                        swept.stale += 1;
                        continue;
                    }
                };
                if self.hold_on(tenant, &live.subject, Some(&d.transcript)).is_some() {
                    swept.held += 1;
                    continue;
                }
                self.queue_delete_among(tenant, &d.transcript, &live, &mut batch, &mut counts)?;
                let token = self.transcript_token(tenant.as_str(), &d.transcript, live.incarnation);
                tombstones.push(self.tombstone(ErasureKind::Transcript, tenant.as_str(), token, now));
                erased.push((d.transcript, live));
            }
            swept.done = erased.len() as u64;
            let applied = if tombstones.is_empty() {
                if !batch.is_empty() {
                    self.apply(batch)?;
                }
                None
            } else {
                Some(self.apply_erasure(tombstones, batch)?)
            };
            (erased, applied.map(|counter| (self.commit.ticket(), counter)))
        };
        for (tb, h) in &erased {
            self.forget_body(tenant, tb, h.incarnation);
            self.forget_subject_hints(Some((tenant, tb)));
            self.set_count(tenant, tb, h, None);
        }
        if let Some((ticket, counter)) = applied {
            self.erasure_durable(ticket, counter).await?;
        }
        Ok(swept)
    }

    /// Closes the open transcripts `due` names (found idle in the activity index), with
    /// `ended_at` at `at` (µs; never before a transcript started).
    pub async fn close_idle(&self, tenant: &TenantId, due: &[Due], at: i64) -> Result<Swept, VaultError> {
        let _writing = self.write_gate.read().await;
        let mut swept = Swept::default();
        let ticket = {
            let _epoch = self.epoch_shared()?;
            let subjects = self.subjects_of(tenant, due)?;
            let _held = self.locks.lock(tenant.as_str(), &subjects.iter().collect::<Vec<_>>());
            let mut batch = Batch::default();
            for d in due {
                let mut h = match self.due_header(tenant, d)? {
                    Some(h)
                        if subjects.contains(&h.subject)
                            && h.ended_at.is_none()
                            && h.activity == Some(d.at)
                            && self.check_live(tenant, &h).is_ok() =>
                    {
                        h
                    }
                    // Written since (its entry moved on), closed since, or dead.
                    _ => {
                        self.drop_stale(tenant, TimeIndex::Active, d, &mut batch)?;
                        swept.stale += 1;
                        continue;
                    }
                };
                let before = h.clone();
                h.ended_at = Some(at.max(h.started_at));
                h.activity = None;
                times::reindex(&mut batch, tenant.as_str(), &d.transcript, Some(&before), Some(&h));
                batch.put(layout::header(tenant.as_str(), &d.transcript), records::encode_header(&h)?);
                swept.done += 1;
            }
            if batch.is_empty() {
                return Ok(swept);
            }
            self.apply(batch)?;
            self.commit.ticket()
        };
        self.durable(ticket).await?;
        Ok(swept)
    }
}
