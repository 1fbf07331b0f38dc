//! Message ciphertext in the value log (`store::ValueLog`); the tree keeps a pointer per
//! message. Records written before the log existed keep their ciphertext inline and stay
//! readable: a pointer and an AEAD envelope differ in their first byte.
//!
//! Space: the reclaimer tallies, per segment and in the same batch as the deletes, the
//! bytes whose pointers it removes. A closed segment at least half dead is compacted:
//! its live values are copied to the active segment and their pointers swapped, and once
//! that is durable the segment is marked retired. Its file is deleted `reclaim_min_age_ms`
//! later, so reads that took a pointer to it before the swap can finish.

use std::collections::BTreeMap;
use std::ops::Deref;

use super::layout;
use super::records::{self, SegmentTally};
use super::{Vault, VaultError};
use crate::store::{Batch, Durability, Entry, LoggedStore, StoreError, SyncTarget, ValueBuf, ValueLog, ValuePointer};

/// Values copied per value-log write while compacting.
const MOVE_CHUNK: usize = 256;

/// A message's sealed bytes: inline in its record, or read from the value log.
pub(super) enum Sealed<'a> {
    Inline(&'a [u8]),
    Logged(ValueBuf),
}

impl Deref for Sealed<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Sealed::Inline(b) => b,
            Sealed::Logged(b) => b,
        }
    }
}

impl Vault {
    /// Queues message records in `batch`: sealed values of at least `inline_values_below`
    /// bytes go to the value log, in the same write as the batch that points at them.
    pub(super) fn put_messages(&self, batch: &mut Batch, sealed: Vec<Entry>) -> Result<(), VaultError> {
        if self.commit.is_failed() {
            return Err(self.commit.failure().into());
        }
        for (key, value) in sealed {
            if value.len() >= self.inline_values_below {
                batch.put_logged(key, value);
            } else {
                batch.put(key, value);
            }
        }
        Ok(())
    }

