//! Background reclaim of ciphertext nobody can decrypt any more (shredded subjects,
//! deleted or replaced transcripts). Not needed for erasure — the keys are gone — only
//! for disk space.

use super::layout;
use super::records::{self, Garbage, Header};
use super::{TenantId, Vault, VaultError};
use crate::store::Batch;

impl Vault {
    /// Removes up to about `budget` dead records. Returns how many it removed; 0 means
    /// there is nothing left to do.
    pub fn reclaim(&self, budget: usize) -> Result<usize, VaultError> {
        let _held = self.maintenance.lock().map_err(|_| VaultError::Internal("maintenance lock".into()))?;
        let budget = budget.max(1);
        let mut removed = 0;
        let cutoff = self.clock.now().micros().saturating_sub(self.reclaim_min_age_micros);
        for (gkey, gval) in self.store.scan(&layout::garbage_prefix(), None, 8)? {
            // Garbage ids start with their creation time: leave young garbage alone so a
            // read that started before the delete can finish (and the queue is in time order).
            let queued_at = gkey.get(1..9).and_then(|b| b.try_into().ok()).map(i64::from_be_bytes).unwrap_or(0);
            if removed >= budget || queued_at > cutoff {
                break;
            }
            let garbage: Garbage = records::decode(&gval, "garbage")?;
            removed += match garbage {
                Garbage::Incarnation { tenant, transcript, incarnation } => {
                    let prefix = layout::messages_prefix(&tenant, &transcript, incarnation);
                    let page = self.store.scan(&prefix, None, budget - removed)?;
                    let mut b = Batch::default();
                    let n = page.len();
                    self.tally_freed(&mut b, &page)?;
                    for (k, _) in page {
                        b.delete(k);
                    }
                    if n < budget - removed {
                        b.delete(layout::body(&tenant, &transcript, incarnation));
                        b.delete(layout::transcript_key(&tenant, &transcript, incarnation));
                        b.delete(gkey);
                    }
                    self.store.apply(b)?;
                    n + 1
                }
                Garbage::Tenant { tenant } => {
                    let mut n = 0;
                    for prefix in layout::tenant_prefixes(&tenant) {
                        let page = self.store.scan(&prefix, None, budget - removed - n)?;
                        n += page.len();
                        let mut b = Batch::default();
                        self.tally_freed(&mut b, &page)?;
                        for (k, _) in page {
                            b.delete(k);
                        }
                        self.store.apply(b)?;
                        if removed + n >= budget {
                            break;
                        }
                    }
                    if n == 0 {
                        let mut b = Batch::default();
                        b.delete(gkey);
                        self.store.apply(b)?;
                    }
                    n + 1
                }
                Garbage::SubjectGeneration { tenant, subject, generation } => {
                    let tenant = TenantId::parse(&tenant)?;
                    let prefix = layout::by_subject_prefix(tenant.as_str(), &subject, generation);
                    let _held = self.locks.lock(tenant.as_str(), &[&subject]);
                    let page = self.store.scan(&prefix, None, (budget - removed).min(256))?;
                    let mut b = Batch::default();
                    let n = page.len();
                    for (k, _) in &page {
                        let tb = layout::trailing_blind(k).ok_or(VaultError::Corrupt("subject index"))?;
                        let hkey = layout::header(tenant.as_str(), &tb);
                        if let Some(bytes) = self.store.get(&hkey)? {
                            let h: Header = records::decode_header(&bytes)?;
                            if h.subject == subject && h.generation == generation {
                                b.delete(hkey);
                                // Its time-index entries go with it: nothing of a shredded
                                // transcript stays, not even when it was written.
                                super::times::reindex(&mut b, tenant.as_str(), &tb, Some(&h), None);
                                self.queue_garbage(
                                    &mut b,
                                    &Garbage::Incarnation {
                                        tenant: tenant.as_str().to_owned(),
                                        transcript: tb,
                                        incarnation: h.incarnation,
                                    },
                                )?;
                            }
                        }
                        b.delete(k.clone());
                    }
                    if n == 0 {
                        b.delete(gkey);
                    }
                    self.store.apply(b)?;
                    n + 1
                }
            };
        }
        Ok(removed)
    }
}

/// Work the background maintenance has not done yet, and the space it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Queued reclaim and packing items, each queue counted up to 10,000.
    pub garbage_records: u64,
    /// Value-log bytes no record points at, waiting for compaction.
    pub dead_value_bytes: u64,
    pub index_bytes: u64,
    pub value_bytes: u64,
    pub ledger_bytes: u64,
}

impl Vault {
    /// For metrics: reclaim and compaction backlog, bytes on disk. A bounded scan.
    pub fn maintenance_backlog(&self) -> Result<Backlog, VaultError> {
        let garbage = self.store.scan(&layout::garbage_prefix(), None, 10_000)?.len() as u64
            + self.store.scan(&layout::pack_queue_prefix(), None, 10_000)?.len() as u64;
        let mut dead = 0u64;
        for (_, v) in self.store.scan(&layout::value_tally_prefix(), None, 100_000)? {
            dead += records::decode::<records::SegmentTally>(&v, "value log tally")?.dead_bytes;
        }
        Ok(Backlog {
            garbage_records: garbage,
            dead_value_bytes: dead,
            index_bytes: self.store.size_on_disk()?,
            value_bytes: match &self.values {
                Some(v) => v.size_on_disk()?,
                None => 0,
            },
            ledger_bytes: self.ledger.size(),
        })
    }
}
