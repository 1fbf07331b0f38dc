//! Records of processing: an append-only, tamper-evident trail of every data access,
//! erasure, admin change and failed authentication. Each record's MAC (HMAC-SHA256 under
//! a root-derived key) covers the MAC of the record before it, so editing, removing or
//! reordering records breaks the chain; `verify` walks it. Cutting off the newest
//! records is only visible against a head published elsewhere (see SECURITY.md).
//!
//! The trail lives in append-only segment files beside the store (`segment.rs`), not in
//! the B-tree: a record is one `write`, made durable by the same group commit as the
//! change it records. Trails written by earlier versions into the store are moved over
//! once, at open (`legacy.rs`).

mod anchor;
mod legacy;
mod prune;
mod record;
mod segment;

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use anchor::AnchorCheck;
pub use prune::{Checkpoint, Pruned};
pub use record::{Event, Operation, Outcome, Record};
use segment::{FrameError, Reader, SegmentView, Segments};
pub use segment::{
    HEADER_LEN as SEGMENT_HEADER_LEN, decode_mark as decode_audit_mark, inspect as inspect_segments,
    mark_key as audit_mark_key, tail_is_damage as audit_tail_is_damage,
};

use crate::clock::Clock;
use crate::crypto::{SecretKey, blind_index};
use crate::store::{Durability, KvStore, StoreError, SyncTarget};

const RECORD_V2: u8 = 2;
/// A V2 record followed by how many events it stands for (an aggregate of refusals).
const RECORD_V3: u8 = 3;
/// A V2 record followed by its count and a detail: the reason an operator gave.
const RECORD_V4: u8 = 4;
/// Longest detail kept: a hold's id and a reason of the longest allowed (500) fit whole.
pub const MAX_DETAIL: usize = 600;
const MAC_LEN: usize = 32;
const MAC_DOMAIN: &[u8] = b"chatvault/audit/v2";
/// Records a query examines per call; it returns a page token to go on.
const SCAN_BUDGET: usize = 50_000;
/// A segment holds ~90,000 records: the unit a reader starts from and, later, archiving removes.
pub const SEGMENT_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("audit record {0} is malformed")]
    Corrupt(u64),
    #[error("audit record {0} fails its MAC: altered, or written under another root key")]
    BadMac(u64),
    #[error(
        "the audit trail kept in the store by an earlier version is broken at record {0} ({1}); it was not migrated"
    )]
    Legacy(u64, String),
    #[error("the audit trail's pruning checkpoint fails its MAC: altered, or written under another root key")]
    BadCheckpoint,
    #[error("the audit trail is broken at record {0} ({1}); nothing is pruned until `audit verify` is clean")]
    Broken(u64, String),
    #[error("internal lock poisoned")]
    Poisoned,
}

impl From<std::io::Error> for AuditError {
    fn from(e: std::io::Error) -> Self {
        AuditError::Store(e.into())
    }
}

/// Which records a query wants; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    pub key_id: Option<String>,
    pub operations: Vec<Operation>,
    pub subject: Option<String>,
    pub since_micros: Option<i64>,
    pub until_micros: Option<i64>,
}

impl Filter {
    fn matches(&self, r: &Record) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == r.tenant)
            && self.key_id.as_ref().is_none_or(|k| *k == r.key_id)
            && self.subject.as_ref().is_none_or(|s| *s == r.subject)
            && (self.operations.is_empty() || self.operations.contains(&r.operation))
            && self.since_micros.is_none_or(|t| r.at_micros >= t)
            && self.until_micros.is_none_or(|t| r.at_micros < t)
    }
}

/// A page of query results; `next_after` continues the scan when set.
#[derive(Debug)]
pub struct Page {
    pub records: Vec<Record>,
    pub next_after: Option<u64>,
}

