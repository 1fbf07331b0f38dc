//! The server's background work: key rotation (scheduled, retried, on SIGHUP), reclaim
//! and compaction, and the erasure ledger's checkpoints. Each is a task with a stop signal.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;

use crate::audit::AuditLog;
use crate::grpc;
use crate::vault::Vault;

/// Tells the erasure ledger, off the request path, which erasures are durable in the
/// data directory (each second, when any were), and where the audit trail's durable head
/// is (each minute, when it moved): what a rollback is later measured against.
pub(super) async fn ledger_worker(vault: Arc<Vault>, audit: Arc<AuditLog>, mut stop: watch::Receiver<bool>) {
    let mut ticks = 0u64;
    while !stopped(&mut stop, Duration::from_secs(1)).await {
        ticks += 1;
        let head = if ticks.is_multiple_of(60) { audit.durable_head() } else { None };
        let v = vault.clone();
        match tokio::task::spawn_blocking(move || v.checkpoint_ledger(head)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "erasure ledger checkpoint failed"),
            Err(e) => tracing::error!(error = %e, "erasure ledger checkpoint panicked"),
        }
    }
}

/// Sleeps `period`, or returns true early when asked to stop.
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>, period: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

async fn rotate(vault: &Arc<Vault>) -> bool {
    let v = vault.clone();
    match tokio::task::spawn_blocking(move || v.rotate_key_store()).await {
        Ok(Ok(report)) => {
            tracing::info!(?report, "key-store rotated");
            true
        }
        Ok(Err(e)) => {
            let failures = vault.rotation_health().consecutive_failures;
            let retry = Vault::rotation_retry_delay(failures);
            tracing::error!(error = %e, failures, retry_in_secs = retry.as_secs(),
                "key-store rotation failed; erasures stay pending until it succeeds");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "key-store rotation panicked");
            false
        }
    }
}

/// Rotates the key-store key when an erasure is not final yet: checked every
/// `every_secs`, and a rotation that failed is retried with backoff (from 1 s, at most
/// 5 min) until it succeeds. The admin listener's erasure health says which it is.
pub(super) async fn rotation_worker(
    vault: Arc<Vault>,
    region: String,
    every_secs: u64,
    health: tonic_health::server::HealthReporter,
    failing: Arc<tokio::sync::Mutex<std::collections::BTreeSet<String>>>,
    mut stop: watch::Receiver<bool>,
) {
    let every = Duration::from_secs(every_secs.max(1));
    let mut since_check = Duration::ZERO;
    let regional = format!("{}.{region}", grpc::ERASURE_HEALTH);
    loop {
        let failures = vault.rotation_health().consecutive_failures;
        let status = |ok: bool| if ok { ServingStatus::Serving } else { ServingStatus::NotServing };
        // Per region, and in all: NOT_SERVING while any hosted region's rotation fails.
        // Held across both reports, so one region's stale answer never overwrites another's.
        {
            let mut set = failing.lock().await;
            if failures == 0 {
                set.remove(&region);
            } else {
                set.insert(region.clone());
            }
            health.set_service_status(&regional, status(failures == 0)).await;
            health.set_service_status(grpc::ERASURE_HEALTH, status(set.is_empty())).await;
        }
        // A failing rotation is retried on its own schedule, even with scheduled checks off.
        let wait = if failures > 0 {
            Vault::rotation_retry_delay(failures)
        } else if every_secs == 0 {
            Duration::from_secs(1)
        } else {
            every.saturating_sub(since_check).min(Duration::from_secs(1))
        };
        if stopped(&mut stop, wait).await {
            return;
        }
        since_check += wait;
        if failures == 0 && (every_secs == 0 || since_check < every) {
            continue;
        }
        since_check = Duration::ZERO;
        match vault.rotation_due() {
            Ok(true) => {
                rotate(&vault).await;
            }
            // Nothing pending any more (another attempt finished it): not failing.
            Ok(false) => vault.clear_rotation_failures(),
            Err(e) => tracing::error!(error = %e, "cannot tell whether a rotation is due"),
        }
    }
}

