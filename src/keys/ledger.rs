//! The erasure ledger: an append-only, MAC-chained file in the key directory (the volume
//! kept apart from the data and out of its backups) that remembers what a data directory
//! cannot be trusted to remember about itself. Every erasure's tombstone is durable here
//! before the data directory applies it, under a counter the data directory records too;
//! so is every tenant registry record, and now and then the audit trail's durable head.
//! At start the two are compared: a data directory behind the ledger was rolled back (a
//! restored backup, a snapshot) and is refused, or, when the operator asks, brought
//! forward by replaying what it lacks.
//!
//! It holds no raw subject or transcript id: a tombstone names what it destroyed by a
//! keyed hash of the destroyed key record's location, which nobody without the root key
//! can compute from a candidate id.
//!
//! File: `MAGIC | store_id (16) | base counter (u64 LE) | base MAC (32)`, then frames
//! `len (u32 LE) | crc32 of len (u32 LE) | crc32 of the rest (u32 LE) | postcard(Frame) |
//! MAC (32)`, each MAC an HMAC of the previous MAC and the frame. The length carries its
//! own checksum, so a damaged length is damage, never taken for the end of the file. After
//! a rotation the file is rewritten as one snapshot frame that restates what is still
//! needed (`compact`).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use super::files;
use crate::crypto::{SecretKey, blind_index};

const FILE_NAME: &str = "erasure.ledger";
const MAGIC: &[u8; 8] = b"CVLEDGR2";
const HEADER_LEN: usize = 8 + 16 + 8 + 32;
const FRAME_HEAD: usize = 12;
const MAC_LEN: usize = 32;
/// Larger frames are refused on write and taken for damage on read.
const MAX_FRAME: usize = 64 << 20;
const MAC_DOMAIN: &[u8] = b"chatvault/ledger/v1";
const TOKEN_DOMAIN: &[u8] = b"chatvault/ledger/tombstone/v1";

/// What an erasure destroyed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErasureKind {
    /// A subject's data key (ShredSubject).
    Subject,
    /// A transcript's key (DeleteTranscript).
    Transcript,
    /// Every key of a tenant (DeleteTenant).
    Tenant,
}

/// One erasure: final once `epoch` (the key-store epoch in force when it was made) is
/// destroyed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub kind: ErasureKind,
    pub tenant: String,
    /// [`Ledger::token`] of the destroyed key record.
    pub token: [u8; 32],
    pub epoch: u64,
    pub at_micros: i64,
}

/// The audit trail's head at some point: its newest durable record and that record's MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAnchor {
    pub seq: u64,
    pub mac: [u8; 32],
}

/// Audit records known lost (in a restore) and accepted as lost by the operator; the
/// trail goes on after `to`, chained to its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditGap {
    pub from: u64,
    pub to: u64,
    pub to_mac: [u8; 32],
    pub at_micros: i64,
}

#[derive(Serialize, Deserialize)]
struct Frame {
    counter: u64,
    /// Every data-bearing entry up to this one is durable in the data directory.
    confirmed: u64,
    body: Body,
}