/// What walking the chain found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verification {
    pub records: u64,
    /// Sequence number and MAC of the newest record: publish these elsewhere to detect truncation.
    pub head_seq: u64,
    pub head_mac: String,
    /// The first record that breaks the chain, and how.
    pub broken: Option<(u64, String)>,
    /// Records lost in a restore, accepted by the operator and recorded in the erasure
    /// ledger: not a break, but never hidden.
    pub accepted_gaps: Vec<crate::keys::AuditGap>,
    /// Records pruned by the trail's retention: the chain is proven from the checkpoint
    /// after them (`first_seq`).
    pub pruned: u64,
    pub first_seq: u64,
}

/// A blind id as stored: 32 raw bytes instead of 64 hex characters.
#[derive(Serialize, Deserialize)]
enum StoredId {
    None,
    Blind([u8; 32]),
    Other(String),
}

impl StoredId {
    fn pack(s: String) -> StoredId {
        if s.is_empty() {
            return StoredId::None;
        }
        let mut b = [0u8; 32];
        match hex::decode_to_slice(&s, &mut b) {
            Ok(()) if s.bytes().all(|c| !c.is_ascii_uppercase()) => StoredId::Blind(b),
            _ => StoredId::Other(s),
        }
    }
    fn unpack(self) -> String {
        match self {
            StoredId::None => String::new(),
            StoredId::Blind(b) => hex::encode(b),
            StoredId::Other(s) => s,
        }
    }
}

/// A record as stored; its chain link is in the MAC, not in the body.
#[derive(Serialize, Deserialize)]
struct Stored {
    seq: u64,
    at_micros: i64,
    operation: Operation,
    outcome: Outcome,
    tenant: String,
    key_id: String,
    subject: StoredId,
    transcript: StoredId,
    source: String,
}

struct Head {
    next_seq: u64,
    prev: [u8; MAC_LEN],
}

pub struct AuditLog {
    segments: Segments,
    key: SecretKey,
    clock: Arc<dyn Clock>,
    head: Mutex<Head>,
    /// The newest record a `fsync` covered: what the erasure ledger may anchor.
    durable: Mutex<Option<crate::keys::AuditAnchor>>,
    /// Losses the operator accepted (recorded in the erasure ledger).
    gaps: Mutex<Vec<crate::keys::AuditGap>>,
}

impl AuditLog {
    /// Opens the trail in `dir` and finds its newest record, which the next one chains to.
    /// A trail an earlier version kept in `store` is moved into `dir` first.
    pub fn open(dir: &Path, store: &dyn KvStore, key: SecretKey, clock: Arc<dyn Clock>) -> Result<Self, AuditError> {
        Self::open_sized(dir, store, key, clock, SEGMENT_BYTES, false)
    }

    /// [`Self::open`] with segments of `segment_bytes`: what retention prunes at a time.
    pub fn open_sized(
        dir: &Path,
        store: &dyn KvStore,
        key: SecretKey,
        clock: Arc<dyn Clock>,
        segment_bytes: u64,
        accept_damage: bool,
    ) -> Result<Self, AuditError> {
        legacy::migrate(dir, store, &key, segment_bytes)?;
        let acknowledged = store.get(&segment::mark_key())?.and_then(|b| segment::decode_mark(&b));
        Self::open_segments(Segments::open_checked(dir, segment_bytes, acknowledged, accept_damage)?, key, clock)
    }

