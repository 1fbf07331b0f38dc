//! A transcript's messages in the store. A message appended alone is a record of its
//! own; a group of [`GROUP`] messages (and a closed transcript's last group) is packed
//! into one chunk record: one pointer, one value-log read and one AEAD open per group
//! instead of per message. A put writes its groups packed at once; an append stays one
//! record per message (O(1) in the transcript's length) and queues its group's packing
//! when the group fills, which the maintenance worker does in the background.
//!
//! Chunks start at multiples of [`GROUP`], and a group holds at most one chunk, at its
//! start: so the record holding any message is found from its group's start, which is
//! how a read that races a packing finds what moved (see [`Vault::read_messages`]).
//! Single-message records of every earlier release stay readable as they are.

use std::ops::ControlFlow;

use zeroize::Zeroizing;

use super::layout::{self, Blind};
use super::model::{Message, MessageRef, TenantId, Timestamp};
use super::records::Header;
use super::seal::{Place, chunk_messages, message_plain, message_view};
use super::{Vault, VaultError};
use crate::crypto::SecretKey;
use crate::store::{Batch, Durability, Entry, SyncTarget};

/// Messages per packed group.
pub(super) const GROUP: u32 = 64;

/// A group whose plaintext is larger stays single records: a chunk is read whole, and
/// large messages gain nothing from sharing a record.
const MAX_CHUNK_PLAIN: usize = 256 * 1024;

/// Queued groups packed per run, sealed before their one value-log sync.
const PACK_BATCH: usize = 64;

/// Rescans in a row that hand out nothing before a read gives up (retryable).
const MAX_RESCANS: u32 = 8;

/// What a read hands its visitor.
pub(super) enum Read<'a> {
    /// The next record's sealed size, before it is opened: how readers bound memory.
    Sealed(usize),
    Message(MessageRef<'a>),
}

/// Takes what a read hands out; breaks to stop the read.
pub(super) type MessageVisitor<'a> = dyn FnMut(Read<'_>) -> Result<ControlFlow<()>, VaultError> + 'a;

/// What one packing run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packing {
    /// Queue entries settled; 0 means the queue was empty.
    pub settled: usize,
    /// Groups packed into one record.
    pub packed: usize,
    /// Groups left as they are because they could not be read (damage, reported by reads).
    pub damaged: usize,
}

/// Where the record holding a message is.
enum Holding {
    Single,
    /// A chunk, found scanning after this bound (its group's start).
    Chunk(Option<Vec<u8>>),
    Nothing,
}

/// A group sealed as a chunk, waiting to replace the records it was sealed from.
struct Sealed {
    queued: Vec<u8>,
    tenant: TenantId,
    transcript: Blind,
    incarnation: u64,
    old: Vec<Entry>,
    key: Vec<u8>,
    sealed: Vec<u8>,
}

impl Vault {
    /// The records for messages `first ..` of a transcript being written. A run of new
    /// messages that starts a group is sealed as one chunk.
    pub(super) fn message_records(
        &self,
        place: &Place<'_>,
        tk: &SecretKey,
        first: u32,
        messages: &[Message],
        now: Timestamp,
    ) -> Result<Vec<Entry>, VaultError> {
        let mut out = Vec::new();
        let mut seq = first;
        let mut rest = messages;
        while !rest.is_empty() {
            let room = (GROUP - seq % GROUP) as usize;
            let (run, after) = rest.split_at(room.min(rest.len()));
            let plains = run.iter().map(|m| message_plain(m, now)).collect::<Result<Vec<_>, _>>()?;
            let packable = seq.is_multiple_of(GROUP)
                && run.len() > 1
                && plains.iter().map(|p| p.len()).sum::<usize>() <= MAX_CHUNK_PLAIN;
            if packable {
                let key =
                    layout::message_chunk(place.tenant, place.transcript, place.incarnation, seq, run.len() as u32);
                out.push((key, place.seal_chunk(self.alg, tk, seq, &plains)?));
            } else {
                for (i, plain) in plains.iter().enumerate() {
                    let s = seq + i as u32;
                    let key = layout::message(place.tenant, place.transcript, place.incarnation, s);
                    out.push((key, place.seal_message_plain(self.alg, tk, s, plain)?));
                }
            }
            seq += run.len() as u32;
            rest = after;
        }
        Ok(out)
    }

