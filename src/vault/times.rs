//! The time indexes beside the transcript headers (`layout::TimeIndex`): when each live
//! transcript started, when each closed one closed, and the minute of each open one's last
//! write. Kept in the same batch as the header they mirror; retention reads the oldest
//! entries of a tenant and so finds a transcript of two years ago without reading
//! yesterday's. An entry whose transcript is gone (shredded, say) is dropped by the first
//! run that meets it.

use super::layout::{self, Blind, TimeIndex};
use super::records::{self, Header};
use super::{TenantId, Timestamp, Vault, VaultError};
use crate::store::{Batch, Durability};

const MINUTE_MICROS: i64 = 60_000_000;
/// Set once every header has its index entries (written before the indexes existed).
const META_TIME_INDEXES: &str = "time_indexes";

/// The minute `at` falls in: an append writes the header again only when it moves on.
pub(super) fn minute(at: Timestamp) -> i64 {
    at.micros().div_euclid(MINUTE_MICROS) * MINUTE_MICROS
}

/// A transcript an index says is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Due {
    pub transcript: Blind,
    pub incarnation: u64,
    /// The indexed time (µs).
    pub at: i64,
}

/// The index entries a header stands for.
pub(super) fn entries(tenant: &str, tb: &Blind, h: &Header) -> Vec<Vec<u8>> {
    let mut v = vec![layout::time_entry(TimeIndex::Started, tenant, h.started_at, tb)];
    match (h.ended_at, h.activity) {
        (Some(ended), _) => v.push(layout::time_entry(TimeIndex::Closed, tenant, ended, tb)),
        (None, Some(active)) => v.push(layout::time_entry(TimeIndex::Active, tenant, active, tb)),
        (None, None) => {}
    }
    v
}

/// Queues the index changes of a header going from `old` to `new` (either may be absent).
pub(super) fn reindex(batch: &mut Batch, tenant: &str, tb: &Blind, old: Option<&Header>, new: Option<&Header>) {
    let keep = new.map(|h| entries(tenant, tb, h)).unwrap_or_default();
    if let Some(o) = old {
        for k in entries(tenant, tb, o) {
            if !keep.contains(&k) {
                batch.delete(k);
            }
        }
    }
    if let Some(n) = new {
        for k in keep {
            batch.put(k, n.incarnation.to_be_bytes().to_vec());
        }
    }
}

impl Vault {
    /// Up to `limit` transcripts of `tenant` whose `which` time is at or before `cutoff`
    /// (µs), oldest first, from just past `after` (the last one of a previous page).
    pub fn due(
        &self,
        tenant: &TenantId,
        which: TimeIndex,
        cutoff: i64,
        after: Option<&Due>,
        limit: usize,
    ) -> Result<Vec<Due>, VaultError> {
        let prefix = layout::times_prefix(which, tenant.as_str());
        let bound = layout::time_bound(which, tenant.as_str(), cutoff);
        let mut out = Vec::new();
        let mut after = after.map(|d| layout::time_entry(which, tenant.as_str(), d.at, &d.transcript));
        while out.len() < limit {
            let page = self.store.scan(&prefix, after.as_deref(), (limit - out.len()).min(512))?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, value) in &page {
                if *key > bound {
                    return Ok(out);
                }
                let (at, transcript) = layout::parse_time_entry(key).ok_or(VaultError::Corrupt("time index"))?;
                let incarnation =
                    u64::from_be_bytes(value.as_slice().try_into().map_err(|_| VaultError::Corrupt("time index"))?);
                out.push(Due { transcript, incarnation, at });
            }
        }
        Ok(out)
    }

    /// Gives every header written before the time indexes existed its entries, once,
    /// before serving. An open transcript counts as active now (its last message's time
    /// is sealed): it is never closed for idleness sooner than a full period after the
    /// upgrade. A crash leaves a prefix done; entries are idempotent, so the next open
    /// just goes over it again.
    pub(super) fn migrate_time_indexes(&self) -> Result<(), VaultError> {
        let flag = layout::meta(META_TIME_INDEXES);
        if self.store.get(&flag)?.is_some() {
            return Ok(());
        }
        let now = minute(self.clock.now());
        let mut after: Option<Vec<u8>> = None;
        let mut done = 0u64;
        loop {
            let page = self.store.scan(&layout::all_headers_prefix(), after.as_deref(), 512)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            let mut batch = Batch::default();
            for (key, value) in &page {
                let (tenant, tb) = layout::parse_header(key).ok_or(VaultError::Corrupt("transcript header"))?;
                let mut h = records::decode_header(value)?;
                if h.ended_at.is_none() && h.activity.is_none() {
                    h.activity = Some(now);
                    batch.put(key.clone(), records::encode_header(&h)?);
                }
                reindex(&mut batch, &tenant, &tb, None, Some(&h));
                done += 1;
            }
            self.apply(batch)?;
        }
        if done > 0 {
            tracing::info!(transcripts = done, "built the retention time indexes (one time)");
        }
        let mut b = Batch::default();
        b.put(flag, vec![1]);
        self.apply(b)?;
        self.store.sync(Durability::Fsync)?;
        Ok(())
    }
}
