//! Server configuration: a TOML file, overridden by flags and `CHATVAULT_*` variables.
//! Secrets are never config values: they come from files (mode 0600) or the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::Algorithm;
use crate::keys::RootKeySource;
use crate::store::Durability;
use crate::vault::{Limits, VaultOptions};

/// Environment variable holding the root key as 64 hex characters.
pub const ROOT_KEY_ENV: &str = "CHATVAULT_ROOT_KEY";
/// Environment variable holding a root passphrase (stretched with argon2id).
pub const ROOT_PASSPHRASE_ENV: &str = "CHATVAULT_ROOT_PASSPHRASE";
/// Name of the development root key generated into the key directory when no key is given.
pub const DEV_ROOT_KEY_FILE: &str = "dev-root.key";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the gRPC listener.
    pub listen: SocketAddr,
    /// sled database: transcripts, wrapped data keys. Back this up.
    pub data_dir: PathBuf,
    /// Key-store keys. Keep on its own small volume; never back it up together with the
    /// data beyond one rotation period (SECURITY.md).
    pub key_dir: PathBuf,
    /// File with the 32-byte root key (raw or hex). Else `CHATVAULT_ROOT_KEY`, else a passphrase.
    pub root_key_file: Option<PathBuf>,
    /// File with a root passphrase. Else `CHATVAULT_ROOT_PASSPHRASE`.
    pub root_passphrase_file: Option<PathBuf>,
    /// AEAD for new records; existing records keep the one they were written with.
    pub cipher: Algorithm,
    /// What an acknowledged write survives (see `store::Durability`).
    pub durability: Durability,
    /// Server-side deadline of every request.
    pub request_timeout_ms: u64,
    /// Largest gRPC request accepted.
    pub max_request_bytes: usize,
    /// Unwrapped keys kept in memory.
    pub key_cache_entries: usize,
    /// sled's page cache.
    pub store_cache_bytes: u64,
    /// How often to check whether a shred happened since the last key-store rotation
    /// and, if so, rotate. This bounds how long a pre-shred copy of the data stays
    /// decryptable with the live key directory. 0 disables scheduled rotation.
    pub rotation_check_interval_secs: u64,
    /// Pause between background reclaim passes over dead ciphertext.
    pub reclaim_interval_ms: u64,
    /// Dead ciphertext younger than this is left alone, so reads already in flight finish.
    pub reclaim_min_age_ms: u64,
    /// On SIGTERM, how long requests in flight may take before connections are dropped.
    pub shutdown_grace_ms: u64,
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("chatvault-data"),
            key_dir: PathBuf::from("chatvault-keys"),
            root_key_file: None,
            root_passphrase_file: None,
            cipher: Algorithm::default(),
            durability: Durability::default(),
            request_timeout_ms: 30_000,
            max_request_bytes: 8 * 1024 * 1024,
            key_cache_entries: 100_000,
            store_cache_bytes: 256 * 1024 * 1024,
            rotation_check_interval_secs: 3600,
            reclaim_interval_ms: 1000,
            reclaim_min_age_ms: 60_000,
            shutdown_grace_ms: 10_000,
            limits: Limits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    /// Where the root key comes from, in order of precedence; the development key last.
    pub fn root_key_source(&self) -> Result<RootKeySource, ConfigError> {
        if let Some(path) = &self.root_key_file {
            return Ok(RootKeySource::File(path.clone()));
        }
        if let Ok(hex) = std::env::var(ROOT_KEY_ENV) {
            return Ok(RootKeySource::Hex(Zeroizing::new(hex)));
        }
        if let Some(path) = &self.root_passphrase_file {
            return Ok(RootKeySource::PassphraseFile(path.clone()));
        }
        if let Ok(pass) = std::env::var(ROOT_PASSPHRASE_ENV) {
            return Ok(RootKeySource::Passphrase(Zeroizing::new(pass)));
        }
        Ok(RootKeySource::Development(self.key_dir.join(DEV_ROOT_KEY_FILE)))
    }

    pub fn vault_options(&self) -> Result<VaultOptions, ConfigError> {
        if self.max_request_bytes < 1024 {
            return Err(ConfigError::Invalid("max_request_bytes must be at least 1024".into()));
        }
        let mut opts = VaultOptions::new(self.data_dir.clone(), self.key_dir.clone(), self.root_key_source()?);
        opts.algorithm = self.cipher;
        opts.durability = self.durability;
        opts.limits = self.limits.clone();
        opts.key_cache_entries = self.key_cache_entries;
        opts.store_cache_bytes = self.store_cache_bytes;
        opts.reclaim_min_age_ms = self.reclaim_min_age_ms;
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_in_deploy_parses_and_unknown_keys_are_refused() {
        let text = include_str!("../deploy/chatvault.toml");
        let cfg: Config = toml::from_str(text).unwrap();
        assert_eq!(cfg.durability, Durability::Fsync);
        assert!(toml::from_str::<Config>("listne = \"1.2.3.4:1\"").is_err());
    }
}