#[derive(Serialize, Deserialize)]
enum Body {
    /// Data-bearing: the data directory applies these.
    Erasures(Vec<Tombstone>),
    /// Data-bearing: a record the data directory stores at `key` (tenant registry).
    Anchor {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Checkpoint {
        audit: Option<AuditAnchor>,
    },
    Destroyed {
        epochs: Vec<u64>,
        at_micros: i64,
    },
    AuditGap(AuditGap),
    /// Only ever the first frame of a file: everything still needed, restated.
    Snapshot(Box<Snapshot>),
}

impl Body {
    fn is_data_bearing(&self) -> bool {
        matches!(self, Body::Erasures(_) | Body::Anchor { .. })
    }
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    last_data: u64,
    pruned_through: u64,
    pending: Vec<(u64, Tombstone)>,
    anchors: Vec<(Vec<u8>, u64, Vec<u8>)>,
    destroyed: Vec<(u64, i64)>,
    audit: Option<AuditAnchor>,
    audit_gaps: Vec<AuditGap>,
}

/// What the ledger knows, as of its newest entry.
#[derive(Clone, Debug, Default)]
pub struct LedgerState {
    /// The newest entry's counter.
    pub counter: u64,
    /// The newest data-bearing entry's counter: what a data directory in step has applied.
    pub last_data: u64,
    /// Every data-bearing entry up to here was durable in the data directory when the
    /// ledger last heard; a data directory behind it was rolled back.
    pub confirmed: u64,
    /// Tombstones up to here were dropped as final: a data directory behind this was
    /// taken under key-store epochs that are destroyed, and no key in it opens.
    pub pruned_through: u64,
    /// Erasures not final yet, by token, with their counters.
    pub pending: HashMap<[u8; 32], (u64, Tombstone)>,
    /// The newest anchored record at each key, with its counter.
    pub anchors: BTreeMap<Vec<u8>, (u64, Vec<u8>)>,
    /// When each destroyed epoch was destroyed.
    pub destroyed: BTreeMap<u64, i64>,
    pub audit: Option<AuditAnchor>,
    pub audit_gaps: Vec<AuditGap>,
}

impl LedgerState {
    fn apply(&mut self, counter: u64, confirmed: u64, body: Body) {
        self.counter = counter;
        self.confirmed = self.confirmed.max(confirmed);
        if body.is_data_bearing() {
            self.last_data = counter;
        }
        match body {
            Body::Erasures(ts) => {
                for t in ts {
                    self.pending.insert(t.token, (counter, t));
                }
            }
            Body::Anchor { key, value } => {
                self.anchors.insert(key, (counter, value));
            }
            Body::Checkpoint { audit } => {
                if audit.is_some() {
                    self.audit = audit;
                }
            }
            Body::Destroyed { epochs, at_micros } => {
                let newest = epochs.iter().copied().max().unwrap_or(0);
                for e in epochs {
                    self.destroyed.entry(e).or_insert(at_micros);
                }
                // Only an erasure the data directory is known to hold is dropped: one it
                // may lack must stay, to be replayed into it.
                let confirmed = self.confirmed;
                let final_now: Vec<[u8; 32]> = self
                    .pending
                    .iter()
                    .filter(|(_, (c, t))| t.epoch <= newest && *c <= confirmed)
                    .map(|(k, _)| *k)
                    .collect();
                for token in final_now {
                    if let Some((c, _)) = self.pending.remove(&token) {
                        self.pruned_through = self.pruned_through.max(c);
                    }
                }
            }
            Body::AuditGap(g) => self.audit_gaps.push(g),
            Body::Snapshot(s) => {
                let Snapshot { last_data, pruned_through, pending, anchors, destroyed, audit, audit_gaps } = *s;
                self.last_data = last_data;
                self.pruned_through = pruned_through;
                self.pending = pending.into_iter().map(|(c, t)| (t.token, (c, t))).collect();
                self.anchors = anchors.into_iter().map(|(k, c, v)| (k, (c, v))).collect();
                self.destroyed = destroyed.into_iter().collect();
                self.audit = audit;
                self.audit_gaps = audit_gaps;
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut pending: Vec<(u64, Tombstone)> = self.pending.values().cloned().collect();
        pending.sort_by_key(|(c, _)| *c);
        Snapshot {
            last_data: self.last_data,
            pruned_through: self.pruned_through,
            pending,
            anchors: self.anchors.iter().map(|(k, (c, v))| (k.clone(), *c, v.clone())).collect(),
            destroyed: self.destroyed.iter().map(|(e, at)| (*e, *at)).collect(),
            audit: self.audit,
            audit_gaps: self.audit_gaps.clone(),
        }
    }

    /// Entries a data directory that applied everything up to `applied` still lacks.
    pub fn after(&self, applied: u64) -> Missing {
        let mut erasures: Vec<(u64, Tombstone)> =
            self.pending.values().filter(|(c, _)| *c > applied).cloned().collect();
        erasures.sort_by_key(|(c, _)| *c);
        let anchors = self.anchors.iter().filter(|(_, (c, _))| *c > applied).map(|(k, (_, v))| (k.clone(), v.clone()));
        Missing { erasures: erasures.into_iter().map(|(_, t)| t).collect(), anchors: anchors.collect() }
    }
}

/// What a data directory lacks of the ledger, oldest first.
#[derive(Debug, Default)]
pub struct Missing {
    pub erasures: Vec<Tombstone>,
    pub anchors: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Missing {
    pub fn is_empty(&self) -> bool {
        self.erasures.is_empty() && self.anchors.is_empty()
    }
}

/// Why the ledger could not be used. A ledger that fails its checks stops the start
/// before anything is written anywhere.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("erasure ledger {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("erasure ledger {path} is damaged at byte {offset}: {why}")]
    Damaged { path: PathBuf, offset: u64, why: &'static str },
    #[error(
        "erasure ledger {path}: entry {counter} fails its MAC: the file was altered, or written under another root key"
    )]
    BadMac { path: PathBuf, counter: u64 },
    #[error("erasure ledger {path} belongs to another key directory")]
    Foreign { path: PathBuf },
    #[error("erasure ledger {path} does not exist")]
    Missing { path: PathBuf },
    #[error("the erasure ledger could not be written after an earlier failure; restart the server")]
    Failed,
    #[error("internal lock poisoned")]
    Poisoned,
}

struct Writer {
    file: Arc<File>,
    len: u64,
    counter: u64,
    prev: [u8; MAC_LEN],
}

pub struct Ledger {
    path: PathBuf,
    key: SecretKey,
    store_id: [u8; 16],
    writer: Mutex<Writer>,
    state: RwLock<LedgerState>,
    /// The newest data-bearing counter known durable in the data directory, in memory:
    /// the next entry carries it to disk.
    confirmed: AtomicU64,
    /// Set when a write or sync failed: nothing more is recorded until restart.
    failed: AtomicBool,
    /// Where a torn final entry starts, until it is cut off (`repair_tail`).
    torn: Mutex<Option<u64>>,
    /// Whether the file did not exist before this open.
    created: bool,
}

impl Ledger {
    /// Opens the ledger in `dir` (creating an empty one if there is none and
    /// `create_if_missing`). A torn final frame (a crash mid-append, so never
    /// acknowledged) is left out, and cut off by [`Ledger::repair_tail`]; anything else that
    /// is wrong (a bad MAC, a damaged frame or length, another key directory's file) is
    /// refused. Opening an existing ledger changes nothing on disk.
    /// Without `create_if_missing`, a missing file is [`LedgerError::Missing`].
    pub fn open(dir: &Path, key: SecretKey, store_id: [u8; 16], create_if_missing: bool) -> Result<Self, LedgerError> {
        let path = dir.join(FILE_NAME);
        let io = |source| LedgerError::Io { path: path.clone(), source };
        let (bytes, created) = match fs::read(&path) {
            Ok(b) => (b, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create_if_missing => {
                return Err(LedgerError::Missing { path });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_file(&path, &header(&store_id, 0, &[0; MAC_LEN]), &[]).map_err(io)?;
                (fs::read(&path).map_err(io)?, true)
            }
            Err(e) => return Err(io(e)),
        };
        let parsed = parse(&path, &bytes, &key, &store_id)?;
        let file = OpenOptions::new().append(true).open(&path).map_err(io)?;
        let torn = (parsed.valid_len < bytes.len() as u64).then_some(parsed.valid_len);
        let state = parsed.state;
        Ok(Ledger {
            writer: Mutex::new(Writer {
                file: Arc::new(file),
                len: parsed.valid_len,
                counter: state.counter,
                prev: parsed.prev,
            }),
            confirmed: AtomicU64::new(state.confirmed),
            state: RwLock::new(state),
            failed: AtomicBool::new(false),
            torn: Mutex::new(torn),
            created,
            path,
            key,
            store_id,
        })
    }

    /// Cuts off a torn final entry (a crash mid-append: never synced, so never
    /// acknowledged), keeping its bytes aside in `erasure.ledger.torn-<offset>-<time>`. Opening
    /// changes nothing; this runs once the start was not refused, or before the next append.
    pub fn repair_tail(&self) -> Result<(), LedgerError> {
        let mut torn = self.torn.lock().map_err(|_| LedgerError::Poisoned)?;
        let Some(valid) = *torn else { return Ok(()) };
        let io = |source| LedgerError::Io { path: self.path.clone(), source };
        let bytes = fs::read(&self.path).map_err(io)?;
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
        let aside = self.path.with_file_name(format!("{FILE_NAME}.torn-{valid}-{stamp}"));
        write_file(&aside, &bytes[valid as usize..], &[]).map_err(io)?;
        let w = self.writer.lock().map_err(|_| LedgerError::Poisoned)?;
        w.file.set_len(valid).map_err(io)?;
        w.file.sync_all().map_err(io)?;
        tracing::warn!(path = %self.path.display(), cut = bytes.len() as u64 - valid, kept_in = %aside.display(),
            "erasure ledger: cut off a torn final entry (a crash mid-write; it was never acknowledged)");
        *torn = None;
        Ok(())
    }

    /// Where a torn final entry was found at open, until `repair_tail` cuts it.
    pub fn torn_at(&self) -> Option<u64> {
        self.torn.lock().ok().and_then(|t| *t)
    }

    /// Whether the ledger file was created by this open (there was none).
    pub fn was_created(&self) -> bool {
        self.created
    }

    /// A copy of what the ledger knows.
    pub fn state(&self) -> Result<LedgerState, LedgerError> {
        Ok(self.state.read().map_err(|_| LedgerError::Poisoned)?.clone())
    }

    /// Runs `f` on the state without copying it.
    pub fn with_state<T>(&self, f: impl FnOnce(&LedgerState) -> T) -> Result<T, LedgerError> {
        Ok(f(&*self.state.read().map_err(|_| LedgerError::Poisoned)?))
    }

    /// The name a tombstone gives a destroyed key record: a keyed hash of where the record
    /// lives (and which generation of key it held), never the ids themselves.
    pub fn token(&self, record_key: &[u8], generation: u32) -> [u8; 32] {
        let mut input = Vec::with_capacity(record_key.len() + 4);
        input.extend_from_slice(record_key);
        input.extend_from_slice(&generation.to_be_bytes());
        blind_index(&self.key, TOKEN_DOMAIN, &input)
    }

    /// Records erasures durably; returns their counter. The data directory applies them
    /// after this returns, and records the counter with them.
    pub fn record_erasures(&self, tombstones: Vec<Tombstone>) -> Result<u64, LedgerError> {
        self.record(Body::Erasures(tombstones))
    }

    /// Records a record the data directory is about to store at `key`, durably.
    pub fn record_anchor(&self, key: Vec<u8>, value: Vec<u8>) -> Result<u64, LedgerError> {
        self.record(Body::Anchor { key, value })
    }

    /// Records that these epochs' key-store keys were destroyed at `at_micros`: their
    /// erasures are final.
    pub fn record_destroyed(&self, epochs: Vec<u64>, at_micros: i64) -> Result<u64, LedgerError> {
        self.record(Body::Destroyed { epochs, at_micros })
    }

    /// Records that audit records `gap.from..=gap.to` are lost and the operator knows.
    pub fn record_audit_gap(&self, gap: AuditGap) -> Result<u64, LedgerError> {
        self.record(Body::AuditGap(gap))
    }

    /// Says that every data-bearing entry up to `counter` is durable in the data directory.
    pub fn confirm(&self, counter: u64) {
        self.confirmed.fetch_max(counter, Ordering::SeqCst);
    }

    /// Writes down what `confirm` learnt and the audit trail's durable head, if either
    /// moved since the ledger last said (`audit_moved` decides for the trail). Returns
    /// whether it wrote.
    pub fn checkpoint(
        &self,
        audit: Option<AuditAnchor>,
        audit_moved: impl FnOnce(Option<AuditAnchor>, Option<AuditAnchor>) -> bool,
    ) -> Result<bool, LedgerError> {
        let (written, last_audit) = self.with_state(|s| (s.confirmed, s.audit))?;
        let confirmed_moved = self.confirmed.load(Ordering::SeqCst) > written;
        let audit = audit.filter(|a| audit_moved(last_audit, Some(*a)));
        if !confirmed_moved && audit.is_none() {
            return Ok(false);
        }
        self.record(Body::Checkpoint { audit })?;
        Ok(true)
    }

    /// Appends one entry and syncs it before anything else is appended: only the newest
    /// entry can ever be unsynced, so only it can be torn by a crash. (Entries are rare:
    /// erasures, registry changes, a checkpoint a second at most.)
    fn record(&self, body: Body) -> Result<u64, LedgerError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(LedgerError::Failed);
        }
        self.repair_tail()?;
        let mut w = self.writer.lock().map_err(|_| LedgerError::Poisoned)?;
        let counter = w.counter + 1;
        let frame = Frame { counter, confirmed: self.confirmed.load(Ordering::SeqCst), body };
        let (bytes, mac) = self.encode(&frame, &w.prev)?;
        let written = (&*w.file).write_all(&bytes).and_then(|()| w.file.sync_data());
        if let Err(e) = written {
            // Part of the frame may be in the file: cut it off, and refuse more, since
            // what is on disk can no longer be vouched for.
            let _ = w.file.set_len(w.len);
            self.failed.store(true, Ordering::SeqCst);
            return Err(LedgerError::Io { path: self.path.clone(), source: e });
        }
        w.len += bytes.len() as u64;
        w.counter = counter;
        w.prev = mac;
        let Frame { counter, confirmed, body } = frame;
        self.state.write().map_err(|_| LedgerError::Poisoned)?.apply(counter, confirmed, body);
        Ok(counter)
    }

