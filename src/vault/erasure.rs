//! The vault's side of the erasure ledger (`keys::Ledger`, on the key volume). An
//! erasure, and every tenant registry record, is durable in the ledger before the store
//! applies it; the store applies them in ledger order and records the counter with them,
//! so the data directory's counter says exactly which entries it holds. At open the two
//! are compared: a data directory behind what the ledger knows was durable in it has
//! been rolled back, and is refused unless the operator asks for the missing entries to
//! be replayed; one behind only by what a crash interrupted is brought forward at once.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use super::layout::{self, Blind};
use super::records::{self, Garbage, Header, KeyRecord};
use super::{Timestamp, Vault, VaultError};
use crate::keys::{AuditAnchor, AuditGap, ErasureKind, KeyStore, Ledger, LedgerError, Missing, Tombstone};
use crate::store::{Batch, CommitTicket, Durability, Entry, KvStore};

/// The highest ledger counter whose entry the data directory holds (all below it too).
pub(super) const META_LEDGER: &str = "ledger_counter";
/// The oldest key-store epoch a key of the data directory may still be wrapped under.
pub(super) const META_WRAPPED_FROM: &str = "keys_wrapped_from";
/// Purpose of the root-derived key that MACs the ledger and makes its tokens.
const LEDGER_KEY: &[u8] = b"chatvault/control/erasure-ledger/v1";

/// Where erasures stand, server-wide (never per tenant: that is the tenant's own ask).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErasureOverview {
    pub pending_erasures: u64,
    pub oldest_pending_at: Option<Timestamp>,
    pub live_epochs: u32,
    pub rotation_due: bool,
    pub rotation: super::RotationHealth,
}

/// What comparing the data directory with the ledger found, before anything is written.
pub(super) struct Verdict {
    applied: u64,
    last_data: u64,
    missing: Missing,
    rolled_back: bool,
}

impl Vault {
    /// Records `tombstones` in the ledger (durable), then applies `batch` with the data
    /// directory's counter moved to theirs. Serialised, so the store applies erasures in
    /// ledger order. The caller holds whatever locks make `batch` right.
    pub(super) fn apply_erasure(&self, tombstones: Vec<Tombstone>, mut batch: Batch) -> Result<u64, VaultError> {
        if self.commit.is_failed() {
            return Err(self.commit.failure().into());
        }
        let _order = self.erasure_order.lock().map_err(|_| VaultError::Internal("erasure lock".into()))?;
        let counter = self.ledger.record_erasures(tombstones)?;
        crate::failpoint::hit("erasure.after_ledger");
        batch.put(layout::meta(META_LEDGER), counter.to_be_bytes().to_vec());
        self.apply_recorded(batch)?;
        crate::failpoint::hit("erasure.after_apply");
        Ok(counter)
    }

    /// Applies the batch of an entry the ledger already holds. If that fails, the store
    /// and the ledger disagree until the entry is applied: nothing more is written (the
    /// store refuses until restart), and the restart finishes it as a crash's leftover.
    fn apply_recorded(&self, batch: Batch) -> Result<(), VaultError> {
        self.apply(batch).inspect_err(|e| {
            tracing::error!(error = %e, "an erasure recorded in the ledger could not be applied; refusing writes until restart");
            self.commit.poison();
        })
    }

    /// Waits until an erasure is on disk in the data directory — synced, whatever
    /// `durability` says, since a lost erasure is not a lost chat line — and tells the
    /// ledger, which writes it down with its next entry.
    pub(super) async fn erasure_durable(&self, ticket: CommitTicket, counter: u64) -> Result<(), VaultError> {
        self.commit.wait_synced(ticket).await?;
        self.ledger.confirm(counter);
        Ok(())
    }

    /// Stores a control-plane record (a tenant's registry entry) so that a rolled-back
    /// data directory cannot silently bring back an older one: anchored in the ledger
    /// first, then stored with the counter and synced. Blocking.
    pub fn store_anchored(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), VaultError> {
        if self.commit.is_failed() {
            return Err(self.commit.failure().into());
        }
        let counter = {
            let _order = self.erasure_order.lock().map_err(|_| VaultError::Internal("erasure lock".into()))?;
            let counter = self.ledger.record_anchor(key.clone(), value.clone())?;
            let mut batch = Batch::default();
            batch.put(key, value);
            batch.put(layout::meta(META_LEDGER), counter.to_be_bytes().to_vec());
            self.apply_recorded(batch)?;
            counter
        };
        self.store.sync(Durability::Fsync)?;
        self.ledger.confirm(counter);
        Ok(())
    }

