//! The key directory must live apart from the data directory: every backup or snapshot
//! of the data would otherwise carry the key-store keys that make erasures final by
//! being destroyed.

use std::path::{Path, PathBuf};

use super::VaultError;

/// Refuses a key directory equal to, inside, or containing the data directory.
pub fn refuse_overlap(data_dir: &Path, key_dir: &Path) -> Result<(), VaultError> {
    let (data, keys) = (resolved(data_dir)?, resolved(key_dir)?);
    let why = if data == keys {
        "are the same directory"
    } else if keys.starts_with(&data) {
        "overlap: the key directory is inside the data directory"
    } else if data.starts_with(&keys) {
        "overlap: the data directory is inside the key directory"
    } else {
        return Ok(());
    };
    Err(VaultError::Mismatch(format!(
        "data_dir ({}) and key_dir ({}) {why}; every copy of the data would then hold the \
         key-store keys. Put the key directory on its own volume (SECURITY.md)",
        data_dir.display(),
        key_dir.display()
    )))
}

/// Warns when the two directories exist on one file system: a snapshot of that volume
/// (or its block-level backup) then holds both, which an erasure must not allow past one
/// rotation period. Not refused: a test or a laptop has one disk.
pub fn warn_if_same_volume(data_dir: &Path, key_dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(d), Ok(k)) = (std::fs::metadata(data_dir), std::fs::metadata(key_dir))
        && d.dev() == k.dev()
    {
        tracing::warn!(
            data_dir = %data_dir.display(),
            key_dir = %key_dir.display(),
            "the key directory is on the same file system as the data directory: keep it on its own volume, \
             out of the data's snapshots and backups (SECURITY.md)"
        );
    }
}

/// `path` made absolute and `.`/`..` folded, with symbolic links resolved as far as it
/// exists already (it may not yet: the directories are created on first start).
fn resolved(path: &Path) -> Result<PathBuf, VaultError> {
    let folded =
        crate::store::files::folded(path).map_err(|e| VaultError::invalid("data_dir/key_dir", e.to_string()))?;
    let mut existing = folded.as_path();
    let mut rest = Vec::new();
    while let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) {
        if let Ok(real) = existing.canonicalize() {
            return Ok(rest.iter().rev().fold(real, |p, part| p.join(part)));
        }
        rest.push(name.to_owned());
        existing = parent;
    }
    Ok(folded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_directory_equal_to_inside_or_around_the_data_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        assert!(refuse_overlap(&data, &tmp.path().join("keys")).is_ok());
        assert!(refuse_overlap(&data, &data).is_err());
        assert!(refuse_overlap(&data, &data.join("keys")).is_err(), "inside, not created yet");
        assert!(refuse_overlap(&data.join("x"), &data).is_err(), "containing");
        // The same directory named through a link and a `..` is still the same.
        std::os::unix::fs::symlink(&data, tmp.path().join("link")).unwrap();
        assert!(refuse_overlap(&data, &tmp.path().join("link")).is_err());
        assert!(refuse_overlap(&data, &data.join("sub/../")).is_err());
        // Siblings sharing a name prefix do not overlap.
        assert!(refuse_overlap(&data, &tmp.path().join("data-keys")).is_ok());
    }
}
