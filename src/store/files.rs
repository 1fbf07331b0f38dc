//! Directories of numbered segment files, shared by the value log and the audit trail.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Creates `dir` readable by the server's user only, if it does not exist yet.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The files of `dir` named `<number><suffix>`, by number. Other files are left alone.
pub fn numbered(dir: &Path, suffix: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let number = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(suffix)?.parse().ok());
        if let Some(n) = number {
            found.push((n, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Copies the first `len` bytes of `from` to a new file `to` (mode 0600) and syncs it:
/// a file that is only ever appended to, copied as it was when `len` was read.
pub fn copy_prefix(from: &Path, to: &Path, len: u64) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = fs::File::open(from)?.take(len);
    let mut dst = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(to)?;
    let copied = std::io::copy(&mut src, &mut dst)?;
    if copied != len {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("{} is shorter", from.display())));
    }
    dst.flush()?;
    dst.sync_all()
}

/// Syncs a directory, so the files created or renamed in it stay.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// `path` made absolute with `.` and `..` folded, without touching the file system
/// (the directory may not exist yet): for comparing configured directories.
pub fn folded(path: &Path) -> std::io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for part in std::path::absolute(path)?.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

/// One segment file as it is on disk, read without changing it: its length, how much of
/// it is a header and whole frames, and (when not all of it) whether a whole frame
/// follows the first bad one, which only damage leaves behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentCheck {
    pub path: std::path::PathBuf,
    pub len: u64,
    pub valid: u64,
    pub good_after: bool,
    /// A value log's: whether a whole commit frame after the bad one says the log was
    /// synced past it (then the bad frame was acknowledged, whatever the durability).
    pub marked_after: bool,
}

/// Whether a whole, good frame (`len u32 LE | crc32 u32 LE | payload`, the framing of the
/// value log and the audit trail) starts anywhere after the bad frame at `at`: what a
/// process crash never leaves, since it cuts a log's last write short and leaves nothing
/// after it. Every offset is tried, so a flipped byte in a length field is found as well
/// as one in a payload; a random match needs 32 bits of CRC to agree. A candidate must be
/// followed by the end or by another plausible header, and the CRC work is capped
/// (`SCAN_BUDGET`): past it the answer is "none found", so a start never stalls on a
/// large tail.
pub fn good_frame_after(path: &Path, at: u64, file_len: u64, max_payload: usize) -> std::io::Result<bool> {
    good_frame_after_where(path, at, file_len, max_payload, None, |_| true)
}

/// [`good_frame_after`], for a good frame whose payload `wanted` accepts. With `only_len`,
/// candidates of any other payload length are passed over without a CRC, so the budget
/// goes to the frames looked for (a log's small commit frames among large values).
pub fn good_frame_after_where(
    path: &Path,
    at: u64,
    file_len: u64,
    max_payload: usize,
    only_len: Option<usize>,
    wanted: impl Fn(&[u8]) -> bool,
) -> std::io::Result<bool> {
    use std::io::Read;
    const HEAD: usize = 8;
    const SCAN_BUDGET: usize = 64 << 20;
    let start = at + 1;
    if start + HEAD as u64 > file_len {
        return Ok(false);
    }
    let mut rest = Vec::new();
    let window = (file_len - start).min(SCAN_BUDGET as u64 + max_payload as u64 + HEAD as u64);
    let mut f = std::fs::File::open(path)?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(start))?;
    f.take(window).read_to_end(&mut rest)?;
    let plausible = |at: usize| -> Option<usize> {
        let h = rest.get(at..at + HEAD)?;
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        (len > 0 && len <= max_payload && at + HEAD + len <= rest.len()).then_some(len)
    };
    let mut spent = 0usize;
    for i in 0..rest.len().saturating_sub(HEAD - 1) {
        let Some(len) = plausible(i) else { continue };
        if only_len.is_some_and(|l| l != len) {
            continue;
        }
        let next = i + HEAD + len;
        // The end of what was read, or another header that could be one.
        if next != rest.len() && plausible(next).is_none() {
            continue;
        }
        spent += len;
        if spent > SCAN_BUDGET {
            return Ok(false);
        }
        let crc = u32::from_le_bytes([rest[i + 4], rest[i + 5], rest[i + 6], rest[i + 7]]);
        if crc32fast::hash(&rest[i + HEAD..next]) == crc && wanted(&rest[i + HEAD..next]) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_good_frame_after_a_bad_one_is_found_even_when_the_bad_length_field_hides_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let (a, b) = (frame(b"first record"), frame(b"second record"));
        for flip in [0usize, 9] {
            let mut bytes = [a.clone(), b.clone()].concat();
            bytes[flip] ^= 0x55; // the length field, then the payload
            std::fs::write(&path, &bytes).unwrap();
            assert!(good_frame_after(&path, 0, bytes.len() as u64, 1024).unwrap(), "flip at {flip}");
        }
        // A last write cut short has nothing whole after it.
        let cut = [a.clone(), b[..b.len() - 3].to_vec()].concat();
        std::fs::write(&path, &cut).unwrap();
        assert!(!good_frame_after(&path, a.len() as u64, cut.len() as u64, 1024).unwrap());
    }
}
