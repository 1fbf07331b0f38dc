//! The running server: opens the vault, starts the background workers (key rotation,
//! reclaim), serves gRPC, and shuts all of it down cleanly on SIGTERM / Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tonic_health::ServingStatus;

use crate::audit::{AnchorCheck, AuditError, AuditLog};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError};
use crate::grpc::{self, Admin, Gate, ServeError, ServeOptions};
use crate::tenancy::{Authenticator, Registry, TenancyError};
use crate::vault::{Vault, VaultError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("tenant registry: {0}")]
    Tenancy(#[from] TenancyError),
    #[error("audit trail: {0}")]
    Audit(#[from] AuditError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    /// A check at start failed; the text says what and what to do.
    #[error("{0}")]
    Refused(String),
}

pub async fn run(config: Config) -> Result<(), ServerError> {
    let opts = config.vault_options()?;
    let dev_key = matches!(opts.root_key, crate::keys::RootKeySource::Development(_));
    let (vault, report) = tokio::task::spawn_blocking(move || Vault::open(opts))
        .await
        .map_err(|e| VaultError::Internal(e.to_string()))??;
    let vault = Arc::new(vault);
    if let Some(path) = &report.generated_dev_key {
        tracing::warn!(path = %path.display(), "GENERATED A DEVELOPMENT ROOT KEY");
    }
    if dev_key {
        eprintln!(
            "\n  WARNING: chatvault is running on a DEVELOPMENT root key stored next to the data\n  \
             ({}). Anyone with this folder can read everything.\n  \
             For production set root_key_file, {} or a passphrase (see README).\n",
            config.key_dir.join(crate::config::DEV_ROOT_KEY_FILE).display(),
            crate::config::ROOT_KEY_ENV
        );
    }
    let (token, dev_token) = config.operator_token()?;
    if let Some(path) = &dev_token {
        eprintln!(
            "  WARNING: the admin API uses a DEVELOPMENT operator token ({}).\n  \
             For production set operator_token_file or {}.\n",
            path.display(),
            crate::config::OPERATOR_TOKEN_ENV
        );
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = vault.shared_store();
    let registry = Arc::new(Registry::open(
        store.clone(),
        vault.clone(),
        vault.control_key(b"chatvault/control/tenant-registry/v1"),
        vault.algorithm(),
    )?);
    let audit = Arc::new(AuditLog::open(
        &config.data_dir.join("audit"),
        store.as_ref(),
        vault.control_key(b"chatvault/control/audit-chain/v1"),
        clock.clone(),
    )?);
    check_audit_anchor(&vault, &audit, config.replay_erasures)?;
    vault.attach_durable(audit.clone());
    let auth = Arc::new(Authenticator::new(registry.clone(), config.auth.clone())?);
    let gate = Arc::new(Gate::new(vault.clone(), auth, audit.clone()));
    let admin =
        Admin { registry, vault: vault.clone(), audit: audit.clone(), token, key_hash: config.auth.key_hash, clock };
    let tls = |t: &Option<crate::config::TlsFiles>| t.as_ref().map(|t| t.server_config()).transpose();
    let serve_opts = ServeOptions {
        max_message_bytes: config.max_request_bytes,
        request_timeout: Duration::from_millis(config.request_timeout_ms.max(1)),
        tls: tls(&config.tls)?,
    };
    let admin_opts = ServeOptions { tls: tls(&config.admin_tls)?, ..serve_opts.clone() };

    let bind = |addr: std::net::SocketAddr| async move {
        let l = TcpListener::bind(addr).await.map_err(|source| ServerError::Listen { addr, source })?;
        let local = l.local_addr().map_err(|source| ServerError::Listen { addr, source })?;
        Ok::<_, ServerError>((l, local))
    };
    let (listener, addr) = bind(config.listen).await?;
    let (admin_listener, admin_addr) = bind(config.admin_listen).await?;
    tracing::info!(%addr, %admin_addr, data_dir = %config.data_dir.display(), key_dir = %config.key_dir.display(),
        epoch = vault.key_epoch(), durability = ?config.durability, "chatvault serving");
    // Handlers go in before the ready line: a SIGHUP or SIGTERM sent the moment the server
    // says it is ready must find them, not the default action (terminate).
    let hup = signal(SignalKind::hangup()).map_err(ServerError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServerError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServerError::Signal)?;
    // Scripts and tests wait for these exact lines on stdout; the data line comes last.
    println!("chatvault admin listening on {admin_addr}");
    println!("chatvault listening on {addr}");

    let (stop_tx, stop_rx) = watch::channel(false);
    let admin_health = tonic_health::server::HealthReporter::new();
    let workers = [
        tokio::spawn(rotation_worker(
            vault.clone(),
            config.rotation_check_interval_secs,
            admin_health.clone(),
            stop_rx.clone(),
        )),
        tokio::spawn(reclaim_worker(vault.clone(), config.reclaim_interval_ms, stop_rx.clone())),
        tokio::spawn(rotate_on_sighup(vault.clone(), hup, stop_rx.clone())),
        tokio::spawn(ledger_worker(vault.clone(), audit.clone(), stop_rx.clone())),
    ];
    let (drain_tx, drain_rx) = watch::channel(false);
    let drained = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|d| *d).await;
    };
    let admin_task =
        tokio::spawn(grpc::serve_admin(admin, admin_listener, admin_opts, admin_health, drained(drain_rx.clone())));
    let serve = grpc::serve(gate, listener, serve_opts, drained(drain_rx));
    tokio::pin!(serve);
    let served = tokio::select! {
        r = &mut serve => r,
        _ = async { tokio::select! { _ = sigterm.recv() => {}, _ = sigint.recv() => {} } } => {
            tracing::info!("shutting down: finishing requests in flight");
            let _ = drain_tx.send(true);
            let grace = Duration::from_millis(config.shutdown_grace_ms);
            match tokio::time::timeout(grace, &mut serve).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("shutdown grace period over; dropping remaining connections");
                    Ok(())
                }
            }
        }
    };
    let _ = drain_tx.send(true);
    match tokio::time::timeout(Duration::from_millis(config.shutdown_grace_ms), admin_task).await {
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "admin listener failed"),
        Ok(_) => {}
        Err(_) => tracing::warn!("admin listener did not stop within the grace period"),
    }
    let _ = stop_tx.send(true);
    for w in workers {
        let _ = w.await;
    }
    vault.sync()?;
    // The ledger hears that everything is durable, and where the trail ends.
    vault.checkpoint_ledger(audit.durable_head())?;
    served?;
    Ok(())
}

