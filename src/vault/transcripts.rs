//! Transcript operations. Writes hold their subject's stripe lock from the first read
//! to the batch, then wait for group commit outside it.

use std::ops::ControlFlow;
use std::sync::Arc;

use super::layout::{self, Blind};
use super::messages::Read;
use super::model::{Message, ShredReceipt, TenantId, Timestamp, Touched, Transcript, TranscriptPage};
use super::receipts::Erased;
use super::records::{self, BodyRecord, Garbage, Header, SubjectRecord};
use super::seal::{owned_message, seal_err};
use super::times;
use super::{Vault, VaultError};
use crate::crypto::{SecretKey, random_bytes};
use crate::keys::{ErasureKind, Tombstone};
use crate::store::{Batch, CommitTicket};

/// Messages read per store scan when reading a transcript.
const MESSAGE_CHUNK: usize = 1024;

/// Default and maximum page sizes of `list_transcripts`.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

impl Vault {
    /// Creates or replaces a transcript. Returns whether one was replaced.
    pub async fn put_transcript(&self, tenant: &TenantId, t: Transcript) -> Result<bool, VaultError> {
        let _writing = self.write_gate.read().await;
        self.limits.transcript(&t)?;
        let now = self.clock.now();
        let started = t.started_at.unwrap_or(now);
        if t.ended_at.is_some_and(|e| e < started) {
            return Err(VaultError::invalid("transcript.ended_at", "must not be before started_at"));
        }
        let (replaced, ticket) = {
            let _epoch = self.epoch_shared()?;
            let tkey = self.tenant_key(tenant, true)?.ok_or_else(|| VaultError::Internal("tenant key".into()))?;
            let (sb, tb) = self.blinds(&tkey, Some(&t.subject_id), Some(&t.transcript_id));
            let hkey = layout::header(tenant.as_str(), &tb);
            loop {
                let old = self.read_header(&hkey)?;
                let mut subjects = vec![&sb];
                if let Some(o) = &old {
                    subjects.push(&o.subject);
                }
                let _held = self.locks.lock(tenant.as_str(), &subjects);
                let current = self.read_header(&hkey)?;
                if current != old {
                    continue;
                }
                // Replacing a transcript destroys the old one's key: a hold keeps it (one
                // whose subject was shredded is gone already). Asked in memory first, so
                // a replace with no hold in force reads nothing more.
                if let Some(o) = &old
                    && let Some(hold) = self.hold_on(tenant, &o.subject, Some(&tb))
                    && self.check_live(tenant, o).is_ok()
                {
                    return Err(VaultError::Held(hold));
                }
                let mut batch = Batch::default();
                let mut subj = self.read_subject(tenant, &sb)?;
                let dek = match &mut subj {
                    Some(s) if s.active => self.subject_key(tenant, &sb, s.generation)?,
                    Some(s) => {
                        s.generation += 1;
                        s.active = true;
                        s.transcript_count = 0;
                        self.new_subject_key(tenant, &sb, s.generation, &mut batch)?
                    }
                    None => {
                        subj = Some(SubjectRecord { active: true, ..SubjectRecord::default() });
                        self.new_subject_key(tenant, &sb, 0, &mut batch)?
                    }
                };
                let mut subj = subj.ok_or_else(|| VaultError::Internal("subject".into()))?;
                let takes_its_place = match &old {
                    Some(o) => self.retire_header(tenant, &tb, o, &sb, subj.generation, &mut batch)?,
                    None => false,
                };
                if !takes_its_place {
                    subj.transcript_count += 1;
                }
                let place_inc = u64::from_be_bytes(random_bytes().map_err(seal_err)?);
                let place = self.place(tenant, &sb, &tb, place_inc);
                let tk = SecretKey::generate().map_err(seal_err)?;
                let inner = place.wrap_transcript_key(self.alg, &dek, subj.generation, &tk)?;
                self.put_transcript_key(&mut batch, tenant.as_str(), &tb, place_inc, subj.generation, &inner)?;
                // The key is in its own record; the body record holds only the body.
                let body = BodyRecord { wrapped_key: Vec::new(), body: place.seal_body(self.alg, &tk, &t)? };
                let records = self.message_records(&place, &tk, 0, &t.messages, now)?;
                self.put_messages(&mut batch, records)?;
                let header = Header {
                    subject: sb,
                    generation: subj.generation,
                    incarnation: place_inc,
                    started_at: started.micros(),
                    ended_at: t.ended_at.map(Timestamp::micros),
                    activity: t.ended_at.is_none().then(|| times::minute(now)),
                };
                times::reindex(&mut batch, tenant.as_str(), &tb, old.as_ref(), Some(&header));
                batch.put(layout::body(tenant.as_str(), &tb, place_inc), records::encode(&body)?);
                batch
                    .put(layout::by_subject(tenant.as_str(), &sb, subj.generation, header.started_at, &tb), Vec::new());
                batch.put(hkey.clone(), records::encode_header(&header)?);
                batch.put(layout::subject(tenant.as_str(), &sb), records::encode(&subj)?);
                self.apply(batch)?;
                if let Some(o) = &old {
                    self.forget_body(tenant, &tb, o.incarnation);
                }
                self.set_count(tenant, &tb, &header, Some(t.messages.len() as u32));
                self.hint_subject((tenant.as_str().to_owned(), tb), sb);
                break (old.is_some(), self.commit.ticket());
            }
        };
        self.durable(ticket).await?;
        Ok(replaced)
    }

