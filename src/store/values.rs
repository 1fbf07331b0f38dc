//! The value log: large values (message ciphertext) in append-only segment files beside
//! the B-tree, which keeps only a small pointer to each. Values read once (an export)
//! then never pass through sled's page cache, whose eviction lags far behind a sequential
//! read; and a write is one `write` to a segment plus a small tree update, instead of a
//! leaf rewrite that sled turns into a blob file once the leaf holds a few large values.
//!
//! Segment file: `MAGIC`, then frames `len (u32 LE) | crc32 (u32 LE) | key_len (u16 LE) |
//! key | value`, where `len` counts everything after the CRC. The key lets compaction ask
//! the tree whether a frame is still the live value of its key. Binding a value to its
//! place is the AEAD's business (the AAD), not the log's: the CRC only tells a torn or
//! damaged frame from a whole one.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Write};
use std::ops::Deref;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::{Durability, StoreError, SyncTarget};

const MAGIC: &[u8; 8] = b"CVVALUE\x01";
const HEADER_LEN: u64 = MAGIC.len() as u64;
const FRAME_HEAD: usize = 8;
const SUFFIX: &str = ".values";
/// First byte of an encoded pointer. Values stored inline start with an AEAD envelope's
/// version byte (1 before regions, 2 since), so the two never collide.
const POINTER_TAG: u8 = 0xB0;
/// Larger values are refused: a frame's length must fit its u32 with room to spare.
pub const MAX_VALUE: usize = 64 * 1024 * 1024;
/// Largest frame payload: a value, its key and the key's length.
const MAX_PAYLOAD: usize = MAX_VALUE + 2 + u16::MAX as usize;

/// Where one value lives: a frame of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValuePointer {
    pub segment: u32,
    offset: u64,
    len: u32,
}

impl ValuePointer {
    pub const ENCODED_LEN: usize = 1 + 4 + 8 + 4;

    /// What the tree stores in place of the value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::ENCODED_LEN);
        out.push(POINTER_TAG);
        out.extend_from_slice(&self.segment.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out
    }

    /// The pointer a tree value holds; `None` for a value stored inline.
    pub fn decode(stored: &[u8]) -> Option<Self> {
        if stored.len() != Self::ENCODED_LEN || stored[0] != POINTER_TAG {
            return None;
        }
        Some(ValuePointer {
            segment: u32::from_be_bytes(stored[1..5].try_into().ok()?),
            offset: u64::from_be_bytes(stored[5..13].try_into().ok()?),
            len: u32::from_be_bytes(stored[13..17].try_into().ok()?),
        })
    }

    /// Bytes the frame takes in its segment: what removing its value frees.
    pub fn frame_bytes(&self) -> u64 {
        FRAME_HEAD as u64 + u64::from(self.len)
    }

    /// Where the frame ends: (segment, offset past it).
    pub fn end(&self) -> Mark {
        (self.segment, self.offset + self.frame_bytes())
    }
}

/// A value read back: the frame's buffer, lent out as the value alone.
pub struct ValueBuf {
    frame: Vec<u8>,
    start: usize,
}

impl Deref for ValueBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.frame[self.start..]
    }
}

/// Takes a frame's pointer, key and value.
pub type FrameVisitor<'a> = dyn FnMut(ValuePointer, &[u8], &[u8]) -> Result<(), StoreError> + 'a;

/// Takes a frame's position, size, key and value.
pub type WalkVisitor<'a> = dyn FnMut(Mark, u64, &[u8], &[u8]) -> Result<(), StoreError> + 'a;

struct Active {
    id: u32,
    file: Arc<File>,
    len: u64,
}

pub struct ValueLog {
    dir: PathBuf,
    max_bytes: u64,
    /// Every readable segment, the active one included.
    files: RwLock<BTreeMap<u32, Arc<File>>>,
    active: Mutex<Active>,
    /// Where open cut a torn tail off: records pointing into that segment at or past the
    /// offset were never acknowledged and point at nothing. Nothing is written there again.
    torn: Option<(u32, u64)>,
    /// The first segment written after that cut: segments between the cut's and it
    /// (skipped when the index was ahead of the log) hold nothing either.
    first_live: u32,
    /// Set when a sync or a repair of the file failed: what the kernel holds is then
    /// unknown, so nothing more is written or acknowledged until restart.
    failed: AtomicBool,
    /// What the log's commit frames have said: see [`COMMIT_KEY`].
    commits: Mutex<Commits>,
    /// Per segment, the bytes of the log's own frames (commit and batch frames), which no
    /// record points at: dead from the start, for compaction's tally.
    overhead: Mutex<BTreeMap<u32, u64>>,
}

#[derive(Default)]
struct Commits {
    /// How far the log was durable at its last sync.
    durable: Option<Mark>,
    /// The newest one written into the log as a commit frame.
    logged: Option<Mark>,
    /// Where the log ended after that frame: no frame is written for a round that
    /// appended nothing else, so an idle log (or one a backup is copying) stands still.
    end: Option<Mark>,
}

/// A position in the log: (segment, length).
pub type Mark = (u32, u64);

/// The key of a commit frame: a frame of no key (no record has one) whose value is the
/// position the log had synced when the frame was written, appended right after that
/// sync. Releases before the write-ahead log wrote the position the store had made
/// durable (never more than the log's); either way, bytes before it were acknowledged.
const COMMIT_KEY: &[u8] = b"";
/// Bytes a commit frame takes: head, key length, no key, a mark.
pub(super) const COMMIT_FRAME_BYTES: u64 = (FRAME_HEAD + 2 + 12) as u64;

