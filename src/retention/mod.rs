//! Retention: each tenant's policy enforced. A run closes the chats idle past
//! `close_inactive_after`, then purges — the crypto-shred of DeleteTranscript, in batches
//! under one erasure-ledger entry each — what closed more than `purge_after_close` ago (or
//! at all, with `purge_on_close`) and what started more than `max_age` ago. It finds them
//! in the vault's time indexes, so a run costs what it purges. A legal hold keeps what it
//! covers; the run steps past it.
//!
//! Several nodes of one region may run it at once: a per-tenant lease taken by
//! compare-and-swap in the store lets one of them work on a tenant at a time, and every
//! transcript is re-read under its subject's lock before it goes, so none is purged or
//! counted twice even if two runs meet.

mod status;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use status::TenantStatus as RetentionStatus;

use crate::audit::{AuditLog, Event, Operation, Outcome};
use crate::store::{KvStore, space};
use crate::tenancy::{Registry, RetentionPolicy, Tenant, TenantStatus};
use crate::vault::{Due, Swept, TenantId, TimeIndex, Vault, VaultError};

/// Transcripts handled per batch (one ledger entry, one lock of their subjects).
pub const BATCH: usize = 64;
/// Transcripts one run handles per tenant at most; the rest is the backlog, taken next run.
pub const MAX_PER_RUN: u64 = 100_000;
/// How finely the activity index records a chat's last write.
const ACTIVITY_GRAIN_MICROS: i64 = 60 * 1_000_000;
/// How long a lease on a tenant holds without being renewed (it is, at every batch). A
/// node that died holding one delays that tenant's retention this long, no more.
const LEASE_MICROS: i64 = 60 * 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("retention status record is corrupt")]
    Corrupt,
}

/// What a run did, over all tenants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    pub purged: u64,
    pub closed: u64,
    pub held: u64,
    /// Tenants skipped because another node held their lease.
    pub leased_elsewhere: u64,
    /// Tenants whose run failed (logged); retried at the next run.
    pub failed: u64,
}

/// Who holds a tenant's lease, and until when (µs, vault clock).
#[derive(Serialize, Deserialize)]
struct Lease {
    owner: [u8; 16],
    until: i64,
}

fn lease_key(tenant: &str) -> Vec<u8> {
    let mut k = vec![space::RETENTION, b'l'];
    k.extend_from_slice(tenant.as_bytes());
    k
}

pub struct Purger {
    vault: Arc<Vault>,
    registry: Arc<Registry>,
    audit: Arc<AuditLog>,
    store: Arc<dyn KvStore>,
    /// Audit records older than this are pruned at each run (0: never).
    audit_keep_micros: i64,
    /// This purger's id in leases.
    owner: [u8; 16],
    /// One run at a time in this process (the interval and RunRetention may meet).
    running: tokio::sync::Mutex<()>,
}

impl Purger {
    pub fn new(vault: Arc<Vault>, registry: Arc<Registry>, audit: Arc<AuditLog>) -> Result<Self, RetentionError> {
        let owner = crate::crypto::random_bytes::<16>().map_err(|e| VaultError::Internal(e.to_string()))?;
        let store = vault.shared_store();
        Ok(Purger { vault, registry, audit, store, audit_keep_micros: 0, owner, running: tokio::sync::Mutex::new(()) })
    }

    /// Prunes audit records older than `days` at each run (0: never).
    pub fn keeping_audit_for(mut self, days: u64) -> Self {
        self.audit_keep_micros = i64::try_from(days.saturating_mul(86_400_000_000)).unwrap_or(i64::MAX);
        self
    }

    /// One run over every tenant with a policy, on the blocking pool: a purge syncs the
    /// erasure ledger while it holds its subjects' locks, which must not stall an
    /// executor thread.
    pub async fn run(self: &Arc<Self>) -> Result<RunReport, RetentionError> {
        let (this, handle) = (self.clone(), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || handle.block_on(this.run_here()))
            .await
            .map_err(|e| VaultError::Internal(format!("retention run: {e}")))?
    }

