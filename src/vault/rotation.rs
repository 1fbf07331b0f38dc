//! Key-store rotation: the step that makes an erasure final against old copies of the
//! data directory. New epoch (durable) → re-wrap every surviving key (durable) → destroy
//! the old key-store keys. A crash or a failure anywhere leaves more than one epoch in
//! the key directory; the next attempt *resumes* that rotation (it never adds yet another
//! epoch), and the old key is never destroyed before its keys are re-wrapped and synced.

use std::time::Duration;

use super::layout::{self, KeyOwner};
use super::model::{RotationHealth, RotationReport};
use super::records::{self, KeyRecord};
use super::{META_SHRED_EPOCH, Vault, VaultError, key_err};
use crate::crypto::{Aad, RecordKind};
use crate::keys::wrapped_epoch;
use crate::store::Durability;

const REWRAP_CHUNK: usize = 512;
/// Longest pause between attempts of a rotation that keeps failing.
const MAX_RETRY: Duration = Duration::from_secs(300);

impl Vault {
    /// Rotates the key-store key now, or finishes the rotation already under way.
    /// Blocking: run it off the async executor.
    pub fn rotate_key_store(&self) -> Result<RotationReport, VaultError> {
        let outcome = self.rotate_inner();
        let now = self.clock.now();
        if let Ok(mut h) = self.rotation_health.lock() {
            match &outcome {
                Ok(_) => *h = RotationHealth { last_completed_at: Some(now), ..RotationHealth::default() },
                Err(e) => {
                    h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                    h.last_failure = Some((now, e.to_string()));
                }
            }
        }
        outcome
    }

    fn rotate_inner(&self) -> Result<RotationReport, VaultError> {
        let _one = self.rotation.lock().map_err(|_| VaultError::Internal("lock".into()))?;
        // A store refusing writes may lack an erasure the ledger holds: destroying its
        // epoch now would make that erasure unreplayable. The restart comes first.
        if self.commit.is_failed() {
            return Err(self.commit.failure().into());
        }
        let epochs = self.keys.epochs();
        let target = match epochs.as_slice() {
            // Already more than one epoch: a rotation was cut short; resume it.
            [_, .., newest] => {
                tracing::warn!(epoch = newest, "resuming a key-store rotation that did not finish");
                *newest
            }
            _ => {
                let _switch = self.epoch_guard.write().map_err(|_| VaultError::Internal("lock".into()))?;
                let new_epoch = self.keys.add_epoch()?;
                crate::failpoint::hit("rotation.after_new_epoch");
                tracing::info!(new_epoch, "key-store rotation started");
                new_epoch
            }
        };
        self.finish_rotation(target)
    }

    /// True while an erasure is not final yet: a rotation is under way (more than one
    /// epoch), the erasure ledger holds a tombstone whose epoch still lives, or keys were
    /// discarded under the current epoch (a replace), so a copy of the data directory
    /// taken before that could still open them.
    pub fn rotation_due(&self) -> Result<bool, VaultError> {
        if self.keys.epochs().len() > 1 || self.erasures_pending()? {
            return Ok(true);
        }
        let Some(bytes) = self.store.get(&layout::meta(META_SHRED_EPOCH))? else { return Ok(false) };
        let shred_epoch = u64::from_be_bytes(bytes.as_slice().try_into().map_err(|_| VaultError::Corrupt("meta"))?);
        Ok(shred_epoch >= self.keys.current_epoch())
    }

    /// How rotations have gone: for the admin API, health and the retry schedule.
    pub fn rotation_health(&self) -> RotationHealth {
        self.rotation_health.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Forgets past failures once nothing is pending.
    pub fn clear_rotation_failures(&self) {
        if let Ok(mut h) = self.rotation_health.lock() {
            h.consecutive_failures = 0;
            h.last_failure = None;
        }
    }

    /// How long to wait before trying a rotation again that failed `failures` times in a
    /// row: doubling from one second, at most five minutes.
    pub fn rotation_retry_delay(failures: u32) -> Duration {
        Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(MAX_RETRY)
    }

    /// At open: a rotation a crash cut short is finished before serving when it can be;
    /// when it cannot (the key directory refuses writes), the server starts anyway and
    /// the rotation worker keeps retrying, loudly.
    pub(super) fn resume_rotation(&self) {
        if self.keys.epochs().len() > 1
            && let Err(e) = self.rotate_key_store()
        {
            tracing::error!(error = %e, "an interrupted key-store rotation could not be finished; will retry");
        }
    }

    fn finish_rotation(&self, new_epoch: u64) -> Result<RotationReport, VaultError> {
        let prefix = layout::keys_prefix();
        let mut after: Option<Vec<u8>> = None;
        let mut rewrapped = 0u64;
        let check_tombstones = self.erasures_pending()?;
        // Keys left of an erased tenant (a crash cut its erasure short; reclaim gets to
        // them later) are deleted, never carried into the new epoch.
        let erased_tenants = self.erased_tenants()?;
        loop {
            let page = self.store.scan(&prefix, after.as_deref(), REWRAP_CHUNK)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, value) in &page {
                let rec: KeyRecord = records::decode(value, "wrapped key")?;
                if wrapped_epoch(&rec.wrapped)? >= new_epoch {
                    continue;
                }
                if (check_tombstones && self.is_tombstoned(&self.record_token(key, rec.generation))?)
                    || layout::key_tenant(key).is_some_and(|t| erased_tenants.contains(t))
                {
                    // An erasure destroyed this key; it may only still be here in a data
                    // directory being brought forward. Never carried into a new epoch.
                    tracing::warn!("rotation: deleting a key the erasure ledger says was destroyed");
                    self.store.compare_and_swap(key, Some(value), None)?;
                    continue;
                }
                let aad = || key_aad(key, rec.generation);
                let plain = self.keys.open(&rec.wrapped, aad()?).map_err(key_err("wrapped key"))?;
                let fresh = KeyRecord { generation: rec.generation, wrapped: self.keys.seal(aad()?, &plain)? };
                // Swap only if unchanged: a shred deleting this key meanwhile must win.
                if self.store.compare_and_swap(key, Some(value), Some(records::encode(&fresh)?))? {
                    rewrapped += 1;
                    if rewrapped == 2 {
                        crate::failpoint::hit("rotation.mid_rewrap");
                    }
                }
            }
        }
        // Every key is under the new epoch now: a copy of the data directory from before
        // this point is dead once the old epochs are, and `open` can tell from this.
        let mut b = crate::store::Batch::default();
        b.put(layout::meta(super::erasure::META_WRAPPED_FROM), new_epoch.to_be_bytes().to_vec());
        self.store.apply(b)?;
        self.store.sync(Durability::Fsync)?;
        crate::failpoint::hit("rotation.before_destroy");
        let destroyed = self.keys.destroy_epochs_before(new_epoch)?;
        crate::failpoint::hit("rotation.before_ledger");
        if !destroyed.is_empty() {
            // Their erasures are final now; the ledger keeps only what is still needed.
            self.ledger.record_destroyed(destroyed.clone(), self.clock.now().micros())?;
            self.ledger.compact()?;
        }
        tracing::info!(new_epoch, ?destroyed, rewrapped, "key-store rotation complete");
        Ok(RotationReport { new_epoch, destroyed_epochs: destroyed, keys_rewrapped: rewrapped })
    }
}

