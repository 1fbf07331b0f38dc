//! The value log as the index's write-ahead log (the WiscKey/Badger design): every batch
//! the store applies is first appended to the value log as one batch frame, then applied
//! to sled. A commit is durable once the value log is synced — one sync of one file.
//! sled is made durable lazily, by a checkpoint every [`CHECKPOINT_EVERY`]: it syncs the
//! log, records in sled the log position (the head) up to which sled holds every batch,
//! and syncs sled. At open, the batch frames after the head are applied again.
//!
//! Replaying is idempotent because batches reach the log and sled in one order (one lock
//! covers both) and hold only puts and deletes: whatever prefix of them sled's own
//! recovery kept, applying the rest in log order ends where the log ends. A sled that
//! recovered to an older state (damage to its files) is brought forward the same way, as
//! long as the log still holds the segment its head is in; compaction removes a segment
//! only once a checkpoint's head has passed it.
//!
//! A write the log took but sled then refused (an engine error) is in the log: the store
//! stops taking writes, and the next start applies it. It was never acknowledged.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::values::{BATCH_KEY, Mark, ValueLog, ValuePointer, decode_mark, encode_mark};
use super::{Batch, Durability, Entry, KvStore, Op, StoreError, SyncTarget, space};

/// How often sled is checkpointed by default: what a start after a crash replays at most.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// Batch frame format version (the first byte of a batch frame's value).
const BATCH_V1: u8 = 1;
const PUT: u8 = 0;
const DELETE: u8 = 1;

/// Where sled keeps the log position up to which it holds every batch.
fn head_key() -> Vec<u8> {
    vec![space::LOG_MARKS, b'h']
}

/// Where sled keeps, in every batch, the end of that batch's frame in the log: the exact
/// point its state is at, whatever its own recovery kept (a prefix of its batches).
fn applied_key() -> Vec<u8> {
    vec![space::LOG_MARKS, b'p']
}

/// A log position the index keeps under `key`, if any (`what` names it in an error).
fn mark_at(index: &dyn KvStore, key: &[u8], what: &str) -> Result<Option<Mark>, StoreError> {
    match index.get(key)? {
        Some(b) => decode_mark(&b).map(Some).ok_or_else(|| StoreError::Damaged(format!("the index's {what}"))),
        None => Ok(None),
    }
}

/// The end of the last batch frame the index applied, if it records one.
pub fn applied_of(index: &dyn KvStore) -> Result<Option<Mark>, StoreError> {
    mark_at(index, &applied_key(), "log position")
}

/// Where the index keeps a cut of the log (a torn tail, damage accepted, the index ahead
/// of the log) until the records pointing past it are dropped: a start cut short before
/// then drops them again.
fn cut_key() -> Vec<u8> {
    vec![space::LOG_MARKS, b't']
}

/// A cut recorded and not yet finished, if any.
pub fn pending_cut(index: &dyn KvStore) -> Result<Option<Mark>, StoreError> {
    mark_at(index, &cut_key(), "log cut")
}

/// Where a checkpoint records a segment's bytes of log frames (see `ValueLog::overhead`).
fn overhead_key(segment: u32) -> Vec<u8> {
    let mut k = vec![space::LOG_MARKS, b'o'];
    k.extend_from_slice(&segment.to_be_bytes());
    k
}

/// The head a store records, if it has one: a store that has none was never opened
/// with its log as write-ahead log (a release before it, or a new directory).
pub fn head_of(index: &dyn KvStore) -> Result<Option<Mark>, StoreError> {
    mark_at(index, &head_key(), "log head")
}

/// Records in `index` (a copy made of the live one, writers paused) that it holds every
/// batch logged before `head`.
pub fn set_log_head(index: &dyn KvStore, head: Mark) -> Result<(), StoreError> {
    let mut b = Batch::default();
    b.put(head_key(), encode_mark(head));
    // A commit round may have written a mark through the log while writers waited: its
    // frame is past the copied end, and nothing of the copy needs it replayed.
    if applied_of(index)?.is_some_and(|a| a > head) {
        b.put(applied_key(), encode_mark(head));
    }
    index.apply(b)
}

