//! Bounds on the work one caller can make the server do at once, so that no tenant can
//! stall the others: every kind of work that holds a thread of tokio's blocking pool has
//! a pool of its own, bounded (exports, reads, erasures; argon2 has its own in
//! `tenancy::auth`), and together they stay well under the blocking pool's size. Exports
//! are also bounded per tenant, and the decrypted bytes reads hold at once are bounded
//! server-wide and per tenant. A call past a limit waits briefly, then gets
//! RESOURCE_EXHAUSTED with RetryInfo and a message naming the limit and its value.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `[work]` in the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkLimits {
    /// Exports streaming at once, server-wide.
    pub max_exports: usize,
    /// Exports streaming at once for one tenant.
    pub max_exports_per_tenant: usize,
    /// A reader that takes no export data for this long is given up on.
    pub export_stall_timeout_ms: u64,
    /// Reads (GetTranscript, ListTranscripts) running at once, server-wide and per tenant.
    pub max_concurrent_reads: usize,
    pub max_concurrent_reads_per_tenant: usize,
    /// Erasures running at once (each syncs the key volume), server-wide and per tenant.
    pub max_concurrent_erasures: usize,
    pub max_concurrent_erasures_per_tenant: usize,
    /// Response bytes GetTranscript calls hold at once until their responses are out,
    /// server-wide and per tenant: a transcript of the maximum size decrypts to tens of
    /// MiB, held twice (decrypted, then encoded), and both are counted.
    pub max_inflight_response_bytes: u64,
    pub max_inflight_response_bytes_per_tenant: u64,
    /// How long a call waits for a read, erasure or byte slot before RESOURCE_EXHAUSTED.
    pub busy_wait_ms: u64,
}

impl Default for WorkLimits {
    fn default() -> Self {
        WorkLimits {
            max_exports: 16,
            max_exports_per_tenant: 4,
            export_stall_timeout_ms: 5_000,
            max_concurrent_reads: 64,
            max_concurrent_reads_per_tenant: 32,
            max_concurrent_erasures: 16,
            max_concurrent_erasures_per_tenant: 4,
            max_inflight_response_bytes: 256 << 20,
            max_inflight_response_bytes_per_tenant: 96 << 20,
            busy_wait_ms: 1_000,
        }
    }
}

impl WorkLimits {
    /// Checks the limits against each other and against the largest response.
    pub fn validate(&self, max_response_bytes: u64) -> Result<(), String> {
        let need = max_response_bytes.saturating_mul(RESPONSE_COPIES);
        for (field, v) in [
            ("work.max_inflight_response_bytes", self.max_inflight_response_bytes),
            ("work.max_inflight_response_bytes_per_tenant", self.max_inflight_response_bytes_per_tenant),
        ] {
            if v < need {
                return Err(format!(
                    "{field} = {v} cannot hold one response of limits.max_response_bytes ({max_response_bytes}) \
                     twice over (decrypted and encoded): set it to at least {need}"
                ));
            }
        }
        Ok(())
    }
}

/// Bytes are counted in KiB permits, so a semaphore holds a large budget.
const UNIT: u64 = 1024;

/// The live pools of one server.
pub struct Work {
    cfg: WorkLimits,
    exports: Arc<Semaphore>,
    reads: Arc<Semaphore>,
    erasures: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    per_tenant: Mutex<HashMap<String, Tenant>>,
}

struct Tenant {
    exports: Arc<Semaphore>,
    reads: Arc<Semaphore>,
    erasures: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// A place in a tenant's pool and in the server's; freed on drop (move it into the
/// blocking closure, so that a caller going away does not free it early).
pub struct Slot {
    _tenant: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

/// An export's place in both of its pools; freed when the export ends.
pub struct ExportSlot {
    _global: OwnedSemaphorePermit,
    _tenant: OwnedSemaphorePermit,
    _open: crate::metrics::GaugeGuard,
}

/// Response bytes a read reserved, server-wide and for its tenant; freed on drop.
pub struct ByteBudget {
    global: Arc<Semaphore>,
    tenant: Arc<Semaphore>,
    held: Vec<OwnedSemaphorePermit>,
    held_units: u64,
    wait: Duration,
    limits: (u64, u64),
    handle: tokio::runtime::Handle,
}

impl Work {
    pub fn new(cfg: WorkLimits) -> Self {
        let permits = |n: usize| Arc::new(Semaphore::new(n.max(1)));
        let units =
            |bytes: u64| Arc::new(Semaphore::new(usize::try_from((bytes / UNIT).max(1)).unwrap_or(usize::MAX >> 4)));
        Work {
            exports: permits(cfg.max_exports),
            reads: permits(cfg.max_concurrent_reads),
            erasures: permits(cfg.max_concurrent_erasures),
            bytes: units(cfg.max_inflight_response_bytes),
            per_tenant: Mutex::new(HashMap::new()),
            cfg,
        }
    }