    fn open_segments(segments: Segments, key: SecretKey, clock: Arc<dyn Clock>) -> Result<Self, AuditError> {
        let log = AuditLog {
            segments,
            key,
            clock,
            head: Mutex::new(Head { next_seq: 1, prev: [0; MAC_LEN] }),
            durable: Mutex::new(None),
            gaps: Mutex::new(Vec::new()),
        };
        if let Some(view) = log.segments.snapshot()?.pop() {
            // Only the newest record is checked here (the rest is `verify`'s job): a damaged
            // trail must not keep the server, and with it the verify call, from starting.
            let mut r = Reader::open(&view).map_err(|e| frame_err(e, view.first_seq))?;
            let (mut prev, mut last, mut before) = (r.header.prev, None, r.header.prev);
            while let Some(p) = r.next_frame().map_err(|e| frame_err(e, view.first_seq))? {
                before = prev;
                prev = stored_mac(&p).ok_or(AuditError::Corrupt(view.first_seq))?;
                last = Some(p);
            }
            let head = match last {
                Some(p) => {
                    let seq = match log.decode(&p, &before, view.first_seq) {
                        Ok((rec, _)) => rec.seq,
                        // Serving goes on (so `verify` can be asked); new records chain to
                        // what is stored, and the break stays where verify will find it.
                        Err(AuditError::BadMac(seq)) => {
                            tracing::error!(
                                seq,
                                "audit trail: the newest record fails its MAC; run `admin audit verify`"
                            );
                            seq
                        }
                        Err(e) => return Err(e),
                    };
                    Head { next_seq: seq + 1, prev }
                }
                None => Head { next_seq: view.first_seq, prev: r.header.prev },
            };
            *log.head.lock().map_err(|_| AuditError::Poisoned)? = head;
        }
        Ok(log)
    }

    fn mac(&self, prev: &[u8; MAC_LEN], body: &[u8]) -> [u8; MAC_LEN] {
        let mut linked = Vec::with_capacity(MAC_LEN + body.len());
        linked.extend_from_slice(prev);
        linked.extend_from_slice(body);
        blind_index(&self.key, MAC_DOMAIN, &linked)
    }

    /// Checks one stored record against the MAC of the one before it. `near` names a
    /// sequence number for errors when the record's own cannot be read.
    fn decode(&self, payload: &[u8], prev: &[u8; MAC_LEN], near: u64) -> Result<(Record, [u8; MAC_LEN]), AuditError> {
        let (&v, rest) = payload.split_first().ok_or(AuditError::Corrupt(near))?;
        if !(RECORD_V2..=RECORD_V4).contains(&v) || rest.len() < MAC_LEN {
            return Err(AuditError::Corrupt(near));
        }
        let (body, mac) = rest.split_at(rest.len() - MAC_LEN);
        let (s, tail): (Stored, &[u8]) = postcard::take_from_bytes(body).map_err(|_| AuditError::Corrupt(near))?;
        let (count, detail) = match (v, tail) {
            (RECORD_V2, []) => (1, String::new()),
            (RECORD_V3, tail) => {
                (postcard::from_bytes::<u32>(tail).map_err(|_| AuditError::Corrupt(near))?, String::new())
            }
            (RECORD_V4, tail) => postcard::from_bytes::<(u32, String)>(tail).map_err(|_| AuditError::Corrupt(near))?,
            _ => return Err(AuditError::Corrupt(near)),
        };
        if self.mac(prev, body) != mac {
            return Err(AuditError::BadMac(s.seq));
        }
        let rec = Record {
            seq: s.seq,
            at_micros: s.at_micros,
            operation: s.operation,
            outcome: s.outcome,
            tenant: s.tenant,
            key_id: s.key_id,
            subject: s.subject.unpack(),
            transcript: s.transcript.unpack(),
            source: s.source,
            count,
            detail,
            prev: *prev,
        };
        Ok((rec, mac.try_into().map_err(|_| AuditError::Corrupt(near))?))
    }

    /// Appends one record, at `at_micros` (now, unless migrating). It reaches the kernel
    /// now and the disk with the next group commit, which callers wait for when the
    /// operation changed state.
    pub fn append(&self, operation: Operation, outcome: Outcome, ev: Event) -> Result<u64, AuditError> {
        self.append_at(self.clock.now().micros(), operation, outcome, ev)
    }