    /// Queues the records of a header being replaced for removal, and keeps its
    /// subject's counter right. Returns true if the new header takes its place in the
    /// same live subject generation (so that subject's counter must not grow).
    fn retire_header(
        &self,
        tenant: &TenantId,
        tb: &Blind,
        old: &Header,
        new_subject: &Blind,
        new_generation: u32,
        batch: &mut Batch,
    ) -> Result<bool, VaultError> {
        self.queue_garbage(
            batch,
            &Garbage::Incarnation { tenant: tenant.as_str().to_owned(), transcript: *tb, incarnation: old.incarnation },
        )?;
        batch.delete(layout::body(tenant.as_str(), tb, old.incarnation));
        self.discard_transcript_key(batch, tenant.as_str(), tb, old.incarnation);
        let old_index = layout::by_subject(tenant.as_str(), &old.subject, old.generation, old.started_at, tb);
        if old.subject == *new_subject {
            let same_generation = old.generation == new_generation;
            if same_generation {
                batch.delete(old_index);
            }
            return Ok(same_generation);
        }
        if let Some(mut os) = self.read_subject(tenant, &old.subject)?
            && os.active
            && os.generation == old.generation
        {
            os.transcript_count = os.transcript_count.saturating_sub(1);
            batch.put(layout::subject(tenant.as_str(), &old.subject), records::encode(&os)?);
            batch.delete(old_index);
        }
        Ok(false)
    }

    /// Appends messages to an open transcript. Returns the new message count.
    pub async fn append_messages(
        &self,
        tenant: &TenantId,
        transcript_id: &str,
        messages: Vec<Message>,
        expected_count: Option<u32>,
    ) -> Result<Touched<u32>, VaultError> {
        let _writing = self.write_gate.read().await;
        self.limits.id("transcript_id", transcript_id)?;
        self.limits.messages("messages", &messages, false)?;
        let now = self.clock.now();
        let ((count, subject), applied) = self.with_live_header(tenant, transcript_id, |tb, h, batch| {
            if h.ended_at.is_some() {
                return Err(VaultError::FailedPrecondition("transcript is closed; no messages can be appended".into()));
            }
            let held = self.cached_count(tenant, tb, &h)?;
            if let Some(expected) = expected_count
                && expected != held
            {
                return Err(VaultError::Aborted(format!(
                    "expected_message_count is {expected} but the transcript holds {held}"
                )));
            }
            let total = u64::from(held) + messages.len() as u64;
            if total > u64::from(self.limits.max_messages_per_transcript) {
                return Err(VaultError::FailedPrecondition(format!(
                    "transcript would hold {total} messages; the limit is {}",
                    self.limits.max_messages_per_transcript
                )));
            }
            let (tk, _) = self.transcript_key(tenant, tb, &h)?;
            let place = self.place(tenant, &h.subject, tb, h.incarnation);
            let records = self.message_records(&place, &tk, held, &messages, now)?;
            self.put_messages(batch, records)?;
            self.queue_filled_groups(batch, tenant.as_str(), tb, &h, held, total as u32);
            let minute = times::minute(now);
            if h.activity != Some(minute) {
                let moved = Header { activity: Some(minute), ..h.clone() };
                times::reindex(batch, tenant.as_str(), tb, Some(&h), Some(&moved));
                batch.put(layout::header(tenant.as_str(), tb), records::encode_header(&moved)?);
            }
            // Still under the stripe lock; if the batch then fails, the entry is dropped below.
            self.set_count(tenant, tb, &h, Some(total as u32));
            Ok(total as u32)
        })?;
        self.durable(applied.ticket()).await?;
        Ok(Touched::new(count, &subject))
    }