    fn tenant<T>(&self, tenant: &str, f: impl FnOnce(&Tenant) -> T) -> T {
        let mut map = self.per_tenant.lock().unwrap_or_else(|p| p.into_inner());
        let permits = |n: usize| Arc::new(Semaphore::new(n.max(1)));
        let t = map.entry(tenant.to_owned()).or_insert_with(|| Tenant {
            exports: permits(self.cfg.max_exports_per_tenant),
            reads: permits(self.cfg.max_concurrent_reads_per_tenant),
            erasures: permits(self.cfg.max_concurrent_erasures_per_tenant),
            bytes: Arc::new(Semaphore::new(
                usize::try_from((self.cfg.max_inflight_response_bytes_per_tenant / UNIT).max(1))
                    .unwrap_or(usize::MAX >> 4),
            )),
        });
        f(t)
    }

    /// A place for one more export of `tenant`, or RESOURCE_EXHAUSTED at once.
    pub fn export_slot(&self, tenant: &str) -> Result<ExportSlot, Status> {
        let tenant_sem = self.tenant(tenant, |t| t.exports.clone());
        let t = tenant_sem.try_acquire_owned().map_err(|_| {
            busy(
                "max_exports_per_tenant",
                format!("this tenant already has {} exports in progress", self.cfg.max_exports_per_tenant),
            )
        })?;
        let g = self.exports.clone().try_acquire_owned().map_err(|_| {
            busy("max_exports", format!("the server already has {} exports in progress", self.cfg.max_exports))
        })?;
        Ok(ExportSlot {
            _global: g,
            _tenant: t,
            _open: crate::metrics::GaugeGuard::inc(&crate::metrics::get().exports_open),
        })
    }

    /// How long a stalled export reader is waited for.
    pub fn export_stall(&self) -> Duration {
        Duration::from_millis(self.cfg.export_stall_timeout_ms.max(1))
    }

    /// A thread for one read of `tenant`, waited for up to `busy_wait_ms`. A tenant whose
    /// response bytes are all held (its clients take no responses) is refused at once, so
    /// its reads do not sit on slots waiting for bytes.
    pub async fn read_slot(&self, tenant: &str) -> Result<Slot, Status> {
        let (t, bytes) = self.tenant(tenant, |t| (t.reads.clone(), t.bytes.clone()));
        if bytes.available_permits() == 0 {
            return Err(bytes_exhausted(
                self.cfg.max_inflight_response_bytes,
                self.cfg.max_inflight_response_bytes_per_tenant,
            ));
        }
        let tenant_permit =
            self.slot(&t, "max_concurrent_reads_per_tenant", self.cfg.max_concurrent_reads_per_tenant).await?;
        let global = self.slot(&self.reads, "max_concurrent_reads", self.cfg.max_concurrent_reads).await?;
        Ok(Slot { _tenant: tenant_permit, _global: global })
    }

    /// A thread for one erasure of `tenant` (the operator's erasures count as a tenant of
    /// their own), waited for up to `busy_wait_ms`.
    pub async fn erasure_slot(&self, tenant: &str) -> Result<Slot, Status> {
        let t = self.tenant(tenant, |t| t.erasures.clone());
        let tenant_permit =
            self.slot(&t, "max_concurrent_erasures_per_tenant", self.cfg.max_concurrent_erasures_per_tenant).await?;
        let global = self.slot(&self.erasures, "max_concurrent_erasures", self.cfg.max_concurrent_erasures).await?;
        Ok(Slot { _tenant: tenant_permit, _global: global })
    }

    async fn slot(&self, sem: &Arc<Semaphore>, limit: &'static str, n: usize) -> Result<OwnedSemaphorePermit, Status> {
        match tokio::time::timeout(Duration::from_millis(self.cfg.busy_wait_ms), sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(busy(limit, format!("{n} are already running"))),
        }
    }

