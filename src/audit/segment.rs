//! The trail's files: append-only segments of framed records beside the store. A record
//! costs one `write` (no B-tree update, no page rewrite); the group commit `fdatasync`s
//! the active segment with the store. Each segment starts with the sequence number of
//! its first record and the MAC of the record before it, so a segment verifies on its
//! own and old segments can later be archived whole.
//!
//! Segment file: `MAGIC | first_seq (u64 LE) | prev MAC (32)`, then frames
//! `len (u32 LE) | crc32 (u32 LE) | payload`. The CRC tells a torn write from a
//! complete one; tampering is the MAC's business, one level up.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::store::{Durability, StoreError, files};

const MAGIC: &[u8; 8] = b"CVAUDIT\x02";
pub const HEADER_LEN: usize = 8 + 8 + 32;
const FRAME_HEAD: usize = 8;
/// Larger frames are refused on write and taken for damage on read.
pub const MAX_PAYLOAD: usize = 64 * 1024;
const SUFFIX: &str = ".trail";

/// Where a segment's chain picks up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub first_seq: u64,
    pub prev: [u8; 32],
}

/// A segment as far as it was written when a reader asked.
#[derive(Clone, Debug)]
pub struct SegmentView {
    pub path: PathBuf,
    pub first_seq: u64,
    pub(super) len: u64,
}

struct Active {
    file: Arc<File>,
    view: SegmentView,
}

pub struct Segments {
    dir: PathBuf,
    max_bytes: u64,
    /// Older segments, oldest first, then the one written to.
    closed: Mutex<Vec<SegmentView>>,
    active: Mutex<Option<Active>>,
    /// How far the trail was durable at its last `fsync`: (first record of the active
    /// segment, length). The group commit records it in the store with every round.
    synced: Mutex<Option<(u64, u64)>>,
}

/// Where the group commit records how far the audit trail was durable.
pub fn mark_key() -> Vec<u8> {
    vec![crate::store::space::LOG_MARKS, b'a']
}

/// An audit mark read back from the store: (segment's first record, length).
pub fn decode_mark(bytes: &[u8]) -> Option<(u64, u64)> {
    Some((u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?), u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?)))
}

fn name(first_seq: u64) -> String {
    format!("{first_seq:020}{SUFFIX}")
}

