//! sled 0.34 as a `KvStore`. sled's `flush` syncs its log with `sync_file_range`, which
//! does not flush the drive cache, and it never syncs blob files: `Durability::Fsync`
//! adds real `fsync`s of both.

use std::collections::HashSet;
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Batch, Durability, Entry, KvStore, Op, StoreError};

pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    dir: PathBuf,
    log_file: File,
    synced_blobs: Mutex<HashSet<PathBuf>>,
}

const TREE: &[u8] = b"vault";

impl SledStore {
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(engine)?;
        let tree = db.open_tree(TREE).map_err(engine)?;
        let log_file = File::open(dir.join("db"))?;
        Ok(SledStore { db, tree, dir: dir.to_path_buf(), log_file, synced_blobs: Mutex::new(HashSet::new()) })
    }

    /// fsyncs blob files sled wrote since the last call (sled writes them without a sync).
    fn sync_blobs(&self) -> Result<(), StoreError> {
        let blobs = self.dir.join("blobs");
        let Ok(entries) = fs::read_dir(&blobs) else { return Ok(()) };
        let mut synced = self.synced_blobs.lock().map_err(|_| StoreError::Failed)?;
        let mut present = HashSet::new();
        let mut any_new = false;
        for entry in entries {
            let path = entry?.path();
            if !synced.contains(&path) {
                match File::open(&path) {
                    Ok(f) => f.sync_all()?,
                    // sled removed it since the listing (its value was replaced): nothing to sync.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
                any_new = true;
            }
            present.insert(path);
        }
        if any_new {
            File::open(&blobs)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }
}

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

impl SledStore {
    /// A sled error, with a full volume told apart: sled stops for good after one (every
    /// later call answers the same error), so the server must be restarted once space
    /// is freed; the group commit's failed sync says so.
    fn engine(&self, e: sled::Error) -> StoreError {
        match e {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
                StoreError::Full { volume: self.dir.clone() }
            }
            other => engine(other),
        }
    }
}

impl KvStore for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key).map_err(|e| self.engine(e))?.map(|v| v.to_vec()))
    }

    fn apply(&self, mut batch: Batch) -> Result<(), StoreError> {
        // A single write is atomic by itself; sled's batch path pins the log and writes
        // a batch manifest, which costs more than the write.
        if batch.ops.len() == 1
            && let Some(op) = batch.ops.pop()
        {
            match op {
                Op::Put(k, v) | Op::PutLogged(k, v) => self.tree.insert(k, v).map_err(|e| self.engine(e))?,
                Op::Delete(k) => self.tree.remove(k).map_err(|e| self.engine(e))?,
            };
            return Ok(());
        }
        let mut b = sled::Batch::default();
        for op in batch.ops {
            match op {
                // Without a value log, a logged value is kept inline.
                Op::Put(k, v) | Op::PutLogged(k, v) => b.insert(k, v),
                Op::Delete(k) => b.remove(k),
            }
        }
        self.tree.apply_batch(b).map_err(|e| self.engine(e))
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let iter = match after.filter(|a| *a >= prefix) {
            Some(a) => {
                let mut start = a.to_vec();
                start.push(0);
                self.tree.range(start..)
            }
            None => self.tree.range(prefix.to_vec()..),
        };
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in iter {
            let (k, v) = item.map_err(|e| self.engine(e))?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Entry>, StoreError> {
        match self.tree.scan_prefix(prefix).next_back() {
            Some(item) => {
                let (k, v) = item.map_err(|e| self.engine(e))?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    fn compare_and_swap(&self, key: &[u8], old: Option<&[u8]>, new: Option<Vec<u8>>) -> Result<bool, StoreError> {
        Ok(self.tree.compare_and_swap(key, old, new).map_err(|e| self.engine(e))?.is_ok())
    }

    fn sync(&self, mode: Durability) -> Result<(), StoreError> {
        match mode {
            Durability::None => Ok(()),
            Durability::Flush => self.db.flush().map(|_| ()).map_err(|e| self.engine(e)),
            Durability::Fsync => {
                self.db.flush().map_err(|e| self.engine(e))?;
                self.sync_blobs().map_err(|e| match e {
                    StoreError::Io(io) => StoreError::io_at(&self.dir, io),
                    other => other,
                })?;
                self.log_file.sync_data().map_err(|e| StoreError::io_at(&self.dir, e))?;
                Ok(())
            }
        }
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(|e| self.engine(e))
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        let _ = self.sync(Durability::Fsync);
    }
}
