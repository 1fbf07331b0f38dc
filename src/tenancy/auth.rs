//! Authentication of data calls: API key → tenant, checked against the tenant's state and
//! allowlist on every request. argon2 runs only on a cache miss, a few at a time, and
//! never for an address or key id that is locked out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::apikey::{self, KeyHashParams, KeyId};
use super::cidr::Cidr;
use super::lockout::{Culprit, Lockout, LockoutConfig, Refusal};
use super::model::TenantStatus;
use super::registry::Registry;
use super::source::{ClientAddress, client_address};
use crate::crypto::{SecretKey, blind_index};
use crate::vault::TenantId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// How long a verified key is trusted without argon2 again. Revocation, suspension
    /// and allowlist changes still apply at once: they are checked on every request.
    pub cache_ttl_secs: u64,
    /// argon2 verifications running at once; the rest wait (bounded by `verify_wait_ms`).
    pub max_concurrent_verifications: usize,
    pub verify_wait_ms: u64,
    /// What an empty allowlist means: false (default) denies every address.
    pub empty_allowlist_allows_all: bool,
    /// Load balancers whose `x-forwarded-for` is believed (CIDRs).
    pub trusted_proxies: Vec<String>,
    /// argon2id cost of newly issued API keys.
    pub key_hash: KeyHashParams,
    pub lockout: LockoutConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            cache_ttl_secs: 300,
            max_concurrent_verifications: 2,
            verify_wait_ms: 2000,
            empty_allowlist_allows_all: false,
            trusted_proxies: Vec::new(),
            key_hash: KeyHashParams::default(),
            lockout: LockoutConfig::default(),
        }
    }
}

/// Who a verified request acts for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub tenant: TenantId,
    pub key_id: KeyId,
    pub source: IpAddr,
}

/// Why a request was refused. None of these says whether another tenant or key exists.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing credentials: send `authorization: Bearer <API key>`")]
    Missing,
    #[error("malformed authorization header: expected `Bearer cvk_<key id>_<secret>`")]
    Malformed,
    /// Unknown key id and wrong secret look the same from outside.
    #[error("API key not recognised")]
    Unrecognised,
    #[error("API key has been revoked")]
    Revoked,
    #[error("tenant is suspended")]
    Suspended,
    #[error("source address {ip} is not on this tenant's allowlist{}",
        if *.forwarded_ignored { " (x-forwarded-for ignored: the peer is not a trusted proxy)" } else { "" })]
    SourceDenied { ip: IpAddr, forwarded_ignored: bool },
    #[error("too many failed authentications; retry in {}s", .retry_after.as_secs().max(1))]
    LockedOut { retry_after: Duration },
    #[error("too many API key verifications from this address (auth.lockout.verify_per_minute); retry in {}s",
        .retry_after.as_secs().max(1))]
    Throttled { retry_after: Duration },
    #[error("authentication is busy; retry shortly")]
    Busy,
    #[error("{0}")]
    BadForwardedFor(String),
    #[error("authentication failed on a server fault")]
    Internal,
}

impl AuthError {
    /// A short stable name, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Unrecognised => "unrecognised",
            AuthError::Revoked => "revoked",
            AuthError::Suspended => "suspended",
            AuthError::SourceDenied { .. } => "source_denied",
            AuthError::LockedOut { .. } => "locked_out",
            AuthError::Throttled { .. } => "throttled",
            AuthError::Busy => "busy",
            AuthError::BadForwardedFor(_) => "bad_forwarded_for",
            AuthError::Internal => "internal",
        }
    }
}

/// A refusal with what is known of the attempt, for the audit trail.
#[derive(Debug)]
pub struct Denied {
    pub error: AuthError,
    pub key_id: Option<KeyId>,
    pub tenant: Option<TenantId>,
    pub source: IpAddr,
    /// Key ids and addresses this attempt just locked out.
    pub locked: Vec<Culprit>,
}

struct Cached {
    key_id: KeyId,
    expires: Instant,
}

pub struct Authenticator {
    registry: Arc<Registry>,
    cfg: AuthConfig,
    trusted: Vec<Cidr>,
    lockout: Lockout,
    verify_slots: Arc<Semaphore>,
    /// argon2 working memory, one per slot, reused: memory stays bounded by the slots.
    verify_memory: Arc<Mutex<Vec<Vec<argon2::Block>>>>,
    /// Per-process key for cache digests: the cache never holds a secret or its plain hash.
    cache_key: SecretKey,
    cache: Mutex<lru::LruCache<[u8; 32], Cached>>,
    /// Verifications under way, by cache digest: concurrent first calls with one key wait
    /// for a single argon2 run instead of each spending one (a pool of clients starting
    /// together must not use up its address's allowance).
    flights: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    /// Verified against for unknown key ids, so they cost the same time as wrong secrets.
    decoy_hash: String,
}