impl Segments {
    /// Opens the segments in `dir` (created 0700 if missing). A torn frame at the very end
    /// of the newest segment (a crash mid-write, never acknowledged) is cut off.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, StoreError> {
        Self::open_checked(dir, max_bytes, None, false)
    }

    /// [`Self::open`], telling damage from a torn write. With `acknowledged` (the store's
    /// record of how far the trail was durable), a bad record before it is damage and one
    /// after it a write cut short, whatever follows (a power loss may write pages out of
    /// order). Without it (a trail never fsynced, or from before marks) each record is one
    /// `write`, so a bad record followed by a good one is damage. Damage is refused,
    /// naming the file and offset and changing nothing, unless `accept_damage` (then cut
    /// off like a torn tail, said at error level).
    pub fn open_checked(
        dir: &Path,
        max_bytes: u64,
        acknowledged: Option<(u64, u64)>,
        accept_damage: bool,
    ) -> Result<Self, StoreError> {
        files::private_dir(dir)?;
        let found = files::numbered(dir, SUFFIX)?;
        let mut views: Vec<SegmentView> = Vec::with_capacity(found.len());
        for (first_seq, path) in found {
            let len = fs::metadata(&path)?.len();
            views.push(SegmentView { path, first_seq, len });
        }
        // A crash while a segment was being created can leave it without its whole header
        // (it is synced before any record goes in): such a file holds nothing; drop it.
        if let Some(last) = views.last()
            && last.len < HEADER_LEN as u64
        {
            tracing::warn!(segment = %last.path.display(), "audit trail: removing a segment cut short at creation");
            fs::remove_file(&last.path)?;
            views.pop();
        }
        let active = match views.pop() {
            Some(mut last) => {
                let valid = valid_length(&last)?;
                let good_after =
                    valid < last.len && acknowledged.is_none() && frame_follows(&last.path, valid, last.len)?;
                let damaged = tail_is_damage(acknowledged, last.first_seq, valid, good_after);
                if damaged {
                    let why = format!(
                        "audit segment {}: the record at offset {valid} is damaged and good records follow it: this \
                         is damage, not a torn write. Nothing was changed. Restore the data directory from a backup, \
                         or start once with `--accept-damage --replay-erasures` to cut the segment there and accept \
                         the loss of the records after it (recorded in the erasure ledger; `audit verify` reports \
                         it as an accepted gap)",
                        last.path.display()
                    );
                    if !accept_damage {
                        return Err(StoreError::Damaged(why));
                    }
                    tracing::error!("{why}; accepted (--accept-damage): cutting it off");
                }
                let file = OpenOptions::new().append(true).open(&last.path)?;
                if valid < last.len {
                    tracing::warn!(
                        segment = %last.path.display(), cut = last.len - valid,
                        "audit trail: cutting off a torn record at the end (a crash mid-write; it was never acknowledged)"
                    );
                    file.set_len(valid)?;
                    file.sync_all()?;
                    last.len = valid;
                }
                Some(Active { file: Arc::new(file), view: last })
            }
            None => None,
        };
        Ok(Segments {
            dir: dir.to_path_buf(),
            max_bytes,
            closed: Mutex::new(views),
            active: Mutex::new(active),
            synced: Mutex::new(None),
        })
    }

    /// Appends one record. `seq` and `prev` (its predecessor's MAC) head a new segment
    /// when the current one is full.
    pub fn append(&self, seq: u64, prev: &[u8; 32], payload: &[u8]) -> Result<(), StoreError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(StoreError::Engine(format!("audit record of {} bytes is too large", payload.len())));
        }
        let mut frame = Vec::with_capacity(FRAME_HEAD + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        frame.extend_from_slice(payload);
        let mut active = self.active.lock().map_err(|_| StoreError::Failed)?;
        let full = active
            .as_ref()
            .is_none_or(|a| a.view.len > HEADER_LEN as u64 && a.view.len + frame.len() as u64 > self.max_bytes);
        if full {
            // Closed segments are durable before the next one exists: `sync` only ever
            // needs the active file, and only the newest segment can end torn.
            if let Some(old) = active.as_ref() {
                old.file.sync_data()?;
            }
            let next = self.create(SegmentHeader { first_seq: seq, prev: *prev }).map_err(|e| match e {
                StoreError::Io(io) => StoreError::io_at(&self.dir, io),
                other => other,
            })?;
            if let Some(old) = active.replace(next) {
                self.closed.lock().map_err(|_| StoreError::Failed)?.push(old.view);
                crate::failpoint::hit("audit.after_rollover");
            }
        }
        let a = active.as_mut().ok_or(StoreError::Failed)?;
        // One write of the whole frame: a reader or a crash sees all of it or a torn tail.
        if let Err(e) = (&*a.file).write_all(&frame) {
            // Part of the frame may be in the file (a full disk): cut it off, or every
            // later record would sit behind a torn one.
            let _ = a.file.set_len(a.view.len);
            return Err(StoreError::io_at(&self.dir, e));
        }
        a.view.len += frame.len() as u64;
        Ok(())
    }

    /// Closes the active segment and starts one with `header` now, whatever its fill:
    /// how the trail goes on after an accepted loss.
    pub fn begin(&self, header: SegmentHeader) -> Result<(), StoreError> {
        let mut active = self.active.lock().map_err(|_| StoreError::Failed)?;
        let next = self.create(header)?;
        if let Some(old) = active.replace(next) {
            old.file.sync_data()?;
            self.closed.lock().map_err(|_| StoreError::Failed)?.push(old.view);
        }
        Ok(())
    }

    fn create(&self, header: SegmentHeader) -> Result<Active, StoreError> {
        let path = self.dir.join(name(header.first_seq));
        let mut file = OpenOptions::new().append(true).create_new(true).mode(0o600).open(&path)?;
        let mut head = Vec::with_capacity(HEADER_LEN);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&header.first_seq.to_le_bytes());
        head.extend_from_slice(&header.prev);
        if let Err(e) = file.write_all(&head).and_then(|()| file.sync_all()) {
            // A segment that did not get its header (a full disk) is removed again, or
            // every later attempt would find it there and fail for good.
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(e.into());
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(Active {
            file: Arc::new(file),
            view: SegmentView { path, first_seq: header.first_seq, len: HEADER_LEN as u64 },
        })
    }

    /// Makes every appended record durable to the level `mode` asks. Each record is
    /// already in the kernel when `append` returns, so it survives a process kill.
    pub fn sync(&self, mode: Durability) -> Result<(), StoreError> {
        if mode != Durability::Fsync {
            return Ok(());
        }
        let at = self
            .active
            .lock()
            .map_err(|_| StoreError::Failed)?
            .as_ref()
            .map(|a| (a.file.clone(), a.view.first_seq, a.view.len));
        if let Some((f, first_seq, len)) = at {
            f.sync_data()?;
            if let Ok(mut s) = self.synced.lock() {
                *s = (*s).max(Some((first_seq, len)));
            }
        }
        Ok(())
    }

    /// How far the trail was durable at its last sync, as the store records it.
    pub fn synced_mark(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        let (first_seq, len) = (*self.synced.lock().ok()?)?;
        let mut v = first_seq.to_be_bytes().to_vec();
        v.extend_from_slice(&len.to_be_bytes());
        Some((mark_key(), v))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Deletes the `n` oldest closed segments (never the active one).
    pub fn remove_oldest(&self, n: usize) -> Result<(), StoreError> {
        let mut closed = self.closed.lock().map_err(|_| StoreError::Failed)?;
        let n = n.min(closed.len());
        for view in closed.drain(..n) {
            fs::remove_file(&view.path)?;
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// Every segment, oldest first, cut at what was written when this was called.
    pub fn snapshot(&self) -> Result<Vec<SegmentView>, StoreError> {
        // Active first: a roll between the two locks then shows a segment twice, never none.
        let active = self.active.lock().map_err(|_| StoreError::Failed)?.as_ref().map(|a| a.view.clone());
        let mut all = self.closed.lock().map_err(|_| StoreError::Failed)?.clone();
        if let Some(a) = active
            && all.last().is_none_or(|l| l.first_seq != a.first_seq)
        {
            all.push(a);
        }
        Ok(all)
    }
}

/// Reads one segment's frames in order, up to the length it had when snapshotted.
pub struct Reader {
    inner: BufReader<std::io::Take<File>>,
    pub header: SegmentHeader,
    left: u64,
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    Io(std::io::Error),
    /// A frame (or the header) is cut short, too long, or fails its CRC.
    Damaged,
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e)
    }
}

