//! Small-file primitives for the key directory: atomic durable writes and destruction.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

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

/// Overwrites a key file with zeros, syncs, unlinks it and syncs the directory.
/// On a journaling or copy-on-write file system or an SSD, old blocks may survive the
/// overwrite: that is why the key directory belongs on its own small volume (SECURITY.md).
pub fn destroy(path: &Path) -> io::Result<()> {
    match fs::metadata(path) {
        Ok(meta) => {
            let mut f = OpenOptions::new().write(true).open(path)?;
            f.write_all(&vec![0u8; meta.len() as usize])?;
            f.sync_all()?;
            drop(f);
            fs::remove_file(path)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
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
