//! Striped locks keyed by subject: every read-modify-write of a subject's records holds
//! its stripe, so counters, headers and keys change consistently. Reads take no lock.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

const STRIPES: usize = 64;

pub struct LockTable {
    stripes: Vec<Mutex<()>>,
}

pub struct Guards<'a> {
    _held: Vec<MutexGuard<'a, ()>>,
}

impl LockTable {
    pub fn new() -> Self {
        LockTable { stripes: (0..STRIPES).map(|_| Mutex::new(())).collect() }
    }

    fn stripe(tenant: &str, subject: &[u8; 32]) -> usize {
        let mut h = DefaultHasher::new();
        tenant.hash(&mut h);
        subject.hash(&mut h);
        (h.finish() as usize) % STRIPES
    }

    /// Locks the stripes of all given subjects, in stripe order so two callers never deadlock.
    pub fn lock<'a>(&'a self, tenant: &str, subjects: &[&[u8; 32]]) -> Guards<'a> {
        let mut idx: Vec<usize> = subjects.iter().map(|s| Self::stripe(tenant, s)).collect();
        idx.sort_unstable();
        idx.dedup();
        let held =
            idx.into_iter().map(|i| self.stripes[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner())).collect();
        Guards { _held: held }
    }

    /// Every stripe: no subject write of any tenant runs until the guards drop.
    pub fn lock_all(&self) -> Guards<'_> {
        Guards { _held: self.stripes.iter().map(|m| m.lock().unwrap_or_else(|p| p.into_inner())).collect() }
    }

    #[cfg(test)]
    pub fn same_stripe(tenant: &str, a: &[u8; 32], b: &[u8; 32]) -> bool {
        Self::stripe(tenant, a) == Self::stripe(tenant, b)
    }
}