    async fn run_here(&self) -> Result<RunReport, RetentionError> {
        let _one = self.running.lock().await;
        let mut report = RunReport::default();
        // Answers kept for batch retries are retention's to prune too.
        if let Err(e) = self.vault.prune_requests(10_000) {
            tracing::error!(error = %e, "pruning kept batch answers failed");
        }
        if self.audit_keep_micros > 0 {
            // Without the anchor no segment is known safe to go: none goes.
            match self.vault.anchored_audit_head() {
                Ok(anchor) => {
                    if let Err(e) = self.audit.prune(self.audit_keep_micros, anchor.map(|a| a.seq)) {
                        tracing::error!(error = %e, "pruning the audit trail failed");
                    }
                }
                Err(e) => tracing::error!(error = %e, "audit trail not pruned: the ledger's anchor cannot be read"),
            }
        }
        let tenants = self.registry.list().map_err(|e| VaultError::Internal(e.to_string()))?;
        for t in tenants.iter().filter(|t| t.status != TenantStatus::Deleted && t.retention.is_active()) {
            if !self.take_lease(&t.id)? {
                report.leased_elsewhere += 1;
                continue;
            }
            let outcome = self.run_tenant(t).await;
            self.drop_lease(&t.id)?;
            // One tenant's failure (a damaged record, say) must not stop the others'.
            let r = match outcome {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, tenant = t.id.as_str(), "retention run of a tenant failed");
                    report.failed += 1;
                    continue;
                }
            };
            report.purged += r.purged;
            report.closed += r.closed;
            report.held += r.held;
        }
        Ok(report)
    }

    async fn run_tenant(&self, t: &Tenant) -> Result<status::Run, RetentionError> {
        let p: RetentionPolicy = t.retention;
        let now = self.vault.now().micros();
        let ago = |secs: u64| now.saturating_sub(i64::try_from(secs.saturating_mul(1_000_000)).unwrap_or(i64::MAX));
        let mut run = status::Run { at: now, ..status::Run::default() };
        let mut budget = MAX_PER_RUN;
        if p.close_inactive_after_secs > 0 {
            // An activity entry is the minute a write fell in: the write may have come up
            // to a minute after it, so the entry must be a minute older than the policy.
            let cutoff = ago(p.close_inactive_after_secs).saturating_sub(ACTIVITY_GRAIN_MICROS);
            let s = self.sweep(&t.id, TimeIndex::Active, cutoff, &mut budget, Some(now)).await?;
            run.closed += s.0.done;
            run.backlog += s.1;
        }
        if p.purge_on_close || p.purge_after_close_secs > 0 {
            let s = self.sweep(&t.id, TimeIndex::Closed, ago(p.purge_after_close_secs), &mut budget, None).await?;
            run.add_purge(s);
        }
        if p.max_age_secs > 0 {
            let s = self.sweep(&t.id, TimeIndex::Started, ago(p.max_age_secs), &mut budget, None).await?;
            run.add_purge(s);
        }
        self.record(&t.id, &run)?;
        Ok(run)
    }

    /// Goes through index `which` up to `cutoff` in batches, purging each batch — or,
    /// with `close_at`, closing it at that time (the run's, so that a purge on close in
    /// the same run finds them due). Returns what was done and how many due entries were
    /// left for the next run.
    async fn sweep(
        &self,
        tenant: &TenantId,
        which: TimeIndex,
        cutoff: i64,
        budget: &mut u64,
        close_at: Option<i64>,
    ) -> Result<(Swept, u64), RetentionError> {
        let mut total = Swept::default();
        let mut after: Option<Due> = None;
        loop {
            let due = self.vault.due(tenant, which, cutoff, after.as_ref(), BATCH)?;
            let Some(last) = due.last().copied() else { return Ok((total, 0)) };
            if *budget == 0 {
                // Count what is left (bounded: a count, not a second sweep).
                let left = self.vault.due(tenant, which, cutoff, after.as_ref(), 10_000)?.len() as u64;
                return Ok((total, left));
            }
            let (s, purged, closed) = match close_at {
                None => {
                    let s = self.vault.purge(tenant, which, &due).await?;
                    (s, s.done, 0)
                }
                Some(at) => {
                    let s = self.vault.close_idle(tenant, &due, at).await?;
                    (s, 0, s.done)
                }
            };
            status::add_batch(self.store.as_ref(), tenant.as_str(), purged, closed)?;
            // The counts are as durable as what they count (a crash between the two loses
            // at most this batch's count, never adds one).
            self.vault.wait_durable().await?;
            crate::failpoint::hit("retention.after_batch");
            total.done += s.done;
            total.held += s.held;
            total.stale += s.stale;
            *budget = budget.saturating_sub(s.done);
            // Held entries stay; the cursor steps past them (the others are gone).
            after = Some(last);
            self.renew_lease(tenant)?;
        }
    }

    /// Audits the run and adds it to the tenant's status.
    fn record(&self, tenant: &TenantId, run: &status::Run) -> Result<(), RetentionError> {
        for (op, n) in [(Operation::RetentionClose, run.closed), (Operation::RetentionPurge, run.purged)] {
            if n == 0 {
                continue;
            }
            let ev = Event {
                tenant: tenant.as_str().to_owned(),
                source: "retention".into(),
                count: u32::try_from(n).unwrap_or(u32::MAX),
                ..Event::default()
            };
            if let Err(e) = self.audit.append(op, Outcome::Ok, ev) {
                tracing::error!(error = %e, tenant = tenant.as_str(), "retention run could not be audited");
            }
        }
        crate::metrics::get().retention_run(run.purged, run.closed, run.backlog);
        status::finish(self.store.as_ref(), tenant.as_str(), run)
    }

    fn take_lease(&self, tenant: &TenantId) -> Result<bool, RetentionError> {
        let key = lease_key(tenant.as_str());
        let now = self.vault.now().micros();
        let old = self.store.get(&key)?;
        if let Some(bytes) = &old {
            let lease: Lease = postcard::from_bytes(bytes).map_err(|_| RetentionError::Corrupt)?;
            if lease.owner != self.owner && lease.until > now {
                return Ok(false);
            }
        }
        let new = Lease { owner: self.owner, until: now.saturating_add(LEASE_MICROS) };
        let bytes = postcard::to_allocvec(&new).map_err(|_| RetentionError::Corrupt)?;
        Ok(self.store.compare_and_swap(&key, old.as_deref(), Some(bytes))?)
    }

    fn renew_lease(&self, tenant: &TenantId) -> Result<(), RetentionError> {
        // A lease lost while working (a very long pause) only means another node may
        // join in: the subject locks and re-reads keep that correct.
        let _ = self.take_lease(tenant)?;
        Ok(())
    }

    fn drop_lease(&self, tenant: &TenantId) -> Result<(), RetentionError> {
        let key = lease_key(tenant.as_str());
        if let Some(bytes) = self.store.get(&key)?
            && postcard::from_bytes::<Lease>(&bytes).is_ok_and(|l| l.owner == self.owner)
        {
            let _ = self.store.compare_and_swap(&key, Some(&bytes), None)?;
        }
        Ok(())
    }

    /// A tenant's retention status.
    pub fn status(&self, tenant: &TenantId) -> Result<RetentionStatus, RetentionError> {
        status::get(self.store.as_ref(), tenant.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::tenancy::Cidr;
    use crate::vault::testing::{self, HandClock};
    use crate::vault::{Timestamp, Transcript};

    fn node(dir: &std::path::Path) -> (Arc<Vault>, Arc<Registry>, Arc<AuditLog>, Arc<HandClock>) {
        let clock = HandClock::new();
        let vault = Arc::new(testing::open(dir, clock.clone(), |_| {}));
        let store = vault.shared_store();
        let registry = Arc::new(
            Registry::open(
                store.clone(),
                vault.clone(),
                vault.control_key(b"test-registry"),
                vault.algorithm(),
                vault.binding().clone(),
            )
            .unwrap(),
        );
        let audit = Arc::new(
            AuditLog::open(&dir.join("audit"), store.as_ref(), vault.control_key(b"test-audit"), clock.clone())
                .unwrap(),
        );
        vault.attach_holds(registry.clone());
        (vault, registry, audit, clock)
    }

    /// Two purgers on one store, each free to work on every tenant (their leases expire
    /// between batches as the clock jumps): every expired transcript is purged once, and
    /// the purged counts add up to exactly that many.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_purgers_on_one_store_never_purge_a_transcript_twice_nor_miss_one() {
        let dir = tempfile::tempdir().unwrap();
        let (vault, registry, audit, clock) = node(dir.path());
        let now = clock.now();
        // Ten days: the clock's jumps below (under a day in all) never make the young ones due.
        let policy = RetentionPolicy { purge_after_close_secs: 10 * 86_400, ..RetentionPolicy::default() };
        let mut expired = 0;
        for t in 0..4 {
            let id = TenantId::parse(&format!("t{t}")).unwrap();
            registry.create(id.clone(), String::new(), Vec::<Cidr>::new(), policy, now).unwrap();
            for i in 0..150 {
                let m = crate::vault::Message::new("m", crate::vault::AuthorRole::Visitor, "V", "x");
                let mut tr = Transcript::new(format!("c{i}"), format!("s{}", i % 7), vec![m]);
                tr.started_at = Timestamp::from_micros(now.micros() - 30 * 86_400_000_000);
                let ended = if i % 5 == 0 { now.micros() } else { now.micros() - 20 * 86_400_000_000 };
                tr.ended_at = Timestamp::from_micros(ended);
                expired += u64::from(i % 5 != 0);
                vault.put_transcript(&id, tr).await.unwrap();
            }
        }
        let a = Arc::new(Purger::new(vault.clone(), registry.clone(), audit.clone()).unwrap());
        let b = Arc::new(Purger::new(vault.clone(), registry.clone(), audit.clone()).unwrap());
        // Past every lease: both may take any tenant, so they do meet on the same ones.
        let jumper = {
            let clock = clock.clone();
            tokio::spawn(async move {
                for _ in 0..200 {
                    clock.advance_secs(LEASE_MICROS / 1_000_000 + 1);
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            })
        };
        let (ra, rb) = tokio::join!(a.run(), b.run());
        jumper.abort();
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        // Whatever one left (it saw the other's lease), one more run finishes.
        let rc = a.run().await.unwrap();
        assert_eq!(ra.purged + rb.purged + rc.purged, expired, "{ra:?} {rb:?} {rc:?}");
        let mut counted = 0;
        for t in 0..4 {
            let id = TenantId::parse(&format!("t{t}")).unwrap();
            counted += a.status(&id).unwrap().purged_total;
            for i in 0..150 {
                let live = vault.get_transcript(&id, &format!("c{i}")).is_ok();
                assert_eq!(live, i % 5 == 0, "t{t}/c{i}");
            }
            assert!(vault.due(&id, TimeIndex::Closed, i64::MAX, None, 1000).unwrap().len() == 30);
        }
        assert_eq!(counted, expired, "status totals count each purge once");
    }
}
