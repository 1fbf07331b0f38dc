//! Server configuration: a TOML file, overridden by flags and `CHATVAULT_*` variables.
//! Secrets are never config values: they come from files (mode 0600) or the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::Algorithm;
use crate::grpc::{ConnectionLimits, WorkLimits};
use crate::keys::RootKeySource;
use crate::region::RegionSpec;
use crate::store::Durability;
use crate::tenancy::{AuthConfig, OperatorToken};
use crate::vault::{Limits, VaultOptions};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Environment variable holding the root key as 64 hex characters.
pub const ROOT_KEY_ENV: &str = "CHATVAULT_ROOT_KEY";
/// Environment variable holding a root passphrase (stretched with argon2id).
pub const ROOT_PASSPHRASE_ENV: &str = "CHATVAULT_ROOT_PASSPHRASE";
/// Name of the development root key generated into the key directory when no key is given.
pub const DEV_ROOT_KEY_FILE: &str = "dev-root.key";
/// Environment variable holding the operator token of the admin API.
pub const OPERATOR_TOKEN_ENV: &str = "CHATVAULT_OPERATOR_TOKEN";
/// Name of the development operator token generated into the key directory when none is given.
pub const DEV_OPERATOR_TOKEN_FILE: &str = "dev-operator.token";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the gRPC listener for tenants' data calls.
    pub listen: SocketAddr,
    /// Address of the admin listener. Keep it on loopback or a management network.
    pub admin_listen: SocketAddr,
    /// Address of the Prometheus endpoint (`GET /metrics`, plain HTTP); none to turn it off.
    /// It shows counts and latencies, no tenant or subject id; keep it on loopback or a
    /// management network.
    pub metrics_listen: Option<SocketAddr>,
    /// A listener without TLS on an address other than loopback is refused unless this is
    /// set: API keys and transcripts would cross the network in clear.
    pub allow_plaintext_non_loopback: bool,
    /// File with the operator token (mode 0600). Else `CHATVAULT_OPERATOR_TOKEN`, else a
    /// generated development token in the key directory.
    pub operator_token_file: Option<PathBuf>,
    /// The region served from `data_dir` / `key_dir` and the root key below, or, with
    /// `[regions.*]`, the one of them this node hosts (`serve --region`). With neither
    /// (the development default) the node hosts `eu` and `us` in `data_dir/<region>`
    /// and `key_dir/<region>`.
    pub region: Option<String>,
    /// Regions with their own directories and root keys (`[regions.eu]`, `[regions.us]`).
    pub regions: std::collections::BTreeMap<String, crate::region::RegionConfig>,
    /// Where regions this node does not host are served: a call for one of their
    /// tenants is answered FAILED_PRECONDITION naming the region and this endpoint.
    pub region_endpoints: std::collections::BTreeMap<String, String>,
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
    /// Server-side deadline of every request; for an export, the longest a reader may
    /// take no data before the export is stopped (DEADLINE_EXCEEDED).
    pub request_timeout_ms: u64,
    /// Largest gRPC request accepted.
    pub max_request_bytes: usize,
    /// Entries of each in-memory cache (unwrapped keys; per transcript its message
    /// count, body record and subject hint).
    pub key_cache_entries: usize,
    /// sled's page cache.
    pub store_cache_bytes: u64,
    /// How often to check whether a shred happened since the last key-store rotation
    /// and, if so, rotate. This bounds how long a pre-shred copy of the data stays
    /// decryptable with the live key directory. 0 disables scheduled rotation.
    pub rotation_check_interval_secs: u64,
    /// Pause between background reclaim passes over dead ciphertext.
    pub reclaim_interval_ms: u64,
    /// How often retention runs (closing idle chats, purging expired ones); 0: only when
    /// asked (`RunRetention`).
    pub retention_interval_secs: u64,
    /// Audit records are kept this many days, then pruned by whole segments at a
    /// retention run; 0 keeps them for ever.
    pub audit_retention_days: u64,
    /// Size of one audit segment: the unit of pruning.
    pub audit_segment_bytes: u64,
    /// Dead ciphertext younger than this is left alone, so reads already in flight finish.
    pub reclaim_min_age_ms: u64,
    /// Size at which a value-log segment (message ciphertext) is closed; compaction
    /// rewrites one segment at a time once half of it is dead.
    pub value_segment_bytes: u64,
    /// Sealed messages smaller than this stay inline in sled instead of the value log.
    pub inline_values_below: usize,
    /// How often sled is made durable up to the value log (its write-ahead log): the
    /// most a start after a crash replays. Commits never wait for it.
    pub checkpoint_interval_ms: u64,
    /// On SIGTERM, how long requests in flight may take before connections are dropped.
    pub shutdown_grace_ms: u64,
    /// After a region's storage failed a durable sync (a full volume sled hit, an I/O
    /// error), the server exits this many seconds later, so that its supervisor (systemd
    /// `Restart=on-failure`, Kubernetes) restarts it and it recovers from what is on disk;
    /// 0 keeps it up, NOT_SERVING, until restarted by hand.
    pub storage_failure_exit_secs: u64,
    /// Lock the whole process in memory (`mlockall`), so that no key, and no message being
    /// served, is ever written to swap. Needs `CAP_IPC_LOCK` or an `RLIMIT_MEMLOCK` above
    /// what the process uses (systemd `LimitMEMLOCK=infinity`): a start where it fails is
    /// refused. Off by default, since the limit is 8 MiB on most systems.
    pub lock_memory: bool,
    pub limits: Limits,
    /// API key verification, allowlists, trusted proxies, lockout.
    pub auth: AuthConfig,
    /// Bounds on work in progress, so no tenant can stall the others (`grpc::limits`).
    pub work: WorkLimits,
    /// Bounds on each listener's connections (`grpc::connections`).
    pub connections: ConnectionLimits,
    /// TLS of the data listener; plaintext when absent.
    pub tls: Option<TlsFiles>,
    /// TLS of the admin listener; plaintext when absent.
    pub admin_tls: Option<TlsFiles>,
    /// Bring a data directory the erasure ledger says was rolled back forward, instead of
    /// refusing to start (`serve --replay-erasures`, `chatvault restore`). Never from the
    /// file: a choice made once, by an operator who knows a backup was restored.
    #[serde(skip)]
    pub replay_erasures: bool,
    /// Start on a value log damaged where writes were acknowledged, cutting it there
    /// (`serve --accept-damage`). Never from the file, for the same reason.
    #[serde(skip)]
    pub accept_damage: bool,
}