/// Whether the index holds any record besides the logs' own marks.
pub fn holds_records(index: &dyn KvStore) -> Result<bool, StoreError> {
    let first = |after: Option<&[u8]>| index.scan(&[], after, 1).map(|p| p.into_iter().next());
    Ok(match first(None)? {
        None => false,
        Some((k, _)) if k.first() == Some(&space::LOG_MARKS) => first(Some(&[space::LOG_MARKS, 0xFF]))?.is_some(),
        Some(_) => true,
    })
}

/// How far the log is known to have been durable when writes were last acknowledged,
/// read without changing anything: the index's head (a checkpoint synced the log that
/// far) or the log's last commit frame, whichever is further. For an index from before
/// the log was its write-ahead log, its own mark, checked against the log's commit
/// frames. An index that holds nothing beside a log that holds frames lost its state:
/// refused unless `accept_damage`, when the open rebuilds it from what the log holds.
pub fn log_acknowledged(index: &dyn KvStore, log_dir: &Path, accept_damage: bool) -> Result<Option<Mark>, StoreError> {
    if let Some(head) = head_of(index)? {
        return Ok(Some(head).max(ValueLog::last_commit_frame(log_dir)?));
    }
    let legacy = index.get(&super::values_mark_key())?.and_then(|b| decode_mark(&b));
    if legacy.is_none() && !holds_records(index)? && ValueLog::holds_frames(log_dir)? {
        let oldest = super::files::numbered(log_dir, ".values")?.first().map(|(n, _)| *n);
        let history = match oldest {
            Some(1) => "the log holds every write since the directory was made".to_owned(),
            Some(n) => format!(
                "the log's oldest segment is {n}: what compaction removed before it is lost, and the index rebuilt \
                 from the rest may lack records older than it"
            ),
            None => String::new(),
        };
        let why = format!(
            "the index in {} holds nothing, but the value log beside it holds writes: the index lost its state \
             (its files were damaged or removed). Nothing was changed. Restore the data directory from a backup \
             (`chatvault restore`), or start once with --accept-damage to rebuild the index from the log ({history})",
            log_dir.parent().unwrap_or(log_dir).display()
        );
        if !accept_damage {
            return Err(StoreError::Damaged(why));
        }
        tracing::error!("{why}; accepted (--accept-damage): rebuilding the index from the log");
    }
    ValueLog::check_store_against_commits(log_dir, legacy, accept_damage)?;
    Ok(legacy)
}

/// A batch frame's value for `ops`, the n-th [`Op::PutLogged`] put as a pointer to
/// `pointers[n]` (where its value went, in the same write).
/// Opens the value log in `dir` as the write-ahead log of `index`, as a start must: how
/// far it was acknowledged decides torn tail against damage (`log_acknowledged`), and a
/// cut the index is past, or one an earlier start recorded and did not finish, is
/// carried (`ValueLog::index_ahead`, `resume_cut`). Reads only, unless it cuts.
pub fn open_log(
    index: &dyn KvStore,
    dir: &Path,
    segment_bytes: u64,
    mode: Durability,
    accept_damage: bool,
) -> Result<ValueLog, StoreError> {
    let acknowledged = log_acknowledged(index, dir, accept_damage)?;
    let mut log = ValueLog::open_checked(dir, segment_bytes, acknowledged, mode, accept_damage)?;
    if let Some(applied) = applied_of(index)? {
        log.index_ahead(applied)?;
    }
    if let Some(cut) = pending_cut(index)? {
        log.resume_cut(cut)?;
    }
    Ok(log)
}

fn encode_batch(ops: &[Op], pointers: &[ValuePointer]) -> Result<Vec<u8>, StoreError> {
    let size = ops
        .iter()
        .map(|op| match op {
            Op::Put(k, v) => 7 + k.len() + v.len(),
            Op::PutLogged(k, _) => 7 + k.len() + ValuePointer::ENCODED_LEN,
            Op::Delete(k) => 3 + k.len(),
        })
        .sum::<usize>();
    let mut out = Vec::with_capacity(1 + size);
    out.push(BATCH_V1);
    let mut logged = pointers.iter();
    for op in ops {
        let pointer;
        let (tag, key, value) = match op {
            Op::Put(k, v) => (PUT, k, Some(v.as_slice())),
            Op::PutLogged(k, _) => {
                pointer = logged.next().ok_or(StoreError::Failed)?.encode();
                (PUT, k, Some(pointer.as_slice()))
            }
            Op::Delete(k) => (DELETE, k, None),
        };
        let key_len =
            u16::try_from(key.len()).map_err(|_| StoreError::Engine("write-ahead log: key too long".into()))?;
        out.push(tag);
        out.extend_from_slice(&key_len.to_le_bytes());
        out.extend_from_slice(key);
        if let Some(v) = value {
            let len =
                u32::try_from(v.len()).map_err(|_| StoreError::Engine("write-ahead log: value too long".into()))?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(v);
        }
    }
    Ok(out)
}