    /// Closes a transcript; `ended_at` defaults to now. Returns the time recorded.
    pub async fn close_transcript(
        &self,
        tenant: &TenantId,
        transcript_id: &str,
        ended_at: Option<Timestamp>,
    ) -> Result<Touched<Timestamp>, VaultError> {
        let _writing = self.write_gate.read().await;
        self.limits.id("transcript_id", transcript_id)?;
        let ended = ended_at.unwrap_or_else(|| self.clock.now());
        let ((ended, subject), applied) = self.with_live_header(tenant, transcript_id, |tb, mut h, batch| {
            if h.ended_at.is_some() {
                return Err(VaultError::FailedPrecondition("transcript is already closed".into()));
            }
            if ended.micros() < h.started_at {
                return Err(VaultError::invalid("ended_at", "must not be before the transcript's started_at"));
            }
            let count = self.cached_count(tenant, tb, &h)?;
            self.queue_last_group(batch, tenant.as_str(), tb, &h, count);
            let before = h.clone();
            h.ended_at = Some(ended.micros());
            h.activity = None;
            times::reindex(batch, tenant.as_str(), tb, Some(&before), Some(&h));
            batch.put(layout::header(tenant.as_str(), tb), records::encode_header(&h)?);
            Ok(ended)
        })?;
        self.durable(applied.ticket()).await?;
        Ok(Touched::new(ended, &subject))
    }

    /// Deletes a transcript: a crypto-shred of its key. The tombstone is durable in the
    /// erasure ledger before the key's record goes; copies elsewhere are sealed under this
    /// epoch's key-store key, which the next rotation destroys. Its ciphertext is reclaimed
    /// in the background.
    pub async fn delete_transcript(
        &self,
        tenant: &TenantId,
        transcript_id: &str,
    ) -> Result<Touched<ShredReceipt>, VaultError> {
        let _writing = self.write_gate.read().await;
        self.limits.id("transcript_id", transcript_id)?;
        let now = self.clock.now();
        let ((tb, subject), ticket) = self.with_live_header(tenant, transcript_id, |tb, h, change| {
            self.refuse_if_held(tenant, &h.subject, Some(tb))?;
            self.queue_delete(tenant, tb, &h, change)?;
            let token = self.transcript_token(tenant.as_str(), tb, h.incarnation);
            let tomb = self.tombstone(ErasureKind::Transcript, tenant.as_str(), token, now);
            let epoch = tomb.epoch;
            change.erasure = Some(tomb);
            Ok((*tb, h.incarnation, epoch))
        })?;
        let (tb, incarnation, epoch) = tb;
        self.forget_body(tenant, &tb, incarnation);
        self.forget_subject_hints(Some((tenant, &tb)));
        let counter = match ticket {
            Applied::Erasure(ticket, counter) => {
                self.erasure_durable(ticket, counter).await?;
                counter
            }
            Applied::Plain(_) => return Err(VaultError::Internal("a delete without its tombstone".into())),
        };
        let receipt = self.receipt(
            tenant,
            Erased {
                kind: ErasureKind::Transcript,
                subject: &subject,
                transcript: Some(&tb),
                at: now,
                transcripts_erased: 1,
                done: Some((epoch, counter)),
            },
        )?;
        Ok(Touched::new(receipt, &subject))
    }

    /// Reads a whole transcript, decrypted.
    pub fn get_transcript(&self, tenant: &TenantId, transcript_id: &str) -> Result<Transcript, VaultError> {
        self.get_transcript_reserving(tenant, transcript_id, &mut |_| Ok(()))
    }