    fn append_at(&self, at_micros: i64, operation: Operation, outcome: Outcome, ev: Event) -> Result<u64, AuditError> {
        let mut head = self.head.lock().map_err(|_| AuditError::Poisoned)?;
        let seq = head.next_seq;
        let count = ev.count;
        let stored = Stored {
            seq,
            at_micros,
            operation,
            outcome,
            tenant: ev.tenant,
            key_id: ev.key_id,
            subject: StoredId::pack(ev.subject),
            transcript: StoredId::pack(ev.transcript),
            source: ev.source,
        };
        let detail: String = ev.detail.chars().filter(|c| !c.is_control()).take(MAX_DETAIL).collect();
        let version = match (count > 1, detail.is_empty()) {
            (_, false) => RECORD_V4,
            (true, true) => RECORD_V3,
            (false, true) => RECORD_V2,
        };
        let mut payload = vec![version];
        postcard::to_io(&stored, &mut payload).map_err(|_| AuditError::Corrupt(seq))?;
        match version {
            RECORD_V3 => postcard::to_io(&count, &mut payload).map(drop),
            RECORD_V4 => postcard::to_io(&(count, &detail), &mut payload).map(drop),
            _ => Ok(()),
        }
        .map_err(|_| AuditError::Corrupt(seq))?;
        let mac = self.mac(&head.prev, &payload[1..]);
        payload.extend_from_slice(&mac);
        self.segments.append(seq, &head.prev, &payload)?;
        *head = Head { next_seq: seq + 1, prev: mac };
        Ok(seq)
    }

    /// Every segment's file with the bytes it holds now: what a backup copies.
    pub fn files_with_lengths(&self) -> Result<Vec<(std::path::PathBuf, u64)>, AuditError> {
        Ok(self.segments.snapshot()?.into_iter().map(|v| (v.path, v.len)).collect())
    }

    /// Records after `after` (a sequence number) that match, oldest first, up to `limit`.
    pub fn query(&self, filter: &Filter, after: u64, limit: usize) -> Result<Page, AuditError> {
        let limit = limit.clamp(1, 1000);
        let views = self.segments.snapshot()?;
        // The segment holding record `after + 1` is the last one starting at or before it.
        let start = views.partition_point(|v| v.first_seq <= after.saturating_add(1)).saturating_sub(1);
        let mut records = Vec::new();
        let mut scanned = 0;
        for view in views.get(start..).unwrap_or_default() {
            let mut walk = Walk::open(self, view)?;
            while let Some(rec) = walk.next_record()? {
                if rec.seq <= after {
                    continue;
                }
                scanned += 1;
                let seq = rec.seq;
                if filter.matches(&rec) {
                    records.push(rec);
                }
                if records.len() == limit || scanned == SCAN_BUDGET {
                    return Ok(Page { records, next_after: Some(seq) });
                }
            }
        }
        Ok(Page { records, next_after: None })
    }

