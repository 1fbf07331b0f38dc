//! Bounded cache of unwrapped keys. Entries are `Arc<SecretKey>`: the key bytes are
//! zeroized when the last holder drops them, whether evicted by size or by a shred.
//! Only tenant and subject keys are cached, so a shred evicts exactly one entry.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::crypto::SecretKey;

/// What a cached key is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyRef {
    /// A tenant's blind-index key.
    Tenant(String),
    /// A subject's data key in one generation.
    Subject { tenant: String, subject: [u8; 32], generation: u32 },
}

pub struct KeyCache {
    inner: Mutex<LruCache<KeyRef, Arc<SecretKey>>>,
}

impl KeyCache {
    pub fn new(capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        KeyCache { inner: Mutex::new(LruCache::new(cap)) }
    }

    pub fn get(&self, k: &KeyRef) -> Option<Arc<SecretKey>> {
        let found = self.inner.lock().ok()?.get(k).cloned();
        crate::metrics::get().key_cache(found.is_some());
        found
    }

    pub fn insert(&self, k: KeyRef, v: Arc<SecretKey>) {
        if let Ok(mut c) = self.inner.lock() {
            c.put(k, v);
        }
    }

    pub fn remove(&self, k: &KeyRef) {
        if let Ok(mut c) = self.inner.lock() {
            c.pop(k);
        }
    }

    /// Drops every key of one tenant: O(cache), for the rare erasure of a whole tenant.
    pub fn remove_tenant(&self, tenant: &str) {
        if let Ok(mut c) = self.inner.lock() {
            let doomed: Vec<KeyRef> = c
                .iter()
                .map(|(k, _)| k)
                .filter(|k| match k {
                    KeyRef::Tenant(t) | KeyRef::Subject { tenant: t, .. } => t == tenant,
                })
                .cloned()
                .collect();
            for k in doomed {
                c.pop(&k);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|c| c.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<SecretKey> {
        Arc::new(SecretKey::generate().unwrap())
    }

    #[test]
    fn removing_a_key_drops_only_that_key() {
        let c = KeyCache::new(16);
        let s = KeyRef::Subject { tenant: "t".into(), subject: [1; 32], generation: 0 };
        let other = KeyRef::Subject { tenant: "t".into(), subject: [9; 32], generation: 0 };
        c.insert(s.clone(), key());
        c.insert(other.clone(), key());
        c.remove(&s);
        assert!(c.get(&s).is_none());
        assert!(c.get(&other).is_some());
    }

    #[test]
    fn cache_is_bounded() {
        let c = KeyCache::new(2);
        for i in 0..5u8 {
            c.insert(KeyRef::Tenant(i.to_string()), key());
        }
        assert_eq!(c.len(), 2);
    }
}