fn decode_batch(bytes: &[u8]) -> Option<Batch> {
    let (&version, mut rest) = bytes.split_first()?;
    if version != BATCH_V1 {
        return None;
    }
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        rest = tail;
        Some(head)
    };
    let mut batch = Batch::default();
    while let Some(tag) = take(1) {
        let tag = tag[0];
        let key_len = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let key = take(key_len)?.to_vec();
        match tag {
            PUT => {
                let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                batch.put(key, take(len)?.to_vec());
            }
            DELETE => batch.delete(key),
            _ => return None,
        }
    }
    Some(batch)
}

/// The index (sled) behind its write-ahead log.
pub struct LoggedStore {
    index: Arc<dyn KvStore>,
    log: Arc<ValueLog>,
    /// Held while a batch goes to the log and then to the index, so both see one order.
    order: Mutex<()>,
    /// One checkpoint at a time; holds the last head made durable in the index.
    checkpointed: Mutex<Mark>,
    /// Per segment, the overhead count last recorded in the index.
    recorded: Mutex<std::collections::BTreeMap<u32, u64>>,
    /// Set when the index refused a batch the log took: nothing more is written.
    failed: AtomicBool,
    /// Set once the start is sure: only then is a checkpoint made at drop.
    started: AtomicBool,
    stop: Arc<(Mutex<bool>, Condvar)>,
}

impl LoggedStore {
    /// Puts `index` behind `log` (already opened, its torn tail cut) and applies the
    /// batches logged after the index's head. Writes nothing else: a start refused after
    /// this leaves the files as they were, but for the index caught up with its own log.
    /// [`Self::start`] begins the checkpoints once the start is sure.
    pub fn open(index: Arc<dyn KvStore>, log: Arc<ValueLog>) -> Result<Arc<Self>, StoreError> {
        let head = head_of(index.as_ref())?;
        let mut recorded = std::collections::BTreeMap::new();
        let present: std::collections::BTreeSet<u32> = log.segment_ids()?.into_iter().collect();
        for (k, v) in index.scan(&[space::LOG_MARKS, b'o'], None, usize::MAX)? {
            let (Some(seg), Ok(bytes)) = (k.get(2..6).and_then(|s| s.try_into().ok()), v.as_slice().try_into()) else {
                continue;
            };
            let (seg, bytes) = (u32::from_be_bytes(seg), u64::from_be_bytes(bytes));
            if present.contains(&seg) {
                log.set_overhead(seg, bytes);
                recorded.insert(seg, bytes);
            }
        }
        // An index with no head and no records is new, or lost its state (see
        // `log_acknowledged`): it is rebuilt from the oldest segment there is.
        // sled's state is exactly that after the last batch it records (`applied_key`);
        // a head only moves past batches sled holds.
        let applied = applied_of(index.as_ref())?;
        let from = match head {
            Some(head) => Some(head.max(applied.unwrap_or(head))),
            None if !holds_records(index.as_ref())? => log.segment_ids()?.first().map(|id| (*id, 0)),
            None => None,
        };
        // Damage accepted at the log's open, or a power loss that kept sled ahead of the
        // log, cut it before that point: what the index holds is all there is, and the
        // log goes on past the cut.
        let from = from.filter(|from| !log.in_cut(*from));
        if let Some(from) = from {
            let replayed = replay(index.as_ref(), &log, from)?;
            if replayed > 0 {
                tracing::info!(batches = replayed, "write-ahead log: applied the batches the index had not absorbed");
            }
        }
        // After an unclean stop (frames past the index's last checkpoint), writing goes on
        // in a new segment: see `ValueLog::start_segment`.
        if let Some(head) = head {
            let end = log.end()?;
            // A clean stop leaves the head at the end, or one commit frame before it.
            let clean = head == end || (head.0 == end.0 && end.1 == head.1 + super::values::COMMIT_FRAME_BYTES);
            if !clean && log.torn_at_open().is_none() {
                log.start_segment()?;
            }
        }
        // A new (or upgraded, or rebuilt) index gets its head at once: a crash before the
        // first checkpoint must not leave it looking as if it had lost its state. After a
        // cut, the index is made to say so before anything else: its head and position
        // may lie past the log's new end (in the cut part), and the next start must not
        // look for them there; the cut itself stays recorded until `clear_cut`.
        let cut = log.torn_at_open();
        let mut b = Batch::default();
        let head = match head {
            Some(head) if !log.in_cut(head) => head,
            _ => {
                // Synced, so the head never names what a power loss could still take.
                log.sync(Durability::Fsync)?;
                let end = log.end()?;
                b.put(head_key(), encode_mark(end));
                end
            }
        };
        if let Some(cut) = cut {
            b.put(cut_key(), encode_mark(cut));
            if applied.is_some_and(|a| log.in_cut(a)) {
                b.put(applied_key(), encode_mark(log.end()?));
            }
        }
        if !b.is_empty() {
            index.apply(b)?;
            index.sync(Durability::Fsync)?;
        }
        Ok(Arc::new(LoggedStore {
            index,
            log,
            order: Mutex::new(()),
            // What the index has made durable.
            checkpointed: Mutex::new(head),
            recorded: Mutex::new(recorded),
            failed: AtomicBool::new(false),
            started: AtomicBool::new(false),
            stop: Arc::new((Mutex::new(false), Condvar::new())),
        }))
    }

