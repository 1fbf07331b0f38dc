//! Small-file primitives for the key directory: atomic durable writes and destruction.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// temp file (mode 0600), fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Destroys a key file so that a crash at any point leaves nothing that stops the next
/// start: the file is first renamed to `<name>.destroy` (a name no key is ever loaded
/// from), then overwritten with zeros, synced and unlinked. [`finish_destroying`] ends
/// what a crash interrupted. On a journaling or copy-on-write file system or an SSD, old
/// blocks may survive the overwrite: that is why the key directory belongs on its own
/// small volume (SECURITY.md).
pub fn destroy(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let doomed = destroying_name(path);
    match fs::rename(path, &doomed) {
        Ok(()) => {
            sync_dir(dir)?;
            crate::failpoint::hit("destroy.after_rename");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && !doomed.exists() => return sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    wipe_and_unlink(&doomed)?;
    sync_dir(dir)
}

/// The name a key file has while it is being destroyed.
pub fn destroying_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(DESTROYING_SUFFIX);
    path.with_file_name(name)
}

/// Suffix of a key file whose destruction was started.
pub const DESTROYING_SUFFIX: &str = ".destroy";

/// Finishes destroying every `*.destroy` file in `dir` (a crash stopped it). Returns
/// how many it finished.
pub fn finish_destroying(dir: &Path) -> io::Result<usize> {
    let mut done = 0;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(DESTROYING_SUFFIX)) {
            wipe_and_unlink(&path)?;
            done += 1;
        }
    }
    if done > 0 {
        sync_dir(dir)?;
    }
    Ok(done)
}

fn wipe_and_unlink(path: &Path) -> io::Result<()> {
    let len = match fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(&vec![0u8; len as usize])?;
    f.sync_all()?;
    drop(f);
    crate::failpoint::hit("destroy.after_wipe");
    fs::remove_file(path)
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates a directory readable by the owner only, or checks an existing one isn't world-open.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// True if group or others may read the file: a secret file like that is refused.
pub fn readable_by_others(path: &Path) -> io::Result<bool> {
    Ok(fs::metadata(path)?.permissions().mode() & 0o077 != 0)
}
