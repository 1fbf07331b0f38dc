//! Bounded cache of unwrapped keys. Entries are `Arc<SecretKey>`: the key bytes are
//! zeroized when the last holder drops them, whether evicted by size or by a shred.

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
    /// A transcript's key in one incarnation.
    Transcript { tenant: String, subject: [u8; 32], transcript: [u8; 32], incarnation: u64 },
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
        self.inner.lock().ok()?.get(k).cloned()
    }

    pub fn insert(&self, k: KeyRef, v: Arc<SecretKey>) {
        if let Ok(mut c) = self.inner.lock() {
            c.put(k, v);
        }
    }

    /// Drops every key of one subject (its data key and its transcripts' keys).
    pub fn evict_subject(&self, tenant_id: &str, subject_blind: &[u8; 32]) {
        let Ok(mut c) = self.inner.lock() else { return };
        let doomed: Vec<KeyRef> = c
            .iter()
            .map(|(k, _)| k)
            .filter(|k| match k {
                KeyRef::Subject { tenant, subject, .. } | KeyRef::Transcript { tenant, subject, .. } => {
                    tenant == tenant_id && subject == subject_blind
                }
                KeyRef::Tenant(_) => false,
            })
            .cloned()
            .collect();
        for k in doomed {
            c.pop(&k);
        }
    }

    pub fn remove(&self, k: &KeyRef) {
        if let Ok(mut c) = self.inner.lock() {
            c.pop(k);
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
    fn evicting_a_subject_drops_its_transcript_keys_too() {
        let c = KeyCache::new(16);
        let s = KeyRef::Subject { tenant: "t".into(), subject: [1; 32], generation: 0 };
        let tr = KeyRef::Transcript { tenant: "t".into(), subject: [1; 32], transcript: [2; 32], incarnation: 5 };
        let other = KeyRef::Subject { tenant: "t".into(), subject: [9; 32], generation: 0 };
        for k in [&s, &tr, &other] {
            c.insert(k.clone(), key());
        }
        c.evict_subject("t", &[1; 32]);
        assert!(c.get(&s).is_none() && c.get(&tr).is_none());
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