    fn encode(&self, frame: &Frame, prev: &[u8; MAC_LEN]) -> Result<(Vec<u8>, [u8; MAC_LEN]), LedgerError> {
        let payload = postcard::to_allocvec(frame).map_err(|_| LedgerError::Failed)?;
        if payload.len() + MAC_LEN > MAX_FRAME {
            return Err(LedgerError::Failed);
        }
        let mac = frame_mac(&self.key, prev, &payload);
        let mut body = payload;
        body.extend_from_slice(&mac);
        let mut bytes = Vec::with_capacity(FRAME_HEAD + body.len());
        let len = (body.len() as u32).to_le_bytes();
        bytes.extend_from_slice(&len);
        bytes.extend_from_slice(&crc32fast::hash(&len).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        Ok((bytes, mac))
    }

    /// Rewrites the file as one snapshot of what is still needed: tombstones made final
    /// by a rotation, and superseded anchors, go. Atomic: a crash leaves the old file.
    pub fn compact(&self) -> Result<(), LedgerError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(LedgerError::Failed);
        }
        self.repair_tail()?;
        let mut w = self.writer.lock().map_err(|_| LedgerError::Poisoned)?;
        let snapshot = self.state.read().map_err(|_| LedgerError::Poisoned)?.snapshot();
        let frame = Frame {
            counter: w.counter,
            confirmed: self.confirmed.load(Ordering::SeqCst),
            body: Body::Snapshot(Box::new(snapshot)),
        };
        let (bytes, mac) = self.encode(&frame, &w.prev)?;
        let io = |source| {
            // The rename may have happened: the open file may no longer be the ledger.
            // Nothing more is recorded until a restart reads what is on disk.
            self.failed.store(true, Ordering::SeqCst);
            LedgerError::Io { path: self.path.clone(), source }
        };
        write_file(&self.path, &header(&self.store_id, w.counter, &w.prev), &bytes).map_err(io)?;
        let file = OpenOptions::new().append(true).open(&self.path).map_err(io)?;
        w.len = (HEADER_LEN + bytes.len()) as u64;
        w.file = Arc::new(file);
        w.prev = mac;
        Ok(())
    }

