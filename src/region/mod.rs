//! Regions: the shards a tenant is pinned to (`eu`, `us`, ...). Each hosted region has
//! its own data directory, key directory and root key; nothing of one region's tenants
//! is ever written to another's. This module says which regions a node hosts and where
//! the others are served; the vault binds the region into every envelope it seals.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::keys::RootKeySource;

/// The development default of `chatvault serve` without a configuration: one process
/// hosting both.
pub const DEV_REGIONS: [&str; 2] = ["eu", "us"];

/// A region name: 1-32 of a-z 0-9 and `-`, starting with a letter. It leads API keys
/// (`cvk_<region>_...`), so it has no `_`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(()) } else { Err(format!("{name:?} is not a region name (1-32 of a-z 0-9 -, starting with a letter)")) }
}

/// `[regions.<name>]` in the configuration: one hosted region's own directories and root key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub data_dir: PathBuf,
    pub key_dir: PathBuf,
    /// File with this region's 32-byte root key. Else `root_passphrase_file`, else
    /// `CHATVAULT_ROOT_KEY_<NAME>` (or `..._PASSPHRASE_<NAME>`) in the environment.
    pub root_key_file: Option<PathBuf>,
    pub root_passphrase_file: Option<PathBuf>,
    /// Where the region's tree lives: `sled` (the default, in `data_dir`) or `postgres`.
    #[serde(default)]
    pub store: StoreKind,
    /// With `store = "postgres"`: a file holding the connection URL (it may hold a
    /// password); else `CHATVAULT_POSTGRES_URL_<NAME>` in the environment.
    #[serde(default)]
    pub postgres_url_file: Option<PathBuf>,
}

/// The engines a region's tree can live in.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Sled,
    Postgres,
}

/// One region this node hosts, resolved.
pub struct RegionSpec {
    pub name: String,
    pub data_dir: PathBuf,
    pub key_dir: PathBuf,
    pub root_key: RootKeySource,
    pub engine: crate::vault::Engine,
}

/// The environment variable holding `region`'s PostgreSQL URL.
pub fn postgres_url_env(region: &str) -> String {
    format!("CHATVAULT_POSTGRES_URL_{}", region.to_ascii_uppercase().replace('-', "_"))
}

/// The engine `[regions.<name>]` asks for, with its connection settings resolved.
pub fn engine_of(name: &str, r: &RegionConfig) -> Result<crate::vault::Engine, String> {
    match r.store {
        StoreKind::Sled => Ok(crate::vault::Engine::Sled),
        StoreKind::Postgres => {
            let url = match &r.postgres_url_file {
                // It may hold a password: refused, like a root key file, if others may read it.
                Some(f) => {
                    let bytes = crate::keys::read_secret_file(f)
                        .map_err(|e| format!("regions.{name}.postgres_url_file: {e}"))?;
                    String::from_utf8_lossy(&bytes).trim().to_owned()
                }
                None => std::env::var(postgres_url_env(name)).map_err(|_| {
                    format!(
                        "regions.{name}: store = \"postgres\" needs postgres_url_file or {}",
                        postgres_url_env(name)
                    )
                })?,
            };
            // Region names may hold `-`, table names not; `_` is never in a region name.
            let table = name.replace('-', "_");
            Ok(crate::vault::Engine::Postgres(crate::store::PgOptions::new(url, table)))
        }
    }
}

/// The environment variable holding `region`'s root key (64 hex characters).
pub fn root_key_env(region: &str) -> String {
    format!("CHATVAULT_ROOT_KEY_{}", region.to_ascii_uppercase().replace('-', "_"))
}

/// The environment variable holding `region`'s root passphrase.
pub fn root_passphrase_env(region: &str) -> String {
    format!("CHATVAULT_ROOT_PASSPHRASE_{}", region.to_ascii_uppercase().replace('-', "_"))
}

/// `region`'s own root key from the environment, if set there.
pub fn root_key_from_env(region: &str) -> Option<RootKeySource> {
    if let Ok(hex) = std::env::var(root_key_env(region)) {
        return Some(RootKeySource::Hex(Zeroizing::new(hex)));
    }
    std::env::var(root_passphrase_env(region)).ok().map(|p| RootKeySource::Passphrase(Zeroizing::new(p)))
}