impl Reader {
    pub fn open(view: &SegmentView) -> Result<Self, FrameError> {
        let file = File::open(&view.path)?;
        let mut inner = BufReader::with_capacity(256 * 1024, file.take(view.len));
        let mut head = [0u8; HEADER_LEN];
        if view.len < HEADER_LEN as u64 {
            return Err(FrameError::Damaged);
        }
        inner.read_exact(&mut head)?;
        if &head[..8] != MAGIC {
            return Err(FrameError::Damaged);
        }
        let first_seq = u64::from_le_bytes(head[8..16].try_into().map_err(|_| FrameError::Damaged)?);
        let prev = head[16..].try_into().map_err(|_| FrameError::Damaged)?;
        if first_seq != view.first_seq {
            return Err(FrameError::Damaged);
        }
        Ok(Reader { inner, header: SegmentHeader { first_seq, prev }, left: view.len - HEADER_LEN as u64 })
    }

    /// The next frame's payload; `None` at the end.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut head = [0u8; FRAME_HEAD];
        self.inner.read_exact(&mut head).map_err(eof_is_damage)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 || len > MAX_PAYLOAD || (FRAME_HEAD + len) as u64 > self.left {
            return Err(FrameError::Damaged);
        }
        let mut payload = vec![0u8; len];
        self.inner.read_exact(&mut payload).map_err(eof_is_damage)?;
        if crc32fast::hash(&payload) != crc {
            return Err(FrameError::Damaged);
        }
        self.left -= (FRAME_HEAD + len) as u64;
        Ok(Some(payload))
    }
}

fn eof_is_damage(e: std::io::Error) -> FrameError {
    if e.kind() == ErrorKind::UnexpectedEof { FrameError::Damaged } else { FrameError::Io(e) }
}

