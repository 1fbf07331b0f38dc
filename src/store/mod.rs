//! Ordered key-value storage behind a small trait, so the vault never names sled.

mod commit;
pub mod files;
pub(crate) mod pg;
mod sled_store;
#[cfg(test)]
mod test_postgres;
mod values;
mod wal;

use serde::{Deserialize, Serialize};

pub use commit::{CommitTicket, GroupCommit};
pub use pg::{PgOptions, PgStore};
pub use sled_store::SledStore;
pub use values::{
    Mark as LogMark, ValueBuf, ValueLog, ValuePointer, decode_mark as decode_values_mark, inspect as inspect_values,
    mark_key as values_mark_key, segment_id as value_segment_id, tail_is_damage as values_tail_is_damage,
};
pub use wal::{
    CHECKPOINT_EVERY, LoggedStore, applied_of as log_applied_of, holds_records, log_acknowledged, open_log,
    set_log_head,
};

/// First byte of every key: which part of chatvault owns it. The vault's own record
/// types use 0x00..=0x0f (see `vault/layout.rs`).
use std::path::PathBuf;

pub mod space {
    /// Tenant registry: settings and API key hashes.
    pub const TENANCY: u8 = 0x10;
    /// The audit trail of versions before it moved to its own files (migrated at open).
    pub const AUDIT: u8 = 0x11;
    /// Retention's leases and per-tenant status.
    pub const RETENTION: u8 = 0x12;
    /// How far the logs beside the store were durable at the last commit round.
    pub const LOG_MARKS: u8 = 0x13;
}

/// How hard an acknowledged write is pushed towards the disk before the client hears "ok".
/// Every change reaches the kernel (one `write` to the write-ahead log, `wal.rs`) before
/// it is applied, so all three survive a process kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// `fdatasync` the write-ahead log (and what is synced beside it): survives a power
    /// loss. Default.
    #[default]
    Fsync,
    /// Wait for no sync: survives a process kill, not a power loss.
    Flush,
    /// The same as `Flush` since the log became the index's write-ahead log.
    None,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fsync" => Ok(Durability::Fsync),
            "flush" => Ok(Durability::Flush),
            "none" => Ok(Durability::None),
            other => Err(format!("unknown durability {other:?}: expected fsync, flush or none")),
        }
    }
}

/// One operation of an atomic batch.
#[derive(Debug)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// A put of a large value the engine may keep out of line: the key's record is then a
    /// [`ValuePointer`] to it (an engine that keeps it inline stores the value itself;
    /// readers tell the two apart, see `ValuePointer::decode`).
    PutLogged(Vec<u8>, Vec<u8>),
}

/// Writes applied all together or not at all.
#[derive(Debug, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put(key, value));
    }
    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.push(Op::Delete(key));
    }
    /// See [`Op::PutLogged`].
    pub fn put_logged(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::PutLogged(key, value));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A key and its value, as scanned.
pub type Entry = (Vec<u8>, Vec<u8>);

/// The storage an engine must offer.
pub trait KvStore: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Applies every op of `batch` atomically (all or none, also across a crash).
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;
    /// Up to `limit` entries whose key starts with `prefix`, in key order, after `after`.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>, StoreError>;
    /// The last entry whose key starts with `prefix`, if any.
    fn last(&self, prefix: &[u8]) -> Result<Option<Entry>, StoreError>;
    /// Replaces `key`'s value with `new` only if it is still `old` (`None`: absent).
    /// Returns whether it swapped.
    fn compare_and_swap(&self, key: &[u8], old: Option<&[u8]>, new: Option<Vec<u8>>) -> Result<bool, StoreError>;
    /// Makes every applied batch durable to the level `mode` asks.
    fn sync(&self, mode: Durability) -> Result<(), StoreError>;
    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> Result<u64, StoreError>;
}

/// Something kept beside the store (the audit trail's files) that the group commit makes
/// durable together with it, so one wait covers both.
pub trait SyncTarget: Send + Sync + 'static {
    fn sync(&self, mode: Durability) -> Result<(), StoreError>;
    /// After a `sync`: a record saying how far the target is durable, which the next round
    /// writes into the store. What it holds up to there was acknowledged; damage before it
    /// is never taken for a torn write.
    fn synced_mark(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        None
    }
}