    /// The audit trail's head as the ledger last anchored it.
    pub fn anchored_audit_head(&self) -> Result<Option<AuditAnchor>, VaultError> {
        Ok(self.ledger.with_state(|s| s.audit)?)
    }

    /// Audit records lost in restores that the operator accepted.
    pub fn accepted_audit_gaps(&self) -> Result<Vec<AuditGap>, VaultError> {
        Ok(self.ledger.with_state(|s| s.audit_gaps.clone())?)
    }

    /// Records an accepted loss of audit records (a restore with `--replay-erasures`).
    pub fn record_audit_gap(&self, gap: AuditGap) -> Result<(), VaultError> {
        self.ledger.record_audit_gap(gap)?;
        Ok(())
    }

    /// Writes down, in the ledger, which erasures are durable in the data directory and,
    /// when given, the audit trail's durable head — if either moved. Blocking (one sync of
    /// the key volume when it writes).
    pub fn checkpoint_ledger(&self, audit: Option<AuditAnchor>) -> Result<bool, VaultError> {
        Ok(self.ledger.checkpoint(audit, |old, new| old != new)?)
    }

    /// The tombstone token of a subject's data key of one generation.
    pub(super) fn subject_token(&self, tenant: &str, subject: &Blind, generation: u32) -> [u8; 32] {
        self.ledger.token(&layout::subject_key(tenant, subject), generation)
    }

    /// The tombstone token of a transcript incarnation's key.
    pub(super) fn transcript_token(&self, tenant: &str, transcript: &Blind, incarnation: u64) -> [u8; 32] {
        self.ledger.token(&layout::transcript_key(tenant, transcript, incarnation), 0)
    }

    /// The tombstone token of a tenant's erasure.
    pub(super) fn tenant_token(&self, tenant: &str) -> [u8; 32] {
        self.ledger.token(&layout::tenant_key(tenant), 0)
    }

    /// The token of the key record at `key` holding a key of `generation`, whatever its kind.
    pub(super) fn record_token(&self, key: &[u8], generation: u32) -> [u8; 32] {
        match layout::parse_key_owner(key) {
            Some(layout::KeyOwner::Subject(..)) => self.ledger.token(key, generation),
            _ => self.ledger.token(key, 0),
        }
    }

    /// A tombstone for what is being destroyed now, under the current epoch.
    pub(super) fn tombstone(&self, kind: ErasureKind, tenant: &str, token: [u8; 32], at: Timestamp) -> Tombstone {
        Tombstone { kind, tenant: tenant.to_owned(), token, epoch: self.keys.current_epoch(), at_micros: at.micros() }
    }

    /// Applies what the data directory lacks of the ledger: re-destroys tombstoned keys,
    /// puts back registry records (revocations, deletions, suspensions). A rotation is
    /// due after it (the tombstones stay pending until their epoch is destroyed).
    pub(super) fn replay_ledger(&self, v: Verdict) -> Result<(), VaultError> {
        // What the data directory holds at open is on its disk: durable.
        self.ledger.confirm(v.applied);
        if v.missing.is_empty() && v.applied == v.last_data {
            return Ok(());
        }
        if v.rolled_back {
            tracing::warn!(missing = %describe(&v.missing), "replaying the erasure ledger into a rolled-back data directory");
        } else if !v.missing.is_empty() {
            tracing::warn!(missing = %describe(&v.missing), "finishing erasures a crash interrupted");
        }
        let mut batch = Batch::default();
        for (key, value) in &v.missing.anchors {
            batch.put(key.clone(), value.clone());
        }
        self.store.apply(batch)?;
        let mut by_tenant: HashMap<(String, ErasureKind), HashSet<[u8; 32]>> = HashMap::new();
        for t in &v.missing.erasures {
            by_tenant.entry((t.tenant.clone(), t.kind)).or_default().insert(t.token);
        }
        for ((tenant, kind), tokens) in by_tenant {
            match kind {
                ErasureKind::Subject => self.replay_subject_shreds(&tenant, &tokens)?,
                ErasureKind::Transcript => self.replay_transcript_deletes(&tenant, &tokens)?,
                ErasureKind::Tenant => self.replay_tenant_erasure(&tenant)?,
            }
        }
        let mut b = Batch::default();
        b.put(layout::meta(META_LEDGER), v.last_data.to_be_bytes().to_vec());
        self.store.apply(b)?;
        self.store.sync(Durability::Fsync)?;
        self.ledger.confirm(v.last_data);
        Ok(())
    }