impl Authenticator {
    pub fn new(registry: Arc<Registry>, cfg: AuthConfig) -> Result<Self, super::TenancyError> {
        const DAY: u64 = 86_400;
        for (field, v) in [
            ("auth.cache_ttl_secs", cfg.cache_ttl_secs),
            ("auth.verify_wait_ms", cfg.verify_wait_ms / 1000),
            ("auth.lockout.window_secs", cfg.lockout.window_secs),
            ("auth.lockout.backoff_secs", cfg.lockout.backoff_secs),
        ] {
            if v > DAY {
                return Err(super::TenancyError::invalid(field, "must be at most one day"));
            }
        }
        let trusted = super::cidr::parse_list(&cfg.trusted_proxies)
            .map_err(|e| super::TenancyError::invalid("auth.trusted_proxies", e.to_string()))?;
        let (_, _, decoy_hash) = apikey::generate(cfg.key_hash, "decoy")?;
        Ok(Authenticator {
            registry,
            trusted,
            lockout: Lockout::new(cfg.lockout),
            verify_slots: Arc::new(Semaphore::new(cfg.max_concurrent_verifications.max(1))),
            verify_memory: Arc::default(),
            cache_key: SecretKey::generate()?,
            cache: Mutex::new(lru::LruCache::new(NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN))),
            flights: Mutex::default(),
            decoy_hash,
            cfg,
        })
    }

    /// Verifies `bearer` (the key, without "Bearer ") sent from `peer`.
    pub async fn authenticate(
        &self,
        bearer: Option<&str>,
        peer: IpAddr,
        forwarded_for: Option<&str>,
    ) -> Result<Principal, Denied> {
        let deny = |error, key_id: Option<&KeyId>, source| Denied {
            error,
            key_id: key_id.cloned(),
            tenant: None,
            source,
            locked: Vec::new(),
        };
        let ClientAddress { ip, forwarded_ignored } = client_address(peer, forwarded_for, &self.trusted)
            .map_err(|e| deny(AuthError::BadForwardedFor(e.to_string()), None, peer))?;
        let parsed = match bearer {
            None => Err(AuthError::Missing),
            Some(token) => {
                apikey::parse(token).map(|(id, secret)| (token, id, secret)).map_err(|_| AuthError::Malformed)
            }
        };
        let (token, key_id, secret) = match parsed {
            Ok(p) => p,
            // Cheap to send, so counted against the address like a wrong key: a flood of
            // junk ends in a lockout instead of an endless stream of audit records.
            Err(error) => {
                return Err(match self.lockout.junk(ip, Instant::now()) {
                    Ok(locked) => Denied { locked, ..deny(error, None, ip) },
                    Err(refusal) => deny(refused(refusal), None, ip),
                });
            }
        };
        let digest = blind_index(&self.cache_key, b"api-key-cache", token.as_bytes());
        if !self.cached(&digest, &key_id) {
            let flight = Flight::join(&self.flights, digest);
            let wait = Duration::from_millis(self.cfg.verify_wait_ms);
            let Ok(_turn) = tokio::time::timeout(wait, flight.lock.lock()).await else {
                return Err(deny(AuthError::Busy, Some(&key_id), ip));
            };
            if !self.cached(&digest, &key_id) {
                self.verify(&key_id, secret, ip).await?;
                if let Ok(mut c) = self.cache.lock() {
                    let expires = Instant::now() + Duration::from_secs(self.cfg.cache_ttl_secs);
                    c.put(digest, Cached { key_id: key_id.clone(), expires });
                }
            }
        }
        // The live state, every time: a revocation or suspension needs no cache flush.
        let owner = self
            .registry
            .key_owner(&key_id)
            .map_err(|_| deny(AuthError::Internal, Some(&key_id), ip))?
            .ok_or_else(|| deny(AuthError::Unrecognised, Some(&key_id), ip))?;
        let tenant = &owner.tenant;
        let known = |error| Denied {
            error,
            key_id: Some(key_id.clone()),
            tenant: Some(tenant.id.clone()),
            source: ip,
            locked: Vec::new(),
        };
        match tenant.status {
            TenantStatus::Deleted => return Err(known(AuthError::Unrecognised)),
            _ if !owner.key().is_live() => return Err(known(AuthError::Revoked)),
            TenantStatus::Suspended => return Err(known(AuthError::Suspended)),
            TenantStatus::Active => {}
        }
        let allowed = if tenant.allowlist.is_empty() {
            self.cfg.empty_allowlist_allows_all
        } else {
            tenant.allowlist.iter().any(|c| c.contains(ip))
        };
        if !allowed {
            return Err(known(AuthError::SourceDenied { ip, forwarded_ignored }));
        }
        Ok(Principal { tenant: tenant.id.clone(), key_id, source: ip })
    }

    fn cached(&self, digest: &[u8; 32], key_id: &KeyId) -> bool {
        let Ok(mut c) = self.cache.lock() else { return false };
        match c.get(digest) {
            Some(e) if e.expires > Instant::now() && &e.key_id == key_id => true,
            Some(_) => {
                c.pop(digest);
                false
            }
            None => false,
        }
    }

    /// The slow path: lockout (the attempt is counted now, before it waits), then argon2
    /// under the concurrency cap.
    async fn verify(&self, key_id: &KeyId, secret: &str, ip: IpAddr) -> Result<(), Denied> {
        let denied = |error, locked| Denied { error, key_id: Some(key_id.clone()), tenant: None, source: ip, locked };
        let attempt =
            self.lockout.begin(Some(key_id), ip, Instant::now()).map_err(|r| denied(refused(r), Vec::new()))?;
        let owner = match self.registry.key_owner(key_id) {
            Ok(o) => o,
            Err(_) => {
                drop(attempt); // not verified: neither a failure nor a success
                return Err(denied(AuthError::Internal, Vec::new()));
            }
        };
        let hash = owner.as_ref().map(|o| o.key().hash.clone()).unwrap_or_else(|| self.decoy_hash.clone());
        let wait = Duration::from_millis(self.cfg.verify_wait_ms);
        let metrics = crate::metrics::get();
        let waiting = crate::metrics::GaugeGuard::inc(&metrics.argon2_waiting);
        let permit = match tokio::time::timeout(wait, self.verify_slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                drop(attempt); // not verified, so not a failure of the key: taken back
                return Err(denied(AuthError::Busy, Vec::new()));
            }
        };
        drop(waiting);
        let running = crate::metrics::GaugeGuard::inc(&metrics.argon2_running);
        metrics.argon2_verifications.inc();
        let secret = Zeroizing::new(secret.to_owned());
        let pool = self.verify_memory.clone();
        let matches = tokio::task::spawn_blocking(move || {
            let mut memory = pool.lock().ok().and_then(|mut p| p.pop()).unwrap_or_default();
            let ok = apikey::verify(&secret, &hash, &mut memory);
            if let Ok(mut p) = pool.lock() {
                p.push(memory);
            }
            drop(permit);
            drop(running);
            ok
        })
        .await
        .unwrap_or(false);
        let ok = matches && owner.is_some();
        let locked = self.lockout.finish(attempt, ok, Instant::now());
        if ok {
            Ok(())
        } else {
            let mut d = denied(AuthError::Unrecognised, locked);
            d.tenant = owner.map(|o| o.tenant.id.clone());
            Err(d)
        }
    }
}

/// A place in line for one digest's verification; the entry goes when its last holder does.
struct Flight<'a> {
    map: &'a Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    digest: [u8; 32],
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> Flight<'a> {
    fn join(map: &'a Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>, digest: [u8; 32]) -> Self {
        let lock = match map.lock() {
            Ok(mut m) => m.entry(digest).or_default().clone(),
            // A poisoned map only loses the sharing, never the check.
            Err(_) => Arc::default(),
        };
        Flight { map, digest, lock }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock()
            && m.get(&self.digest).is_some_and(|l| Arc::ptr_eq(l, &self.lock) && Arc::strong_count(l) <= 2)
        {
            m.remove(&self.digest);
        }
    }
}

/// What a lockout refusal is answered as.
fn refused(r: Refusal) -> AuthError {
    match r {
        Refusal::Locked(retry_after) => AuthError::LockedOut { retry_after },
        Refusal::Throttled(retry_after) => AuthError::Throttled { retry_after },
        Refusal::Full => AuthError::Busy,
    }
}
