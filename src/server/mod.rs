//! The running server: opens the node (vault, registry, audit trail), starts the
//! background workers (key rotation, reclaim, ledger checkpoints), serves gRPC, and shuts
//! all of it down cleanly on SIGTERM / Ctrl-C.

mod node;
mod restore;
mod workers;

pub use node::Node;
pub use restore::restore;
use workers::{ledger_worker, reclaim_worker, rotate_on_sighup, rotation_worker};

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
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    /// A check at start failed; the text says what and what to do.
    #[error("{0}")]
    Refused(String),
}

pub async fn run(config: Config) -> Result<(), ServerError> {
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