    fn replay_subject_shreds(&self, tenant: &str, tokens: &HashSet<[u8; 32]>) -> Result<(), VaultError> {
        let tenant_id = super::TenantId::parse(tenant)?;
        for (key, value) in self.scan_all(&layout::subject_keys_prefix(tenant))? {
            let rec: KeyRecord = records::decode(&value, "subject key")?;
            let Some(layout::KeyOwner::Subject(_, sb)) = layout::parse_key_owner(&key) else { continue };
            if tokens.contains(&self.subject_token(tenant, &sb, rec.generation)) {
                let mut batch = Batch::default();
                self.queue_shred(&tenant_id, &sb, self.clock.now(), &mut batch)?;
                self.store.apply(batch)?;
            }
        }
        Ok(())
    }

    fn replay_transcript_deletes(&self, tenant: &str, tokens: &HashSet<[u8; 32]>) -> Result<(), VaultError> {
        let tenant_id = super::TenantId::parse(tenant)?;
        for (key, _) in self.scan_all(&layout::transcript_keys_prefix(tenant))? {
            let Some(layout::KeyOwner::Transcript(_, tb, incarnation)) = layout::parse_key_owner(&key) else {
                continue;
            };
            if !tokens.contains(&self.transcript_token(tenant, &tb, incarnation)) {
                continue;
            }
            let mut batch = Batch::default();
            match self.read_header(&layout::header(tenant, &tb))? {
                Some(h) if h.incarnation == incarnation => self.queue_delete(&tenant_id, &tb, &h, &mut batch)?,
                // The header moved on (replaced in this copy): only the key is left to destroy.
                _ => self.discard_transcript_key(&mut batch, tenant, &tb, incarnation),
            }
            self.store.apply(batch)?;
        }
        Ok(())
    }

    fn replay_tenant_erasure(&self, tenant: &str) -> Result<(), VaultError> {
        const REPLAY_CHUNK: usize = 10_000;
        self.closed_tenants
            .write()
            .map_err(|_| VaultError::Internal("closed tenants lock".into()))?
            .insert(tenant.to_owned());
        let mut batch = Batch::default();
        batch.delete(layout::tenant_key(tenant));
        self.queue_garbage(&mut batch, &Garbage::Tenant { tenant: tenant.to_owned() })?;
        for prefix in [layout::subject_keys_prefix(tenant), layout::transcript_keys_prefix(tenant)] {
            for (key, _) in self.scan_all(&prefix)? {
                batch.delete(key);
                // A batch is one frame of the write-ahead log, which has a size limit; the
                // deletions are idempotent, and the replay runs again if a crash cuts it.
                if batch.ops.len() >= REPLAY_CHUNK {
                    self.store.apply(std::mem::take(&mut batch))?;
                }
            }
        }
        self.mark_keys_discarded(&mut batch);
        self.store.apply(batch)?;
        Ok(())
    }