    /// Walks the whole chain: every MAC, every link, no gaps in the sequence but the ones
    /// the operator accepted (recorded in the erasure ledger, reported apart).
    pub fn verify(&self) -> Result<Verification, AuditError> {
        let mut expect_seq = 1u64;
        let mut prev = [0u8; MAC_LEN];
        let mut records = 0;
        let mut accepted = Vec::new();
        let checkpoint = match self.checkpoint() {
            Ok(c) => c,
            Err(AuditError::BadCheckpoint) => {
                let why = AuditError::BadCheckpoint.to_string();
                return Ok(Verification {
                    records: 0,
                    head_seq: 0,
                    head_mac: String::new(),
                    broken: Some((0, why)),
                    accepted_gaps: Vec::new(),
                    pruned: 0,
                    first_seq: 0,
                });
            }
            Err(e) => return Err(e),
        };
        if let Some(c) = &checkpoint {
            expect_seq = c.first_seq;
            prev = c.prev;
        }
        let (pruned, first_seq) = checkpoint.as_ref().map(|c| (c.pruned, c.first_seq)).unwrap_or((0, 1));
        let report = |records, next_seq: u64, prev: [u8; MAC_LEN], broken, accepted_gaps| Verification {
            records,
            head_seq: next_seq.saturating_sub(1),
            head_mac: hex::encode(prev),
            broken,
            accepted_gaps,
            pruned,
            first_seq,
        };
        for view in self.segments.snapshot()? {
            // Left by a prune a crash cut short: before the checkpoint, so not the chain's.
            if view.first_seq < first_seq {
                continue;
            }
            let reader = match Reader::open(&view) {
                Ok(r) => r,
                Err(e) => return Ok(report(records, expect_seq, prev, Some((expect_seq, frame_why(e))), accepted)),
            };
            let header = reader.header;
            if header.first_seq != expect_seq
                && let Some(gap) = self.accepted_gap(expect_seq, header.first_seq)
                && header.prev == gap.to_mac
            {
                // A loss the operator accepted in a restore: the chain goes on from the
                // anchored record, whose MAC this segment names.
                accepted.push(gap);
                expect_seq = header.first_seq;
                prev = header.prev;
            }
            if header.first_seq != expect_seq {
                let why = format!("records {expect_seq}..{} are missing", header.first_seq);
                return Ok(report(records, expect_seq, prev, Some((expect_seq, why)), accepted));
            }
            if header.prev != prev {
                let why = "its segment does not chain to the record before it".to_string();
                return Ok(report(records, expect_seq, prev, Some((expect_seq, why)), accepted));
            }
            let mut walk = Walk::new(self, reader, view.first_seq);
            loop {
                match walk.next_record() {
                    Ok(None) => break,
                    Ok(Some(rec)) if rec.seq != expect_seq => {
                        let why = if rec.seq > expect_seq {
                            format!("records {expect_seq}..{} are missing", rec.seq)
                        } else {
                            format!("record {} appears again", rec.seq)
                        };
                        return Ok(report(records, expect_seq, prev, Some((expect_seq, why)), accepted));
                    }
                    Ok(Some(_)) => {
                        prev = walk.prev;
                        records += 1;
                        expect_seq += 1;
                    }
                    Err(AuditError::Store(e)) => return Err(AuditError::Store(e)),
                    Err(e) => {
                        return Ok(report(records, expect_seq, prev, Some((expect_seq, e.to_string())), accepted));
                    }
                }
            }
        }
        Ok(report(records, expect_seq, prev, None, accepted))
    }
}

impl SyncTarget for AuditLog {
    fn sync(&self, mode: Durability) -> Result<(), StoreError> {
        self.sync_and_note(mode)
    }

    fn synced_mark(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        self.segments.synced_mark()
    }
}

/// Records of one segment in order, each checked against the MAC before it.
struct Walk<'a> {
    log: &'a AuditLog,
    reader: Reader,
    prev: [u8; MAC_LEN],
    near: u64,
}

impl<'a> Walk<'a> {
    fn open(log: &'a AuditLog, view: &SegmentView) -> Result<Self, AuditError> {
        let reader = Reader::open(view).map_err(|e| frame_err(e, view.first_seq))?;
        Ok(Walk::new(log, reader, view.first_seq))
    }

    fn new(log: &'a AuditLog, reader: Reader, first_seq: u64) -> Self {
        let prev = reader.header.prev;
        Walk { log, reader, prev, near: first_seq }
    }

    fn next_record(&mut self) -> Result<Option<Record>, AuditError> {
        let Some(p) = self.reader.next_frame().map_err(|e| frame_err(e, self.near))? else { return Ok(None) };
        let (rec, mac) = self.log.decode(&p, &self.prev, self.near)?;
        self.prev = mac;
        self.near = rec.seq + 1;
        Ok(Some(rec))
    }
}

fn stored_mac(payload: &[u8]) -> Option<[u8; MAC_LEN]> {
    payload.get(payload.len().checked_sub(MAC_LEN)?..)?.try_into().ok()
}

fn frame_err(e: FrameError, near: u64) -> AuditError {
    match e {
        FrameError::Io(e) => e.into(),
        FrameError::Damaged => AuditError::Corrupt(near),
    }
}