/// Whether the newest segment (starting at record `first_seq`, whole up to `valid`) ends
/// in damage rather than a write cut short: with the store's durable mark, when the mark
/// lies past `valid`; without one, when a good record follows the bad one. `serve` and
/// `chatvault check` decide with this alike.
pub fn tail_is_damage(acknowledged: Option<(u64, u64)>, first_seq: u64, valid: u64, good_after: bool) -> bool {
    match acknowledged {
        Some((seq, off)) => seq > first_seq || (seq == first_seq && off > valid),
        None => good_after,
    }
}

/// Whether a good record follows the damaged one at `at`: then it is damage.
fn frame_follows(path: &Path, at: u64, file_len: u64) -> Result<bool, StoreError> {
    Ok(files::good_frame_after(path, at, file_len, MAX_PAYLOAD)?)
}

/// Every segment in `dir`, oldest first, read through without changing anything (for
/// `chatvault check`).
pub fn inspect(dir: &Path) -> Result<Vec<files::SegmentCheck>, StoreError> {
    let mut out = Vec::new();
    for (first_seq, path) in files::numbered(dir, SUFFIX)? {
        let len = fs::metadata(&path)?.len();
        let view = SegmentView { path: path.clone(), first_seq, len };
        let valid = match valid_length(&view) {
            _ if len < HEADER_LEN as u64 => 0,
            Ok(v) => v,
            // A header that does not read is damage at offset 0; an I/O error is told.
            Err(StoreError::Engine(_)) => 0,
            Err(e) => return Err(e),
        };
        let good_after = valid >= HEADER_LEN as u64 && valid < len && frame_follows(&path, valid, len)?;
        out.push(files::SegmentCheck { path, len, valid, good_after, marked_after: false });
    }
    Ok(out)
}