    /// Every entry under `prefix` (replay only: a rare, whole-directory operation).
    fn scan_all(&self, prefix: &[u8]) -> Result<Vec<Entry>, VaultError> {
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.store.scan(prefix, after.as_deref(), 1024)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            out.extend(page);
        }
        Ok(out)
    }

    /// Epochs destroyed without the ledger hearing of it (a crash between the destruction
    /// and its entry): written down now, so their erasures read as final.
    pub(super) fn note_unrecorded_destructions(&self) -> Result<(), VaultError> {
        let oldest = self.keys.epochs().first().copied().unwrap_or(0);
        let stale: BTreeSet<u64> =
            self.ledger.with_state(|s| s.pending.values().map(|(_, t)| t.epoch).filter(|e| *e < oldest).collect())?;
        if !stale.is_empty() {
            self.ledger.record_destroyed(stale.into_iter().collect(), self.clock.now().micros())?;
        }
        Ok(())
    }

    /// Erasures still pending and how rotations have gone, for the operator.
    pub fn erasure_overview(&self) -> Result<ErasureOverview, VaultError> {
        let (pending, oldest) =
            self.ledger.with_state(|s| (s.pending.len() as u64, s.pending.values().map(|(_, t)| t.at_micros).min()))?;
        Ok(ErasureOverview {
            pending_erasures: pending,
            oldest_pending_at: oldest.and_then(Timestamp::from_micros),
            live_epochs: self.keys.epochs().len() as u32,
            rotation_due: self.rotation_due()?,
            rotation: self.rotation_health(),
        })
    }

    /// Whether an erasure recorded in the ledger is not final yet.
    pub(super) fn erasures_pending(&self) -> Result<bool, VaultError> {
        Ok(self.ledger.with_state(|s| !s.pending.is_empty())?)
    }

    /// Tenants whose erasure is recorded but not final, or that were erased in this process.
    pub(super) fn erased_tenants(&self) -> Result<HashSet<String>, VaultError> {
        let mut set: HashSet<String> = self.ledger.with_state(|s| {
            s.pending.values().filter(|(_, t)| t.kind == ErasureKind::Tenant).map(|(_, t)| t.tenant.clone()).collect()
        })?;
        let closed = self.closed_tenants.read().map_err(|_| VaultError::Internal("closed tenants lock".into()))?;
        set.extend(closed.iter().cloned());
        Ok(set)
    }

    /// Whether `token` names a key that an erasure destroyed: a rotation must never
    /// re-wrap it (it can only be there in a data directory being brought forward).
    pub(super) fn is_tombstoned(&self, token: &[u8; 32]) -> Result<bool, VaultError> {
        Ok(self.ledger.with_state(|s| s.pending.contains_key(token))?)
    }

    /// The header of a live transcript and its subject, for replay and delete alike.
    pub(super) fn queue_delete(
        &self,
        tenant: &super::TenantId,
        tb: &Blind,
        h: &Header,
        batch: &mut Batch,
    ) -> Result<(), VaultError> {
        self.queue_delete_among(tenant, tb, h, batch, &mut HashMap::new())
    }

    /// [`Self::queue_delete`] for one of several deletions in one batch: `subjects` holds
    /// the subject records as the batch leaves them, so two transcripts of one subject
    /// take two off its count.
    pub(super) fn queue_delete_among(
        &self,
        tenant: &super::TenantId,
        tb: &Blind,
        h: &Header,
        batch: &mut Batch,
        subjects: &mut HashMap<Blind, Option<records::SubjectRecord>>,
    ) -> Result<(), VaultError> {
        let subj = match subjects.get(&h.subject) {
            Some(s) => s.clone(),
            None => self.read_subject(tenant, &h.subject)?,
        };
        let subj = match subj {
            Some(mut s) if s.active && s.generation == h.generation => {
                s.transcript_count = s.transcript_count.saturating_sub(1);
                batch.put(layout::subject(tenant.as_str(), &h.subject), records::encode(&s)?);
                Some(s)
            }
            other => other,
        };
        subjects.insert(h.subject, subj);
        batch.delete(layout::header(tenant.as_str(), tb));
        super::times::reindex(batch, tenant.as_str(), tb, Some(h), None);
        batch.delete(layout::body(tenant.as_str(), tb, h.incarnation));
        self.discard_transcript_key(batch, tenant.as_str(), tb, h.incarnation);
        batch.delete(layout::by_subject(tenant.as_str(), &h.subject, h.generation, h.started_at, tb));
        self.queue_garbage(
            batch,
            &Garbage::Incarnation { tenant: tenant.as_str().to_owned(), transcript: *tb, incarnation: h.incarnation },
        )
    }
}

/// The highest ledger counter the data directory says it holds.
pub(super) fn data_counter(store: &dyn KvStore) -> Result<u64, VaultError> {
    match store.get(&layout::meta(META_LEDGER))? {
        None => Ok(0),
        Some(b) => Ok(u64::from_be_bytes(b.as_slice().try_into().map_err(|_| VaultError::Corrupt("meta"))?)),
    }
}