    /// Queues the packing of the groups an append of messages `held .. total` filled,
    /// where they hold records written before it.
    pub(super) fn queue_filled_groups(
        &self,
        batch: &mut Batch,
        tenant: &str,
        tb: &Blind,
        h: &Header,
        held: u32,
        total: u32,
    ) {
        for group in held / GROUP..total / GROUP {
            if group * GROUP < held {
                batch.put(layout::pack_queued(tenant, tb, h.incarnation, group), Vec::new());
            }
        }
    }

    /// Queues the packing of a closing transcript's last group, unless it is full (queued
    /// when it filled) or holds one message.
    pub(super) fn queue_last_group(&self, batch: &mut Batch, tenant: &str, tb: &Blind, h: &Header, count: u32) {
        if count % GROUP > 1 {
            batch.put(layout::pack_queued(tenant, tb, h.incarnation, count / GROUP), Vec::new());
        }
    }

    /// Hands `f` an incarnation's messages in order with their sequence numbers, reading
    /// up to `chunk` records per store scan, until `f` breaks. Returns how many it handed out.
    ///
    /// A packing running meanwhile replaces records with a chunk at their group's start,
    /// which sorts before where the scan is. So when a scan skips past the next message,
    /// ends, or finds a record it was reading gone, the record holding that message is
    /// looked for once more from its group's start: each store operation sees a packing
    /// whole or not at all, so a message that is in neither place did not exist when the
    /// read began.
    pub(super) fn read_messages(
        &self,
        tenant: &TenantId,
        tb: &Blind,
        h: &Header,
        tk: &SecretKey,
        chunk: usize,
        f: &mut MessageVisitor<'_>,
    ) -> Result<u32, VaultError> {
        let t = tenant.as_str();
        let place = self.place(tenant, &h.subject, tb, h.incarnation);
        let prefix = layout::messages_prefix(t, tb, h.incarnation);
        let corrupt = || VaultError::Corrupt("transcript messages");
        let mut next = 0u32;
        let mut after: Option<Vec<u8>> = None;
        // Rescans since the read last moved on: each packing moves a group once, so a
        // read that keeps finding its next message moved is not making progress.
        let mut idle_rescans = 0;
        loop {
            let entries = self.store.scan(&prefix, after.as_deref(), chunk)?;
            let mut skipped = false;
            let before = next;
            for (key, value) in &entries {
                let (first, count) = layout::message_span(key, prefix.len()).ok_or_else(corrupt)?;
                if first + count <= next {
                    continue; // handed out already, before a rescan
                }
                if first > next {
                    skipped = true;
                    break;
                }
                let sealed = match self.sealed_or_moved(key, value) {
                    // Packed, its old value's segment compacted and gone since the scan.
                    Err(VaultError::Corrupt(_)) if self.store.get(key)?.is_none() => {
                        skipped = true;
                        break;
                    }
                    other => other?,
                };
                // A chunk partly handed out before a rescan was counted then, as singles.
                if first == next && f(Read::Sealed(sealed.len()))?.is_break() {
                    return Ok(next);
                }
                if layout::is_chunk(key, prefix.len()) {
                    let plain = place.open_chunk(tk, first, count, &sealed)?;
                    for (seq, m) in (first..).zip(chunk_messages(&plain, count)?) {
                        if seq < next {
                            continue;
                        }
                        next = seq + 1;
                        if message_view(m, |m| f(Read::Message(m)))??.is_break() {
                            return Ok(next);
                        }
                    }
                } else {
                    let plain = place.open_message_plain(tk, first, &sealed)?;
                    next = first + 1;
                    if message_view(&plain, |m| f(Read::Message(m)))??.is_break() {
                        return Ok(next);
                    }
                }
            }
            if !skipped && entries.len() == chunk {
                after = entries.last().map(|(k, _)| k.clone());
                continue;
            }
            idle_rescans = if next > before { 0 } else { idle_rescans + 1 };
            if idle_rescans > MAX_RESCANS {
                return Err(VaultError::Aborted("the transcript changed while it was read; retry".into()));
            }
            after = match self.record_holding(t, tb, h.incarnation, &prefix, next)? {
                // Appended after the scan passed its place: what was read is a whole
                // prefix of the transcript as it was when the read began.
                Holding::Single if !skipped => return Ok(next),
                Holding::Single => layout::messages_from(t, tb, h.incarnation, next),
                Holding::Chunk(from) => from,
                // Records go on past a message that is nowhere: damage.
                Holding::Nothing if skipped => return Err(corrupt()),
                Holding::Nothing => return Ok(next),
            };
        }
    }