    /// [`Vault::get_transcript`], calling `reserve` with the bytes read so far before each
    /// message is decrypted: how the edge bounds the memory reads hold at once.
    pub fn get_transcript_reserving(
        &self,
        tenant: &TenantId,
        transcript_id: &str,
        reserve: &mut dyn FnMut(usize) -> Result<(), String>,
    ) -> Result<Transcript, VaultError> {
        self.limits.id("transcript_id", transcript_id)?;
        let tkey = self.tenant_key(tenant, false)?.ok_or(VaultError::NotFound("transcript"))?;
        let (_, tb) = self.blinds(&tkey, None, Some(transcript_id));
        let hkey = layout::header(tenant.as_str(), &tb);
        let h = self.read_header(&hkey)?.ok_or(VaultError::NotFound("transcript"))?;
        self.check_live(tenant, &h)?;
        let t =
            self.read_transcript(tenant, &tb, &h, reserve).or_else(|e| self.unless_replaced(e, tenant, &hkey, &h))?;
        // No stored count to check against: if the transcript was replaced or deleted while
        // we read (and its messages reclaimed), what we read may be cut short. Say so instead.
        // A close meanwhile changes only ended_at, not the messages: that read stands.
        match self.read_header(&hkey)? {
            Some(now) if now.incarnation == h.incarnation => Ok(t),
            Some(_) => Err(VaultError::Aborted("the transcript changed while it was read; retry".into())),
            None => Err(VaultError::NotFound("transcript")),
        }
    }

    /// A read that failed because a concurrent replace, delete or shred removed what it
    /// was reading is a NOT_FOUND (or erased), not data loss: re-check before blaming the disk.
    pub(super) fn unless_replaced<T>(
        &self,
        e: VaultError,
        tenant: &TenantId,
        hkey: &[u8],
        seen: &Header,
    ) -> Result<T, VaultError> {
        if !matches!(e, VaultError::Corrupt(_) | VaultError::Integrity(_)) {
            return Err(e);
        }
        match self.read_header(hkey)? {
            Some(now) if now == *seen => {
                self.check_live(tenant, seen)?;
                Err(e)
            }
            Some(_) => Err(VaultError::Aborted("the transcript changed while it was read; retry".into())),
            None => Err(VaultError::NotFound("transcript")),
        }
    }

    fn read_transcript(
        &self,
        tenant: &TenantId,
        tb: &Blind,
        h: &Header,
        reserve: &mut dyn FnMut(usize) -> Result<(), String>,
    ) -> Result<Transcript, VaultError> {
        let (mut t, tk) = self.summary(tenant, tb, h)?;
        let mut bytes = 0usize;
        let limit = self.limits.max_response_bytes;
        self.read_messages(tenant, tb, h, &tk, MESSAGE_CHUNK, &mut |read| {
            match read {
                Read::Sealed(n) => {
                    bytes += n;
                    if bytes > limit {
                        return Err(VaultError::FailedPrecondition(format!(
                            "transcript is larger than max_response_bytes ({limit})"
                        )));
                    }
                    reserve(bytes).map_err(VaultError::Busy)?;
                }
                Read::Message(m) => t.messages.push(owned_message(m)),
            }
            Ok(ControlFlow::Continue(()))
        })?;
        t.message_count = t.messages.len() as u32;
        Ok(t)
    }

    /// The message count for an append: from the in-memory count if present, else the
    /// store. The caller holds the subject's stripe lock.
    fn cached_count(&self, tenant: &TenantId, tb: &Blind, h: &Header) -> Result<u32, VaultError> {
        let key = (tenant.as_str().to_owned(), *tb, h.incarnation);
        if let Some(n) = self.counts.lock().ok().and_then(|mut c| c.get(&key).copied()) {
            return Ok(n);
        }
        self.message_count(tenant, tb, h)
    }

    pub(super) fn set_count(&self, tenant: &TenantId, tb: &Blind, h: &Header, count: Option<u32>) {
        if let Ok(mut c) = self.counts.lock() {
            let key = (tenant.as_str().to_owned(), *tb, h.incarnation);
            match count {
                Some(n) => {
                    c.put(key, n);
                }
                None => {
                    c.pop(&key);
                }
            }
        }
    }