/// PEM files of one listener's TLS. With `client_ca_file`, clients must present a
/// certificate signed by that CA (mutual TLS).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

impl TlsFiles {
    pub fn server_config(&self) -> Result<ServerTlsConfig, ConfigError> {
        let read = |path: &Path| std::fs::read(path).map_err(|source| ConfigError::Read { path: path.into(), source });
        let cert = read(&self.cert_file)?;
        let key = crate::keys::read_secret_file(&self.key_file).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(cert, key.as_slice()));
        if let Some(ca) = &self.client_ca_file {
            cfg = cfg.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(cfg)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 50053))),
            allow_plaintext_non_loopback: false,
            operator_token_file: None,
            region: None,
            regions: Default::default(),
            region_endpoints: Default::default(),
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
            retention_interval_secs: 300,
            audit_retention_days: 0,
            audit_segment_bytes: crate::audit::SEGMENT_BYTES,
            reclaim_min_age_ms: 60_000,
            value_segment_bytes: crate::vault::DEFAULT_VALUE_SEGMENT_BYTES,
            checkpoint_interval_ms: crate::store::CHECKPOINT_EVERY.as_millis() as u64,
            inline_values_below: 0,
            shutdown_grace_ms: 10_000,
            storage_failure_exit_secs: 10,
            lock_memory: false,
            limits: Limits::default(),
            auth: AuthConfig::default(),
            work: WorkLimits::default(),
            connections: ConnectionLimits::default(),
            tls: None,
            admin_tls: None,
            replay_erasures: false,
            accept_damage: false,
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

    /// The admin API's operator token, and the path of a development token if that is
    /// what is in use (generated on first start).
    pub fn operator_token(&self) -> Result<(OperatorToken, Option<PathBuf>), ConfigError> {
        let bad = |e: String| ConfigError::Invalid(format!("operator token: {e}"));
        let (path, dev) = match (&self.operator_token_file, std::env::var(OPERATOR_TOKEN_ENV)) {
            (Some(path), _) => (path.clone(), false),
            (None, Ok(text)) => return Ok((OperatorToken::new(&Zeroizing::new(text)).map_err(bad)?, None)),
            (None, Err(_)) => {
                let path = self.key_dir.join(DEV_OPERATOR_TOKEN_FILE);
                crate::keys::create_dev_secret(&path).map_err(|e| bad(e.to_string()))?;
                (path, true)
            }
        };
        let bytes = crate::keys::read_secret_file(&path).map_err(|e| bad(e.to_string()))?;
        let text = std::str::from_utf8(&bytes).map_err(|_| bad(format!("{}: not UTF-8", path.display())))?;
        Ok((OperatorToken::new(text).map_err(bad)?, dev.then_some(path)))
    }

    /// Refuses a listener that would speak plaintext off loopback, unless allowed; warns
    /// when it is allowed.
    pub fn check_listeners(&self) -> Result<(), ConfigError> {
        for (name, addr, tls) in
            [("listen", self.listen, self.tls.is_some()), ("admin_listen", self.admin_listen, self.admin_tls.is_some())]
        {
            if tls || addr.ip().is_loopback() {
                continue;
            }
            if !self.allow_plaintext_non_loopback {
                return Err(ConfigError::Invalid(format!(
                    "{name} = {addr} is not loopback and has no TLS: API keys and transcripts would cross the \
                     network in clear. Configure [{}] or set allow_plaintext_non_loopback = true",
                    if name == "listen" { "tls" } else { "admin_tls" }
                )));
            }
            tracing::warn!(%addr, listener = name, "serving plaintext on a non-loopback address (allowed by configuration)");
        }
        if let Some(addr) = self.metrics_listen.filter(|a| !a.ip().is_loopback()) {
            tracing::warn!(%addr, "the metrics endpoint is not on loopback: keep it on a management network");
        }
        Ok(())
    }

    /// The regions this node hosts, resolved and checked: names, directories apart, each
    /// with a root key of its own.
    pub fn region_specs(&self) -> Result<Vec<RegionSpec>, ConfigError> {
        use crate::region::{self, DEV_REGIONS, RegionSpec};
        let bad = ConfigError::Invalid;
        if let Some(name) = &self.region {
            region::check_name(name).map_err(|e| bad(format!("region: {e}")))?;
        }
        for name in self.regions.keys() {
            region::check_name(name).map_err(|e| bad(format!("regions: {e}")))?;
        }
        region::check_endpoints(&self.region_endpoints).map_err(bad)?;
        let from_table = |name: &str, r: &crate::region::RegionConfig| {
            let root_key = match (&r.root_key_file, &r.root_passphrase_file) {
                (Some(_), Some(_)) => {
                    return Err(bad(format!(
                        "regions.{name}: root_key_file and root_passphrase_file both set; give one"
                    )));
                }
                (Some(f), None) => RootKeySource::File(f.clone()),
                (None, Some(f)) => RootKeySource::PassphraseFile(f.clone()),
                (None, None) => region::root_key_from_env(name).ok_or_else(|| {
                    bad(format!(
                        "regions.{name}: no root key: set root_key_file, root_passphrase_file or {}",
                        region::root_key_env(name)
                    ))
                })?,
            };
            Ok::<_, ConfigError>(RegionSpec {
                name: name.to_owned(),
                data_dir: r.data_dir.clone(),
                key_dir: r.key_dir.clone(),
                root_key,
                engine: region::engine_of(name, r).map_err(bad)?,
            })
        };
        let specs = match (&self.region, self.regions.is_empty()) {
            (Some(name), false) => {
                let r = self.regions.get(name).ok_or_else(|| {
                    let known: Vec<&str> = self.regions.keys().map(String::as_str).collect();
                    bad(format!("region: {name:?} is not one of the configured regions ({})", known.join(", ")))
                })?;
                vec![from_table(name, r)?]
            }
            (None, false) => self.regions.iter().map(|(n, r)| from_table(n, r)).collect::<Result<_, _>>()?,
            (Some(name), true) => vec![RegionSpec {
                name: name.clone(),
                data_dir: self.data_dir.clone(),
                key_dir: self.key_dir.clone(),
                root_key: self.root_key_source()?,
                engine: crate::vault::Engine::Sled,
            }],
            (None, true) => {
                // Development default: both regions under the given folders, each with
                // its own development root key unless one is set for it.
                if self.root_key_file.is_some() || self.root_passphrase_file.is_some() {
                    return Err(bad(
                        "root_key_file / root_passphrase_file name one root key, but the development default hosts \
                         two regions (eu, us): set region = \"eu\" (serve --region eu) for one region, or \
                         [regions.*] with a root key each"
                            .into(),
                    ));
                }
                if std::env::var_os(ROOT_KEY_ENV).is_some() || std::env::var_os(ROOT_PASSPHRASE_ENV).is_some() {
                    return Err(bad(format!(
                        "{ROOT_KEY_ENV} names one root key, but the development default hosts two regions (eu, \
                         us): start with --region eu for one region, or set {} and {}",
                        region::root_key_env("eu"),
                        region::root_key_env("us")
                    )));
                }
                for (what, dir, marker) in
                    [("data_dir", &self.data_dir, "db"), ("key_dir", &self.key_dir, "keydir.meta")]
                {
                    if dir.join(marker).exists() {
                        return Err(bad(format!(
                            "{what} {} holds a single-region directory from before regions: name its region \
                             (serve --region eu, or region = \"eu\" in the configuration)",
                            dir.display()
                        )));
                    }
                }
                DEV_REGIONS
                    .iter()
                    .map(|name| RegionSpec {
                        name: (*name).to_owned(),
                        data_dir: self.data_dir.join(name),
                        key_dir: self.key_dir.join(name),
                        root_key: region::root_key_from_env(name).unwrap_or_else(|| {
                            RootKeySource::Development(self.key_dir.join(name).join(DEV_ROOT_KEY_FILE))
                        }),
                        engine: crate::vault::Engine::Sled,
                    })
                    .collect()
            }
        };
        region::check_apart(&specs).map_err(bad)?;
        Ok(specs)
    }

    pub fn vault_options(&self, spec: &RegionSpec) -> Result<VaultOptions, ConfigError> {
        self.work.validate(self.limits.max_response_bytes as u64).map_err(ConfigError::Invalid)?;
        if self.max_request_bytes < 1024 {
            return Err(ConfigError::Invalid("max_request_bytes must be at least 1024".into()));
        }
        let mut opts = VaultOptions::new(spec.data_dir.clone(), spec.key_dir.clone(), spec.root_key.clone());
        opts.region = spec.name.clone();
        opts.algorithm = self.cipher;
        opts.durability = self.durability;
        opts.limits = self.limits.clone();
        opts.key_cache_entries = self.key_cache_entries;
        opts.store_cache_bytes = self.store_cache_bytes;
        opts.reclaim_min_age_ms = self.reclaim_min_age_ms;
        if self.value_segment_bytes < 4096 {
            return Err(ConfigError::Invalid("value_segment_bytes must be at least 4096".into()));
        }
        opts.value_segment_bytes = self.value_segment_bytes;
        if self.checkpoint_interval_ms < 10 {
            return Err(ConfigError::Invalid("checkpoint_interval_ms must be at least 10".into()));
        }
        opts.checkpoint_every = std::time::Duration::from_millis(self.checkpoint_interval_ms);
        opts.inline_values_below = self.inline_values_below;
        opts.replay_erasures = self.replay_erasures;
        opts.accept_damage = self.accept_damage;
        opts.engine = spec.engine.clone();
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
        // "Defaults shown": the example says what a server without it does.
        let d = Config::default();
        assert_eq!((cfg.metrics_listen, cfg.allow_plaintext_non_loopback), (d.metrics_listen, false));
        assert_eq!(cfg.auth.lockout, d.auth.lockout);
        assert_eq!(cfg.work, d.work);
        assert_eq!(cfg.connections, d.connections);
        assert!(toml::from_str::<Config>("listne = \"1.2.3.4:1\"").is_err());
    }

    #[test]
    fn plaintext_off_loopback_is_refused_unless_allowed() {
        let mut c = Config { listen: "0.0.0.0:50051".parse().unwrap(), ..Config::default() };
        let e = c.check_listeners().unwrap_err().to_string();
        assert!(e.contains("listen = 0.0.0.0:50051") && e.contains("allow_plaintext_non_loopback"), "{e}");
        c.allow_plaintext_non_loopback = true;
        assert!(c.check_listeners().is_ok());
        let admin = Config { admin_listen: "[::]:50052".parse().unwrap(), ..Config::default() };
        assert!(admin.check_listeners().unwrap_err().to_string().contains("admin_tls"));
        assert!(Config::default().check_listeners().is_ok());
    }

    #[test]
    fn region_settings_that_cannot_serve_are_refused_naming_the_field() {
        let bad = |toml: &str| toml::from_str::<Config>(toml).unwrap().region_specs().err().unwrap().to_string();
        assert!(bad("region = \"EU\"").starts_with("region:"));
        assert!(
            bad("[regions.E_U]\ndata_dir = \"/d\"\nkey_dir = \"/k\"\nroot_key_file = \"/r\"").starts_with("regions:")
        );
        let two = "[regions.eu]\ndata_dir = \"/d/eu\"\nkey_dir = \"/k/eu\"\nroot_key_file = \"/r/eu\"\n\
                   [regions.us]\ndata_dir = \"/d/us\"\nkey_dir = \"/k/us\"\nroot_key_file = \"/r/us\"\n";
        let ok: Config = toml::from_str(two).unwrap();
        assert_eq!(ok.region_specs().unwrap().iter().map(|s| s.name.clone()).collect::<Vec<_>>(), ["eu", "us"]);
        let one = Config { region: Some("us".into()), ..ok.clone() };
        assert_eq!(one.region_specs().unwrap()[0].data_dir, PathBuf::from("/d/us"));
        let missing = Config { region: Some("ap".into()), ..ok.clone() };
        assert!(
            missing.region_specs().err().unwrap().to_string().contains("not one of the configured regions (eu, us)")
        );
        assert!(bad(&two.replace("/d/us", "/d/eu")).contains("overlap"));
        let keyless = two.replace("root_key_file = \"/r/us\"\n", "");
        assert!(bad(&keyless).contains("regions.us: no root key") && bad(&keyless).contains("CHATVAULT_ROOT_KEY_US"));
        assert!(
            bad(&format!("{two}[region_endpoints]\nap = \"http://a:1\"\nsa = \"http://a:1\"\n"))
                .contains("both point at")
        );
        let both = two.replace("root_key_file = \"/r/us\"", "root_key_file = \"/r/us\"\nroot_passphrase_file = \"/p\"");
        assert!(bad(&both).contains("regions.us: root_key_file and root_passphrase_file"));
        let dev_with_one_key = Config { root_key_file: Some("/r".into()), ..Config::default() };
        assert!(dev_with_one_key.region_specs().err().unwrap().to_string().contains("two regions"));
    }
}