/// `kill -HUP` rotates the key-store key now: erasure made final on demand.
pub(super) async fn rotate_on_sighup(
    vaults: Vec<Arc<Vault>>,
    mut hup: tokio::signal::unix::Signal,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = hup.recv() => {
                for vault in &vaults {
                    rotate(vault).await;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// Removes dead ciphertext in small steps, so it never competes long with requests, then
/// compacts the value log.
pub(super) async fn reclaim_worker(vault: Arc<Vault>, every_ms: u64, mut stop: watch::Receiver<bool>) {
    let pause = Duration::from_millis(every_ms.max(1));
    while !stopped(&mut stop, pause).await {
        loop {
            let v = vault.clone();
            match tokio::task::spawn_blocking(move || v.reclaim(1000)).await {
                Ok(Ok(0)) => {
                    // Dead records are gone: small messages are packed into chunks, then
                    // the value-log space both left can go too.
                    pack(&vault, &mut stop).await;
                    let v = vault.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || v.compact_values()).await {
                        tracing::error!(error = %e, "value log compaction failed");
                    }
                    break;
                }
                Ok(Ok(_)) if !*stop.borrow() => continue,
                Ok(Ok(_)) => return,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "reclaim failed");
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

/// Runs of packing per reclaim round: a queue that keeps filling does not hold back
/// reclaim and compaction.
const PACK_RUNS: usize = 16;

/// Packs queued groups of messages until none is left, the round's runs are used, or
/// the server stops.
async fn pack(vault: &Arc<Vault>, stop: &mut watch::Receiver<bool>) {
    for _ in 0..PACK_RUNS {
        if *stop.borrow() {
            return;
        }
        let v = vault.clone();
        match tokio::task::spawn_blocking(move || v.pack_messages(64)).await {
            Ok(Ok(run)) => {
                let m = crate::metrics::get();
                m.groups_packed.inc_by(run.packed as u64);
                m.groups_left_unpacked.inc_by(run.damaged as u64);
                if run.settled == 0 {
                    return;
                }
                tokio::task::yield_now().await;
            }
            Err(_) => return,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "packing messages failed");
                return;
            }
        }
    }
}

/// Writes the aggregates of refused calls (data and admin listeners) as their windows
/// close, and whatever is left at shutdown.
pub(super) async fn denials_worker(
    gate: Arc<crate::grpc::Regions>,
    admin: Arc<dyn Fn(bool) + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stopping = stopped(&mut stop, Duration::from_secs(10)).await;
        gate.flush_denials(stopping);
        admin(stopping);
        if stopping {
            return;
        }
    }
}

/// Runs retention every `every_secs` (0: only when asked through the admin API).
pub(super) async fn retention_worker(
    purger: Arc<crate::retention::Purger>,
    every_secs: u64,
    mut stop: watch::Receiver<bool>,
) {
    if every_secs == 0 {
        return;
    }
    while !stopped(&mut stop, Duration::from_secs(every_secs)).await {
        match purger.run().await {
            Ok(r) if r.purged + r.closed > 0 => {
                tracing::info!(purged = r.purged, closed = r.closed, held = r.held, "retention run")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "retention run failed; retried at the next interval"),
        }
    }
}

/// Reports on the admin listener's health whether every region's storage still syncs:
/// after a failed sync (a full volume sled hit, an I/O error) writes are refused, and the
/// server's overall health turns NOT_SERVING so that its supervisor (the liveness probe,
/// `chatvault health`) restarts it, which recovers from what is on disk once the volume
/// has room again.
pub(super) async fn storage_worker(
    vaults: Vec<(String, Arc<Vault>)>,
    health: tonic_health::server::HealthReporter,
    exit_after: Option<Duration>,
    give_up: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut reported = None;
    let mut failed_since = None;
    loop {
        let failed: Vec<&str> = vaults.iter().filter(|(_, v)| v.storage_failed()).map(|(r, _)| r.as_str()).collect();
        let ok = failed.is_empty();
        if !ok {
            let since = *failed_since.get_or_insert_with(std::time::Instant::now);
            if exit_after.is_some_and(|after| since.elapsed() >= after) {
                tracing::error!(regions = ?failed, "storage failed; exiting so that the supervisor restarts the server");
                give_up.notify_one();
                return;
            }
        }
        if reported != Some(ok) {
            if !ok {
                tracing::error!(regions = ?failed, "storage failed a durable sync; writes are refused until a restart");
            }
            let status = if ok { ServingStatus::Serving } else { ServingStatus::NotServing };
            health.set_service_status("", status).await;
            health.set_service_status(grpc::STORAGE_HEALTH, status).await;
            reported = Some(ok);
        }
        if stopped(&mut stop, Duration::from_secs(1)).await {
            return;
        }
    }
}