/// The AAD a wrapped key was sealed with, rebuilt from where it is stored.
fn key_aad(key: &[u8], generation: u32) -> Result<Aad, VaultError> {
    match layout::parse_key_owner(key) {
        Some(KeyOwner::Tenant(t)) => Ok(Aad::new(RecordKind::TenantKey).bytes(t.as_bytes())),
        Some(KeyOwner::Subject(t, s)) => Ok(Vault::subject_key_aad(&t, &s, generation)),
        Some(KeyOwner::Transcript(t, tb, incarnation)) => Ok(super::transcript_keys::seal_aad(&t, &tb, incarnation)),
        None => Err(VaultError::Corrupt("wrapped key location")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::{Message, TenantId, Transcript, testing};
    use super::*;

    fn transcript(id: &str, subject: &str) -> Transcript {
        Transcript::new(id, subject, vec![Message::new("m", super::super::AuthorRole::Visitor, "V", "words")])
    }

    #[tokio::test]
    async fn a_rotation_cut_short_by_a_key_directory_fault_is_resumed_not_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let (v, faults) = testing::open_faulty(dir.path(), testing::HandClock::new());
        let tenant = TenantId::parse("acme").unwrap();
        v.put_transcript(&tenant, transcript("kept", "bob")).await.unwrap();
        v.put_transcript(&tenant, transcript("gone", "alice")).await.unwrap();
        v.shred_subject(&tenant, "alice").await.unwrap();
        assert!(v.rotation_due().unwrap());

        faults.fail_destroy.store(true, Ordering::SeqCst);
        for attempt in 1..=3 {
            assert!(v.rotate_key_store().is_err());
            assert_eq!(v.keys.epochs(), vec![1, 2], "attempt {attempt} must resume epoch 2, not add another");
            assert!(v.rotation_due().unwrap(), "still due after failed attempt {attempt}");
            assert_eq!(v.rotation_health().consecutive_failures, attempt);
        }
        faults.fail_destroy.store(false, Ordering::SeqCst);
        let report = v.rotate_key_store().unwrap();
        assert_eq!((report.new_epoch, report.destroyed_epochs), (2, vec![1]));
        assert!(!v.rotation_due().unwrap());
        assert_eq!(v.rotation_health().consecutive_failures, 0);
        assert!(v.rotation_health().last_completed_at.is_some());
        assert_eq!(v.get_transcript(&tenant, "kept").unwrap().messages[0].text, "words");
    }

    #[tokio::test]
    async fn a_rotation_that_cannot_start_leaves_the_erasure_due() {
        let dir = tempfile::tempdir().unwrap();
        let (v, faults) = testing::open_faulty(dir.path(), testing::HandClock::new());
        let tenant = TenantId::parse("acme").unwrap();
        v.put_transcript(&tenant, transcript("t", "alice")).await.unwrap();
        v.shred_subject(&tenant, "alice").await.unwrap();
        faults.fail_add_epoch.store(true, Ordering::SeqCst);
        assert!(v.rotate_key_store().is_err());
        assert_eq!(v.keys.epochs(), vec![1]);
        assert!(v.rotation_due().unwrap());
        assert!(v.rotation_health().last_failure.unwrap().1.contains("injected fault"));
        faults.fail_add_epoch.store(false, Ordering::SeqCst);
        v.rotate_key_store().unwrap();
        assert_eq!(v.keys.epochs(), vec![2]);
        assert!(!v.rotation_due().unwrap());
    }

    #[test]
    fn retries_back_off_from_a_second_to_five_minutes() {
        let secs: Vec<u64> = [1, 2, 3, 9, 30].iter().map(|&n| Vault::rotation_retry_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 256, 300]);
    }
}