/// Refuses two hosted regions sharing a directory (or one inside another's): each
/// region's files must be its own, so that a region's disk can be wiped, moved or
/// backed up alone.
pub fn check_apart(specs: &[RegionSpec]) -> Result<(), String> {
    // A region's data and key directories are checked against each other when the
    // vault opens (`layout_check`); here, each region against the others.
    let dirs: Vec<(&str, String, PathBuf)> = specs
        .iter()
        .flat_map(|s| {
            [
                (s.name.as_str(), format!("regions.{}.data_dir", s.name), normal(&s.data_dir)),
                (s.name.as_str(), format!("regions.{}.key_dir", s.name), normal(&s.key_dir)),
            ]
        })
        .collect();
    for (i, (ra, a, pa)) in dirs.iter().enumerate() {
        for (rb, b, pb) in &dirs[i + 1..] {
            if ra != rb && (pa.starts_with(pb) || pb.starts_with(pa)) {
                return Err(format!(
                    "{a} ({}) and {b} ({}) overlap: every region keeps its own directories",
                    pa.display(),
                    pb.display()
                ));
            }
        }
    }
    Ok(())
}

/// Refuses two regions served at the same endpoint.
pub fn check_endpoints(endpoints: &BTreeMap<String, String>) -> Result<(), String> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (region, url) in endpoints {
        check_name(region).map_err(|e| format!("region_endpoints: {e}"))?;
        if url.trim().is_empty() {
            return Err(format!("region_endpoints.{region}: empty"));
        }
        if let Some(other) = seen.insert(url.trim_end_matches('/'), region) {
            return Err(format!("region_endpoints: {other} and {region} both point at {url}"));
        }
    }
    Ok(())
}

/// A path made absolute and without `.`/`..`, for comparing.
fn normal(p: &Path) -> PathBuf {
    crate::store::files::folded(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, data: &str, keys: &str) -> RegionSpec {
        RegionSpec {
            name: name.into(),
            data_dir: data.into(),
            key_dir: keys.into(),
            root_key: RootKeySource::Development(PathBuf::from(keys).join("k")),
            engine: crate::vault::Engine::Sled,
        }
    }

    #[test]
    fn region_names_are_short_lowercase_and_have_no_underscore() {
        for ok in ["eu", "us", "ap-south-1", "x"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "EU", "e_u", "1eu", "eu ", &"a".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn two_regions_on_one_directory_are_refused() {
        let ok = [spec("eu", "/d/eu", "/k/eu"), spec("us", "/d/us", "/k/us")];
        assert!(check_apart(&ok).is_ok());
        let same = [spec("eu", "/d/x", "/k/eu"), spec("us", "/d/./x", "/k/us")];
        let e = check_apart(&same).unwrap_err();
        assert!(e.contains("regions.eu.data_dir") && e.contains("regions.us.data_dir"), "{e}");
        let nested = [spec("eu", "/d", "/k/eu"), spec("us", "/d/us", "/k/us")];
        assert!(check_apart(&nested).is_err());
        let crossed = [spec("eu", "/d/eu", "/k/eu"), spec("us", "/d/us", "/k/eu/../eu")];
        assert!(check_apart(&crossed).unwrap_err().contains("regions.us.key_dir"));
        // One region's own pair is the vault's check, with its own message.
        assert!(check_apart(&[spec("eu", "/d", "/d/keys")]).is_ok());
    }

    #[test]
    fn two_regions_at_one_endpoint_are_refused() {
        let mut m = BTreeMap::new();
        m.insert("eu".to_string(), "http://a:1".to_string());
        m.insert("us".to_string(), "http://b:1".to_string());
        assert!(check_endpoints(&m).is_ok());
        m.insert("ap".to_string(), "http://a:1/".to_string());
        assert!(check_endpoints(&m).unwrap_err().contains("both point at"));
        let mut bad = BTreeMap::new();
        bad.insert("E U".to_string(), "http://a:1".to_string());
        assert!(check_endpoints(&bad).unwrap_err().contains("region_endpoints"));
    }
}
