//! Per-tenant retention status, kept in the store beside the leases so that it survives
//! a restart and adds up over every node of a region (each run adds its own counts by
//! compare-and-swap).

use serde::{Deserialize, Serialize};

use super::RetentionError;
use crate::store::{KvStore, space};

/// What one run did for one tenant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Run {
    pub at: i64,
    pub purged: u64,
    pub closed: u64,
    pub held: u64,
    pub backlog: u64,
}

impl Run {
    pub(super) fn add_purge(&mut self, (s, left): (crate::vault::Swept, u64)) {
        self.purged += s.done;
        self.held += s.held;
        self.backlog += left;
    }
}

/// A tenant's retention so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantStatus {
    /// µs; 0 if retention never ran for the tenant.
    pub last_run_at: i64,
    pub purged_total: u64,
    pub closed_total: u64,
    pub last_purged: u64,
    pub last_closed: u64,
    pub backlog: u64,
    pub held: u64,
}

fn key(tenant: &str) -> Vec<u8> {
    let mut k = vec![space::RETENTION, b's'];
    k.extend_from_slice(tenant.as_bytes());
    k
}

pub fn get(store: &dyn KvStore, tenant: &str) -> Result<TenantStatus, RetentionError> {
    match store.get(&key(tenant))? {
        Some(b) => postcard::from_bytes(&b).map_err(|_| RetentionError::Corrupt),
        None => Ok(TenantStatus::default()),
    }
}

/// Read-modify-write of a tenant's status by compare-and-swap: runs on several nodes
/// never lose each other's counts.
fn update(store: &dyn KvStore, tenant: &str, change: impl Fn(&mut TenantStatus)) -> Result<(), RetentionError> {
    let key = key(tenant);
    loop {
        let old = store.get(&key)?;
        let mut s: TenantStatus = match &old {
            Some(b) => postcard::from_bytes(b).map_err(|_| RetentionError::Corrupt)?,
            None => TenantStatus::default(),
        };
        change(&mut s);
        let new = postcard::to_allocvec(&s).map_err(|_| RetentionError::Corrupt)?;
        if store.compare_and_swap(&key, old.as_deref(), Some(new))? {
            return Ok(());
        }
    }
}

/// Adds one batch's work to the totals, as soon as it is done: a run cut short by a
/// crash still counts what it did (up to its last batch).
pub fn add_batch(store: &dyn KvStore, tenant: &str, purged: u64, closed: u64) -> Result<(), RetentionError> {
    if purged == 0 && closed == 0 {
        return Ok(());
    }
    update(store, tenant, |s| {
        s.purged_total += purged;
        s.closed_total += closed;
    })
}

/// Records the end of a run.
pub fn finish(store: &dyn KvStore, tenant: &str, run: &Run) -> Result<(), RetentionError> {
    update(store, tenant, |s| {
        s.last_run_at = s.last_run_at.max(run.at);
        s.last_purged = run.purged;
        s.last_closed = run.closed;
        s.backlog = run.backlog;
        s.held = run.held;
    })
}