    /// Which record holds message `seq`, if any.
    fn record_holding(
        &self,
        tenant: &str,
        tb: &Blind,
        incarnation: u64,
        prefix: &[u8],
        seq: u32,
    ) -> Result<Holding, VaultError> {
        if self.store.get(&layout::message(tenant, tb, incarnation, seq))?.is_some() {
            return Ok(Holding::Single);
        }
        let from = layout::messages_from(tenant, tb, incarnation, seq - seq % GROUP);
        let first = self.store.scan(prefix, from.as_deref(), 1)?;
        Ok(match first.first().and_then(|(k, _)| layout::message_span(k, prefix.len())) {
            Some((start, count)) if start <= seq && seq - start < count => Holding::Chunk(from),
            _ => Holding::Nothing,
        })
    }

    /// Messages in a transcript: where its last record ends. One reverse seek, so appends
    /// never rewrite a counter.
    pub(super) fn message_count(&self, tenant: &TenantId, tb: &Blind, h: &Header) -> Result<u32, VaultError> {
        let prefix = layout::messages_prefix(tenant.as_str(), tb, h.incarnation);
        match self.store.last(&prefix)? {
            Some((key, _)) => {
                let (first, count) =
                    layout::message_span(&key, prefix.len()).ok_or(VaultError::Corrupt("transcript messages"))?;
                Ok(first + count)
            }
            None => Ok(0),
        }
    }

