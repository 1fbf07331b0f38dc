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

/// What a due entry's transcript is now, read under its subject's lock.
enum Found {
    /// Readable, the same incarnation: its header.
    Live(Header),
    /// The same incarnation, its subject shredded: its entries can all go.
    Dead(Header),
    /// Deleted or replaced since (or its subject lock was not taken: re-read next run).
    Gone,
}

impl Vault {
    /// The header `due` names, if it is still that incarnation.
    fn due_header(&self, tenant: &TenantId, due: &Due) -> Result<Option<Header>, VaultError> {
        let h = self.read_header(&layout::header(tenant.as_str(), &due.transcript))?;
        Ok(h.filter(|h| h.incarnation == due.incarnation))
    }

    /// What `due` names now, with `locked` the subjects whose locks are held. Errors other
    /// than "erased" are errors: a read that failed never passes for a dead transcript.
    fn find(&self, tenant: &TenantId, due: &Due, locked: &[Blind]) -> Result<Found, VaultError> {
        let Some(h) = self.due_header(tenant, due)? else { return Ok(Found::Gone) };
        if !locked.contains(&h.subject) {
            return Ok(Found::Gone);
        }
        match self.check_live(tenant, &h) {
            Ok(()) => Ok(Found::Live(h)),
            Err(VaultError::Erased(_)) => Ok(Found::Dead(h)),
            Err(e) => Err(e),
        }
    }

    /// Removes an entry that no longer stands for what its transcript is: `h` is the
    /// transcript's current header (under its lock), if it has one. Without one, only
    /// the exact entry of the incarnation that was found goes, by compare-and-swap, so an
    /// entry a new incarnation wrote meanwhile at the same key stays.
    fn drop_stale(
        &self,
        tenant: &TenantId,
        which: TimeIndex,
        due: &Due,
        found: &Found,
        batch: &mut Batch,
    ) -> Result<(), VaultError> {
        let key = layout::time_entry(which, tenant.as_str(), due.at, &due.transcript);
        match found {
            Found::Dead(h) => times::reindex(batch, tenant.as_str(), &due.transcript, Some(h), None),
            Found::Live(h) => {
                if !times::entries(tenant.as_str(), &due.transcript, h).contains(&key) {
                    batch.delete(key);
                }
            }
            Found::Gone => {
                let _ = self.store.compare_and_swap(&key, Some(due.incarnation.to_be_bytes().as_slice()), None)?;
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
            // A tenant being erased is written to by no one, retention included.
            self.check_open(tenant)?;
            let subjects = self.subjects_of(tenant, due)?;
            let _held = self.locks.lock(tenant.as_str(), &subjects.iter().collect::<Vec<_>>());
            let mut batch = Batch::default();
            let mut tombstones = Vec::new();
            let mut erased = Vec::new();
            let mut counts = HashMap::new();
            for d in due {
                let found = self.find(tenant, d, &subjects)?;
                let live = match &found {
                    // Still the entry it was found by (closed and started times never move).
                    Found::Live(h)
                        if times::entries(tenant.as_str(), &d.transcript, h).contains(&layout::time_entry(
                            which,
                            tenant.as_str(),
                            d.at,
                            &d.transcript,
                        )) =>
                    {
                        h.clone()
                    }
                    _ => {
                        self.drop_stale(tenant, which, d, &found, &mut batch)?;
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
            self.check_open(tenant)?;
            let subjects = self.subjects_of(tenant, due)?;
            let _held = self.locks.lock(tenant.as_str(), &subjects.iter().collect::<Vec<_>>());
            let mut batch = Batch::default();
            for d in due {
                let found = self.find(tenant, d, &subjects)?;
                let mut h = match &found {
                    Found::Live(h) if h.ended_at.is_none() && h.activity == Some(d.at) => h.clone(),
                    // Written since (its entry moved on), closed since, gone or dead.
                    _ => {
                        self.drop_stale(tenant, TimeIndex::Active, d, &found, &mut batch)?;
                        swept.stale += 1;
                        continue;
                    }
                };
                let count = self.message_count(tenant, &d.transcript, &h)?;
                self.queue_last_group(&mut batch, tenant.as_str(), &d.transcript, &h, count);
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