/// The key of a batch frame: a write batch of the store, logged ahead of the index
/// (`store::wal`). No record key starts with 0xFF.
pub const BATCH_KEY: &[u8] = &[0xFF];

/// Whether a frame of this key is the log's own (a commit or batch frame), not a value.
fn is_meta(key: &[u8]) -> bool {
    key.is_empty() || key == BATCH_KEY
}

pub(super) fn encode_mark((id, len): Mark) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Where releases before the log became the index's write-ahead log recorded how far it
/// was durable: read only when opening such an index (`wal::log_acknowledged`).
pub fn mark_key() -> Vec<u8> {
    vec![super::space::LOG_MARKS, b'v']
}

/// A mark read back from the store: (segment, length).
pub fn decode_mark(bytes: &[u8]) -> Option<(u32, u64)> {
    Some((u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?), u64::from_be_bytes(bytes.get(4..12)?.try_into().ok()?)))
}

fn name(id: u32) -> String {
    format!("{id:010}{SUFFIX}")
}

impl ValueLog {
    /// Opens the segments in `dir` (created 0700 if missing). A torn frame at the end of
    /// the newest segment (a crash mid-write, never acknowledged) is cut off.
    /// Knows nothing of the store, so its commit frames are not checked: for tools and
    /// tests that read a log on its own.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, StoreError> {
        Self::open_checked(dir, max_bytes, None, Durability::Fsync, false)
    }

    /// [`Self::open`], knowing how far the log was durable when writes were last
    /// acknowledged (`acknowledged`, the store's mark): a damaged frame before that is
    /// damage, not a torn write, and open refuses, naming the file and the offset and
    /// changing nothing — unless `accept_damage`, when it is cut off like a torn tail (the
    /// bytes kept beside it) and said so at error level.
    ///
    /// Under `flush` and `none` there is no durable mark (nothing is fsynced), but a
    /// kill cannot leave a hole: there, a bad frame followed by a whole good one is
    /// damage too.
    pub fn open_checked(
        dir: &Path,
        max_bytes: u64,
        acknowledged: Option<(u32, u64)>,
        mode: Durability,
        accept_damage: bool,
    ) -> Result<Self, StoreError> {
        super::files::private_dir(dir)?;
        let mut files = BTreeMap::new();
        let mut ids = Vec::new();
        for (number, path) in super::files::numbered(dir, SUFFIX)? {
            let id = u32::try_from(number).map_err(|_| StoreError::Damaged(format!("value log: segment {number}")))?;
            files.insert(id, Arc::new(OpenOptions::new().read(true).append(true).open(path)?));
            ids.push(id);
        }
        let mut torn = None;
        let active = match ids.last().and_then(|id| Some((*id, files.get(id)?.clone()))) {
            Some((id, file)) => {
                let len = file.metadata()?.len();
                let valid = valid_length(&dir.join(name(id)), len)?;
                let path = dir.join(name(id));
                // A whole frame after the bad one: damage where a kill leaves no hole (no
                // durable mark is kept); under fsync, where a power loss may leave holes
                // after the last sync, only a commit frame saying the log was synced past it.
                let good_after = valid < len
                    && match mode {
                        Durability::Fsync => marked_after(&path, id, valid, len)?,
                        _ => frame_follows(&path, valid, len)?,
                    };
                // (where the loss starts, why): acknowledged bytes that are not there.
                let damaged = match acknowledged {
                    Some((seg, _)) if seg > id => Some((
                        (seg, 0),
                        format!("value log: segment {seg} is missing, and writes in it were acknowledged"),
                    )),
                    Some((seg, off)) if seg == id && off > valid => Some((
                        (id, valid),
                        format!(
                            "value log segment {}: what is at offset {valid} is damaged or missing, and the log was \
                             durable up to offset {off} of it when writes were last acknowledged: this is damage, \
                             not a torn write. Nothing was changed. Restore the data directory from a backup \
                             (`chatvault restore`), or start once with --accept-damage to cut the segment at {valid} \
                             (the bytes from there are kept beside it) and lose what they held",
                            path.display()
                        ),
                    )),
                    _ if tail_is_damage(acknowledged, id, valid, good_after) => Some((
                        (id, valid),
                        format!(
                            "value log segment {}: the frame at offset {valid} is damaged and whole frames follow \
                             it: this is damage, not a torn write ({}). Nothing was changed. Restore the data \
                             directory from a backup (`chatvault restore`), or start once with --accept-damage to \
                             cut the segment at {valid} (the bytes from there are kept beside it) and lose what \
                             they held",
                            path.display(),
                            if mode == Durability::Fsync {
                                "a commit frame after it says the log was synced past it"
                            } else {
                                "a process crash leaves no holes, and this durability keeps no durable mark"
                            },
                        ),
                    )),
                    _ => None,
                };
                let mut next_id = id + 1;
                match damaged {
                    Some((_, why)) if !accept_damage => return Err(StoreError::Damaged(why)),
                    Some((from, why)) => {
                        tracing::error!("{why}; accepted (--accept-damage): cutting it off");
                        // Records pointing at the lost range are dropped like a torn tail's,
                        // and writing goes on in a segment no record points into.
                        torn = Some(from);
                        next_id = next_id.max(from.0 + 1);
                    }
                    None => {}
                }
                if valid < len {
                    let aside = set_aside(dir, id, &file, valid, len)?;
                    tracing::warn!(
                        segment = id,
                        cut = len - valid,
                        kept_in = %aside.display(),
                        "value log: cutting off a torn write at the end (a crash mid-write; it was never acknowledged)"
                    );
                    file.set_len(valid)?;
                    file.sync_all()?;
                    torn = Some((id, valid));
                }
                match (valid < HEADER_LEN, torn.is_some()) {
                    (true, false) => create(dir, &mut files, id)?,
                    // New writes go to a new segment, so a record left pointing into the
                    // cut-off range can never be taken for one that points at a new value.
                    (_, true) => create(dir, &mut files, next_id)?,
                    (false, false) => Active { id, file, len: valid },
                }
            }
            None => {
                if let Some((seg, _)) = acknowledged {
                    let why = format!(
                        "value log {}: no segment is there, and writes in segment {seg} were acknowledged. Nothing \
                         was changed. Restore the data directory from a backup (`chatvault restore`), or start once \
                         with --accept-damage to lose what the log held",
                        dir.display()
                    );
                    if !accept_damage {
                        return Err(StoreError::Damaged(why));
                    }
                    tracing::error!("{why}; accepted (--accept-damage)");
                    torn = Some((seg, 0));
                    create(dir, &mut files, seg + 1)?
                } else {
                    create(dir, &mut files, 1)?
                }
            }
        };
        let first_live = active.id;
        let log = ValueLog {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(HEADER_LEN + 1),
            files: RwLock::new(files),
            active: Mutex::new(active),
            torn,
            first_live,
            failed: AtomicBool::new(false),
            commits: Mutex::new(Commits::default()),
            overhead: Mutex::new(BTreeMap::new()),
        };
        Ok(log)
    }

    /// The mark of the last commit frame in the newest two segments (a round writes at
    /// most one frame, so a log from before commit frames costs no full scan), read up to
    /// the first bad frame. Reads only.
    pub fn last_commit_frame(dir: &Path) -> Result<Option<Mark>, StoreError> {
        let found = match super::files::numbered(dir, SUFFIX) {
            Ok(found) => found,
            // A new data directory: no log yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mut last = None;
        for (_, path) in found.into_iter().rev().take(2) {
            let len = fs::metadata(&path)?.len();
            if len < HEADER_LEN {
                continue;
            }
            let mut r = FrameReader::new(&path, len)?;
            while let Some((_, frame, (key, start))) = r.next()? {
                if key == 0 && frame.len() - start == 12 {
                    last = decode_mark(&frame[start..]);
                }
            }
            if last.is_some() {
                break;
            }
        }
        Ok(last)
    }

    /// Whether any segment in `dir` holds more than its header. Reads only.
    pub fn holds_frames(dir: &Path) -> Result<bool, StoreError> {
        match super::files::numbered(dir, SUFFIX) {
            Ok(found) => {
                for (_, path) in found {
                    if fs::metadata(&path)?.len() > HEADER_LEN {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The store must be at least where the log's last commit frame says it was durable
    /// (a store the log is not the write-ahead log of: see `store::wal` for one it is).
    /// A missing log under a store that says it held one is the open's own check.
    /// Reads only: run before anything is written at open.
    pub fn check_store_against_commits(
        dir: &Path,
        acknowledged: Option<(u32, u64)>,
        accept_damage: bool,
    ) -> Result<(), StoreError> {
        let last = Self::last_commit_frame(dir)?;
        let Some(logged) = last else { return Ok(()) };
        if acknowledged.is_some_and(|a| a >= logged) {
            return Ok(());
        }
        let why = format!(
            "the store in {} is older than what was acknowledged: the value log records that the store was durable \
             up to value-log segment {} offset {}, but the store itself says {}. The store lost acknowledged writes \
             (damage to its files, or a copy of them from before). Nothing was changed. Restore the data directory \
             from a backup (`chatvault restore`), or start once with --accept-damage to serve what the store holds",
            dir.parent().unwrap_or(dir).display(),
            logged.0,
            logged.1,
            acknowledged.map(|(s, o)| format!("segment {s} offset {o}")).unwrap_or_else(|| "nothing".into()),
        );
        if !accept_damage {
            return Err(StoreError::Damaged(why));
        }
        tracing::error!("{why}; accepted (--accept-damage)");
        Ok(())
    }

    /// Appends a commit frame when the store has made a newer mark durable and the log
    /// took other frames since the last one. A full volume only skips it (kept due): the
    /// frame is a check, and a sync that could not carry it is no less durable.
    fn write_commit_frame(&self) -> Result<(), StoreError> {
        let mut c = self.commits.lock().map_err(|_| StoreError::Failed)?;
        let end = {
            let a = self.active.lock().map_err(|_| StoreError::Failed)?;
            (a.id, a.len)
        };
        let Some(mark) = c.durable.filter(|d| Some(*d) > c.logged) else { return Ok(()) };
        if c.end == Some(end) {
            return Ok(());
        }
        match self.append(&[(COMMIT_KEY, &encode_mark(mark))]) {
            Ok(p) => {
                c.logged = Some(mark);
                c.end = p.first().map(|p| (p.segment, p.offset + p.frame_bytes()));
                Ok(())
            }
            Err(StoreError::Full { .. }) => {
                tracing::warn!("value log: no space for a commit frame; written with a later sync");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The index holds batches up to `applied` (the end of the last batch frame it
    /// applied), past where the log now ends: a power loss kept sled's pages but lost the
    /// log's unsynced tail, so those batches were never acknowledged. The log's end is then
    /// treated as a cut like a torn tail's (records pointing past it are dropped) and
    /// writing goes on in a new segment, so no offset the index names is ever reused.
    pub fn index_ahead(&mut self, applied: Mark) -> Result<(), StoreError> {
        let end = {
            let a = self.active.get_mut().map_err(|_| StoreError::Failed)?;
            (a.id, a.len)
        };
        if applied <= end || self.torn.is_some() {
            return Ok(());
        }
        tracing::warn!(
            log_end = ?end,
            index_at = ?applied,
            "value log: the index holds writes past the log's end (a power loss kept them in sled and cut the \
             log's unsynced tail; they were never acknowledged): dropping what points past it"
        );
        self.torn = Some(end);
        let next = end.0.max(applied.0) + 1;
        let files = self.files.get_mut().map_err(|_| StoreError::Failed)?;
        let active = create(&self.dir, files, next)?;
        *self.active.get_mut().map_err(|_| StoreError::Failed)? = active;
        self.first_live = next;
        Ok(())
    }

    /// Closes the active segment and goes on in a new one (after an unclean stop): the
    /// index may hold one write the log lost to a power loss, and its pointer must not
    /// come to name a later frame at the same offset. It then names nothing: DATA_LOSS for
    /// that never-acknowledged message, never another's bytes.
    pub fn start_segment(&self) -> Result<(), StoreError> {
        let mut active = self.active.lock().map_err(|_| StoreError::Failed)?;
        if active.len <= HEADER_LEN {
            return Ok(());
        }
        active.file.sync_data().map_err(|e| self.fail(e))?;
        let mut files = self.files.write().map_err(|_| StoreError::Failed)?;
        *active = create(&self.dir, &mut files, active.id + 1)?;
        Ok(())
    }

    /// A cut an earlier start made and recorded (`store::wal`) but did not finish dropping
    /// the records past: they are dropped again. Writing went on in later segments.
    pub fn resume_cut(&mut self, cut: Mark) -> Result<(), StoreError> {
        if self.torn.is_none() {
            self.torn = Some(cut);
            self.first_live = self.active.get_mut().map_err(|_| StoreError::Failed)?.id;
        }
        Ok(())
    }

    /// Where open cut off a torn tail, if it did: (segment, offset).
    pub fn torn_at_open(&self) -> Option<(u32, u64)> {
        self.torn
    }

    /// Whether `p` points into the range open cut off.
    pub fn is_torn(&self, p: &ValuePointer) -> bool {
        self.in_cut((p.segment, p.offset)) || self.torn == Some((p.segment, p.offset))
    }

    /// Whether a position lies past the cut open made, where nothing is any more.
    pub fn in_cut(&self, (segment, offset): Mark) -> bool {
        self.torn.is_some_and(|(s, from)| (segment == s && offset > from) || (segment > s && segment < self.first_live))
    }

    fn check_failed(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::SeqCst) { Err(StoreError::Failed) } else { Ok(()) }
    }

    fn fail(&self, e: std::io::Error) -> StoreError {
        tracing::error!(error = %e, "value log: a sync or repair failed; refusing further writes");
        self.failed.store(true, Ordering::SeqCst);
        e.into()
    }

    fn file(&self, id: u32) -> Result<Arc<File>, StoreError> {
        self.files
            .read()
            .map_err(|_| StoreError::Failed)?
            .get(&id)
            .cloned()
            .ok_or_else(|| StoreError::Damaged(format!("value log segment {id} is missing")))
    }

    /// Appends `(key, value)` frames with one `write` and returns where each value went.
    pub fn append(&self, items: &[(&[u8], &[u8])]) -> Result<Vec<ValuePointer>, StoreError> {
        self.append_then(items, |_| Ok(None)).map(|(pointers, _)| pointers)
    }

    /// [`Self::append`], then one more frame of key `last_key` whose value `last` makes
    /// from where the items went, all in the same `write`: a batch frame naming its
    /// values' places. Returns the items' pointers and the last frame's, if any.
    pub fn append_then(
        &self,
        items: &[(&[u8], &[u8])],
        last: impl Fn(&[ValuePointer]) -> Result<Option<(&'static [u8], Vec<u8>)>, StoreError>,
    ) -> Result<(Vec<ValuePointer>, Option<ValuePointer>), StoreError> {
        let mut buf = Vec::with_capacity(items.iter().map(|(k, v)| FRAME_HEAD + 2 + k.len() + v.len()).sum());
        let mut lens = Vec::with_capacity(items.len());
        let mut meta = 0u64;
        for (key, value) in items {
            let len = push_frame(&mut buf, key, value)?;
            lens.push(len);
            if is_meta(key) {
                meta += FRAME_HEAD as u64 + u64::from(len);
            }
        }
        let pointers_at = |offset: u64, id: u32| -> Vec<ValuePointer> {
            let mut offset = offset;
            lens.iter()
                .map(|&len| {
                    let p = ValuePointer { segment: id, offset, len };
                    offset += p.frame_bytes();
                    p
                })
                .collect()
        };
        let mut active = self.active.lock().map_err(|_| StoreError::Failed)?;
        self.check_failed()?;
        let mut pointers = pointers_at(active.len, active.id);
        let mut tail = last(&pointers)?;
        let tail_len = |t: &Option<(&[u8], Vec<u8>)>| t.as_ref().map_or(0, |(k, v)| FRAME_HEAD + 2 + k.len() + v.len());
        let total = (buf.len() + tail_len(&tail)) as u64;
        if active.len > HEADER_LEN && active.len + total > self.max_bytes {
            // A closed segment is durable before the next one exists, so `sync` only ever
            // needs the active file, and only the newest segment can end torn. If this
            // sync fails, writes not yet acknowledged in it may be lost: stop.
            active.file.sync_data().map_err(|e| self.fail(e))?;
            let mut files = self.files.write().map_err(|_| StoreError::Failed)?;
            *active = create(&self.dir, &mut files, active.id + 1).map_err(|e| match e {
                StoreError::Io(io) => StoreError::io_at(&self.dir, io),
                other => other,
            })?;
            crate::failpoint::hit("values.after_rollover");
            pointers = pointers_at(active.len, active.id);
            tail = last(&pointers)?;
        }
        let mut tail_pointer = None;
        if let Some((key, value)) = &tail {
            let len = push_frame(&mut buf, key, value)?;
            let p = ValuePointer {
                segment: active.id,
                offset: active.len + buf.len() as u64 - FRAME_HEAD as u64 - u64::from(len),
                len,
            };
            if is_meta(key) {
                meta += p.frame_bytes();
            }
            tail_pointer = Some(p);
        }
        // One write of all frames: a crash leaves them whole or a torn tail cut at open.
        if let Err(e) = (&*active.file).write_all(&buf) {
            // Part of the frames may be in the file (a full disk). Offsets come from
            // `active.len`, so the file must end there again, or the log stops.
            active.file.set_len(active.len).map_err(|e| self.fail(e))?;
            return Err(StoreError::io_at(&self.dir, e));
        }
        active.len += buf.len() as u64;
        if meta > 0 {
            *self.overhead.lock().map_err(|_| StoreError::Failed)?.entry(active.id).or_default() += meta;
        }
        Ok((pointers, tail_pointer))
    }

    /// Where the next frame goes: everything appended so far lies before it.
    pub fn end(&self) -> Result<Mark, StoreError> {
        let a = self.active.lock().map_err(|_| StoreError::Failed)?;
        Ok((a.id, a.len))
    }

    /// `to` if the only frame between `from` and `to` is the commit frame a sync wrote
    /// after it (a checkpoint's own): nothing new to checkpoint, so an idle log settles.
    /// That frame is not synced, so no checkpoint may claim it.
    pub fn past_own_commit_frame(&self, from: Mark, to: Mark) -> Option<Mark> {
        let c = self.commits.lock().ok()?;
        (from.0 == to.0 && to.1 == from.1 + COMMIT_FRAME_BYTES && c.end == Some(to)).then_some(to)
    }

    /// Hands `f` every frame from `from` (a frame's start) to the end, across segments:
    /// its segment, offset, size, key and value. A frame that fails its check before the
    /// end of a closed segment, or a missing segment, is damage.
    pub fn walk_from(&self, from: Mark, f: &mut WalkVisitor<'_>) -> Result<(), StoreError> {
        let ids: Vec<u32> =
            self.files.read().map_err(|_| StoreError::Failed)?.keys().copied().filter(|id| *id >= from.0).collect();
        if ids.first() != Some(&from.0) {
            return Err(StoreError::Damaged(format!(
                "value log segment {} is missing, and the index has not absorbed it yet",
                from.0
            )));
        }
        if let Some(gap) = ids.windows(2).find(|w| w[1] != w[0] + 1) {
            return Err(StoreError::Damaged(format!(
                "value log segment {} is missing, and the index has not absorbed it yet",
                gap[0] + 1
            )));
        }
        let end = self.end()?;
        for id in ids {
            let len = if id == end.0 { end.1 } else { self.file(id)?.metadata()?.len() };
            let path = self.dir.join(name(id));
            let mut r = FrameReader::at(&path, len, if id == from.0 { from.1 } else { HEADER_LEN })?;
            while let Some((offset, frame, (key, start))) = r.next()? {
                f((id, offset), frame.len() as u64, &frame[FRAME_HEAD + 2..FRAME_HEAD + 2 + key], &frame[start..])?;
            }
            if r.offset != len {
                return Err(StoreError::Damaged(format!(
                    "value log segment {}: the frame at offset {} is damaged",
                    path.display(),
                    r.offset
                )));
            }
        }
        Ok(())
    }

    /// Bytes of the log's own frames per segment, as counted since `set_overhead`.
    pub fn overhead(&self) -> BTreeMap<u32, u64> {
        self.overhead.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Sets a segment's count of the log's own bytes (as recorded at a checkpoint).
    pub fn set_overhead(&self, segment: u32, bytes: u64) {
        if let Ok(mut o) = self.overhead.lock() {
            o.insert(segment, bytes);
        }
    }

    /// Adds bytes of the log's own frames found in `segment` (by a replay).
    pub fn add_overhead(&self, segment: u32, bytes: u64) {
        if let Ok(mut o) = self.overhead.lock() {
            *o.entry(segment).or_default() += bytes;
        }
    }

    /// The segments there are, oldest first.
    pub fn segment_ids(&self) -> Result<Vec<u32>, StoreError> {
        Ok(self.files.read().map_err(|_| StoreError::Failed)?.keys().copied().collect())
    }

    /// Reads the value `p` points at.
    pub fn read(&self, p: &ValuePointer) -> Result<ValueBuf, StoreError> {
        if p.len as usize > MAX_PAYLOAD {
            return Err(damaged(p.segment));
        }
        let file = self.file(p.segment)?;
        let mut frame = vec![0u8; FRAME_HEAD + p.len as usize];
        file.read_exact_at(&mut frame, p.offset).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => damaged(p.segment),
            _ => e.into(),
        })?;
        let (_, start) = check_frame(&frame).ok_or_else(|| damaged(p.segment))?;
        Ok(ValueBuf { frame, start })
    }

    /// Segments no longer written to, with their sizes: what compaction may rewrite.
    pub fn closed_segments(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        let active = self.active.lock().map_err(|_| StoreError::Failed)?.id;
        let files = self.files.read().map_err(|_| StoreError::Failed)?;
        files.iter().filter(|(id, _)| **id != active).map(|(&id, f)| Ok((id, f.metadata()?.len()))).collect()
    }

    /// Hands `f` every frame of a closed segment: its pointer, key and value.
    pub fn for_each_frame(&self, segment: u32, f: &mut FrameVisitor<'_>) -> Result<(), StoreError> {
        let file = self.file(segment)?;
        let len = file.metadata()?.len();
        let mut r = FrameReader::new(&self.dir.join(name(segment)), len)?;
        while let Some((offset, frame, (key, start))) = r.next()? {
            let p = ValuePointer { segment, offset, len: (frame.len() - FRAME_HEAD) as u32 };
            f(p, &frame[FRAME_HEAD + 2..FRAME_HEAD + 2 + key], &frame[start..])?;
        }
        if r.offset != len {
            return Err(damaged(segment));
        }
        Ok(())
    }

    /// Stops serving a segment and deletes its file. Readers that already hold it finish.
    pub fn remove(&self, segment: u32) -> Result<(), StoreError> {
        if self.active.lock().map_err(|_| StoreError::Failed)?.id == segment {
            return Err(StoreError::Engine("value log: the active segment cannot be removed".into()));
        }
        self.files.write().map_err(|_| StoreError::Failed)?.remove(&segment);
        self.overhead.lock().map_err(|_| StoreError::Failed)?.remove(&segment);
        match fs::remove_file(self.dir.join(name(segment))) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// Every segment's file with the bytes it holds now: what a backup copies (the active
    /// one only that far; closed ones never change until compaction removes them).
    pub fn files_with_lengths(&self) -> Result<Vec<(PathBuf, u64)>, StoreError> {
        let active = self.active.lock().map_err(|_| StoreError::Failed)?;
        let files = self.files.read().map_err(|_| StoreError::Failed)?;
        files
            .iter()
            .map(|(&id, f)| {
                let len = if id == active.id { active.len } else { f.metadata()?.len() };
                Ok((self.dir.join(name(id)), len))
            })
            .collect()
    }

    /// Bytes all segments occupy.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        let files = self.files.read().map_err(|_| StoreError::Failed)?;
        files.values().map(|f| Ok(f.metadata()?.len())).sum()
    }
}

impl SyncTarget for ValueLog {
    /// Every appended frame is already in the kernel when `append` returns (it survives a
    /// process kill); `Fsync` also makes it survive a power loss.
    fn sync(&self, mode: Durability) -> Result<(), StoreError> {
        if mode != Durability::Fsync {
            return Ok(());
        }
        self.check_failed()?;
        let (id, len, file) = {
            let a = self.active.lock().map_err(|_| StoreError::Failed)?;
            (a.id, a.len, a.file.clone())
        };
        file.sync_data().map_err(|e| self.fail(e))?;
        // Said at once, unsynced: a process crash leaves it (the kernel holds it), so a
        // start after one knows this sync happened; after a power loss the next round's
        // sync is what makes it durable. Two rounds may sync at once; the mark only moves
        // forward.
        if let Ok(mut c) = self.commits.lock() {
            c.durable = c.durable.max(Some((id, len)));
        }
        self.write_commit_frame()
    }
}

/// Appends one frame of `key` and `value` to `buf`; returns its length field.
fn push_frame(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) -> Result<u32, StoreError> {
    let key_len = u16::try_from(key.len()).map_err(|_| StoreError::Engine("value log: key too long".into()))?;
    if value.len() > MAX_VALUE {
        return Err(StoreError::Engine(format!("value log: value of {} bytes is too large", value.len())));
    }
    let len = 2 + key.len() + value.len();
    let start = buf.len();
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&key_len.to_le_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    let crc = crc32fast::hash(&buf[start + FRAME_HEAD..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(len as u32)
}

/// Copies the bytes open is about to cut off a segment into a file beside it: a torn
/// write is the usual cause, but if it is damage in the middle, nothing is destroyed.
fn set_aside(dir: &Path, id: u32, file: &File, from: u64, to: u64) -> Result<PathBuf, StoreError> {
    let path = dir.join(format!("{}.torn-{from}", name(id)));
    let mut tail = vec![0u8; (to - from) as usize];
    file.read_exact_at(&mut tail, from)?;
    let mut out = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    out.write_all(&tail)?;
    out.sync_all()?;
    Ok(path)
}

/// Creates segment `id` (replacing one whose header a crash cut short) and makes it readable.
fn create(dir: &Path, files: &mut BTreeMap<u32, Arc<File>>, id: u32) -> Result<Active, StoreError> {
    let mut file =
        OpenOptions::new().read(true).append(true).create(true).truncate(false).mode(0o600).open(dir.join(name(id)))?;
    file.set_len(0)?;
    file.write_all(MAGIC)?;
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    let file = Arc::new(file);
    files.insert(id, file.clone());
    Ok(Active { id, file, len: HEADER_LEN })
}

fn damaged(segment: u32) -> StoreError {
    StoreError::Damaged(format!("value log segment {segment}: a record fails its checksum or is missing"))
}

/// The key length and the value's start in a whole frame whose CRC holds.
fn check_frame(frame: &[u8]) -> Option<(usize, usize)> {
    let len = u32::from_le_bytes(frame.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(frame.get(4..8)?.try_into().ok()?);
    let payload = frame.get(FRAME_HEAD..)?;
    if payload.len() != len || crc32fast::hash(payload) != crc {
        return None;
    }
    let key = u16::from_le_bytes(payload.get(..2)?.try_into().ok()?) as usize;
    (2 + key <= len).then_some((key, FRAME_HEAD + 2 + key))
}

/// Whether a good frame follows the bad one at `at`: then it is damage.
fn frame_follows(path: &Path, at: u64, file_len: u64) -> Result<bool, StoreError> {
    Ok(super::files::good_frame_after(path, at, file_len, MAX_PAYLOAD)?)
}

/// Whether a whole commit frame after the bad frame at `at` of segment `id` says the log
/// was synced past `at`.
fn marked_after(path: &Path, id: u32, at: u64, file_len: u64) -> Result<bool, StoreError> {
    let says_past = |payload: &[u8]| {
        payload.len() == 2 + 12
            && payload[..2] == [0, 0]
            && decode_mark(&payload[2..]).is_some_and(|(seg, off)| seg == id && off > at)
    };
    let payload = 2 + 12;
    Ok(super::files::good_frame_after_where(path, at, file_len, MAX_PAYLOAD, Some(payload), says_past)?)
}

/// A frame read back: its offset, its bytes, and its key length and value start.
type ReadFrame = (u64, Vec<u8>, (usize, usize));

/// Reads a segment's frames in order from after its header.
struct FrameReader {
    inner: BufReader<std::io::Take<File>>,
    offset: u64,
    len: u64,
}

impl FrameReader {
    /// Opens its own descriptor: one shared with the writer would share its file offset.
    fn new(path: &Path, len: u64) -> Result<Self, StoreError> {
        Self::at(path, len, HEADER_LEN)
    }

    /// As [`Self::new`], reading from `offset` (a frame's start) on.
    fn at(path: &Path, len: u64, offset: u64) -> Result<Self, StoreError> {
        let mut file = File::open(path)?;
        let mut magic = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut magic, 0)
            .map_err(|_| StoreError::Damaged(format!("value log segment {} has no header", path.display())))?;
        if &magic != MAGIC {
            return Err(StoreError::Damaged(format!("value log segment {} has a foreign header", path.display())));
        }
        let offset = offset.max(HEADER_LEN);
        if offset > len {
            return Err(StoreError::Damaged(format!(
                "value log segment {}: offset {offset} is past its end",
                path.display()
            )));
        }
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset))?;
        let inner = BufReader::with_capacity(256 * 1024, file.take(len - offset));
        Ok(FrameReader { inner, offset, len })
    }

    /// The next whole frame, its offset, and its key length and value start (as
    /// [`check_frame`] found them); `None` at the end or at a torn frame.
    fn next(&mut self) -> Result<Option<ReadFrame>, StoreError> {
        if self.offset + FRAME_HEAD as u64 > self.len {
            return Ok(None);
        }
        let mut head = [0u8; FRAME_HEAD];
        self.inner.read_exact(&mut head)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_PAYLOAD || self.offset + (FRAME_HEAD + len) as u64 > self.len {
            return Ok(None);
        }
        let mut frame = vec![0u8; FRAME_HEAD + len];
        frame[..FRAME_HEAD].copy_from_slice(&head);
        self.inner.read_exact(&mut frame[FRAME_HEAD..])?;
        let Some(parts) = check_frame(&frame) else { return Ok(None) };
        let at = self.offset;
        self.offset += frame.len() as u64;
        Ok(Some((at, frame, parts)))
    }
}

/// Whether the newest segment `id`, whole up to `valid`, ends in damage rather than a
/// write cut short: the store's durable mark lies past `valid`, or (`good_after`, only
/// looked for where no mark is kept) a whole frame follows the bad one. `serve` and
/// `chatvault check` decide with this alike.
pub fn tail_is_damage(acknowledged: Option<Mark>, id: u32, valid: u64, good_after: bool) -> bool {
    acknowledged.is_some_and(|(seg, off)| seg > id || (seg == id && off > valid)) || good_after
}

/// Every segment in `dir`, oldest first, read through without changing anything (for
/// `chatvault check`). A value log has no frame-follows test: a segment's frames are
/// written in batches, so what matters is where the whole frames end.
pub fn inspect(dir: &Path) -> Result<Vec<super::files::SegmentCheck>, StoreError> {
    let mut out = Vec::new();
    for (_, path) in super::files::numbered(dir, SUFFIX)? {
        let len = fs::metadata(&path)?.len();
        let valid = valid_length(&path, len)?;
        let cut = valid >= HEADER_LEN && valid < len;
        let good_after = cut && frame_follows(&path, valid, len)?;
        let id = segment_id(&path).unwrap_or(0);
        let marked_after = cut && marked_after(&path, id, valid, len)?;
        out.push(super::files::SegmentCheck { path, len, valid, good_after, marked_after });
    }
    Ok(out)
}

/// The segment number in a value-log file name.
pub fn segment_id(path: &Path) -> Option<u32> {
    path.file_name()?.to_str()?.strip_suffix(SUFFIX)?.parse().ok()
}

/// Bytes of a segment that hold its header and whole frames.
fn valid_length(path: &Path, len: u64) -> Result<u64, StoreError> {
    if len < HEADER_LEN {
        // A header cut short by a crash at creation: the segment holds nothing.
        return Ok(0);
    }
    let mut r = FrameReader::new(path, len)?;
    while r.next()?.is_some() {}
    Ok(r.offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn values(log: &ValueLog, ps: &[ValuePointer]) -> Vec<Vec<u8>> {
        ps.iter().map(|p| log.read(p).unwrap().to_vec()).collect()
    }

    #[test]
    fn values_read_back_across_segments_and_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = ValueLog::open(dir.path(), 100).unwrap();
        let mut ps = Vec::new();
        for i in 0u8..10 {
            ps.extend(log.append(&[(&[i], &[i; 40])]).unwrap());
        }
        assert!(log.closed_segments().unwrap().len() >= 4, "segments roll over when full");
        let p = ValuePointer::decode(&ps[3].encode()).unwrap();
        assert_eq!(p, ps[3]);
        drop(log);
        let log = ValueLog::open(dir.path(), 100).unwrap();
        assert_eq!(values(&log, &ps), (0u8..10).map(|i| vec![i; 40]).collect::<Vec<_>>());
        let more = log.append(&[(b"k", b"after"), (b"l", b"reopen")]).unwrap();
        assert_eq!(values(&log, &more), vec![b"after".to_vec(), b"reopen".to_vec()]);
        assert_eq!(fs::metadata(dir.path().join(name(1))).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_torn_last_frame_is_cut_off_at_open_and_writing_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = ValueLog::open(dir.path(), 1 << 20).unwrap();
        let first = log.append(&[(b"a", b"first")]).unwrap();
        let torn = log.append(&[(b"b", b"second")]).unwrap();
        drop(log);
        let path = dir.path().join(name(1));
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let log = ValueLog::open(dir.path(), 1 << 20).unwrap();
        assert!(log.read(&torn[0]).is_err(), "the torn frame is gone");
        assert_eq!(log.torn_at_open(), Some((1, torn[0].offset)));
        assert!(log.is_torn(&torn[0]) && !log.is_torn(&first[0]));
        let aside = dir.path().join(format!("{}.torn-{}", name(1), torn[0].offset));
        assert_eq!(fs::metadata(aside).unwrap().len(), torn[0].frame_bytes() - 3, "the cut bytes are kept aside");
        let again = log.append(&[(b"b", b"again")]).unwrap();
        assert_eq!(again[0].segment, 2, "writing goes on in a new segment, never in the cut-off range");
        assert!(!log.is_torn(&again[0]));
        assert_eq!(values(&log, &[first[0], again[0]]), vec![b"first".to_vec(), b"again".to_vec()]);
    }

    #[test]
    fn a_flipped_bit_reads_as_damage_not_as_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let log = ValueLog::open(dir.path(), 1 << 20).unwrap();
        let p = log.append(&[(b"key", b"payload")]).unwrap()[0];
        let path = dir.path().join(name(1));
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(log.read(&p), Err(StoreError::Damaged(m)) if m.contains("checksum")));
    }

    #[test]
    fn frames_of_a_closed_segment_are_listed_with_their_keys_and_it_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let log = ValueLog::open(dir.path(), 64).unwrap();
        let a = log.append(&[(b"k1", b"v1"), (b"k2", b"v2")]).unwrap();
        log.append(&[(b"k3", &[7; 60])]).unwrap();
        let closed = log.closed_segments().unwrap();
        assert_eq!(closed.iter().map(|c| c.0).collect::<Vec<_>>(), vec![a[0].segment]);
        let mut seen = Vec::new();
        log.for_each_frame(a[0].segment, &mut |p, k, v| {
            seen.push((p, k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(a[0], b"k1".to_vec(), b"v1".to_vec()), (a[1], b"k2".to_vec(), b"v2".to_vec())]);
        log.remove(a[0].segment).unwrap();
        assert!(log.read(&a[0]).is_err());
        assert!(!dir.path().join(name(a[0].segment)).exists());
        let active = log.active.lock().unwrap().id;
        assert!(log.remove(active).is_err(), "the active segment stays");
    }

    #[test]
    fn pointers_never_look_like_inline_ciphertext() {
        let key = crate::crypto::SecretKey::generate().unwrap();
        let alg = crate::crypto::Algorithm::Aes256Gcm;
        let aad = crate::crypto::Aad::new(crate::crypto::RecordKind::Message);
        let v1 = crate::crypto::seal(alg, &key, &aad.legacy(), &[0; 1]).unwrap();
        let v2 = crate::crypto::Binding::new("eu", false).seal(alg, &key, &aad, &[0; 1]).unwrap();
        for envelope in [v1, v2] {
            assert_ne!(envelope[0], POINTER_TAG);
            let same_length = &envelope[..ValuePointer::ENCODED_LEN];
            assert!(ValuePointer::decode(same_length).is_none(), "an envelope's first byte is not the pointer tag");
        }
    }
}