    /// Packs up to `budget` queued groups into chunks.
    pub fn pack_messages(&self, budget: usize) -> Result<Packing, VaultError> {
        let _held = self.maintenance.lock().map_err(|_| VaultError::Internal("maintenance lock".into()))?;
        if self.commit.is_failed() {
            return Err(self.commit.failure().into());
        }
        let queue = self.store.scan(&layout::pack_queue_prefix(), None, budget.clamp(1, PACK_BATCH))?;
        let mut run = Packing { settled: queue.len(), ..Packing::default() };
        let mut settled = Batch::default();
        let mut sealed = Vec::new();
        for (queued, _) in &queue {
            match self.seal_group(queued) {
                Ok(Some(s)) => sealed.push(s),
                Ok(None) => settled.delete(queued.clone()),
                // Gone meanwhile (deleted, replaced, shredded, its tenant erased).
                Err(VaultError::Erased(_) | VaultError::NotFound(_) | VaultError::Aborted(_)) => {
                    settled.delete(queued.clone())
                }
                Err(e @ (VaultError::Corrupt(_) | VaultError::Integrity(_))) => {
                    if self.still_live(queued)? {
                        // Damage stays where it is, for reads and `chatvault check` to report.
                        tracing::error!(error = %e, "packing: a group of messages could not be read; left as it is");
                        run.damaged += 1;
                    }
                    settled.delete(queued.clone());
                }
                // Left queued for the next run; the others go on.
                Err(e) => {
                    tracing::warn!(error = %e, "packing: a group could not be read now; retried later");
                    run.settled -= 1;
                }
            }
        }
        // The chunks are durable in the value log before any record points at them: the
        // index may persist a record at any time, and the records it replaces go with it.
        let out_of_line = |s: &Sealed| self.values.is_some() && s.sealed.len() >= self.inline_values_below;
        let logged: Vec<(&[u8], &[u8])> =
            sealed.iter().filter(|s| out_of_line(s)).map(|s| (s.key.as_slice(), s.sealed.as_slice())).collect();
        let mut pointers = match &self.values {
            Some(values) if !logged.is_empty() => {
                let p = values.append(&logged)?;
                values.sync(Durability::Fsync)?;
                crate::failpoint::hit("packing.after_value_sync");
                p
            }
            _ => Vec::new(),
        }
        .into_iter();
        let mut sealed = sealed.into_iter();
        while let Some(mut s) = sealed.next() {
            if out_of_line(&s) {
                let p = pointers.next().ok_or_else(|| VaultError::Internal("value log pointers".into()))?;
                s.sealed = p.encode();
            }
            match self.install(s) {
                Ok(done) => run.packed += usize::from(done),
                Err(e) => {
                    // What was not installed is dead in the log: counted so, for compaction.
                    let dead: Vec<Entry> =
                        sealed.filter(|s| out_of_line(s)).zip(pointers).map(|(s, p)| (s.key, p.encode())).collect();
                    let mut b = Batch::default();
                    if self.tally_freed(&mut b, &dead).is_ok() {
                        let _ = self.apply(b);
                    }
                    return Err(e);
                }
            }
            crate::failpoint::hit("packing.after_install");
        }
        if !settled.is_empty() {
            self.apply(settled)?;
        }
        Ok(run)
    }

    /// Whether the transcript incarnation a queue entry names is still live: a read that
    /// failed on it is damage only then, not a delete or shred racing the packing.
    fn still_live(&self, queued: &[u8]) -> Result<bool, VaultError> {
        let Some((tenant, tb, incarnation, _)) = layout::parse_pack_queued(queued) else { return Ok(true) };
        let tenant = TenantId::parse(&tenant)?;
        if self.check_open(&tenant).is_err() {
            return Ok(false);
        }
        match self.read_header(&layout::header(tenant.as_str(), &tb))? {
            Some(h) if h.incarnation == incarnation => match self.check_live(&tenant, &h) {
                Ok(()) => Ok(true),
                Err(VaultError::Erased(_)) => Ok(false),
                Err(e) => Err(e),
            },
            _ => Ok(false),
        }
    }

