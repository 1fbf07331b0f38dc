//! Helpers for the vault's own unit tests: a real vault in a temporary directory, and a
//! clock the test moves by hand.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use super::{Timestamp, Vault, VaultOptions};
use crate::clock::Clock;
use crate::crypto::{Aad, SecretKey};
use crate::keys::{KeyError, KeyStore, RootKeySource};
use crate::store::{Batch, Durability, Entry, KvStore, StoreError};

/// A clock that stands still until the test moves it.
pub struct HandClock(AtomicI64);

impl HandClock {
    pub fn new() -> Arc<Self> {
        Arc::new(HandClock(AtomicI64::new(1_700_000_000_000_000)))
    }

    pub fn advance_secs(&self, secs: i64) {
        self.0.fetch_add(secs * 1_000_000, Ordering::SeqCst);
    }
}

impl Clock for HandClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_micros(self.0.load(Ordering::SeqCst)).expect("the test clock stays in range")
    }
}

/// Opens (or reopens) the vault under `dir` with the test root key, after `tweak`.
pub fn open(dir: &Path, clock: Arc<HandClock>, tweak: impl FnOnce(&mut VaultOptions)) -> Vault {
    let root = RootKeySource::Hex(zeroize::Zeroizing::new("42".repeat(32)));
    let mut opts = VaultOptions::new(dir.join("data"), dir.join("keys"), root);
    tweak(&mut opts);
    Vault::open_with_clock(opts, clock).expect("the test vault opens").0
}

/// The real key store, with faults a test switches on and off: an I/O error from the key
/// directory, as a full or read-only volume would give.
pub struct FaultyKeys {
    inner: Arc<dyn KeyStore>,
    pub fail_add_epoch: AtomicBool,
    pub fail_destroy: AtomicBool,
}

impl FaultyKeys {
    pub fn wrap(inner: Arc<dyn KeyStore>) -> Arc<Self> {
        Arc::new(FaultyKeys { inner, fail_add_epoch: AtomicBool::new(false), fail_destroy: AtomicBool::new(false) })
    }

    fn fault(flag: &AtomicBool) -> Result<(), KeyError> {
        if flag.load(Ordering::SeqCst) {
            let e = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "injected fault");
            return Err(KeyError::Io { path: "keys".into(), source: e });
        }
        Ok(())
    }
}

impl KeyStore for FaultyKeys {
    fn store_id(&self) -> [u8; 16] {
        self.inner.store_id()
    }
    fn current_epoch(&self) -> u64 {
        self.inner.current_epoch()
    }
    fn epochs(&self) -> Vec<u64> {
        self.inner.epochs()
    }
    fn seal(&self, aad: Aad, secret: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.inner.seal(aad, secret)
    }
    fn open(&self, sealed: &[u8], aad: Aad) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyError> {
        self.inner.open(sealed, aad)
    }
    fn add_epoch(&self) -> Result<u64, KeyError> {
        Self::fault(&self.fail_add_epoch)?;
        self.inner.add_epoch()
    }
    fn destroy_epochs_before(&self, keep_from: u64) -> Result<Vec<u64>, KeyError> {
        Self::fault(&self.fail_destroy)?;
        self.inner.destroy_epochs_before(keep_from)
    }
    fn control_key(&self, purpose: &[u8]) -> SecretKey {
        self.inner.control_key(purpose)
    }
    fn binding(&self) -> &crate::crypto::Binding {
        self.inner.binding()
    }
}

/// Opens the vault under `dir` with its key store behind a [`FaultyKeys`].
pub fn open_faulty(dir: &Path, clock: Arc<HandClock>) -> (Vault, Arc<FaultyKeys>) {
    let root = RootKeySource::Hex(zeroize::Zeroizing::new("42".repeat(32)));
    let opts = VaultOptions::new(dir.join("data"), dir.join("keys"), root);
    let mut faulty = None;
    let vault = Vault::open_with_wrappers(
        opts,
        clock,
        |keys| {
            let f = FaultyKeys::wrap(keys);
            faulty = Some(f.clone());
            f
        },
        |store| store,
    )
    .expect("the test vault opens")
    .0;
    (vault, faulty.expect("wrapped"))
}

/// The real store, with a switch that makes `apply` fail as a full or failing disk would.
pub struct FaultyStore {
    inner: Arc<dyn KvStore>,
    pub fail_apply: AtomicBool,
}

impl KvStore for FaultyStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        if self.fail_apply.load(Ordering::SeqCst) {
            return Err(StoreError::Io(std::io::Error::other("injected fault")));
        }
        self.inner.apply(batch)
    }
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>, StoreError> {
        self.inner.scan(prefix, after, limit)
    }
    fn last(&self, prefix: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.inner.last(prefix)
    }
    fn compare_and_swap(&self, key: &[u8], old: Option<&[u8]>, new: Option<Vec<u8>>) -> Result<bool, StoreError> {
        self.inner.compare_and_swap(key, old, new)
    }
    fn sync(&self, mode: Durability) -> Result<(), StoreError> {
        self.inner.sync(mode)
    }
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.size_on_disk()
    }
}

/// Opens the vault under `dir` with its store behind a [`FaultyStore`].
pub fn open_faulty_store(dir: &Path, clock: Arc<HandClock>) -> (Vault, Arc<FaultyStore>) {
    let root = RootKeySource::Hex(zeroize::Zeroizing::new("42".repeat(32)));
    let opts = VaultOptions::new(dir.join("data"), dir.join("keys"), root);
    let mut faulty = None;
    let vault = Vault::open_with_wrappers(
        opts,
        clock,
        |keys| keys,
        |store| {
            let f = Arc::new(FaultyStore { inner: store, fail_apply: AtomicBool::new(false) });
            faulty = Some(f.clone());
            f
        },
    )
    .expect("the test vault opens")
    .0;
    (vault, faulty.expect("wrapped"))
}