    /// Checkpoints now, then every `every`, and at the end (drop).
    pub fn start(self: &Arc<Self>, every: Duration) -> Result<(), StoreError> {
        self.checkpoint()?;
        self.started.store(true, Ordering::SeqCst);
        let weak = Arc::downgrade(self);
        let stop = self.stop.clone();
        std::thread::Builder::new().name("chatvault-checkpoint".into()).spawn(move || {
            loop {
                {
                    let Ok(stopped) = stop.0.lock() else { return };
                    let Ok((stopped, _)) = stop.1.wait_timeout_while(stopped, every, |s| !*s) else {
                        return;
                    };
                    if *stopped {
                        return;
                    }
                }
                let Some(store) = weak.upgrade() else { return };
                if let Err(e) = store.checkpoint() {
                    tracing::error!(error = %e, "write-ahead log: a checkpoint failed; retried later");
                }
            }
        })?;
        Ok(())
    }

    /// Makes the index durable up to the log's end now and records that as its head.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let mut checkpointed = self.checkpointed.lock().map_err(|_| StoreError::Failed)?;
        if self.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Failed);
        }
        // Every batch logged before `head` has been applied to the index.
        let head = {
            let _order = self.order.lock().map_err(|_| StoreError::Failed)?;
            self.log.end()?
        };
        if head == *checkpointed || self.log.past_own_commit_frame(*checkpointed, head).is_some() {
            return Ok(());
        }
        // The log is durable up to the head before the index says it absorbed it.
        self.log.sync(Durability::Fsync)?;
        crate::failpoint::hit("checkpoint.after_log_sync");
        let mut b = Batch::default();
        b.put(head_key(), encode_mark(head));
        let counts = self.log.overhead();
        let mut recorded = self.recorded.lock().map_err(|_| StoreError::Failed)?;
        for (seg, bytes) in &counts {
            if recorded.get(seg) != Some(bytes) {
                b.put(overhead_key(*seg), bytes.to_be_bytes().to_vec());
            }
        }
        for seg in recorded.keys().filter(|s| !counts.contains_key(s)) {
            b.delete(overhead_key(*seg));
        }
        self.index.apply(b)?;
        crate::failpoint::hit("checkpoint.before_index_sync");
        self.index.sync(Durability::Fsync)?;
        crate::failpoint::hit("checkpoint.after_index_sync");
        *recorded = counts;
        *checkpointed = head;
        Ok(())
    }

    /// The records past the log's cut are dropped: the cut need not be redone.
    pub fn clear_cut(&self) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.delete(cut_key());
        self.index.apply(b)?;
        self.index.sync(Durability::Fsync)
    }

    /// The head the index has made durable: segments before its segment are no longer
    /// needed for a replay.
    pub fn checkpointed(&self) -> Result<Mark, StoreError> {
        Ok(*self.checkpointed.lock().map_err(|_| StoreError::Failed)?)
    }

    fn check_failed(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::SeqCst) { Err(StoreError::Failed) } else { Ok(()) }
    }

    /// Logs `batch` and applies it to the index; the caller holds the order lock. Values
    /// put logged and the batch frame pointing at them go to the log in one write.
    /// `encoded` is the batch frame made ahead, outside the lock, for a batch with no
    /// logged value (whose frame depends on nothing the log decides).
    fn log_and_apply(&self, batch: Batch, encoded: Option<Vec<u8>>) -> Result<(), StoreError> {
        let (pointers, end) = if let Some(frame) = encoded {
            let framed = self.log.append(&[(BATCH_KEY, &frame)])?;
            (Vec::new(), framed.first().map(ValuePointer::end))
        } else {
            let values: Vec<(&[u8], &[u8])> = batch
                .ops
                .iter()
                .filter_map(|op| match op {
                    Op::PutLogged(k, v) => Some((k.as_slice(), v.as_slice())),
                    _ => None,
                })
                .collect();
            let frame = |ps: &[ValuePointer]| Ok(Some((BATCH_KEY, encode_batch(&batch.ops, ps)?)));
            let (pointers, framed) = self.log.append_then(&values, frame)?;
            (pointers, framed.as_ref().map(ValuePointer::end))
        };
        let mut logged = pointers.into_iter();
        let mut resolved = Batch::default();
        for op in batch.ops {
            match op {
                Op::PutLogged(k, _) => resolved.put(k, logged.next().ok_or(StoreError::Failed)?.encode()),
                other => resolved.ops.push(other),
            }
        }
        let mut position = Batch::default();
        position.put(applied_key(), encode_mark(end.ok_or(StoreError::Failed)?));
        // A batch of several writes carries its position inside (sled applies it whole).
        // A single write keeps sled's single-write path, whose batch path takes a lock that
        // stops every other reader and writer: its position follows it as a second single
        // write. sled keeps a prefix of its writes in their order, so after a crash the
        // position lags the state by that one write at most, and applying it again from
        // there is exact.
        let applied = if resolved.ops.len() == 1 {
            self.index.apply(resolved).and_then(|()| {
                crate::failpoint::hit("wal.before_position");
                self.index.apply(position)
            })
        } else {
            resolved.ops.extend(position.ops);
            self.index.apply(resolved)
        };
        match applied {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "the index refused a batch its log holds; refusing further writes");
                self.failed.store(true, Ordering::SeqCst);
                Err(e)
            }
        }
    }
}