    /// Reads and seals one queued group. None: nothing to pack (gone, or one record already).
    fn seal_group(&self, queued: &[u8]) -> Result<Option<Sealed>, VaultError> {
        let (tenant, tb, incarnation, group) =
            layout::parse_pack_queued(queued).ok_or(VaultError::Corrupt("packing queue"))?;
        let tenant = TenantId::parse(&tenant)?;
        self.check_open(&tenant)?;
        let t = tenant.as_str();
        let Some(h) = self.read_header(&layout::header(t, &tb))? else { return Ok(None) };
        if h.incarnation != incarnation {
            return Ok(None);
        }
        self.check_live(&tenant, &h)?;
        let start = group.checked_mul(GROUP).ok_or(VaultError::Corrupt("packing queue"))?;
        let end = start.saturating_add(GROUP);
        let prefix = layout::messages_prefix(t, &tb, incarnation);
        let from = layout::messages_from(t, &tb, incarnation, start);
        let mut old = self.store.scan(&prefix, from.as_deref(), GROUP as usize + 1)?;
        old.retain(|(k, _)| layout::message_span(k, prefix.len()).is_some_and(|(first, _)| first < end));
        if old.len() < 2 {
            return Ok(None);
        }
        let (tk, _) = self.transcript_key(&tenant, &tb, &h)?;
        let place = self.place(&tenant, &h.subject, &tb, incarnation);
        let mut plains: Vec<Zeroizing<Vec<u8>>> = Vec::with_capacity(GROUP as usize);
        let mut next = start;
        for (key, value) in &old {
            let (first, count) =
                layout::message_span(key, prefix.len()).ok_or(VaultError::Corrupt("transcript messages"))?;
            if first != next {
                return Err(VaultError::Corrupt("transcript messages"));
            }
            let sealed = self.sealed_or_moved(key, value)?;
            if layout::is_chunk(key, prefix.len()) {
                let plain = place.open_chunk(&tk, first, count, &sealed)?;
                plains.extend(chunk_messages(&plain, count)?.into_iter().map(|m| Zeroizing::new(m.to_vec())));
            } else {
                plains.push(place.open_message_plain(&tk, first, &sealed)?);
            }
            next = first + count;
        }
        if next > end || plains.iter().map(|p| p.len()).sum::<usize>() > MAX_CHUNK_PLAIN {
            return Ok(None);
        }
        let key = layout::message_chunk(t, &tb, incarnation, start, next - start);
        let sealed = place.seal_chunk(self.alg, &tk, start, &plains)?;
        Ok(Some(Sealed { queued: queued.to_vec(), tenant, transcript: tb, incarnation, old, key, sealed }))
    }