    /// An empty budget for one read of `tenant`, to reserve bytes from as they are decrypted.
    pub fn byte_budget(&self, tenant: &str) -> ByteBudget {
        ByteBudget {
            global: self.bytes.clone(),
            tenant: self.tenant(tenant, |t| t.bytes.clone()),
            held: Vec::new(),
            held_units: 0,
            wait: Duration::from_millis(self.cfg.busy_wait_ms),
            limits: (self.cfg.max_inflight_response_bytes, self.cfg.max_inflight_response_bytes_per_tenant),
            handle: tokio::runtime::Handle::current(),
        }
    }
}

impl ByteBudget {
    /// Makes sure `total` bytes are reserved (called from the blocking read as it goes,
    /// 64 KiB at a time). Errs, naming the limit, if they cannot be had in time.
    pub fn reserve(&mut self, total: usize) -> Result<(), String> {
        let want = (total as u64).saturating_mul(RESPONSE_COPIES).div_ceil(UNIT).div_ceil(64) * 64;
        if want <= self.held_units {
            return Ok(());
        }
        let more = u32::try_from(want - self.held_units).map_err(|_| "response too large".to_owned())?;
        let (global, tenant, wait) = (self.global.clone(), self.tenant.clone(), self.wait);
        let got = self.handle.block_on(async move {
            let t = tokio::time::timeout(wait, tenant.acquire_many_owned(more)).await.ok()?.ok()?;
            let g = tokio::time::timeout(wait, global.acquire_many_owned(more)).await.ok()?.ok()?;
            Some((t, g))
        });
        let Some((t, g)) = got else {
            crate::metrics::get().limit_hit("max_inflight_response_bytes");
            return Err(bytes_message(self.limits.0, self.limits.1));
        };
        self.held.push(t);
        self.held.push(g);
        crate::metrics::get().response_bytes_held.inc_by(i64::from(more) * UNIT as i64);
        self.held_units = want;
        Ok(())
    }
}

impl Drop for ByteBudget {
    fn drop(&mut self) {
        crate::metrics::get().response_bytes_held.dec_by(i64::try_from(self.held_units * UNIT).unwrap_or(0));
    }
}

/// A response is held decrypted and then encoded: both copies are counted.
const RESPONSE_COPIES: u64 = 2;

fn bytes_message(global: u64, tenant: u64) -> String {
    format!(
        "reads are holding their limit of response bytes (max_inflight_response_bytes {global} B, per tenant {tenant} B)"
    )
}

fn bytes_exhausted(global: u64, tenant: u64) -> Status {
    crate::metrics::get().limit_hit("max_inflight_response_bytes");
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("{}; retry shortly", bytes_message(global, tenant)),
        ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
    )
}

/// RESOURCE_EXHAUSTED with RetryInfo, naming the limit.
fn busy(limit: &'static str, what: String) -> Status {
    crate::metrics::get().limit_hit(limit);
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("{what} (limit {limit}); retry shortly"),
        ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exports_are_bounded_per_tenant_and_in_all() {
        let w = Work::new(WorkLimits { max_exports: 3, max_exports_per_tenant: 2, ..WorkLimits::default() });
        let a1 = w.export_slot("a").unwrap();
        let _a2 = w.export_slot("a").unwrap();
        let e = w.export_slot("a").err().unwrap();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.message().contains("max_exports_per_tenant"), "{}", e.message());
        let _b1 = w.export_slot("b").unwrap();
        let e = w.export_slot("c").err().unwrap();
        assert!(e.message().contains("max_exports") && e.message().contains('3'), "{}", e.message());
        drop(a1);
        assert!(w.export_slot("c").is_ok());
    }

    #[test]
    fn a_response_budget_smaller_than_the_largest_response_is_refused_naming_both() {
        let small = WorkLimits { max_inflight_response_bytes_per_tenant: 32 << 20, ..WorkLimits::default() };
        let e = small.validate(32 << 20).unwrap_err();
        assert!(
            e.contains("work.max_inflight_response_bytes_per_tenant") && e.contains("limits.max_response_bytes"),
            "{e}"
        );
        assert!(WorkLimits::default().validate(32 << 20).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn response_bytes_are_bounded_and_given_back() {
        let w = Arc::new(Work::new(WorkLimits {
            max_inflight_response_bytes: 1 << 20,
            max_inflight_response_bytes_per_tenant: 1 << 20,
            busy_wait_ms: 50,
            ..WorkLimits::default()
        }));
        let w2 = w.clone();
        tokio::task::spawn_blocking(move || {
            let mut first = w2.byte_budget("a");
            first.reserve(450 << 10).unwrap(); // counted twice: 900 KiB
            let mut second = w2.byte_budget("a");
            let e = second.reserve(200 << 10).err().unwrap();
            assert!(e.contains("max_inflight_response_bytes 1048576"), "{e}");
            drop(first);
            second.reserve(200 << 10).unwrap();
        })
        .await
        .unwrap();
    }
}