    /// The sealed bytes a message record holds or points at.
    pub(super) fn sealed<'a>(&self, stored: &'a [u8]) -> Result<Sealed<'a>, VaultError> {
        match ValuePointer::decode(stored) {
            None => Ok(Sealed::Inline(stored)),
            Some(p) => self.logged(&p).map(Sealed::Logged),
        }
    }

    /// A value-log read, with damage reported as a corrupt message (DATA_LOSS at the edge).
    fn logged(&self, p: &ValuePointer) -> Result<ValueBuf, VaultError> {
        // A pointer where no value log is (a shared database): nothing it could point at.
        let Some(values) = &self.values else { return Err(VaultError::Corrupt("message")) };
        values.read(p).map_err(|e| match e {
            StoreError::Damaged(_) => VaultError::Corrupt("message"),
            e => e.into(),
        })
    }

    /// [`Vault::sealed`] for a record `key` read as `stored` some time ago. A read that
    /// stalled longer than compaction's grace finds its value's old segment gone: the
    /// record then points at the value's new place, which is read instead.
    pub(super) fn sealed_or_moved<'a>(&self, key: &[u8], stored: &'a [u8]) -> Result<Sealed<'a>, VaultError> {
        match self.sealed(stored) {
            Err(e @ VaultError::Corrupt(_)) => match self.store.get(key)?.as_deref().and_then(ValuePointer::decode) {
                Some(moved) if moved.encode() != stored => self.logged(&moved).map(Sealed::Logged),
                _ => Err(e),
            },
            other => other,
        }
    }

    /// Adds the value-log bytes that deleting these records frees to their segments'
    /// tallies, in `batch`. The caller holds the maintenance lock, so tallies are not
    /// updated concurrently.
    pub(super) fn tally_freed(&self, batch: &mut Batch, deleted: &[Entry]) -> Result<(), VaultError> {
        let mut freed: BTreeMap<u32, u64> = BTreeMap::new();
        for (key, value) in deleted {
            if layout::is_message(key)
                && let Some(p) = ValuePointer::decode(value)
            {
                *freed.entry(p.segment).or_default() += p.frame_bytes();
            }
        }
        for (segment, bytes) in freed {
            let slot = layout::value_tally(segment);
            let mut tally: SegmentTally = match self.store.get(&slot)? {
                Some(b) => records::decode(&b, "value log tally")?,
                None => SegmentTally::default(),
            };
            tally.dead_bytes = tally.dead_bytes.saturating_add(bytes);
            batch.put(slot, records::encode(&tally)?);
        }
        Ok(())
    }

    /// Deletes retired segments whose grace has passed, then compacts closed segments
    /// at least half dead. Returns how many segments it compacted or deleted.
    pub fn compact_values(&self) -> Result<usize, VaultError> {
        let _held = self.maintenance.lock().map_err(|_| VaultError::Internal("maintenance lock".into()))?;
        if self.commit.is_failed() {
            return Err(self.commit.failure().into());
        }
        let (Some(values), Some(wal)) = (self.values.clone(), self.wal.clone()) else { return Ok(0) };
        let mut done = self.delete_retired(&values, &wal)?;
        // The log's own frames (the tree's write-ahead batches) are dead from the start.
        let overhead = values.overhead();
        for (segment, size) in values.closed_segments()? {
            let tallied = match self.store.get(&layout::value_tally(segment))? {
                Some(b) => records::decode::<SegmentTally>(&b, "value log tally")?.dead_bytes,
                None => 0,
            };
            let dead = tallied.saturating_add(overhead.get(&segment).copied().unwrap_or(0));
            // A retired segment waits for its grace, with nothing live left in it.
            if self.store.get(&layout::value_retired(segment))?.is_some() {
                continue;
            }
            if dead == 0 || dead.saturating_mul(2) < size {
                continue;
            }
            match self.move_live_values(&values, segment) {
                Ok(()) => {}
                // A damaged segment stays as it is (its live values still read, or fail
                // as DATA_LOSS); the others are still compacted.
                Err(VaultError::Corrupt(what)) => {
                    tracing::error!(segment, what, "value log: a segment could not be compacted; left in place");
                    continue;
                }
                Err(e) => return Err(e),
            }
            crate::failpoint::hit("compaction.after_copy");
            // The copies and their pointers are durable before anything says the old
            // segment may go: a crash in between leaves both copies, never none.
            self.commit.sync_all(self.store.as_ref(), Durability::Fsync)?;
            let mut b = Batch::default();
            b.delete(layout::value_tally(segment));
            b.put(layout::value_retired(segment), records::encode(&self.clock.now().micros())?);
            self.store.apply(b)?;
            self.commit.sync_all(self.store.as_ref(), Durability::Fsync)?;
            crate::failpoint::hit("compaction.after_retire");
            done += 1;
        }
        Ok(done)
    }

    /// Copies the values of `segment` that their records still point at to the active
    /// segment, and swaps the pointers.
    fn move_live_values(&self, values: &ValueLog, segment: u32) -> Result<(), VaultError> {
        let mut live: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = Vec::new();
        let mut lost: Vec<Entry> = Vec::new();
        let mut flush = |live: &mut Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>| -> Result<(), StoreError> {
            let items: Vec<(&[u8], &[u8])> = live.iter().map(|(k, _, v)| (k.as_slice(), v.as_slice())).collect();
            let pointers = values.append(&items)?;
            // The copies are durable before any pointer to them is written: sled's own
            // flusher may persist a swapped pointer at any time.
            values.sync(Durability::Fsync)?;
            for ((key, old, _), p) in live.drain(..).zip(pointers) {
                let new = p.encode();
                // Nothing else rewrites a message record; if its record went meanwhile,
                // the copy is dead and counted so.
                if !self.store.compare_and_swap(&key, Some(&old), Some(new.clone()))? {
                    lost.push((key, new));
                }
            }
            Ok(())
        };
        let walked = values.for_each_frame(segment, &mut |p, key, value| {
            let old = p.encode();
            if self.store.get(key)?.as_deref() == Some(old.as_slice()) {
                live.push((key.to_vec(), old, value.to_vec()));
                if live.len() >= MOVE_CHUNK {
                    flush(&mut live)?;
                }
            }
            Ok(())
        });
        match walked {
            Err(StoreError::Damaged(_)) => return Err(VaultError::Corrupt("value log segment")),
            other => other?,
        }
        flush(&mut live)?;
        if !lost.is_empty() {
            let mut b = Batch::default();
            self.tally_freed(&mut b, &lost)?;
            self.store.apply(b)?;
        }
        Ok(())
    }

    /// After open cut a torn write off the value log (a crash before it was synced, so
    /// before anything in it was acknowledged), deletes the records that still point
    /// into the cut-off range. Appends to one transcript reach the log in order, so what
    /// is left of each transcript is a whole prefix of its messages.
    pub(super) fn drop_torn_pointers(&self) -> Result<(), VaultError> {
        let (Some(values), Some(wal)) = (&self.values, &self.wal) else { return Ok(()) };
        let Some((segment, from)) = values.torn_at_open() else { return Ok(()) };
        let prefix = layout::all_messages_prefix();
        let mut after: Option<Vec<u8>> = None;
        let mut dropped = 0usize;
        loop {
            let page = self.store.scan(&prefix, after.as_deref(), 1024)?;
            let mut b = Batch::default();
            for (key, value) in &page {
                if ValuePointer::decode(value).is_some_and(|p| values.is_torn(&p)) {
                    b.delete(key.clone());
                    dropped += 1;
                }
            }
            if !b.is_empty() {
                self.store.apply(b)?;
            }
            match page.last() {
                Some((k, _)) if page.len() == 1024 => after = Some(k.clone()),
                _ => break,
            }
        }
        self.store.sync(Durability::Fsync)?;
        wal.clear_cut()?;
        if dropped > 0 {
            tracing::warn!(
                segment,
                from,
                dropped,
                "value log: dropped records of writes a crash cut short (never acknowledged)"
            );
        }
        Ok(())
    }

    /// Deletes the files of retired segments whose grace has passed (all of them after a
    /// restart's grace: nothing in flight can point into them).
    fn delete_retired(&self, values: &ValueLog, wal: &LoggedStore) -> Result<usize, VaultError> {
        let cutoff = self.clock.now().micros().saturating_sub(self.reclaim_min_age_micros);
        let mut done = 0;
        for (key, value) in self.store.scan(&layout::value_retired_prefix(), None, 64)? {
            let retired_at: i64 = records::decode(&value, "value log retirement")?;
            if retired_at > cutoff {
                continue;
            }
            let segment = layout::value_segment_of(&key).ok_or(VaultError::Corrupt("value log retirement"))?;
            // A start replays the tree's batches from the checkpointed head on: the
            // segment goes once a checkpoint has passed it.
            if segment >= wal.checkpointed()?.0 {
                wal.checkpoint()?;
                if segment >= wal.checkpointed()?.0 {
                    continue;
                }
            }
            values.remove(segment)?;
            crate::failpoint::hit("compaction.after_remove");
            let mut b = Batch::default();
            b.delete(key);
            self.store.apply(b)?;
            done += 1;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use super::super::testing::{self, HandClock};
    use super::super::{AuthorRole, Message, TenantId, Transcript};
    use super::*;

    const GRACE_SECS: i64 = 60;

    fn open(dir: &Path, clock: Arc<HandClock>) -> Vault {
        testing::open(dir, clock, |o| {
            o.value_segment_bytes = 4096;
            o.reclaim_min_age_ms = GRACE_SECS as u64 * 1000;
        })
    }

    fn text(i: usize, n: usize) -> String {
        format!("{i}-{n}-{}", "x".repeat(250))
    }

    /// Twelve transcripts of three 250-byte messages (about three to a 4 KiB segment), all
    /// but `t0` deleted and reclaimed, so `t0`'s segment is mostly dead. Returns the key of
    /// `t0`'s first message record and the pointer it holds.
    async fn load_then_delete_all_but_t0(v: &Vault, clock: &HandClock, tenant: &TenantId) -> (Vec<u8>, Vec<u8>) {
        for i in 0..12 {
            let msgs = (0..3).map(|n| Message::new(format!("m{n}"), AuthorRole::Visitor, "V", text(i, n))).collect();
            v.put_transcript(tenant, Transcript::new(format!("t{i}"), "s", msgs)).await.unwrap();
        }
        for i in 1..12 {
            v.delete_transcript(tenant, &format!("t{i}")).await.unwrap();
        }
        clock.advance_secs(GRACE_SECS + 1);
        while v.reclaim(1000).unwrap() > 0 {}
        first_message_of_t0(v, tenant)
    }

    fn first_message_of_t0(v: &Vault, tenant: &TenantId) -> (Vec<u8>, Vec<u8>) {
        let tkey = v.tenant_key(tenant, false).unwrap().unwrap();
        let (_, tb) = v.blinds(&tkey, None, Some("t0"));
        let h = v.read_header(&layout::header(tenant.as_str(), &tb)).unwrap().unwrap();
        v.store.scan(&layout::messages_prefix(tenant.as_str(), &tb, h.incarnation), None, 1).unwrap().remove(0)
    }

    fn assert_t0_reads_whole(v: &Vault, tenant: &TenantId) {
        let texts: Vec<String> = v.get_transcript(tenant, "t0").unwrap().messages.into_iter().map(|m| m.text).collect();
        assert_eq!(texts, (0..3).map(|n| text(0, n)).collect::<Vec<_>>());
    }

    fn segment_file(dir: &Path, pointer: &[u8]) -> PathBuf {
        let segment = ValuePointer::decode(pointer).expect("a value-log pointer").segment;
        dir.join("data").join("values").join(format!("{segment:010}.values"))
    }

    #[tokio::test]
    async fn a_compacted_segment_is_kept_for_the_grace_and_a_read_stalled_past_it_follows_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let clock = HandClock::new();
        let v = open(dir.path(), clock.clone());
        let tenant = TenantId::parse("acme").unwrap();
        let (key, old) = load_then_delete_all_but_t0(&v, &clock, &tenant).await;
        let file = segment_file(dir.path(), &old);

        assert!(v.compact_values().unwrap() >= 1);
        let (_, moved) = first_message_of_t0(&v, &tenant);
        assert_ne!(moved, old, "t0's values were copied forward");
        let current = v.sealed(&moved).unwrap().to_vec();
        assert!(file.exists());
        assert_eq!(*v.sealed(&old).unwrap(), *current, "a read holding the old pointer finishes within the grace");
        clock.advance_secs(GRACE_SECS - 1);
        v.compact_values().unwrap();
        assert!(file.exists(), "the file stays until the grace has passed");

        clock.advance_secs(2);
        v.compact_values().unwrap();
        assert!(!file.exists(), "then it goes");
        assert!(matches!(v.sealed(&old), Err(VaultError::Corrupt(_))));
        assert_eq!(*v.sealed_or_moved(&key, &old).unwrap(), *current, "a stalled read follows the record");
        assert_t0_reads_whole(&v, &tenant);
    }

    #[tokio::test]
    async fn a_compaction_stopped_between_moving_values_and_retiring_the_segment_finishes_when_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let clock = HandClock::new();
        let v = open(dir.path(), clock.clone());
        let tenant = TenantId::parse("acme").unwrap();
        let (_, old) = load_then_delete_all_but_t0(&v, &clock, &tenant).await;
        let segment = ValuePointer::decode(&old).unwrap().segment;
        // The state a crash leaves between swapping the pointers and retiring the segment
        // (both are durable by then); the reopen itself is a clean one.
        v.move_live_values(v.values.as_ref().unwrap(), segment).unwrap();
        v.sync().unwrap();
        drop(v);

        let v = open(dir.path(), clock.clone());
        assert_t0_reads_whole(&v, &tenant);
        assert!(v.compact_values().unwrap() >= 1);
        assert!(v.store.get(&layout::value_retired(segment)).unwrap().is_some(), "the segment is retired");
        clock.advance_secs(GRACE_SECS + 1);
        v.compact_values().unwrap();
        assert!(!segment_file(dir.path(), &old).exists());
        assert_t0_reads_whole(&v, &tenant);
    }
}