    /// Puts a sealed chunk in place of the records it was sealed from, if they are all
    /// still there; else counts its value as dead. Nothing else rewrites message records
    /// but compaction and reclaim, which wait for the maintenance lock the caller holds.
    /// Returns whether it did.
    fn install(&self, s: Sealed) -> Result<bool, VaultError> {
        let t = s.tenant.as_str();
        let hkey = layout::header(t, &s.transcript);
        // Held until the batch is applied, like every writer: nothing is written under a
        // tenant after it was erased.
        let _epoch = self.epoch_shared()?;
        let mut b = Batch::default();
        b.delete(s.queued);
        let open = self.check_open(&s.tenant).is_ok();
        while let Some(seen) = self.read_header(&hkey)?.filter(|_| open) {
            if seen.incarnation != s.incarnation {
                break;
            }
            let _held = self.locks.lock(t, &[&seen.subject]);
            let Some(h) = self.read_header(&hkey)? else { break };
            if h != seen {
                continue;
            }
            let mut whole = match self.check_live(&s.tenant, &h) {
                Ok(()) => true,
                Err(VaultError::Erased(_)) => false,
                Err(e) => return Err(e),
            };
            for (key, value) in &s.old {
                whole = whole && self.store.get(key)?.as_deref() == Some(value.as_slice());
            }
            if !whole {
                break;
            }
            for (key, _) in &s.old {
                b.delete(key.clone());
            }
            self.tally_freed(&mut b, &s.old)?;
            b.put(s.key, s.sealed);
            return self.apply(b).map(|()| true);
        }
        self.tally_freed(&mut b, &[(s.key, s.sealed)])?;
        self.apply(b).map(|()| false)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{self, HandClock};
    use super::super::{AuthorRole, Transcript};
    use super::*;

    fn msg(i: u32) -> Message {
        Message::new(format!("m{i}"), AuthorRole::Visitor, "V", format!("message number {i}"))
    }

    fn msgs(range: std::ops::Range<u32>) -> Vec<Message> {
        range.map(msg).collect()
    }

    fn texts(v: &Vault, tenant: &TenantId, id: &str) -> Vec<String> {
        v.get_transcript(tenant, id).unwrap().messages.into_iter().map(|m| m.text).collect()
    }

    fn expected(n: u32) -> Vec<String> {
        (0..n).map(|i| format!("message number {i}")).collect()
    }

    fn where_is(v: &Vault, tenant: &TenantId, id: &str) -> (Blind, Header) {
        let tkey = v.tenant_key(tenant, false).unwrap().unwrap();
        let (_, tb) = v.blinds(&tkey, None, Some(id));
        (tb, v.read_header(&layout::header(tenant.as_str(), &tb)).unwrap().unwrap())
    }

    /// The spans of a transcript's message records, in key order.
    fn spans(v: &Vault, tenant: &TenantId, id: &str) -> Vec<(u32, u32)> {
        let (tb, h) = where_is(v, tenant, id);
        let prefix = layout::messages_prefix(tenant.as_str(), &tb, h.incarnation);
        let records = v.store.scan(&prefix, None, 10_000).unwrap();
        records.iter().map(|(k, _)| layout::message_span(k, prefix.len()).unwrap()).collect()
    }

    async fn append_one_by_one(v: &Vault, tenant: &TenantId, id: &str, range: std::ops::Range<u32>) {
        for i in range {
            v.append_messages(tenant, id, vec![msg(i)], Some(i)).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_put_is_stored_as_one_record_per_group_of_messages_and_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let v = testing::open(dir.path(), HandClock::new(), |_| {});
        let tenant = TenantId::parse("acme").unwrap();
        v.put_transcript(&tenant, Transcript::new("t", "alice", msgs(0..150))).await.unwrap();
        assert_eq!(spans(&v, &tenant, "t"), [(0, 64), (64, 64), (128, 22)]);
        assert_eq!(texts(&v, &tenant, "t"), expected(150));
        let (tb, h) = where_is(&v, &tenant, "t");
        assert_eq!(v.message_count(&tenant, &tb, &h).unwrap(), 150);
        // Appends go on after the last chunk, one record each.
        append_one_by_one(&v, &tenant, "t", 150..153).await;
        assert_eq!(spans(&v, &tenant, "t")[2..], [(128, 22), (150, 1), (151, 1), (152, 1)]);
        assert_eq!(texts(&v, &tenant, "t"), expected(153));
        // A one-message put is a single record, as before packing.
        v.put_transcript(&tenant, Transcript::new("one", "alice", msgs(0..1))).await.unwrap();
        assert_eq!(spans(&v, &tenant, "one"), [(0, 1)]);
    }

    /// A chunk is read whole, so a group of large messages past 256 KiB stays single records.
    #[tokio::test]
    async fn a_group_of_large_messages_past_the_chunk_limit_stays_single_records() {
        let dir = tempfile::tempdir().unwrap();
        let v = testing::open(dir.path(), HandClock::new(), |_| {});
        let tenant = TenantId::parse("acme").unwrap();
        let big = |n: usize| -> Vec<Message> {
            (0..n)
                .map(|i| {
                    Message::new(format!("m{i}"), AuthorRole::Visitor, "V", format!("{i}{}", "x".repeat(60 << 10)))
                })
                .collect()
        };
        v.put_transcript(&tenant, Transcript::new("four", "alice", big(4))).await.unwrap();
        assert_eq!(spans(&v, &tenant, "four"), [(0, 4)], "240 KiB: one chunk");
        v.put_transcript(&tenant, Transcript::new("five", "alice", big(5))).await.unwrap();
        assert_eq!(spans(&v, &tenant, "five"), [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)], "300 KiB: singles");
        assert_eq!(v.get_transcript(&tenant, "five").unwrap().messages.len(), 5);
    }

    #[tokio::test]
    async fn appends_stay_single_records_until_their_group_fills_and_a_close_packs_the_last_group() {
        let dir = tempfile::tempdir().unwrap();
        let v = testing::open(dir.path(), HandClock::new(), |_| {});
        let tenant = TenantId::parse("acme").unwrap();
        v.put_transcript(&tenant, Transcript::new("t", "alice", msgs(0..2))).await.unwrap();
        append_one_by_one(&v, &tenant, "t", 2..70).await;
        assert_eq!(spans(&v, &tenant, "t").len(), 69, "one chunk of the put, then one record per append");
        assert_eq!(v.pack_messages(100).unwrap().packed, 1, "filling group 0 queued it");
        assert_eq!(spans(&v, &tenant, "t"), [(0, 64), (64, 1), (65, 1), (66, 1), (67, 1), (68, 1), (69, 1)]);
        assert_eq!(texts(&v, &tenant, "t"), expected(70));
        assert_eq!(v.pack_messages(100).unwrap().settled, 0, "nothing else is queued");

        v.close_transcript(&tenant, "t", None).await.unwrap();
        assert_eq!(v.pack_messages(100).unwrap().packed, 1);
        assert_eq!(spans(&v, &tenant, "t"), [(0, 64), (64, 6)]);
        assert_eq!(texts(&v, &tenant, "t"), expected(70));
        let dead = v.maintenance_backlog().unwrap().dead_value_bytes;
        assert!(dead > 70 * 30, "the single records' values are counted dead for compaction: {dead}");
        // And it all survives a reopen.
        drop(v);
        let v = testing::open(dir.path(), HandClock::new(), |_| {});
        assert_eq!(texts(&v, &tenant, "t"), expected(70));
    }

    /// A packing that runs while a read is between two scans moves the messages it has not
    /// read yet into a chunk that sorts before where it is: it must find them there, both
    /// when its next scan skips ahead and when it finds nothing more.
    #[tokio::test]
    async fn a_read_racing_a_packing_still_hands_out_every_message_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let v = testing::open(dir.path(), HandClock::new(), |_| {});
        let tenant = TenantId::parse("acme").unwrap();
        for (id, n) in [("skips", 70), ("ends", 40)] {
            v.put_transcript(&tenant, Transcript::new(id, "alice", Vec::new())).await.unwrap();
            append_one_by_one(&v, &tenant, id, 0..n).await;
            if n < GROUP {
                v.close_transcript(&tenant, id, None).await.unwrap();
            }
            let (tb, h) = where_is(&v, &tenant, id);
            let (tk, _) = v.transcript_key(&tenant, &tb, &h).unwrap();
            let mut read = Vec::new();
            let handed = v
                .read_messages(&tenant, &tb, &h, &tk, 4, &mut |r| {
                    if let Read::Message(m) = r {
                        read.push(m.text.to_owned());
                        if read.len() == 10 {
                            assert_eq!(v.pack_messages(100).unwrap().packed, 1);
                        }
                    }
                    Ok(ControlFlow::Continue(()))
                })
                .unwrap();
            assert_eq!(spans(&v, &tenant, id)[0], (0, n.min(GROUP)), "{id}: packed during the read");
            assert_eq!(read, expected(n), "{id}");
            assert_eq!(handed, n);
        }
    }