/// Applies the batch frames from `head` on to `index`; returns how many.
fn replay(index: &dyn KvStore, log: &ValueLog, from: Mark) -> Result<u64, StoreError> {
    let mut n = 0u64;
    // The count of the segment replay starts in was recorded at the last checkpoint (it
    // may lack what followed: compaction then comes later, never too early); later
    // segments are counted here.
    let mut counted = std::collections::BTreeMap::<u32, u64>::new();
    log.walk_from(from, &mut |(segment, offset), size, key, value| {
        if segment > from.0 && (key.is_empty() || key == BATCH_KEY) {
            *counted.entry(segment).or_default() += size;
        }
        if key == BATCH_KEY {
            let mut batch = decode_batch(value).ok_or_else(|| {
                StoreError::Damaged(format!(
                    "value log segment {segment}: the batch frame at offset {offset} is not one"
                ))
            })?;
            batch.put(applied_key(), encode_mark((segment, offset + size)));
            index.apply(batch)?;
            n += 1;
        }
        Ok(())
    })?;
    for (segment, bytes) in counted {
        log.add_overhead(segment, bytes);
    }
    Ok(n)
}

impl KvStore for LoggedStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.index.get(key)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let encoded = match batch.ops.iter().any(|op| matches!(op, Op::PutLogged(..))) {
            false => Some(encode_batch(&batch.ops, &[])?),
            true => None,
        };
        let _order = self.order.lock().map_err(|_| StoreError::Failed)?;
        self.check_failed()?;
        self.log_and_apply(batch, encoded)
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>, StoreError> {
        self.index.scan(prefix, after, limit)
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.index.last(prefix)
    }

    fn compare_and_swap(&self, key: &[u8], old: Option<&[u8]>, new: Option<Vec<u8>>) -> Result<bool, StoreError> {
        // Every write goes through the order lock: the comparison holds until the swap.
        let _order = self.order.lock().map_err(|_| StoreError::Failed)?;
        self.check_failed()?;
        if self.index.get(key)?.as_deref() != old {
            return Ok(false);
        }
        let mut b = Batch::default();
        match new {
            Some(v) => b.put(key.to_vec(), v),
            None => b.delete(key.to_vec()),
        }
        self.log_and_apply(b, None)?;
        Ok(true)
    }

    /// Syncs the log: every batch applied is in it. `Flush` and `None` need nothing more,
    /// since each batch reached the kernel in its `write`.
    fn sync(&self, mode: Durability) -> Result<(), StoreError> {
        self.check_failed()?;
        match mode {
            Durability::Fsync => self.log.sync(Durability::Fsync),
            Durability::Flush | Durability::None => Ok(()),
        }
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.index.size_on_disk()
    }
}

