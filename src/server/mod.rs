//! The running server: opens the node (vault, registry, audit trail), starts the
//! background workers (key rotation, reclaim, ledger checkpoints), serves gRPC, and shuts
//! all of it down cleanly on SIGTERM / Ctrl-C.

mod harden;
mod node;
mod restore;
mod workers;

pub use harden::harden_process;
pub use node::Node;
pub use restore::restore;
use workers::{denials_worker, ledger_worker, reclaim_worker, retention_worker, rotate_on_sighup, rotation_worker};

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::audit::AuditError;
use crate::config::{Config, ConfigError};
use crate::grpc::{self, Admin, Gate, ServeError, ServeOptions};
use crate::tenancy::{Authenticator, TenancyError};
use crate::vault::VaultError;

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
    #[error("retention: {0}")]
    Retention(#[from] crate::retention::RetentionError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    /// A check at start failed; the text says what and what to do.
    #[error("{0}")]
    Refused(String),
}

pub async fn run(config: Config) -> Result<(), ServerError> {
    config.check_listeners()?;
    harden::close_directory(&config.data_dir, "data_dir").map_err(ServerError::Refused)?;
    harden::close_directory(&config.key_dir, "key_dir").map_err(ServerError::Refused)?;
    let dev_key = matches!(config.root_key_source()?, crate::keys::RootKeySource::Development(_));
    let Node { vault, registry, audit, clock, report } = Node::open(&config).await?;
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
    let auth = Arc::new(Authenticator::new(registry.clone(), config.auth.clone())?);
    let work = Arc::new(grpc::Work::new(config.work.clone()));
    let gate = Arc::new(Gate::new(vault.clone(), auth, audit.clone(), work.clone()));
    let admin_guard = grpc::AdminGuard::new(config.auth.lockout);
    let purger = Arc::new(
        crate::retention::Purger::new(vault.clone(), registry.clone(), audit.clone())?
            .keeping_audit_for(config.audit_retention_days),
    );
    let admin = Admin {
        guard: admin_guard.clone(),
        work,
        registry,
        vault: vault.clone(),
        audit: audit.clone(),
        token,
        key_hash: config.auth.key_hash,
        clock,
        purger: purger.clone(),
    };
    let tls = |t: &Option<crate::config::TlsFiles>| t.as_ref().map(|t| t.server_config()).transpose();
    let serve_opts = ServeOptions {
        name: "data",
        max_message_bytes: config.max_request_bytes,
        request_timeout: Duration::from_millis(config.request_timeout_ms.max(1)),
        tls: tls(&config.tls)?,
        connections: config.connections.clone(),
    };
    let admin_opts = ServeOptions { name: "admin", tls: tls(&config.admin_tls)?, ..serve_opts.clone() };

    let bind = |addr: std::net::SocketAddr| async move {
        let l = TcpListener::bind(addr).await.map_err(|source| ServerError::Listen { addr, source })?;
        let local = l.local_addr().map_err(|source| ServerError::Listen { addr, source })?;
        Ok::<_, ServerError>((l, local))
    };
    let (listener, addr) = bind(config.listen).await?;
    let (admin_listener, admin_addr) = bind(config.admin_listen).await?;
    let metrics_listener = match config.metrics_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    tracing::info!(%addr, %admin_addr, data_dir = %config.data_dir.display(), key_dir = %config.key_dir.display(),
        epoch = vault.key_epoch(), durability = ?config.durability, "chatvault serving");
    // Handlers go in before the ready line: a SIGHUP or SIGTERM sent the moment the server
    // says it is ready must find them, not the default action (terminate).
    let hup = signal(SignalKind::hangup()).map_err(ServerError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServerError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServerError::Signal)?;
    // Scripts and tests wait for these exact lines on stdout; the data line comes last.
    if let Some((_, metrics_addr)) = &metrics_listener {
        println!("chatvault metrics listening on {metrics_addr}");
    }
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
        tokio::spawn(retention_worker(purger, config.retention_interval_secs, stop_rx.clone())),
        tokio::spawn(denials_worker(gate.clone(), admin.flusher(), stop_rx.clone())),
    ];
    let (drain_tx, drain_rx) = watch::channel(false);
    let drained = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|d| *d).await;
    };
    let admin_task =
        tokio::spawn(grpc::serve_admin(admin, admin_listener, admin_opts, admin_health, drained(drain_rx.clone())));
    if let Some((l, _)) = metrics_listener {
        let refresh = observed(vault.clone(), audit.clone());
        tokio::spawn(crate::metrics::serve(l, refresh, drained(drain_rx.clone())));
    }
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

/// What a scrape reads fresh from the vault and the audit trail.
fn observed(vault: Arc<crate::vault::Vault>, audit: Arc<crate::audit::AuditLog>) -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(move || {
        let m = crate::metrics::get();
        if let Ok(o) = vault.erasure_overview() {
            m.erasures_pending.set(i64::try_from(o.pending_erasures).unwrap_or(i64::MAX));
            let age = o.oldest_pending_at.map(|t| (vault.now().micros() - t.micros()) / 1_000_000).unwrap_or(0);
            m.oldest_pending_erasure_seconds.set(age.max(0));
            m.rotation_due.set(i64::from(o.rotation_due));
            m.rotation_failures.set(i64::from(o.rotation.consecutive_failures));
            m.key_store_epochs.set(i64::from(o.live_epochs));
        }
        if let Ok(b) = vault.maintenance_backlog() {
            m.reclaim_backlog_records.set(i64::try_from(b.garbage_records).unwrap_or(i64::MAX));
            m.value_log_dead_bytes.set(i64::try_from(b.dead_value_bytes).unwrap_or(i64::MAX));
            m.disk(crate::metrics::Area::Index, b.index_bytes);
            m.disk(crate::metrics::Area::Values, b.value_bytes);
            m.disk(crate::metrics::Area::Ledger, b.ledger_bytes);
        }
        if let Ok(files) = audit.files_with_lengths() {
            m.disk(crate::metrics::Area::Audit, files.iter().map(|(_, n)| n).sum());
        }
    })
}
