//! Helpers for the vault's own unit tests: a real vault in a temporary directory, and a
//! clock the test moves by hand.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use super::{Timestamp, Vault, VaultOptions};
use crate::clock::Clock;
use crate::keys::RootKeySource;

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
