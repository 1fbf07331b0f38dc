//! Opening a node's state: the vault (keys, erasure ledger, data), the tenant registry
//! and the audit trail, each checked against the erasure ledger. Shared by `serve` and
//! `restore`.

use std::path::Path;
use std::sync::Arc;

use super::ServerError;
use crate::audit::{AnchorCheck, AuditLog};
use crate::clock::Clock;
use crate::config::Config;
use crate::keys::OpenReport;
use crate::region::RegionSpec;
use crate::tenancy::Registry;
use crate::vault::{Vault, VaultError};

/// Everything a node serves from, opened and reconciled.
pub struct Node {
    pub region: String,
    pub vault: Arc<Vault>,
    pub registry: Arc<Registry>,
    pub audit: Arc<AuditLog>,
    pub clock: Arc<dyn Clock>,
    pub report: OpenReport,
}

impl Node {
    /// Opens the vault (refusing a rolled-back data directory unless `replay_erasures`),
    /// then the registry and the audit trail on top of it.
    pub async fn open(config: &Config, spec: &RegionSpec) -> Result<Node, ServerError> {
        let opts = config.vault_options(spec)?;
        let clock = crate::clock::server_clock();
        let (vault, report) = open_vault_retrying(&spec.name, opts, clock.clone()).await?;
        let vault = Arc::new(vault);
        let store = vault.shared_store();
        let registry = Arc::new(Registry::open(
            store.clone(),
            vault.clone(),
            vault.control_key(b"chatvault/control/tenant-registry/v1"),
            vault.algorithm(),
            vault.binding().clone(),
        )?);
        let audit = Arc::new(AuditLog::open_sized(
            &audit_dir(&spec.data_dir),
            store.as_ref(),
            vault.control_key(b"chatvault/control/audit-chain/v1"),
            clock.clone(),
            config.audit_segment_bytes.max(4096),
            config.accept_damage,
        )?);
        check_audit_anchor(&vault, &audit, config.replay_erasures)?;
        vault.attach_durable(audit.clone());
        vault.attach_holds(registry.clone());
        Ok(Node { region: spec.name.clone(), vault, registry, audit, clock, report })
    }
}

/// How long a start waits for a region's database to answer before it gives up.
const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Opens the vault; while its store is unavailable (a database not up yet, or failing
/// over), tries again with a growing pause, up to [`STORE_WAIT`]. Nothing is served
/// meanwhile: the listeners start only once every region is open, never half-open.
async fn open_vault_retrying(
    region: &str,
    opts: crate::vault::VaultOptions,
    clock: Arc<dyn Clock>,
) -> Result<(Vault, OpenReport), ServerError> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(500);
    loop {
        let (o, c) = (opts.clone(), clock.clone());
        let opened = tokio::task::spawn_blocking(move || Vault::open_with_clock(o, c))
            .await
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        match opened {
            Err(VaultError::Store(crate::store::StoreError::Unavailable(why))) if started.elapsed() < STORE_WAIT => {
                tracing::warn!(region, error = %why, retry_in_ms = pause.as_millis() as u64,
                    "the region's store is unavailable; not serving yet, retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(15));
            }
            other => return Ok(other?),
        }
    }
}

/// Where a data directory keeps its audit trail.
pub fn audit_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("audit")
}

/// The audit trail must still hold the head the erasure ledger anchored: if records were
/// cut off (or the trail rolled back with its data directory), start only when the
/// operator accepts the loss, which is then recorded and reported by `verify`.
pub(super) fn check_audit_anchor(vault: &Vault, audit: &AuditLog, replay: bool) -> Result<(), ServerError> {
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