/// Opens the ledger beside the key-store keys. A ledger is created only for a data
/// directory that never had one: if the data directory holds entries, a missing ledger
/// means the key directory was replaced, and that is refused before anything is written.
pub(super) fn open_ledger(key_dir: &Path, keys: &dyn KeyStore, applied: u64) -> Result<Ledger, VaultError> {
    match Ledger::open(key_dir, keys.control_key(LEDGER_KEY), keys.store_id(), applied == 0) {
        Err(LedgerError::Missing { .. }) => Err(VaultError::Rollback(format!(
            "the key directory has no erasure ledger, but the data directory holds {applied} of its entries: \
             the key directory was replaced or restored from a copy without it. Start with the key \
             directory this data directory was used with"
        ))),
        other => Ok(other?),
    }
}

/// What the data directory says of itself, read before anything is written.
pub(super) struct Found {
    /// The highest ledger entry it holds.
    pub applied: u64,
    /// It was empty: never used.
    pub fresh: bool,
    /// No key in it is wrapped under an epoch older than this.
    pub wrapped_from: u64,
}

/// The oldest key-store epoch any key of the data directory may be wrapped under: what
/// the last completed rotation swept it to, as recorded; for a directory of an earlier
/// version, the oldest epoch found on its key records (read once). Reads only.
pub(super) fn wrapped_from(store: &dyn KvStore, keys: &dyn KeyStore, fresh: bool) -> Result<u64, VaultError> {
    if fresh {
        return Ok(keys.current_epoch());
    }
    if let Some(b) = store.get(&layout::meta(META_WRAPPED_FROM))? {
        return Ok(u64::from_be_bytes(b.as_slice().try_into().map_err(|_| VaultError::Corrupt("meta"))?));
    }
    let mut oldest = keys.current_epoch();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(&layout::keys_prefix(), after.as_deref(), 1024)?;
        let Some((last, _)) = page.last() else { return Ok(oldest) };
        after = Some(last.clone());
        for (_, value) in &page {
            let rec: KeyRecord = records::decode(value, "wrapped key")?;
            oldest = oldest.min(crate::keys::wrapped_epoch(&rec.wrapped)?);
        }
    }
}

/// Records [`wrapped_from`] where a directory of an earlier version had none.
pub(super) fn note_wrapped_from(store: &dyn KvStore, epoch: u64) -> Result<(), VaultError> {
    let slot = layout::meta(META_WRAPPED_FROM);
    if store.get(&slot)?.is_none() {
        let mut b = Batch::default();
        b.put(slot, epoch.to_be_bytes().to_vec());
        store.apply(b)?;
    }
    Ok(())
}

/// Compares the data directory with the ledger and the key directory. Reads only: a
/// refusal leaves every file as it was.
pub(super) fn verdict(
    found: &Found,
    ledger: &Ledger,
    keys: &dyn KeyStore,
    replay: bool,
) -> Result<Verdict, VaultError> {
    let applied = found.applied;
    let (counter, last_data, confirmed, pruned, missing) =
        ledger.with_state(|s| (s.counter, s.last_data, s.confirmed, s.pruned_through, s.after(applied)))?;
    if found.fresh && (counter > 0 || keys.current_epoch() > 1) {
        return Err(VaultError::Rollback(format!(
            "the data directory is empty, but this key directory has served one before (its erasure ledger holds \
             {counter} entries, its key store is at epoch {}): point data_dir at that data directory, put a backup \
             back with `chatvault restore`, or start a new deployment with a new key directory",
            keys.current_epoch()
        )));
    }
    if applied > last_data {
        let cut = match ledger.torn_at() {
            Some(at) => format!(
                " (or the ledger's damaged last entry, at byte {at}, was set aside: if this key directory is \
                 current, that entry is the one missing)"
            ),
            None => String::new(),
        };
        return Err(VaultError::Rollback(format!(
            "the key directory is older than the data directory (its erasure ledger ends at entry {last_data}, \
             the data directory holds entry {applied}): it was restored from a backup, which can bring back \
             destroyed key-store keys{cut}. Start with the current key directory"
        )));
    }
    let oldest_live = keys.epochs().first().copied().unwrap_or(0);
    if applied < pruned || found.wrapped_from < oldest_live {
        return Err(VaultError::Rollback(format!(
            "the data directory is older than the last completed key-store rotation (its keys are wrapped under \
             epoch {} and later; the key directory holds epoch {oldest_live} and later): they were destroyed with \
             their epoch and it can no longer be opened. Restore a backup taken after that rotation",
            found.wrapped_from
        )));
    }
    let rolled_back = applied < confirmed;
    if rolled_back && !replay {
        return Err(VaultError::Rollback(format!(
            "the data directory was rolled back: it holds erasure-ledger entries up to {applied}, but entries \
             up to {confirmed} were durable in it. Missing: {}. Serving it would bring erased data and revoked \
             keys back. To bring it forward, start once with --replay-erasures (or run `chatvault restore`); \
             writes made after the copy was taken that are not erasures are lost",
            describe(&missing)
        )));
    }
    Ok(Verdict { applied, last_data, missing, rolled_back })
}