    /// A read that took pointers to single records, then stalled while they were packed,
    /// their segment compacted and its file deleted after the grace, finds them in the chunk.
    #[tokio::test]
    async fn a_read_stalled_past_the_packing_and_compaction_of_what_it_holds_finds_the_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let clock = HandClock::new();
        let v = testing::open(dir.path(), clock.clone(), |o| {
            o.value_segment_bytes = 4096;
            o.reclaim_min_age_ms = 1000;
        });
        let tenant = TenantId::parse("acme").unwrap();
        v.put_transcript(&tenant, Transcript::new("t", "alice", Vec::new())).await.unwrap();
        append_one_by_one(&v, &tenant, "t", 0..70).await;
        let (tb, h) = where_is(&v, &tenant, "t");
        let (tk, _) = v.transcript_key(&tenant, &tb, &h).unwrap();
        let segments = || std::fs::read_dir(dir.path().join("data/values")).unwrap().count();
        let mut read = Vec::new();
        v.read_messages(&tenant, &tb, &h, &tk, 16, &mut |r| {
            if let Read::Message(m) = r {
                read.push(m.text.to_owned());
                if read.len() == 10 {
                    let before = segments();
                    assert_eq!(v.pack_messages(100).unwrap().packed, 1);
                    assert!(v.compact_values().unwrap() >= 1, "the singles' segments are all dead");
                    clock.advance_secs(2);
                    v.compact_values().unwrap();
                    assert!(segments() < before, "a segment the read points into is gone");
                }
            }
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        assert_eq!(read, expected(70));
    }

    #[tokio::test]
    async fn a_packing_queued_for_a_transcript_deleted_since_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let v = testing::open(dir.path(), HandClock::new(), |_| {});
        let tenant = TenantId::parse("acme").unwrap();
        v.put_transcript(&tenant, Transcript::new("t", "alice", Vec::new())).await.unwrap();
        append_one_by_one(&v, &tenant, "t", 0..5).await;
        let (tb, h) = where_is(&v, &tenant, "t");
        v.close_transcript(&tenant, "t", None).await.unwrap();
        v.delete_transcript(&tenant, "t").await.unwrap();
        assert_eq!(v.pack_messages(100).unwrap(), Packing { settled: 1, packed: 0, damaged: 0 });
        let prefix = layout::messages_prefix(tenant.as_str(), &tb, h.incarnation);
        let left = v.store.scan(&prefix, None, 100).unwrap();
        assert_eq!(left.len(), 5, "the deleted transcript's records wait for reclaim, no chunk was added");
        assert!(v.store.scan(&layout::pack_queue_prefix(), None, 10).unwrap().is_empty());
    }