fn frame_why(e: FrameError) -> String {
    match e {
        FrameError::Io(e) => format!("cannot be read: {e}"),
        FrameError::Damaged => "its segment header is damaged".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::store::SledStore;

    fn log_in(dir: &Path, segment_bytes: u64) -> AuditLog {
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        AuditLog::open_segments(Segments::open(&dir.join("audit"), segment_bytes).unwrap(), key, Arc::new(SystemClock))
            .unwrap()
    }

    fn log(dir: &Path) -> AuditLog {
        log_in(dir, SEGMENT_BYTES)
    }

    fn ev(tenant: &str, subject: &str) -> Event {
        Event { tenant: tenant.into(), key_id: "k1".into(), subject: subject.into(), ..Event::default() }
    }

    /// A segment someone deleted between two old ones is never laundered into a clean
    /// checkpoint: prune refuses, and verify still reports the loss.
    #[test]
    fn prune_refuses_a_trail_someone_cut_and_prunes_a_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_in(dir.path(), 1024);
        for i in 0..60 {
            log.append(Operation::PutTranscript, Outcome::Ok, ev("acme", &format!("{i:064x}"))).unwrap();
        }
        let views = log.segments.snapshot().unwrap();
        assert!(views.len() > 4, "{}", views.len());
        // Everything is older than a negative retention: all but the active segment may go.
        let whole = tempfile::tempdir().unwrap();
        let copy = whole.path().join("audit");
        std::fs::create_dir_all(&copy).unwrap();
        for v in &views {
            std::fs::copy(&v.path, copy.join(v.path.file_name().unwrap())).unwrap();
        }
        std::fs::remove_file(&views[2].path).unwrap();
        let cut = log_in(dir.path(), 1024);
        assert!(matches!(cut.prune(-1_000_000, None), Err(AuditError::Broken(..))));
        assert!(cut.verify().unwrap().broken.is_some());

        let intact = log_in(whole.path(), 1024);
        let p = intact.prune(-1_000_000, None).unwrap();
        assert_eq!(p.segments as usize, views.len() - 1);
        let v = intact.verify().unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!((v.pruned, v.first_seq, v.head_seq), (p.records, p.records + 1, 60));
    }

    /// Rewrites the payload of record `seq` in the segment files with `edit`, fixing the
    /// frame's CRC as an insider with disk access would (the MAC they cannot fix).
    fn edit_record(dir: &Path, seq: u64, edit: impl FnOnce(&mut Vec<u8>)) {
        let views = Segments::open(&dir.join("audit"), u64::MAX).unwrap().snapshot().unwrap();
        let view = views.iter().rev().find(|v| v.first_seq <= seq).unwrap();
        let mut bytes = std::fs::read(&view.path).unwrap();
        let mut at = segment::HEADER_LEN;
        for _ in view.first_seq..seq {
            at += 8 + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        }
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let mut payload = bytes[at + 8..at + 8 + len].to_vec();
        edit(&mut payload);
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        bytes.splice(at..at + 8 + len, frame);
        std::fs::write(&view.path, bytes).unwrap();
    }

    #[test]
    fn an_intact_chain_verifies_and_queries_filter_by_tenant_and_operation() {
        let dir = tempfile::tempdir().unwrap();
        let log = log(dir.path());
        log.append(Operation::GetTranscript, Outcome::Ok, ev("a", "s1")).unwrap();
        log.append(Operation::ShredSubject, Outcome::Ok, ev("b", "s2")).unwrap();
        log.append(Operation::GetTranscript, Outcome::NotFound, ev("a", "s3")).unwrap();
        let v = log.verify().unwrap();
        assert_eq!((v.records, v.head_seq, v.broken), (3, 3, None));
        let f = Filter { tenant: Some("a".into()), operations: vec![Operation::GetTranscript], ..Filter::default() };
        let page = log.query(&f, 0, 10).unwrap();
        assert_eq!(page.records.iter().map(|r| r.subject.as_str()).collect::<Vec<_>>(), ["s1", "s3"]);
        let first = log.query(&f, 0, 1).unwrap();
        assert_eq!(first.records.len(), 1);
        let rest = log.query(&f, first.next_after.unwrap(), 10).unwrap();
        assert_eq!(rest.records[0].subject, "s3");
    }

    #[test]
    fn blind_ids_are_stored_as_bytes_and_read_back_as_the_same_hex() {
        let dir = tempfile::tempdir().unwrap();
        let log = log(dir.path());
        let blind = "0f".repeat(32);
        log.append(Operation::GetTranscript, Outcome::Ok, Event { transcript: blind.clone(), ..ev("a", &blind) })
            .unwrap();
        let r = &log.query(&Filter::default(), 0, 1).unwrap().records[0];
        assert_eq!((r.subject.as_str(), r.transcript.as_str()), (blind.as_str(), blind.as_str()));
        // Record + MAC + frame: well under the ~300 bytes a hex record in the store took.
        let size = std::fs::metadata(&log.segments.snapshot().unwrap()[0].path).unwrap().len();
        assert!(size - (segment::HEADER_LEN as u64) < 140, "{size}");
    }

    #[test]
    fn the_chain_survives_reopening_and_detects_an_edit_and_a_removal() {
        let dir = tempfile::tempdir().unwrap();
        log(dir.path()).append(Operation::GetTranscript, Outcome::Ok, ev("a", "s1")).unwrap();
        let log2 = log(dir.path());
        log2.append(Operation::GetTranscript, Outcome::Ok, ev("a", "s2")).unwrap();
        log2.append(Operation::GetTranscript, Outcome::Ok, ev("a", "s3")).unwrap();
        assert_eq!(log2.verify().unwrap().broken, None);
        drop(log2);

        // Flip one byte of record 2's body: its MAC no longer holds.
        edit_record(dir.path(), 2, |p| p[5] ^= 1);
        assert_eq!(log(dir.path()).verify().unwrap().broken.map(|(s, _)| s), Some(2));
    }

    #[test]
    fn a_removed_record_and_a_removed_segment_are_found_as_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let log1 = log_in(dir.path(), 300);
        for i in 0..12 {
            log1.append(Operation::GetTranscript, Outcome::Ok, ev("a", &format!("s{i}"))).unwrap();
        }
        let views = log1.segments.snapshot().unwrap();
        assert!(views.len() >= 3, "{views:?}");
        let query = log1.query(&Filter::default(), views[1].first_seq, 100).unwrap();
        assert_eq!(query.records.first().map(|r| r.seq), Some(views[1].first_seq + 1));
        assert_eq!(log1.verify().unwrap().broken, None);
        drop(log1);
        std::fs::remove_file(&views[1].path).unwrap();
        let broken = log_in(dir.path(), 300).verify().unwrap().broken.unwrap();
        assert_eq!(broken.0, views[1].first_seq);
        assert!(broken.1.contains("missing"), "{}", broken.1);
    }

    #[test]
    fn a_record_moved_to_another_place_in_the_chain_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let log1 = log(dir.path());
        for s in ["s1", "s2", "s3"] {
            log1.append(Operation::GetTranscript, Outcome::Ok, ev("a", s)).unwrap();
        }
        drop(log1);
        // Put record 3's payload in record 2's place: its MAC was made over another link.
        let mut third = Vec::new();
        edit_record(dir.path(), 3, |p| third = p.clone());
        edit_record(dir.path(), 2, |p| *p = third);
        assert_eq!(log(dir.path()).verify().unwrap().broken.map(|(s, _)| s), Some(2));
    }

    #[test]
    fn a_store_that_never_held_a_trail_opens_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("db"), 1 << 20).unwrap();
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        let log = AuditLog::open(&dir.path().join("audit"), &store, key, Arc::new(SystemClock)).unwrap();
        assert_eq!(log.append(Operation::GetTranscript, Outcome::Ok, ev("a", "s")).unwrap(), 1);
    }
}