/// Bytes of `view` that hold a header and whole frames.
fn valid_length(view: &SegmentView) -> Result<u64, StoreError> {
    let mut r = match Reader::open(view) {
        Ok(r) => r,
        // A segment is created with its header synced, so a bad header is damage, not a crash.
        Err(FrameError::Damaged) => {
            return Err(StoreError::Engine(format!("audit segment {} has no valid header", view.path.display())));
        }
        Err(FrameError::Io(e)) => return Err(e.into()),
    };
    let mut valid = HEADER_LEN as u64;
    loop {
        match r.next_frame() {
            Ok(Some(p)) => valid += (FRAME_HEAD + p.len()) as u64,
            Ok(None) | Err(FrameError::Damaged) => return Ok(valid),
            Err(FrameError::Io(e)) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_payloads(s: &Segments) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for v in s.snapshot().unwrap() {
            let mut r = Reader::open(&v).unwrap();
            while let Some(p) = r.next_frame().unwrap() {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn frames_roll_over_into_new_segments_and_read_back_in_order() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("audit");
        let s = Segments::open(&dir, 200).unwrap();
        for i in 1u64..=10 {
            s.append(i, &[i as u8; 32], &[i as u8; 50]).unwrap();
        }
        let views = s.snapshot().unwrap();
        assert!(views.len() > 3, "{views:?}");
        // Only the server's user may read the trail (README says 0600 / 0700).
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&views[0].path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(views[1].first_seq, 3);
        assert_eq!(Reader::open(&views[1]).unwrap().header.prev, [3; 32]);
        drop(s);
        let s = Segments::open(&dir, 200).unwrap();
        s.append(11, &[11; 32], &[11; 50]).unwrap();
        let got = all_payloads(&s);
        assert_eq!(got, (1u8..=11).map(|i| vec![i; 50]).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_last_frame_is_cut_off_at_open_and_writing_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Segments::open(dir.path(), 1 << 20).unwrap();
        s.append(1, &[0; 32], b"first").unwrap();
        s.append(2, &[1; 32], b"second").unwrap();
        let path = s.snapshot().unwrap()[0].path.clone();
        drop(s);
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let s = Segments::open(dir.path(), 1 << 20).unwrap();
        s.append(2, &[1; 32], b"again").unwrap();
        assert_eq!(all_payloads(&s), vec![b"first".to_vec(), b"again".to_vec()]);
    }

    /// A segment of three 40-byte records; its view, with the store closed.
    fn three_records(dir: &Path) -> SegmentView {
        let s = Segments::open(dir, 1 << 20).unwrap();
        for seq in 1..=3 {
            s.append(seq, &[0; 32], &[seq as u8; 40]).unwrap();
        }
        s.snapshot().unwrap()[0].clone()
    }

    #[test]
    fn a_flipped_byte_before_good_records_is_refused_at_open_and_a_cut_short_last_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let view = three_records(dir.path());
        let good = fs::read(&view.path).unwrap();
        let second = HEADER_LEN + FRAME_HEAD + 40;
        let mut bytes = good.clone();
        bytes[second + FRAME_HEAD + 5] ^= 1;
        fs::write(&view.path, &bytes).unwrap();
        let refused = Segments::open(dir.path(), 1 << 20).err().expect("damage is refused");
        let why = refused.to_string();
        assert!(why.contains(&format!("offset {second}")) && why.contains("not a torn write"), "{why}");
        assert_eq!(fs::read(&view.path).unwrap(), bytes, "nothing was changed");
        let accepted = Segments::open_checked(dir.path(), 1 << 20, None, true).unwrap();
        assert_eq!(accepted.snapshot().unwrap()[0].len, second as u64);
        drop(accepted);
        // A last record cut short by a crash is a torn write: cut, no refusal.
        fs::write(&view.path, &good[..good.len() - 3]).unwrap();
        let s = Segments::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(all_payloads(&s).len(), 2);
    }

    #[test]
    fn a_flipped_byte_in_a_length_field_before_good_records_is_refused_too() {
        let dir = tempfile::tempdir().unwrap();
        let view = three_records(dir.path());
        let second = HEADER_LEN + FRAME_HEAD + 40;
        let mut bytes = fs::read(&view.path).unwrap();
        bytes[second + 1] ^= 0x10; // the second record's length: the next one is not where it says
        fs::write(&view.path, &bytes).unwrap();
        let why = Segments::open(dir.path(), 1 << 20).err().expect("damage is refused").to_string();
        assert!(why.contains(&format!("offset {second}")), "{why}");
        assert_eq!(fs::read(&view.path).unwrap(), bytes, "nothing was changed");
    }

    /// With the store's mark of how far the trail was durable, a bad record before it is
    /// damage, and one after it a write a power loss cut short (pages may reach the disk
    /// out of order), whatever follows it: cut, not refused.
    #[test]
    fn the_durable_mark_tells_damage_before_it_from_a_power_loss_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let view = three_records(dir.path());
        let second = (HEADER_LEN + FRAME_HEAD + 40) as u64;
        let mut bytes = fs::read(&view.path).unwrap();
        bytes[second as usize + FRAME_HEAD + 5] ^= 1;
        fs::write(&view.path, &bytes).unwrap();
        // Durable up to the end of the first record only: the rest was never acknowledged.
        let s = Segments::open_checked(dir.path(), 1 << 20, Some((view.first_seq, second)), false).unwrap();
        assert_eq!(all_payloads(&s).len(), 1, "cut after the durable record, no refusal");
        drop(s);
        // Durable past the bad record: damage, refused, nothing changed.
        let dir = tempfile::tempdir().unwrap();
        let view = three_records(dir.path());
        let mut bytes = fs::read(&view.path).unwrap();
        bytes[second as usize + FRAME_HEAD + 5] ^= 1;
        fs::write(&view.path, &bytes).unwrap();
        let end = bytes.len() as u64;
        let why = Segments::open_checked(dir.path(), 1 << 20, Some((view.first_seq, end)), false)
            .err()
            .expect("damage before the durable mark is refused")
            .to_string();
        assert!(why.contains(&format!("offset {second}")), "{why}");
        assert_eq!(fs::read(&view.path).unwrap(), bytes, "nothing was changed");
    }

    #[test]
    fn a_flipped_bit_inside_a_frame_reads_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let s = Segments::open(dir.path(), 1 << 20).unwrap();
        s.append(1, &[0; 32], b"payload").unwrap();
        let view = s.snapshot().unwrap()[0].clone();
        let mut bytes = fs::read(&view.path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&view.path, bytes).unwrap();
        assert!(matches!(Reader::open(&view).unwrap().next_frame(), Err(FrameError::Damaged)));
    }
}
