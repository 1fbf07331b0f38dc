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

/// One segment file as it is on disk, read without changing it: its length, how much of
/// it is a header and whole frames, and (when not all of it) whether a whole frame
/// follows the first bad one, which only damage leaves behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentCheck {
    pub path: std::path::PathBuf,
    pub len: u64,
    pub valid: u64,
    pub good_after: bool,
}
