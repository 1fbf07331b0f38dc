//! What the process does to itself before it touches a key: files it creates are its
//! own (umask 0077, so sled's files are 0600 too), it never writes a core dump (one held
//! message text and an API-key secret), and it cannot be attached to by another process
//! of the same user. And the data and key directories are its own alone.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};

/// Sets the umask, turns core dumps off and makes the process non-dumpable. Failing to
/// turn dumps off is refused: a server that may dump its keys does not start.
pub fn harden_process() -> Result<(), String> {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) })
        .map_err(|e| format!("cannot turn core dumps off (RLIMIT_CORE): {e}"))?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| format!("cannot make the process non-dumpable (PR_SET_DUMPABLE): {e}"))?;
    Ok(())
}

/// Locks every page the process has and will have in memory, faulted in as used (so the
/// sled cache's reservation costs nothing until filled): key pages never reach swap.
/// rustix's `mlock` of single pages is `unsafe`; `mlockall` is not, and covers them all.
pub fn lock_memory() -> Result<(), String> {
    use rustix::mm::{MlockAllFlags, mlockall};
    mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT).map_err(|e| {
        format!(
            "lock_memory: cannot lock the process in memory (mlockall): {e}; give it CAP_IPC_LOCK or raise \
             RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=infinity), or set lock_memory = false"
        )
    })
}

/// A data or key directory that others may enter is closed (0700), saying so: anyone
/// who can read it can take the copy the erasure model assumes only backups hold.
/// One the server does not own (a volume mounted for it, group-shared on purpose) is
/// left as it is, with a warning; the files in it are the server's own either way.
pub fn close_directory(dir: &Path, what: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{what} {}: {e}", dir.display())),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"),
            "{what} is open to other users and not owned by this process's user: left as it is; close it (0700)");
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{what} {} is open to other users ({mode:o}) and cannot be closed: {e}", dir.display()))?;
    tracing::warn!(dir = %dir.display(), was = format!("{mode:o}"), "{what} was open to other users; closed to 0700");
    Ok(())
}