/// Why storage failed. The message names no key or value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The storage engine reported an error (I/O, corruption).
    #[error("storage engine: {0}")]
    Engine(String),
    /// A file outside the engine could not be synced or read.
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A stored record fails its checksum or points at nothing.
    #[error("stored data is damaged: {0}")]
    Damaged(String),
    /// The engine cannot be reached now (a database connection lost or refused, a
    /// failover): nothing of this call was kept unless it was committed whole; retry.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// An earlier sync failed; writes are refused until restart so no ack lies.
    #[error("storage is unavailable after a failed sync; restart the server")]
    Failed,
    /// The volume holding the data is full: nothing of this write was kept, everything
    /// acknowledged before it is.
    #[error("no space left on the volume holding {}: free space there", volume.display())]
    Full { volume: PathBuf },
    /// The volume filled under the engine (a write or a durable sync): writes are refused
    /// until a restart.
    #[error(
        "no space left on the volume holding {}: the storage engine stopped, so writes are refused until the \
         server is restarted; free space there, then restart it (nothing acknowledged is lost)",
        volume.display()
    )]
    FullAfterSync { volume: PathBuf },
}

impl StoreError {
    /// `e` from a file of the volume holding `dir`: a full volume is told apart.
    pub fn io_at(dir: &std::path::Path, e: std::io::Error) -> StoreError {
        if e.kind() == std::io::ErrorKind::StorageFull {
            StoreError::Full { volume: dir.to_path_buf() }
        } else {
            StoreError::Io(e)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! One suite every `KvStore` must pass.
    use super::*;

    fn put(store: &dyn KvStore, k: &[u8], v: &[u8]) {
        let mut b = Batch::default();
        b.put(k.to_vec(), v.to_vec());
        store.apply(b).unwrap();
    }

    fn keys(entries: &[Entry]) -> Vec<Vec<u8>> {
        entries.iter().map(|(k, _)| k.clone()).collect()
    }

    pub fn conformance(store: &dyn KvStore) {
        let mut b = Batch::default();
        for i in 0u8..10 {
            b.put(vec![b'a', i], vec![i]);
        }
        b.put(b"b".to_vec(), b"x".to_vec());
        store.apply(b).unwrap();
        assert_eq!(store.get(&[b'a', 3]).unwrap(), Some(vec![3]));
        let page = store.scan(b"a", None, 4).unwrap();
        assert_eq!(page.len(), 4);
        let next = store.scan(b"a", Some(&page[3].0), 100).unwrap();
        assert_eq!(store.last(b"a").unwrap().unwrap().0, vec![b'a', 9]);
        assert_eq!(store.last(b"c").unwrap(), None);
        assert_eq!(next.len(), 6);
        assert_eq!(next[0].0, vec![b'a', 4]);
        let mut d = Batch::default();
        d.delete(vec![b'a', 0]);
        store.apply(d).unwrap();
        assert_eq!(store.get(&[b'a', 0]).unwrap(), None);
        // A batch of one write takes the engine's single-write path.
        let mut one = Batch::default();
        one.put(vec![b'a', 0], vec![42]);
        store.apply(one).unwrap();
        assert_eq!(store.get(&[b'a', 0]).unwrap(), Some(vec![42]));
        let mut gone = Batch::default();
        gone.delete(vec![b'a', 0]);
        store.apply(gone).unwrap();
        assert_eq!(store.get(&[b'a', 0]).unwrap(), None);
        assert!(store.compare_and_swap(b"b", Some(b"x"), Some(b"y".to_vec())).unwrap());
        assert!(!store.compare_and_swap(b"b", Some(b"x"), Some(b"z".to_vec())).unwrap());
        assert!(store.compare_and_swap(b"b", Some(b"y"), None).unwrap());
        assert_eq!(store.get(b"b").unwrap(), None);
        assert!(store.compare_and_swap(b"b", None, Some(b"new".to_vec())).unwrap(), "absent: created");
        assert!(!store.compare_and_swap(b"b", None, Some(b"again".to_vec())).unwrap(), "present: not created");
        assert!(!store.compare_and_swap(b"b", None, None).unwrap(), "present is not absent");
        assert!(store.compare_and_swap(b"nothing", None, None).unwrap());
        assert_eq!(store.get(b"b").unwrap(), Some(b"new".to_vec()));
        bytewise_order_and_prefix_bounds(store);
        the_last_op_on_a_key_in_a_batch_decides(store);
        store.sync(Durability::Fsync).unwrap();
        assert!(store.size_on_disk().unwrap() > 0);
    }

    /// Keys compare as unsigned bytes (0x00 and 0xff included, shorter first), and a
    /// prefix scan stops exactly at the prefix's end, also where it ends in 0xff.
    fn bytewise_order_and_prefix_bounds(store: &dyn KvStore) {
        let all: [&[u8]; 8] = [
            &[0xf0],
            &[0xf0, 0x00],
            &[0xf0, 0x00, 0x00],
            &[0xf0, 0x01],
            &[0xf0, 0x7f],
            &[0xf0, 0x80],
            &[0xf0, 0xff],
            &[0xf0, 0xff, 0xff],
        ];
        let mut b = Batch::default();
        for k in all.iter().rev() {
            b.put(k.to_vec(), k.to_vec());
        }
        b.put(vec![0xf1], vec![1]);
        store.apply(b).unwrap();
        let want: Vec<Vec<u8>> = all.iter().map(|k| k.to_vec()).collect();
        assert_eq!(keys(&store.scan(&[0xf0], None, 100).unwrap()), want);
        assert_eq!(keys(&store.scan(&[0xf0, 0xff], None, 100).unwrap()), want[6..]);
        assert_eq!(store.last(&[0xf0, 0xff]).unwrap().unwrap().0, vec![0xf0, 0xff, 0xff]);
        assert_eq!(store.last(&[0xf0]).unwrap().unwrap().0, vec![0xf0, 0xff, 0xff]);
        // `after` before the prefix starts at the prefix; past it, nothing.
        assert_eq!(keys(&store.scan(&[0xf0, 0x80], Some(&[0x01]), 100).unwrap()), want[5..6]);
        assert!(store.scan(&[0xf0, 0x01], Some(&[0xf0, 0x02]), 100).unwrap().is_empty());
        assert_eq!(keys(&store.scan(&[0xf0], Some(&[0xf0, 0x00]), 2).unwrap()), want[2..4]);
        assert!(store.scan(&[0xf0], None, 0).unwrap().is_empty());
        put(store, &[0xff, 0xff], b"top");
        assert_eq!(keys(&store.scan(&[0xff], None, 10).unwrap()), [vec![0xff, 0xff]]);
        assert_eq!(store.last(&[0xff]).unwrap().unwrap().1, b"top".to_vec());
        // The empty prefix is every key.
        assert!(store.scan(&[], None, 1000).unwrap().len() >= all.len() + 2);
    }

    /// Within a batch, a key's last op is what stays, and a large value round-trips.
    fn the_last_op_on_a_key_in_a_batch_decides(store: &dyn KvStore) {
        let mut b = Batch::default();
        b.put(b"k1".to_vec(), b"first".to_vec());
        b.delete(b"k1".to_vec());
        b.put(b"k1".to_vec(), b"second".to_vec());
        b.put(b"k2".to_vec(), b"short-lived".to_vec());
        b.delete(b"k2".to_vec());
        b.put(b"k3".to_vec(), vec![7u8; 1 << 20]);
        b.delete(b"never-there".to_vec());
        store.apply(b).unwrap();
        assert_eq!(store.get(b"k1").unwrap(), Some(b"second".to_vec()));
        assert_eq!(store.get(b"k2").unwrap(), None);
        assert_eq!(store.get(b"k3").unwrap().map(|v| v.len()), Some(1 << 20));
        store.apply(Batch::default()).unwrap();
    }

    pub use super::test_postgres::postgres_url;

    #[test]
    fn sled_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 * 1024 * 1024).unwrap();
        conformance(&store);
    }
}