    /// Lists a subject's transcripts, newest first, without their messages.
    pub fn list_transcripts(
        &self,
        tenant: &TenantId,
        subject_id: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<TranscriptPage, VaultError> {
        self.limits.id("subject_id", subject_id)?;
        if page_size > MAX_PAGE_SIZE {
            return Err(VaultError::invalid("page_size", format!("must be at most {MAX_PAGE_SIZE}")));
        }
        let page_size = if page_size == 0 { DEFAULT_PAGE_SIZE } else { page_size } as usize;
        let after = decode_page_token(page_token)?;
        let empty = TranscriptPage { transcripts: Vec::new(), next_page_token: None };
        let Some(tkey) = self.tenant_key(tenant, false)? else { return Ok(empty) };
        let (sb, _) = self.blinds(&tkey, Some(subject_id), None);
        let Some(subj) = self.read_subject(tenant, &sb)? else { return Ok(empty) };
        if !subj.active {
            return Err(VaultError::Erased("no transcripts to list"));
        }
        let prefix = layout::by_subject_prefix(tenant.as_str(), &sb, subj.generation);
        let start = after.map(|a| [prefix.as_slice(), &a].concat());
        let entries = self.store.scan(&prefix, start.as_deref(), page_size + 1)?;
        let mut transcripts = Vec::with_capacity(entries.len().min(page_size));
        for (key, _) in entries.iter().take(page_size) {
            let tb = layout::trailing_blind(key).ok_or(VaultError::Corrupt("subject index"))?;
            let hkey = layout::header(tenant.as_str(), &tb);
            let Some(h) = self.read_header(&hkey)? else { continue };
            if h.subject != sb || h.generation != subj.generation {
                continue;
            }
            let summary = self.summary(tenant, &tb, &h).and_then(|(mut t, _)| {
                t.message_count = self.message_count(tenant, &tb, &h)?;
                Ok(t)
            });
            match summary.or_else(|e| self.unless_replaced(e, tenant, &hkey, &h)) {
                Ok(t) => transcripts.push(t),
                Err(VaultError::NotFound(_) | VaultError::Aborted(_) | VaultError::Erased(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        let next_page_token =
            (entries.len() > page_size).then(|| hex::encode(&entries[page_size - 1].0[prefix.len()..]));
        Ok(TranscriptPage { transcripts, next_page_token })
    }

    /// Runs `f` on a live transcript's header under its subject's lock, applies the
    /// change it fills (through the erasure ledger if it carries a tombstone), and
    /// returns its result with what to wait on.
    fn with_live_header<R>(
        &self,
        tenant: &TenantId,
        transcript_id: &str,
        f: impl FnOnce(&Blind, Header, &mut Change) -> Result<R, VaultError>,
    ) -> Result<((R, Blind), Applied), VaultError> {
        // Held until the batch is applied, like every writer: an erasure of the tenant
        // waits for it, and nothing is written under a tenant after it was erased.
        let _epoch = self.epoch_shared()?;
        let tkey = self.tenant_key(tenant, false)?.ok_or(VaultError::NotFound("transcript"))?;
        let (_, tb) = self.blinds(&tkey, None, Some(transcript_id));
        let hkey = layout::header(tenant.as_str(), &tb);
        let hint_slot = (tenant.as_str().to_owned(), tb);
        let hinted = self.subject_hints.lock().ok().and_then(|mut c| c.get(&hint_slot).copied());
        let mut hint = hinted;
        loop {
            let seen = match hint.take() {
                Some(s) => s,
                None => self.read_header(&hkey)?.ok_or(VaultError::NotFound("transcript"))?.subject,
            };
            let _held = self.locks.lock(tenant.as_str(), &[&seen]);
            // Only under its subject's lock is a header's subject settled: a put moving the
            // transcript to another subject holds both locks. A stale hint costs a retry.
            let h = self.read_header(&hkey)?.ok_or(VaultError::NotFound("transcript"))?;
            if h.subject != seen {
                continue;
            }
            self.check_live(tenant, &h)?;
            let mut change = Change::default();
            let counted = h.clone();
            let subject = h.subject;
            let r = f(&tb, h, &mut change)?;
            let Change { batch, erasure } = change;
            let applied = match erasure {
                None => self.apply(batch).map(|()| None),
                Some(t) => self.apply_erasure(vec![t], batch).map(Some),
            };
            let applied = match applied {
                Ok(counter) => counter,
                Err(e) => {
                    // `f` may have counted messages that were never written.
                    self.set_count(tenant, &tb, &counted, None);
                    return Err(e);
                }
            };
            if hinted != Some(subject) {
                self.hint_subject(hint_slot, subject);
            }
            let ticket = self.commit.ticket();
            let applied = match applied {
                Some(counter) => Applied::Erasure(ticket, counter),
                None => Applied::Plain(ticket),
            };
            return Ok(((r, subject), applied));
        }
    }

    /// Remembers which subject's lock a write to this transcript takes first. Advisory:
    /// the header read under the lock decides, so a wrong entry is never trusted.
    fn hint_subject(&self, slot: (String, Blind), subject: Blind) {
        if let Ok(mut c) = self.subject_hints.lock() {
            c.put(slot, subject);
        }
    }

    /// Drops what memory links to transcripts that are gone: a deleted one's hint, or
    /// (`None`) every hint, after a shred or a tenant erasure. The next write to each
    /// transcript reads its header once more.
    pub(super) fn forget_subject_hints(&self, only: Option<(&TenantId, &Blind)>) {
        if let Ok(mut c) = self.subject_hints.lock() {
            match only {
                Some((tenant, tb)) => {
                    c.pop(&(tenant.as_str().to_owned(), *tb));
                }
                None => c.clear(),
            }
        }
    }

    pub(super) fn read_header(&self, key: &[u8]) -> Result<Option<Header>, VaultError> {
        match self.store.get(key)? {
            Some(b) => Ok(Some(records::decode_header(&b)?)),
            None => Ok(None),
        }
    }

    /// A transcript is readable only while its subject generation's key lives.
    pub(super) fn check_live(&self, tenant: &TenantId, h: &Header) -> Result<(), VaultError> {
        match self.read_subject(tenant, &h.subject)? {
            Some(s) if s.active && s.generation == h.generation => Ok(()),
            _ => Err(VaultError::Erased("transcript not found")),
        }
    }

    /// A transcript's key and body record. Transcript keys are not cached: unwrapping one
    /// costs well under a microsecond, and an uncached key is one a shred never has to
    /// hunt for in memory (the subject key is the only one evicted, in O(1)).
    pub(super) fn transcript_key(
        &self,
        tenant: &TenantId,
        tb: &Blind,
        h: &Header,
    ) -> Result<(Box<SecretKey>, Arc<BodyRecord>), VaultError> {
        let dek = self.subject_key(tenant, &h.subject, h.generation)?;
        let body = self.body_record(tenant, tb, h)?;
        let place = self.place(tenant, &h.subject, tb, h.incarnation);
        Ok((Box::new(place.unwrap_transcript_key(&dek, h.generation, &body.wrapped_key)?), body))
    }

    /// A transcript without messages (and a zero count): header fields plus the decrypted
    /// body. Returns the transcript key too, for callers that go on to read messages.
    pub(super) fn summary(
        &self,
        tenant: &TenantId,
        tb: &Blind,
        h: &Header,
    ) -> Result<(Transcript, Box<SecretKey>), VaultError> {
        let (tk, body) = self.transcript_key(tenant, tb, h)?;
        let place = self.place(tenant, &h.subject, tb, h.incarnation);
        let mut t = place.open_body(&tk, &body.body)?;
        t.started_at = Some(Timestamp::from_micros(h.started_at).ok_or(VaultError::Corrupt("transcript header"))?);
        t.ended_at = h.ended_at.and_then(Timestamp::from_micros);
        Ok((t, tk))
    }

    pub(super) fn queue_garbage(&self, batch: &mut Batch, g: &Garbage) -> Result<(), VaultError> {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.clock.now().micros().to_be_bytes());
        id[8..].copy_from_slice(&random_bytes::<8>().map_err(seal_err)?);
        batch.put(layout::garbage(id), records::encode(g)?);
        Ok(())
    }
}

/// What a write under a live header queues: its batch and, for a delete, its tombstone.
#[derive(Default)]
pub(super) struct Change {
    pub batch: Batch,
    pub erasure: Option<Tombstone>,
}

impl std::ops::Deref for Change {
    type Target = Batch;
    fn deref(&self) -> &Batch {
        &self.batch
    }
}

impl std::ops::DerefMut for Change {
    fn deref_mut(&mut self) -> &mut Batch {
        &mut self.batch
    }
}

/// How a write under a live header was applied: what its caller waits on.
pub(super) enum Applied {
    Plain(CommitTicket),
    /// Through the erasure ledger, as entry `.1`.
    Erasure(CommitTicket, u64),
}

impl Applied {
    fn ticket(&self) -> CommitTicket {
        match self {
            Applied::Plain(t) | Applied::Erasure(t, _) => *t,
        }
    }
}

/// A page token is the hex of the index key suffix after the subject prefix.
fn decode_page_token(token: &str) -> Result<Option<Vec<u8>>, VaultError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes =
        hex::decode(token).map_err(|_| VaultError::invalid("page_token", "is not a token this server issued"))?;
    if bytes.len() != 40 {
        return Err(VaultError::invalid("page_token", "is not a token this server issued"));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::super::{AuthorRole, testing};
    use super::*;

    fn message(text: &str) -> Message {
        Message::new("m", AuthorRole::Visitor, "V", text)
    }

    /// A hint naming the wrong subject must not let an append past the right subject's
    /// lock (a shred holding it must be waited for): the append re-reads the header under
    /// the hinted lock, sees the mismatch and takes the right one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_subject_hint_still_makes_an_append_wait_for_the_right_subject_lock() {
        let dir = tempfile::tempdir().unwrap();
        let v = std::sync::Arc::new(testing::open(dir.path(), testing::HandClock::new(), |_| {}));
        let tenant = TenantId::parse("acme").unwrap();
        v.put_transcript(&tenant, Transcript::new("t", "alice", vec![message("one")])).await.unwrap();
        let tkey = v.tenant_key(&tenant, false).unwrap().unwrap();
        let (alice, tb) = v.blinds(&tkey, Some("alice"), Some("t"));
        let other = (0..)
            .map(|i| v.blinds(&tkey, Some(&format!("bob{i}")), None).0)
            .find(|b| !super::super::locks::LockTable::same_stripe(tenant.as_str(), &alice, b))
            .unwrap();
        v.hint_subject((tenant.as_str().to_owned(), tb), other);

        let held = v.locks.lock(tenant.as_str(), &[&alice]);
        let append = {
            let (v, tenant) = (v.clone(), tenant.clone());
            tokio::spawn(async move { v.append_messages(&tenant, "t", vec![message("two")], Some(1)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!append.is_finished(), "the append must wait for alice's lock, not take the hinted one");
        drop(held);
        assert_eq!(append.await.unwrap().unwrap().value, 2);
        let hinted = v.subject_hints.lock().unwrap().get(&(tenant.as_str().to_owned(), tb)).copied();
        assert_eq!(hinted, Some(alice), "the hint follows the header");
        let texts: Vec<_> = v.get_transcript(&tenant, "t").unwrap().messages.into_iter().map(|m| m.text).collect();
        assert_eq!(texts, ["one", "two"]);
    }

    /// A shard's files copied into another region do not open there, even under the same
    /// root key: the key directory says whose it is, and without that stamp every
    /// envelope still names its region in its AAD.
    #[tokio::test]
    async fn a_shard_copied_into_another_region_does_not_open_there_under_the_same_root_key() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        let tenant = TenantId::parse("acme").unwrap();
        {
            let v = testing::open(&a, testing::HandClock::new(), |o| o.region = "eu".into());
            v.put_transcript(&tenant, Transcript::new("t", "alice", vec![message("hallo")])).await.unwrap();
            v.sync().unwrap();
        }
        let copied = std::process::Command::new("cp").arg("-a").arg(&a).arg(&b).status().unwrap();
        assert!(copied.success());
        let open_as = |region: &str| {
            let root = crate::keys::RootKeySource::Hex(zeroize::Zeroizing::new("42".repeat(32)));
            let mut opts = super::super::VaultOptions::new(b.join("data"), b.join("keys"), root);
            opts.region = region.into();
            Vault::open_with_clock(opts, testing::HandClock::new()).map(|(v, _)| v)
        };
        let e = open_as("us").err().expect("a shard of eu opened as us").to_string();
        assert!(e.contains("region \"eu\"") && e.contains("\"us\""), "{e}");
        // Without the stamp, the keys themselves refuse: their AAD names eu.
        std::fs::remove_file(b.join("keys/keydir.region")).unwrap();
        let e = open_as("us").err().expect("eu's keys opened in us").to_string();
        assert!(e.contains("does not open"), "{e}");
        // Control: the same copy opens as the region it is.
        let v = open_as("eu").expect("the copy opens as eu");
        assert_eq!(v.get_transcript(&tenant, "t").unwrap().messages[0].text, "hallo");
    }
}