    /// Bytes the ledger file holds.
    pub fn size(&self) -> u64 {
        self.writer.lock().map(|w| w.len).unwrap_or(0)
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish_non_exhaustive()
    }
}

/// The most bytes a torn final entry can leave that are all zeros (a file system that
/// extended the file without the data): more is damage, not one interrupted append.
const MAX_TORN: usize = 1 << 20;

/// Where, from offset `from` on, the first whole frame with intact checksums starts.
fn first_intact_frame(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(FRAME_HEAD)).find(|&i| {
        let head = &bytes[i..i + FRAME_HEAD];
        let word = |j: usize| u32::from_le_bytes([head[j], head[j + 1], head[j + 2], head[j + 3]]);
        let len = word(0) as usize;
        (MAC_LEN..=MAX_FRAME).contains(&len)
            && crc32fast::hash(&head[..4]) == word(4)
            && bytes.get(i + FRAME_HEAD..i + FRAME_HEAD + len).is_some_and(|b| crc32fast::hash(b) == word(8))
    })
}

fn frame_mac(key: &SecretKey, prev: &[u8; MAC_LEN], payload: &[u8]) -> [u8; MAC_LEN] {
    let mut linked = Vec::with_capacity(MAC_LEN + payload.len());
    linked.extend_from_slice(prev);
    linked.extend_from_slice(payload);
    blind_index(key, MAC_DOMAIN, &linked)
}