impl Drop for LoggedStore {
    fn drop(&mut self) {
        if let Ok(mut stopped) = self.stop.0.lock() {
            *stopped = true;
            self.stop.1.notify_all();
        }
        if self.started.load(Ordering::SeqCst)
            && !self.failed.load(Ordering::SeqCst)
            && let Err(e) = self.checkpoint()
        {
            tracing::warn!(error = %e, "write-ahead log: no checkpoint at close; the next start replays the log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn started(store: Arc<LoggedStore>) -> Arc<LoggedStore> {
        store.start(CHECKPOINT_EVERY).unwrap();
        store
    }

    fn open(dir: &std::path::Path) -> (Arc<dyn KvStore>, Arc<ValueLog>) {
        // sled's background flusher of a handle just dropped may hold the file lock a moment.
        let mut tries = 0;
        let sled = loop {
            match SledStore::open(&dir.join("db"), 1 << 20) {
                Ok(s) => break s,
                Err(e) if tries < 50 && e.to_string().contains("could not acquire lock") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let index: Arc<dyn KvStore> = Arc::new(sled);
        let log = Arc::new(ValueLog::open(&dir.join("values"), 1 << 20).unwrap());
        (index, log)
    }

    #[test]
    fn a_batch_round_trips_through_its_frame() {
        let mut b = Batch::default();
        b.put(vec![1, 2], vec![3; 300]);
        b.delete(vec![4]);
        b.put(vec![5], vec![]);
        let back = decode_batch(&encode_batch(&b.ops, &[]).unwrap()).unwrap();
        assert_eq!(format!("{:?}", back.ops), format!("{:?}", b.ops));
        assert!(decode_batch(&[2]).is_none(), "a newer format is not taken for this one");
    }

    #[test]
    fn the_logged_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let (index, log) = open(dir.path());
        let store = started(LoggedStore::open(index, log).unwrap());
        super::super::tests::conformance(store.as_ref());
    }

    /// The index loses everything after its checkpoint (as a crash before sled's flush, or
    /// sled recovering to an older state): the next open applies the log's batches again.
    #[test]
    fn batches_the_index_lost_after_its_checkpoint_are_replayed_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let stale = tempfile::tempdir().unwrap();
        {
            let (index, log) = open(dir.path());
            let store = started(LoggedStore::open(index, log).unwrap());
            let mut b = Batch::default();
            b.put(b"kept".to_vec(), b"1".to_vec());
            store.apply(b).unwrap();
            store.checkpoint().unwrap();
            drop(store);
            // The index as it was at that checkpoint.
            copy_dir(&dir.path().join("db"), &stale.path().join("db"));
        }
        {
            let (index, log) = open(dir.path());
            let store = started(LoggedStore::open(index, log).unwrap());
            let mut b = Batch::default();
            b.put(b"later".to_vec(), b"2".to_vec());
            b.delete(b"kept".to_vec());
            store.apply(b).unwrap();
            assert!(store.compare_and_swap(b"later", Some(b"2"), Some(b"3".to_vec())).unwrap());
            assert!(!store.compare_and_swap(b"later", Some(b"2"), Some(b"4".to_vec())).unwrap());
            store.sync(Durability::Fsync).unwrap();
        }
        // Put the old index back: it has none of the later batches.
        std::fs::remove_dir_all(dir.path().join("db")).unwrap();
        copy_dir(&stale.path().join("db"), &dir.path().join("db"));
        let (index, log) = open(dir.path());
        assert_eq!(index.get(b"kept").unwrap(), Some(b"1".to_vec()), "the index really is the old one");
        let store = started(LoggedStore::open(index, log).unwrap());
        assert_eq!(store.get(b"kept").unwrap(), None);
        assert_eq!(store.get(b"later").unwrap(), Some(b"3".to_vec()));
    }

    /// A power loss kept sled's pages but cut the log's unsynced tail: the index is ahead
    /// of its log. Its state is a whole one (sled keeps a prefix of its batches) and is not
    /// rolled back in part by a replay from the head; the log goes on in a new segment, so
    /// no offset the index names is reused.
    #[test]
    fn an_index_ahead_of_its_log_is_kept_whole_and_the_log_goes_on_in_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let cut = {
            let (index, log) = open(dir.path());
            // Not started: no checkpoint at close, as after a power loss.
            let store = LoggedStore::open(index.clone(), log.clone()).unwrap();
            let mut b = Batch::default();
            b.put(b"k".to_vec(), b"before".to_vec());
            store.apply(b).unwrap();
            store.checkpoint().unwrap();
            // Synced after the checkpoint: a replay from the head would apply it again.
            let mut b = Batch::default();
            b.put(b"k".to_vec(), b"synced".to_vec());
            store.apply(b).unwrap();
            store.sync(Durability::Fsync).unwrap();
            let cut = log.end().unwrap();
            let mut b = Batch::default();
            b.put(b"k".to_vec(), b"after".to_vec());
            b.put(b"only-after".to_vec(), b"x".to_vec());
            store.apply(b).unwrap();
            index.sync(Durability::Fsync).unwrap();
            cut
        };
        let segment = dir.path().join("values").join(format!("{:010}.values", cut.0));
        std::fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(cut.1).unwrap();

        // As the vault opens it.
        let reopen = || {
            let index: Arc<dyn KvStore> = Arc::new(SledStore::open(&dir.path().join("db"), 1 << 20).unwrap());
            let log = open_log(index.as_ref(), &dir.path().join("values"), 1 << 20, Durability::Fsync, false);
            let log = Arc::new(log.unwrap());
            (LoggedStore::open(index, log.clone()).unwrap(), log)
        };
        {
            // A start that stops before anything more (refused, or killed): the next one
            // must still open, with the cut still to finish.
            let (store, log) = reopen();
            assert_eq!(log.torn_at_open(), Some(cut));
            assert_eq!(store.get(b"k").unwrap(), Some(b"after".to_vec()), "not rolled back by a replay");
        }
        let (store, log) = reopen();
        let store = started(store);
        assert_eq!(log.torn_at_open(), Some(cut), "the cut is still to finish");
        assert_eq!(store.get(b"k").unwrap(), Some(b"after".to_vec()), "not rolled back by a replay");
        assert_eq!(store.get(b"only-after").unwrap(), Some(b"x".to_vec()));
        assert!(log.end().unwrap().0 > cut.0, "writing goes on in a new segment");
        store.clear_cut().unwrap();
        drop(store);
        let (_, log) = reopen();
        assert_eq!(log.torn_at_open(), None, "a finished cut is not redone");
    }

    /// After an unclean stop the log goes on in a new segment (an offset the index may name
    /// for a write the log lost is never reused); after a clean one it does not.
    #[test]
    fn writing_goes_on_in_a_new_segment_after_an_unclean_stop_only() {
        let dir = tempfile::tempdir().unwrap();
        let segment_after = |clean: bool| {
            let (index, log) = open(dir.path());
            let store = LoggedStore::open(index, log.clone()).unwrap();
            let before = log.end().unwrap().0;
            let mut b = Batch::default();
            b.put(b"k".to_vec(), b"v".to_vec());
            store.apply(b).unwrap();
            if clean {
                store.checkpoint().unwrap();
            }
            before
        };
        let first = segment_after(false);
        let second = segment_after(true);
        assert_eq!(second, first + 1, "an unclean stop: a new segment");
        let (index, log) = open(dir.path());
        let _store = LoggedStore::open(index, log.clone()).unwrap();
        assert_eq!(log.end().unwrap().0, second, "a clean stop: the same segment");
    }

    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }
}