/// The audit trail must still hold the head the erasure ledger anchored: if records were
/// cut off (or the trail rolled back with its data directory), start only when the
/// operator accepts the loss, which is then recorded and reported by `verify`.
fn check_audit_anchor(vault: &Vault, audit: &AuditLog, replay: bool) -> Result<(), ServerError> {
    audit.accept_gaps(vault.accepted_audit_gaps()?);
    let Some(anchor) = vault.anchored_audit_head()? else { return Ok(()) };
    match audit.check_anchor(anchor)? {
        AnchorCheck::Holds => Ok(()),
        AnchorCheck::Behind { last } if replay => {
            let gap = audit.continue_after(anchor, vault.now().micros())?;
            vault.record_audit_gap(gap)?;
            audit.accept_gaps(vault.accepted_audit_gaps()?);
            tracing::warn!(
                from = gap.from,
                to = gap.to,
                last,
                "audit trail: records lost in the restore accepted; \
                the chain goes on from the anchored record"
            );
            Ok(())
        }
        AnchorCheck::Behind { last } => Err(ServerError::Refused(format!(
            "the audit trail ends at record {last}, but record {} was durable in it (anchored in the erasure ledger): \
             records were removed, or the data directory was restored from a backup. To accept the loss, start \
             once with --replay-erasures",
            anchor.seq
        ))),
        AnchorCheck::Differs => Err(ServerError::Refused(format!(
            "audit record {} is not the one the erasure ledger anchored: the trail was replaced or altered",
            anchor.seq
        ))),
    }
}

/// Tells the erasure ledger, off the request path, which erasures are durable in the
/// data directory (each second, when any were), and where the audit trail's durable head
/// is (each minute, when it moved): what a rollback is later measured against.
async fn ledger_worker(vault: Arc<Vault>, audit: Arc<AuditLog>, mut stop: watch::Receiver<bool>) {
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
async fn stopped(stop: &mut watch::Receiver<bool>, period: Duration) -> bool {
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
async fn rotation_worker(
    vault: Arc<Vault>,
    every_secs: u64,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let every = Duration::from_secs(every_secs.max(1));
    let mut since_check = Duration::ZERO;
    loop {
        let failures = vault.rotation_health().consecutive_failures;
        let status = if failures == 0 { ServingStatus::Serving } else { ServingStatus::NotServing };
        health.set_service_status(grpc::ERASURE_HEALTH, status).await;
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
async fn rotate_on_sighup(vault: Arc<Vault>, mut hup: tokio::signal::unix::Signal, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = hup.recv() => {
                rotate(&vault).await;
            }
            _ = stop.changed() => return,
        }
    }
}

/// Removes dead ciphertext in small steps, so it never competes long with requests, then
/// compacts the value log.
async fn reclaim_worker(vault: Arc<Vault>, every_ms: u64, mut stop: watch::Receiver<bool>) {
    let pause = Duration::from_millis(every_ms.max(1));
    while !stopped(&mut stop, pause).await {
        loop {
            let v = vault.clone();
            match tokio::task::spawn_blocking(move || v.reclaim(1000)).await {
                Ok(Ok(0)) => {
                    // Dead records are gone: now the value-log space they held can go too.
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