fn header(store_id: &[u8; 16], base: u64, prev: &[u8; MAC_LEN]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(store_id);
    h.extend_from_slice(&base.to_le_bytes());
    h.extend_from_slice(prev);
    h
}

/// Writes a whole new ledger file: temp file (0600), fsync, rename, fsync of the directory.
fn write_file(path: &Path, header: &[u8], frames: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(header)?;
        f.write_all(frames)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    files::sync_dir(path.parent().unwrap_or(Path::new(".")))
}

struct Parsed {
    state: LedgerState,
    valid_len: u64,
    prev: [u8; MAC_LEN],
}

fn parse(path: &Path, bytes: &[u8], key: &SecretKey, store_id: &[u8; 16]) -> Result<Parsed, LedgerError> {
    let damaged = |offset: usize, why| LedgerError::Damaged { path: path.to_path_buf(), offset: offset as u64, why };
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(damaged(0, "no ledger header (unknown format or version)"));
    }
    if &bytes[8..24] != store_id {
        return Err(LedgerError::Foreign { path: path.to_path_buf() });
    }
    let base = u64::from_le_bytes(bytes[24..32].try_into().map_err(|_| damaged(24, "header"))?);
    let mut prev: [u8; MAC_LEN] = bytes[32..HEADER_LEN].try_into().map_err(|_| damaged(32, "header"))?;
    let mut state = LedgerState { counter: base, ..LedgerState::default() };
    let mut at = HEADER_LEN;
    let mut first = true;
    while at < bytes.len() {
        let rest = &bytes[at..];
        // Only the newest entry can be unsynced (each is synced before the next is
        // written), so only the end of the file can be a crash's doing: what parsed so far
        // stands, and `repair_tail` cuts the rest off. Damage followed by any intact frame,
        // damage in a compacted file's first frame (written whole, then renamed into place),
        // and more zeros than one entry could leave are damage, and refused.
        let tail = || {
            let last = first_intact_frame(rest, 1).is_none();
            let snapshot = first && base > 0;
            if last && !snapshot && (rest.len() <= MAX_TORN || !rest.iter().all(|&b| b == 0)) {
                Ok(Parsed { state: LedgerState::default(), valid_len: at as u64, prev })
            } else {
                Err(damaged(at, "damaged entry followed by more, or in the first entry"))
            }
        };
        let field = |i: usize| rest.get(i..i + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let (Some(len), Some(len_check), Some(crc)) = (field(0), field(4), field(8)) else {
            return tail().map(|p| Parsed { state, ..p });
        };
        let len = len as usize;
        if crc32fast::hash(&rest[..4]) != len_check || !(MAC_LEN..=MAX_FRAME).contains(&len) {
            return tail().map(|p| Parsed { state, ..p });
        }
        let Some(body) = rest.get(FRAME_HEAD..FRAME_HEAD + len) else {
            return tail().map(|p| Parsed { state, ..p });
        };
        if crc32fast::hash(body) != crc {
            return tail().map(|p| Parsed { state, ..p });
        }
        let (payload, mac) = body.split_at(len - MAC_LEN);
        let frame: Frame = postcard::from_bytes(payload).map_err(|_| damaged(at, "undecodable entry"))?;
        if frame_mac(key, &prev, payload) != mac {
            return Err(LedgerError::BadMac { path: path.to_path_buf(), counter: frame.counter });
        }
        let snapshot = matches!(frame.body, Body::Snapshot(_));
        let expected = if first && snapshot { state.counter } else { state.counter + 1 };
        if frame.counter != expected || (snapshot && !first) {
            return Err(damaged(at, "entries missing or out of order"));
        }
        prev = mac.try_into().map_err(|_| damaged(at, "frame"))?;
        state.apply(frame.counter, frame.confirmed, frame.body);
        first = false;
        at += FRAME_HEAD + len;
    }
    Ok(Parsed { state, valid_len: at as u64, prev })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_slice(&[9; 32]).unwrap()
    }

    fn tomb(n: u8, epoch: u64) -> Tombstone {
        Tombstone { kind: ErasureKind::Subject, tenant: "acme".into(), token: [n; 32], epoch, at_micros: 1 }
    }

    fn open(dir: &Path) -> Result<Ledger, LedgerError> {
        Ledger::open(dir, key(), [1; 16], true)
    }

    #[test]
    fn entries_survive_reopening_and_a_rotation_makes_them_final() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path()).unwrap();
        assert!(l.was_created());
        assert_eq!(l.record_erasures(vec![tomb(1, 1)]).unwrap(), 1);
        assert_eq!(l.record_anchor(b"k".to_vec(), b"v1".to_vec()).unwrap(), 2);
        l.confirm(2);
        assert_eq!(l.record_erasures(vec![tomb(2, 2)]).unwrap(), 3);
        drop(l);
        let l = open(dir.path()).unwrap();
        assert!(!l.was_created());
        let s = l.state().unwrap();
        assert_eq!((s.counter, s.last_data, s.confirmed, s.pending.len()), (3, 3, 2, 2));
        assert_eq!(s.after(2).erasures, vec![tomb(2, 2)]);
        assert_eq!(s.after(1).anchors, vec![(b"k".to_vec(), b"v1".to_vec())]);

        l.record_destroyed(vec![1], 77).unwrap();
        let s = l.state().unwrap();
        assert_eq!((s.pending.len(), s.pruned_through, s.destroyed.get(&1)), (1, 1, Some(&77)));
        l.compact().unwrap();
        let before = l.size();
        l.record_anchor(b"k".to_vec(), b"v2".to_vec()).unwrap();
        drop(l);
        let l = open(dir.path()).unwrap();
        let s = l.state().unwrap();
        assert!(l.size() > before);
        assert_eq!((s.counter, s.pruned_through, s.pending.len()), (5, 1, 1));
        assert_eq!(s.anchors.get(b"k".as_slice()), Some(&(5, b"v2".to_vec())));
        assert_eq!(s.destroyed.get(&1), Some(&77));
    }

    /// Two frames written with `key`, as bytes of a ledger file.
    fn two_frames(dir: &Path, key: SecretKey) -> Vec<u8> {
        let l = Ledger::open(dir, key, [1; 16], true).unwrap();
        l.record_erasures(vec![tomb(1, 1)]).unwrap();
        l.record_erasures(vec![tomb(2, 1)]).unwrap();
        drop(l);
        fs::read(dir.join(FILE_NAME)).unwrap()
    }

    fn first_frame_len(bytes: &[u8]) -> usize {
        FRAME_HEAD + u32::from_le_bytes(bytes[HEADER_LEN..HEADER_LEN + 4].try_into().unwrap()) as usize
    }

    #[test]
    fn a_torn_final_entry_is_left_out_and_cut_off_only_when_repaired_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let good = two_frames(dir.path(), key());
        let path = dir.path().join(FILE_NAME);
        for cut in [5, good.len() - HEADER_LEN - first_frame_len(&good) - 3] {
            let torn = &good[..good.len() - cut];
            fs::write(&path, torn).unwrap();
            let l = open(dir.path()).unwrap();
            assert_eq!(l.state().unwrap().counter, 1);
            assert_eq!(fs::read(&path).unwrap(), torn, "opening changed the file");
            l.repair_tail().unwrap();
            assert_eq!(fs::read(&path).unwrap().len(), HEADER_LEN + first_frame_len(&good));
            let prefix = format!("{FILE_NAME}.torn-{}-", HEADER_LEN + first_frame_len(&good));
            let aside: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| fs::read(e.path()).unwrap())
                .collect();
            assert!(aside.iter().any(|a| a == &torn[HEADER_LEN + first_frame_len(&good)..]), "not kept aside");
            assert_eq!(l.record_erasures(vec![tomb(3, 1)]).unwrap(), 2, "appends go on after the cut");
        }
        // The final frame whole in length but not in content (a page lost to a power cut).
        let mut last = good.clone();
        let n = last.len();
        last[n - 40] ^= 0xff;
        fs::write(&path, &last).unwrap();
        assert_eq!(open(dir.path()).unwrap().state().unwrap().counter, 1);
    }

    #[test]
    fn damage_before_the_last_entry_is_refused_and_the_file_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let good = two_frames(dir.path(), key());
        let path = dir.path().join(FILE_NAME);
        // A flipped bit in the first frame's body, and one in its length: an intact frame
        // follows, so neither is a torn tail.
        for at in [HEADER_LEN + FRAME_HEAD + 3, HEADER_LEN + 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            fs::write(&path, &bad).unwrap();
            match open(dir.path()) {
                Err(LedgerError::Damaged { why, offset, .. }) => {
                    assert!(why.contains("followed by more"), "{why}");
                    assert_eq!(offset, HEADER_LEN as u64);
                }
                other => panic!("byte {at}: {other:?}"),
            }
            assert_eq!(fs::read(&path).unwrap(), bad, "a refused open changed the file");
        }
        // More zeros than one interrupted append could leave.
        fs::write(&path, [&good[..], &vec![0u8; MAX_TORN + 1]].concat()).unwrap();
        assert!(matches!(open(dir.path()), Err(LedgerError::Damaged { .. })));
        // Another key directory's ledger.
        fs::write(&path, &good).unwrap();
        assert!(matches!(Ledger::open(dir.path(), key(), [2; 16], true), Err(LedgerError::Foreign { .. })));
        fs::remove_file(&path).unwrap();
        assert!(matches!(Ledger::open(dir.path(), key(), [1; 16], false), Err(LedgerError::Missing { .. })));
        assert!(!path.exists());
    }

    #[test]
    fn a_damaged_snapshot_is_never_taken_for_a_torn_append() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path()).unwrap();
        l.record_erasures(vec![tomb(1, 1)]).unwrap();
        l.compact().unwrap();
        drop(l);
        let path = dir.path().join(FILE_NAME);
        let mut bad = fs::read(&path).unwrap();
        let n = bad.len();
        bad[n - 1] ^= 1;
        fs::write(&path, &bad).unwrap();
        assert!(matches!(open(dir.path()), Err(LedgerError::Damaged { .. })));
    }

    #[test]
    fn a_final_epoch_drops_only_erasures_the_data_directory_is_known_to_hold() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path()).unwrap();
        l.record_erasures(vec![tomb(1, 1)]).unwrap();
        l.confirm(1);
        l.record_erasures(vec![tomb(2, 1)]).unwrap();
        l.record_destroyed(vec![1], 5).unwrap();
        let s = l.state().unwrap();
        assert_eq!(s.pending.keys().copied().collect::<Vec<_>>(), vec![[2; 32]], "the unconfirmed one stays");
        assert_eq!(s.pruned_through, 1);
    }

    #[test]
    fn entries_written_under_another_key_fail_their_mac() {
        let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let good = two_frames(ours.path(), key());
        let other = two_frames(theirs.path(), SecretKey::from_slice(&[8; 32]).unwrap());
        // Their second frame (same counter, valid checksums) in place of ours.
        let cut = HEADER_LEN + first_frame_len(&good);
        let forged = [&good[..cut], &other[HEADER_LEN + first_frame_len(&other)..]].concat();
        let path = ours.path().join(FILE_NAME);
        fs::write(&path, &forged).unwrap();
        assert!(matches!(open(ours.path()), Err(LedgerError::BadMac { counter: 2, .. })));
        // The whole file opened with another root key's MAC key.
        fs::write(&path, &good).unwrap();
        let wrong = Ledger::open(ours.path(), SecretKey::from_slice(&[8; 32]).unwrap(), [1; 16], false);
        assert!(matches!(wrong, Err(LedgerError::BadMac { counter: 1, .. })));
    }

    #[test]
    fn a_compaction_that_fails_stops_every_later_entry() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path()).unwrap();
        l.record_erasures(vec![tomb(1, 1)]).unwrap();
        // The directory refuses new files (an immutable directory, as root), so the rewrite
        // cannot happen; after it, nothing may be appended to what may be a stale file.
        let chattr = |flag: &str| {
            std::process::Command::new("chattr").arg(flag).arg(dir.path()).status().is_ok_and(|s| s.success())
        };
        if !chattr("+i") {
            eprintln!("SKIPPED: chattr needs root");
            return;
        }
        let failed = l.compact();
        chattr("-i");
        assert!(failed.is_err());
        assert!(matches!(l.record_erasures(vec![tomb(2, 1)]), Err(LedgerError::Failed)));
        assert_eq!(open(dir.path()).unwrap().state().unwrap().counter, 1);
    }

    #[test]
    fn a_checkpoint_is_written_only_when_something_moved() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path()).unwrap();
        let never = |_: Option<AuditAnchor>, _: Option<AuditAnchor>| false;
        assert!(!l.checkpoint(None, never).unwrap());
        l.record_erasures(vec![tomb(1, 1)]).unwrap();
        l.confirm(1);
        assert!(l.checkpoint(None, never).unwrap());
        assert!(!l.checkpoint(None, never).unwrap());
        let head = AuditAnchor { seq: 7, mac: [3; 32] };
        assert!(l.checkpoint(Some(head), |old, new| old != new).unwrap());
        drop(l);
        let s = open(dir.path()).unwrap().state().unwrap();
        assert_eq!((s.confirmed, s.audit), (1, Some(head)));
    }

    #[test]
    fn tokens_depend_on_the_record_and_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path()).unwrap();
        assert_ne!(l.token(b"a", 0), l.token(b"a", 1));
        assert_ne!(l.token(b"a", 0), l.token(b"b", 0));
        assert_eq!(l.token(b"a", 0), l.token(b"a", 0));
    }
}