    /// A tenant erased with packings queued: its keys are gone at once, its records only
    /// after reclaim. The packer settles those entries quietly and packs other tenants'.
    #[tokio::test]
    async fn packings_queued_under_an_erased_tenant_are_settled_without_holding_up_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let v = testing::open(dir.path(), HandClock::new(), |_| {});
        let (gone, kept) = (TenantId::parse("a-gone").unwrap(), TenantId::parse("b-kept").unwrap());
        for tenant in [&gone, &kept] {
            v.put_transcript(tenant, Transcript::new("t", "alice", Vec::new())).await.unwrap();
            append_one_by_one(&v, tenant, "t", 0..5).await;
            v.close_transcript(tenant, "t", None).await.unwrap();
        }
        v.erase_tenant(&gone).await.unwrap();
        let run = v.pack_messages(100).unwrap();
        assert_eq!((run.packed, run.damaged), (1, 0), "{run:?}");
        assert!(v.store.scan(&layout::pack_queue_prefix(), None, 10).unwrap().is_empty());
        assert_eq!(spans(&v, &kept, "t"), [(0, 5)]);
        assert_eq!(texts(&v, &kept, "t"), expected(5));
    }

    #[tokio::test]
    async fn a_chunk_moved_to_other_sequence_numbers_or_cut_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let v = testing::open(dir.path(), HandClock::new(), |_| {});
        let tenant = TenantId::parse("acme").unwrap();
        v.put_transcript(&tenant, Transcript::new("t", "alice", msgs(0..3))).await.unwrap();
        let (tb, h) = where_is(&v, &tenant, "t");
        let (tk, _) = v.transcript_key(&tenant, &tb, &h).unwrap();
        let place = v.place(&tenant, &h.subject, &tb, h.incarnation);
        let plains: Vec<_> = msgs(0..3).iter().map(|m| message_plain(m, v.clock.now()).unwrap()).collect();
        let sealed = place.seal_chunk(v.alg, &tk, 0, &plains).unwrap();
        assert!(place.open_chunk(&tk, 0, 3, &sealed).is_ok());
        assert!(matches!(place.open_chunk(&tk, 64, 3, &sealed), Err(VaultError::Integrity(_))));
        assert!(matches!(place.open_chunk(&tk, 0, 2, &sealed), Err(VaultError::Integrity(_))));
        let plain = place.open_chunk(&tk, 0, 3, &sealed).unwrap();
        assert!(chunk_messages(&plain, 2).is_err(), "a count that does not match is corrupt");
        assert!(chunk_messages(&[2, 0], 1).is_err(), "another format version is refused");
    }
}
