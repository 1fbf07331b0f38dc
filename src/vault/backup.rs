//! Online backups of the data directory — never of the key directory, whose keys a
//! backup must not outlive. Writers pause while the index is copied (a few seconds per
//! million records), so the copy is one consistent state; the value-log and audit
//! segments are append-only and are copied after, each up to the length it had then.
//! A backup is restored with `chatvault restore`, which replays the erasure ledger into
//! it: a restored backup never brings back an erased subject, a deleted transcript or a
//! revoked key.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::erasure::data_counter;
use super::layout_check::refuse_overlap;
use super::{Vault, VaultError};
use crate::store::{Batch, Durability, KvStore, SledStore, StoreError, files};

/// The manifest's file name, beside `data/` in a backup.
pub const MANIFEST: &str = "chatvault-backup.json";
const FORMAT: &str = "chatvault.backup.v1";
const COPY_PAGE: usize = 4096;

/// What a backup holds, written beside it. No secret, no personal data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub taken_at: String,
    /// The key directory the backup can only be restored with.
    pub store_id: String,
    /// The erasure-ledger entries it holds (restore replays the later ones).
    pub ledger_counter: u64,
    /// Key-store epochs its keys are wrapped under: once a rotation destroys them, the
    /// backup can no longer be opened — that is the erasure becoming final.
    pub key_epochs: Vec<u64>,
    pub records: u64,
    pub value_segments: usize,
    pub audit_segments: usize,
}

impl Manifest {
    /// Reads and checks the manifest of the backup in `dir`.
    pub fn read(dir: &Path) -> Result<Manifest, VaultError> {
        let path = dir.join(MANIFEST);
        let text = fs::read_to_string(&path)
            .map_err(|e| VaultError::invalid("backup", format!("{}: {e} (not a chatvault backup?)", path.display())))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| VaultError::invalid("backup", format!("{}: {e}", path.display())))?;
        if m.format != FORMAT {
            return Err(VaultError::invalid(
                "backup",
                format!("{}: format {:?} is not {FORMAT}", path.display(), m.format),
            ));
        }
        Ok(m)
    }
}

impl Vault {
    /// Writes a consistent copy of the data directory to `out` (which must not exist, or
    /// be empty, and must be apart from the key directory): `out/data` is a data directory
    /// as it was at one moment, `out/chatvault-backup.json` says what it holds. The audit
    /// trail's files (`audit`, each with its length now) are copied into `out/data/audit`.
    /// Blocking.
    pub fn backup(&self, out: &Path, audit: &[(PathBuf, u64)]) -> Result<Manifest, VaultError> {
        if self.values.is_none() {
            return Err(VaultError::FailedPrecondition(
                "this region's data is in its database: back it up there (pg_basebackup, PITR); keep the key \
                 directory's backups apart (SECURITY.md)"
                    .into(),
            ));
        }
        refuse_overlap(out, &self.key_dir)
            .map_err(|_| VaultError::invalid("out", "must not be the key directory, inside it or around it"))?;
        refuse_overlap(out, &self.data_dir)
            .map_err(|_| VaultError::invalid("out", "must not be the data directory, inside it or around it"))?;
        if out.exists() && fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
            return Err(VaultError::invalid("out", format!("{} exists and is not empty", out.display())));
        }
        let result = self.write_backup(out, audit);
        if result.is_err() {
            // A backup cut short is no backup: nothing half-written is left to restore.
            let _ = fs::remove_dir_all(out);
        }
        result
    }

    fn write_backup(&self, out: &Path, audit: &[(PathBuf, u64)]) -> Result<Manifest, VaultError> {
        let lock = |what: &'static str| VaultError::Internal(format!("{what} lock poisoned"));
        files::private_dir(out).map_err(StoreError::from)?;
        let data = out.join("data");
        let copy = SledStore::open(&data, 16 << 20)?;
        // Compaction would delete segments the copy still points into: held until they are
        // copied. Taken before the write gate, so writers never wait for a compaction or a
        // rotation to end, only for the copy of the index.
        let _maintenance = self.maintenance.lock().map_err(|_| lock("maintenance"))?;
        let rotation = self.rotation.lock().map_err(|_| lock("rotation"))?;
        // Write calls wait here, as tasks, until the index is copied.
        let writers = self.write_gate.blocking_write();
        let (records, segments, ledger_counter, key_epochs) = {
            // Every tree writer holds one of these: while all are held, the tree stands still.
            let _writers = self.epoch_guard.write().map_err(|_| lock("epoch"))?;
            let _erasures = self.erasure_order.lock().map_err(|_| lock("erasure"))?;
            let segments = match &self.values {
                Some(v) => v.files_with_lengths()?,
                None => Vec::new(),
            };
            let records = self.copy_tree(&copy)?;
            (records, segments, data_counter(self.store.as_ref())?, self.keys.epochs())
        };
        drop(writers);
        drop(rotation);
        // The copy holds every batch logged before the copied log's end: replay starts there.
        if let Some(end) = copied_end(&segments) {
            crate::store::set_log_head(&copy, end)?;
        }
        clamp_audit_mark(&copy, audit)?;
        copy_files(&segments, &data.join("values"))?;
        copy_files(audit, &data.join("audit"))?;
        copy.sync(Durability::Fsync)?;
        drop(copy);
        let manifest = Manifest {
            format: FORMAT.into(),
            taken_at: crate::export::rfc3339(self.clock.now()).to_string(),
            store_id: hex::encode(self.keys.store_id()),
            ledger_counter,
            key_epochs,
            records,
            value_segments: segments.len(),
            audit_segments: audit.len(),
        };
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| VaultError::Internal(e.to_string()))?;
        crate::keys::write_file_atomic(&out.join(MANIFEST), &text).map_err(StoreError::from)?;
        files::sync_dir(out).map_err(StoreError::from)?;
        tracing::info!(out = %out.display(), records, "backup written");
        Ok(manifest)
    }

    /// Copies every record of the tree into `to`, a page at a time.
    fn copy_tree(&self, to: &dyn KvStore) -> Result<u64, VaultError> {
        let mut after: Option<Vec<u8>> = None;
        let mut n = 0u64;
        loop {
            let page = self.store.scan(&[], after.as_deref(), COPY_PAGE)?;
            let Some((last, _)) = page.last() else { return Ok(n) };
            after = Some(last.clone());
            n += page.len() as u64;
            let mut b = Batch::default();
            for (k, v) in page {
                b.put(k, v);
            }
            to.apply(b)?;
        }
    }
}

