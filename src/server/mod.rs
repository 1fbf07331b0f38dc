//! The running server: opens the node (vault, registry, audit trail), starts the
//! background workers (key rotation, reclaim, ledger checkpoints), serves gRPC, and shuts
//! all of it down cleanly on SIGTERM / Ctrl-C.

mod check;
mod harden;
mod node;
mod restore;
mod workers;

pub use check::{CheckReport, RepairReport, check, repair};
pub use harden::harden_process;
pub use node::Node;
pub use restore::{one_region, restore};
use workers::{
    denials_worker, ledger_worker, reclaim_worker, retention_worker, rotate_on_sighup, rotation_worker, storage_worker,
};

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
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
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
    if config.lock_memory {
        harden::lock_memory().map_err(ServerError::Refused)?;
        tracing::info!("the process is locked in memory (lock_memory): nothing of it is swapped out");
    }
    let specs = config.region_specs()?;
    for spec in &specs {
        for (dir, what) in [(&spec.data_dir, "data_dir"), (&spec.key_dir, "key_dir")] {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty() && specs.len() > 1) {
                crate::store::files::private_dir(parent)
                    .map_err(|e| ServerError::Refused(format!("{}: {e}", parent.display())))?;
            }
            harden::close_directory(dir, what).map_err(ServerError::Refused)?;
        }
    }
    // Every region is checked, reading only, before any is opened: a start refused for
    // one region writes nothing in another.
    let mut checks: Vec<([u8; 16], &str)> = Vec::new();
    for spec in &specs {
        let check = crate::keys::FileKeyDir::preflight(&spec.key_dir, &spec.root_key, &spec.name)
            .map_err(|e| ServerError::Refused(format!("region {}: {e}", spec.name)))?;
        if let Some(check) = check {
            if let Some((_, other)) = checks.iter().find(|(c, _)| *c == check) {
                return Err(ServerError::Refused(format!(
                    "regions {other} and {} have the same root key: every region needs its own",
                    spec.name
                )));
            }
            checks.push((check, &spec.name));
        }
    }
    let (token, dev_token) = config.operator_token()?;
    let mut nodes = Vec::new();
    for spec in &specs {
        let dev_key = matches!(spec.root_key, crate::keys::RootKeySource::Development(_));
        let node = Node::open(&config, spec).await?;
        if let Some(path) = &node.report.generated_dev_key {
            tracing::warn!(region = %spec.name, path = %path.display(), "GENERATED A DEVELOPMENT ROOT KEY");
        }
        if dev_key {
            eprintln!(
                "\n  WARNING: region {} runs on a DEVELOPMENT root key stored next to the data\n  \
                 ({}). Anyone with this folder can read everything.\n  \
                 For production set root_key_file, {} or a passphrase (see README).\n",
                spec.name,
                spec.key_dir.join(crate::config::DEV_ROOT_KEY_FILE).display(),
                if config.region.is_some() && config.regions.is_empty() {
                    crate::config::ROOT_KEY_ENV.to_owned()
                } else {
                    crate::region::root_key_env(&spec.name)
                }
            );
        }
        nodes.push(node);
    }
    if let Some(path) = &dev_token {
        eprintln!(
            "  WARNING: the admin API uses a DEVELOPMENT operator token ({}).\n  \
             For production set operator_token_file or {}.\n",
            path.display(),
            crate::config::OPERATOR_TOKEN_ENV
        );
    }
    let work = Arc::new(grpc::Work::new(config.work.clone()));
    let mut gates = std::collections::BTreeMap::new();
    let mut admin_regions = Vec::new();
    for n in &nodes {
        let auth = Arc::new(Authenticator::new(n.registry.clone(), config.auth.clone())?);
        gates.insert(n.region.clone(), Arc::new(Gate::new(n.vault.clone(), auth, n.audit.clone(), work.clone())));
        let purger = Arc::new(
            crate::retention::Purger::new(n.vault.clone(), n.registry.clone(), n.audit.clone())?
                .keeping_audit_for(config.audit_retention_days),
        );
        admin_regions.push(Arc::new(grpc::AdminRegion {
            name: n.region.clone(),
            registry: n.registry.clone(),
            vault: n.vault.clone(),
            audit: n.audit.clone(),
            purger,
        }));
    }
    let endpoints: std::collections::BTreeMap<String, String> = config
        .region_endpoints
        .iter()
        .filter(|(r, _)| !gates.contains_key(*r))
        .map(|(r, u)| (r.clone(), u.clone()))
        .collect();
    let regions = Arc::new(grpc::Regions::new(gates, endpoints.clone(), work.clone()));
    let admin_guard = grpc::AdminGuard::new(config.auth.lockout);
    let admin = Admin {
        guard: admin_guard.clone(),
        work,
        regions: admin_regions.clone(),
        endpoints,
        token,
        key_hash: config.auth.key_hash,
        clock: nodes[0].clock.clone(),
        creating: std::sync::Mutex::new(()),
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
    for n in &nodes {
        tracing::info!(%addr, %admin_addr, region = %n.region, data_dir = %n.vault.data_dir().display(),
            epoch = n.vault.key_epoch(), durability = ?config.durability, "chatvault serving");
    }
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
    let failing = Arc::new(tokio::sync::Mutex::new(std::collections::BTreeSet::new()));
    let mut workers = Vec::new();
    for (n, a) in nodes.iter().zip(&admin_regions) {
        let (vault, audit) = (n.vault.clone(), n.audit.clone());
        workers.push(tokio::spawn(rotation_worker(
            vault.clone(),
            n.region.clone(),
            config.rotation_check_interval_secs,
            admin_health.clone(),
            failing.clone(),
            stop_rx.clone(),
        )));
        workers.push(tokio::spawn(reclaim_worker(vault.clone(), config.reclaim_interval_ms, stop_rx.clone())));
        workers.push(tokio::spawn(ledger_worker(vault, audit, stop_rx.clone())));
        workers.push(tokio::spawn(retention_worker(a.purger.clone(), config.retention_interval_secs, stop_rx.clone())));
    }
    let vaults: Vec<_> = nodes.iter().map(|n| n.vault.clone()).collect();
    workers.push(tokio::spawn(rotate_on_sighup(vaults.clone(), hup, stop_rx.clone())));
    let named = nodes.iter().map(|n| (n.region.clone(), n.vault.clone())).collect();
    let give_up = Arc::new(tokio::sync::Notify::new());
    let exit_after =
        (config.storage_failure_exit_secs > 0).then(|| Duration::from_secs(config.storage_failure_exit_secs));
    workers.push(tokio::spawn(storage_worker(
        named,
        admin_health.clone(),
        exit_after,
        give_up.clone(),
        stop_rx.clone(),
    )));
    workers.push(tokio::spawn(denials_worker(regions.clone(), admin.flusher(), stop_rx.clone())));
    let (drain_tx, drain_rx) = watch::channel(false);
    let drained = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|d| *d).await;
    };
    let admin_task =
        tokio::spawn(grpc::serve_admin(admin, admin_listener, admin_opts, admin_health, drained(drain_rx.clone())));
    if let Some((l, _)) = metrics_listener {
        let refresh = observed(nodes.iter().map(|n| (n.vault.clone(), n.audit.clone())).collect());
        tokio::spawn(crate::metrics::serve(l, refresh, drained(drain_rx.clone())));
    }
    let serve = grpc::serve(regions, listener, serve_opts, drained(drain_rx));
    tokio::pin!(serve);
    let mut storage_failed = false;
    let served = tokio::select! {
        r = &mut serve => r,
        _ = async {
            tokio::select! {
                _ = sigterm.recv() => {},
                _ = sigint.recv() => {},
                _ = give_up.notified() => storage_failed = true,
            }
        } => {
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
    // Every region is synced and checkpointed, whichever fails: the first error is told.
    let mut closed = Ok(());
    for n in &nodes {
        // The ledger hears that everything is durable, and where the trail ends.
        let r = n.vault.sync().and_then(|()| n.vault.checkpoint_ledger(n.audit.durable_head()).map(|_| ()));
        if let Err(e) = r {
            tracing::error!(region = %n.region, error = %e, "closing the region failed");
            if closed.is_ok() {
                closed = Err(e);
            }
        }
    }
    served?;
    if storage_failed {
        return Err(ServerError::Refused(
            "storage failed a durable sync (see above); exited so that the supervisor restarts the server, which \
             recovers from what is on disk"
                .into(),
        ));
    }
    closed?;
    Ok(())
}

/// What a scrape reads fresh from every region's vault and audit trail (summed: the
/// metrics name no tenant, and the erasure health names the failing region).
fn observed(regions: Vec<(Arc<crate::vault::Vault>, Arc<crate::audit::AuditLog>)>) -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(move || {
        let m = crate::metrics::get();
        let (mut pending, mut oldest, mut due, mut failures, mut epochs) = (0u64, 0i64, 0i64, 0i64, 0i64);
        let (mut garbage, mut dead, mut index, mut values, mut ledger, mut trail) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        for (vault, audit) in &regions {
            if let Ok(o) = vault.erasure_overview() {
                pending += o.pending_erasures;
                let age = o.oldest_pending_at.map(|t| (vault.now().micros() - t.micros()) / 1_000_000).unwrap_or(0);
                oldest = oldest.max(age);
                due += i64::from(o.rotation_due);
                failures = failures.max(i64::from(o.rotation.consecutive_failures));
                epochs = epochs.max(i64::from(o.live_epochs));
            }
            if let Ok(b) = vault.maintenance_backlog() {
                garbage += b.garbage_records;
                dead += b.dead_value_bytes;
                index += b.index_bytes;
                values += b.value_bytes;
                ledger += b.ledger_bytes;
            }
            if let Ok(files) = audit.files_with_lengths() {
                trail += files.iter().map(|(_, n)| n).sum::<u64>();
            }
        }
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        m.erasures_pending.set(int(pending));
        m.oldest_pending_erasure_seconds.set(oldest.max(0));
        m.rotation_due.set(due);
        m.rotation_failures.set(failures);
        m.key_store_epochs.set(epochs);
        m.reclaim_backlog_records.set(int(garbage));
        m.value_log_dead_bytes.set(int(dead));
        m.disk(crate::metrics::Area::Index, index);
        m.disk(crate::metrics::Area::Values, values);
        m.disk(crate::metrics::Area::Ledger, ledger);
        m.disk(crate::metrics::Area::Audit, trail);
    })
}
