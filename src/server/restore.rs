//! `chatvault restore`: a backup (`chatvault backup`) put back as the data directory,
//! with the erasure ledger replayed into it before anything can serve it. The copy is
//! made beside the data directory and checked there; only a copy that opened cleanly
//! takes the data directory's place, so a refused restore leaves every file as it was.

use std::fs;
use std::path::Path;

use super::{Node, ServerError};
use crate::config::Config;
use crate::vault::BackupManifest;

/// Restores the backup in `from` as the data directory of the one region the
/// configuration names (which must not exist, or be empty), for that region's key
/// directory. Returns the manifest it restored.
pub async fn restore(mut config: Config, from: &Path) -> Result<BackupManifest, ServerError> {
    let refuse = |why: String| Err(ServerError::Refused(why));
    let mut spec = one_sled_region(&config, "restore")?;
    let manifest = BackupManifest::read(from)?;
    if !spec.key_dir.join("keydir.meta").exists() {
        return refuse(format!(
            "{} is not a key directory: a backup is restored next to the key directory it was taken with",
            spec.key_dir.display()
        ));
    }
    let target = spec.data_dir.clone();
    if target.exists() && fs::read_dir(&target).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return refuse(format!("the data directory {} exists and is not empty; move it aside first", target.display()));
    }
    let staging = target.with_extension("restoring");
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| ServerError::Refused(format!("{}: {e}", staging.display())))?;
    }
    let io = |e: std::io::Error| ServerError::Refused(format!("copying the backup: {e}"));
    copy_tree(&from.join("data"), &staging).map_err(io)?;
    spec.data_dir = staging.clone();
    config.replay_erasures = true;
    let opened = Node::open(&config, &spec).await;
    let node = match opened {
        Ok(node) => node,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    node.vault.sync()?;
    node.vault.checkpoint_ledger(node.audit.durable_head())?;
    drop(node);
    if target.exists() {
        fs::remove_dir(&target).map_err(io)?;
    }
    fs::rename(&staging, &target).map_err(io)?;
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::store::files::sync_dir(parent).map_err(io)?;
    }
    tracing::info!(from = %from.display(), data_dir = %target.display(), "backup restored");
    Ok(manifest)
}

/// The one region an offline command acts on: the configuration must name it when the
/// node hosts several.
pub fn one_region(config: &Config, what: &str) -> Result<crate::region::RegionSpec, ServerError> {
    let mut specs = config.region_specs()?;
    if specs.len() != 1 {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        return Err(ServerError::Refused(format!(
            "{what} acts on one region; this configuration hosts {}: name one with --region",
            names.join(", ")
        )));
    }
    Ok(specs.remove(0))
}

/// The one region `config` names, refused if its tree is in a database: `what` works on a
/// sled data directory (the database has its own backup and repair tools).
pub fn one_sled_region(config: &Config, what: &str) -> Result<crate::region::RegionSpec, ServerError> {
    let spec = one_region(config, what)?;
    if matches!(spec.engine, crate::vault::Engine::Postgres(_)) {
        return Err(ServerError::Refused(format!(
            "region {}'s data is in PostgreSQL: {what} works on sled data directories; use the database's own \
             tools (pg_basebackup, PITR, amcheck), keeping the key directory's backups apart",
            spec.name
        )));
    }
    Ok(spec)
}

/// Copies the directory tree `from` to `to` (created 0700; files 0600, synced).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    crate::store::files::private_dir(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            crate::store::files::copy_prefix(&src, &dst, entry.metadata()?.len())?;
        }
    }
    crate::store::files::sync_dir(to)
}