fn copy_files(list: &[(PathBuf, u64)], dir: &Path) -> Result<(), VaultError> {
    files::private_dir(dir).map_err(StoreError::from)?;
    for (path, len) in list {
        let name = path.file_name().ok_or_else(|| VaultError::Internal("a segment without a name".into()))?;
        files::copy_prefix(path, &dir.join(name), *len).map_err(StoreError::from)?;
    }
    files::sync_dir(dir).map_err(StoreError::from)?;
    Ok(())
}

/// The copy's record of how far the value log (and the audit trail) was durable may be
/// newer than the lengths their segments are copied at (a commit round runs on while
/// writers wait): it is cut back to them, or the restored copy would read as a log missing
/// acknowledged bytes.
/// Where the copied value log ends: (segment, length).
fn copied_end(segments: &[(PathBuf, u64)]) -> Option<(u32, u64)> {
    segments.iter().filter_map(|(p, len)| Some((crate::store::value_segment_id(p)?, *len))).max()
}

fn clamp_audit_mark(copy: &dyn KvStore, segments: &[(PathBuf, u64)]) -> Result<(), VaultError> {
    let first_seq = |p: &PathBuf| p.file_stem()?.to_str()?.parse::<u64>().ok();
    let copied = segments.iter().filter_map(|(p, len)| Some((first_seq(p)?, *len))).max();
    let encode = |(seq, len): (u64, u64)| [seq.to_be_bytes().as_slice(), &len.to_be_bytes()].concat();
    clamp_mark(copy, crate::audit::audit_mark_key(), crate::audit::decode_audit_mark, encode, copied)
}

fn clamp_mark<M: Ord + Copy>(
    copy: &dyn KvStore,
    key: Vec<u8>,
    decode: fn(&[u8]) -> Option<M>,
    encode: impl Fn(M) -> Vec<u8>,
    copied_end: Option<M>,
) -> Result<(), VaultError> {
    let Some(mark) = copy.get(&key)?.and_then(|b| decode(&b)) else { return Ok(()) };
    if let Some(end) = copied_end.filter(|end| mark > *end) {
        let mut b = Batch::default();
        b.put(key, encode(end));
        copy.apply(b)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mark the committer moved while the index was copied is cut back to what was
    /// copied; one within it is left as it is.
    #[test]
    fn a_copied_mark_past_the_copied_log_is_cut_back_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let copy = SledStore::open(&dir.path().join("db"), 1 << 20).unwrap();
        let set = |seq: u64, len: u64| {
            let mut b = Batch::default();
            b.put(crate::audit::audit_mark_key(), [seq.to_be_bytes().as_slice(), &len.to_be_bytes()].concat());
            copy.apply(b).unwrap();
        };
        let mark =
            || copy.get(&crate::audit::audit_mark_key()).unwrap().and_then(|b| crate::audit::decode_audit_mark(&b));
        let segments = vec![
            (PathBuf::from("audit/00000000000000000001.trail"), 900),
            (PathBuf::from("audit/00000000000000000101.trail"), 100),
        ];
        set(101, 180);
        clamp_audit_mark(&copy, &segments).unwrap();
        assert_eq!(mark(), Some((101, 100)));
        set(101, 60);
        clamp_audit_mark(&copy, &segments).unwrap();
        assert_eq!(mark(), Some((101, 60)));
    }
}