/// What a data directory lacks, for an operator: counts, tenant ids, never a subject.
fn describe(m: &Missing) -> String {
    let count = |k| m.erasures.iter().filter(|t| t.kind == k).count();
    let tenants: BTreeSet<&str> = m.erasures.iter().map(|t| t.tenant.as_str()).collect();
    format!(
        "{} subject erasure(s), {} transcript deletion(s), {} tenant deletion(s) (tenants: {}), {} tenant registry \
         change(s) (revoked keys, deletions, suspensions, allowlists)",
        count(ErasureKind::Subject),
        count(ErasureKind::Transcript),
        count(ErasureKind::Tenant),
        if tenants.is_empty() { "-".to_owned() } else { tenants.into_iter().collect::<Vec<_>>().join(", ") },
        m.anchors.len()
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::{AuthorRole, Message, TenantId, Transcript, testing};
    use super::*;

    fn transcript(id: &str, subject: &str) -> Transcript {
        Transcript::new(id, subject, vec![Message::new("m", AuthorRole::Visitor, "V", "words")])
    }

    #[tokio::test]
    async fn an_erasure_the_store_failed_to_apply_stops_writes_and_is_finished_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::parse("acme").unwrap();
        {
            let (v, faults) = testing::open_faulty_store(dir.path(), testing::HandClock::new());
            v.put_transcript(&tenant, transcript("t", "alice")).await.unwrap();
            v.put_transcript(&tenant, transcript("u", "bob")).await.unwrap();
            faults.fail_apply.store(true, Ordering::SeqCst);
            assert!(v.shred_subject(&tenant, "alice").await.is_err());
            faults.fail_apply.store(false, Ordering::SeqCst);
            // The tombstone is in the ledger, the store lacks it: nothing more is written,
            // or a later erasure's counter would hide this one.
            let later = v.delete_transcript(&tenant, "u").await;
            assert!(matches!(later, Err(VaultError::Store(crate::store::StoreError::Failed))), "{later:?}");
            // Nor may a rotation make the unapplied erasure final (and unreplayable).
            assert!(v.rotate_key_store().is_err());
            assert_eq!(v.keys.epochs(), vec![1]);
        }
        let v = testing::open(dir.path(), testing::HandClock::new(), |_| {});
        assert!(matches!(v.get_transcript(&tenant, "t"), Err(VaultError::Erased(_))), "the shred was not finished");
        assert_eq!(v.get_transcript(&tenant, "u").unwrap().messages[0].text, "words");
    }

    #[tokio::test]
    async fn keys_left_of_an_erased_tenant_are_deleted_by_a_rotation_not_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        let v = testing::open(dir.path(), testing::HandClock::new(), |_| {});
        let (gone, kept) = (TenantId::parse("gone").unwrap(), TenantId::parse("kept").unwrap());
        v.put_transcript(&gone, transcript("t", "alice")).await.unwrap();
        v.put_transcript(&kept, transcript("t", "bob")).await.unwrap();
        let leftover = v.scan_all(&layout::subject_keys_prefix("gone")).unwrap();
        assert_eq!(leftover.len(), 1);
        v.erase_tenant(&gone).await.unwrap();
        // What a crash after the erasure's first batch could leave.
        let mut b = Batch::default();
        for (k, val) in &leftover {
            b.put(k.clone(), val.clone());
        }
        v.store.apply(b).unwrap();
        v.rotate_key_store().unwrap();
        assert!(v.scan_all(&layout::subject_keys_prefix("gone")).unwrap().is_empty());
        assert_eq!(v.get_transcript(&kept, "t").unwrap().messages[0].text, "words");
    }
}
