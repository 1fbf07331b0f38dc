//! Lockout: after too many failed authentications for one key id or from one source
//! address within a window, further attempts are refused for a back-off period, before
//! any argon2 work is spent on them.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::apikey::KeyId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LockoutConfig {
    /// Failures within `window_secs` that trigger a lockout; 0 disables lockout.
    pub max_failures: u32,
    pub window_secs: u64,
    /// How long a locked key id or address is refused.
    pub backoff_secs: u64,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig { max_failures: 10, window_secs: 60, backoff_secs: 300 }
    }
}

/// What is being counted: a key id (someone guessing its secret) or an address
/// (someone trying many keys).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Culprit {
    Key(KeyId),
    /// An IPv4 address, or an IPv6 /64 (one host usually owns a whole /64).
    Source(IpAddr),
}

impl Culprit {
    pub fn source(ip: IpAddr) -> Culprit {
        match super::cidr::canonical(ip) {
            IpAddr::V6(v6) => Culprit::Source(IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into())),
            v4 => Culprit::Source(v4),
        }
    }
}

#[derive(Clone, Copy)]
struct Entry {
    window_start: Instant,
    failures: u32,
    locked_until: Option<Instant>,
}

/// Bounded: an attacker cycling addresses evicts old entries rather than growing memory.
pub struct Lockout {
    cfg: LockoutConfig,
    entries: Mutex<lru::LruCache<Culprit, Entry>>,
}

const TRACKED: usize = 65_536;

impl Lockout {
    pub fn new(cfg: LockoutConfig) -> Self {
        let cap = NonZeroUsize::new(TRACKED).unwrap_or(NonZeroUsize::MIN);
        Lockout { cfg, entries: Mutex::new(lru::LruCache::new(cap)) }
    }

    /// How much longer the first locked culprit is refused, if any is.
    pub fn locked(&self, culprits: &[Culprit], now: Instant) -> Option<Duration> {
        let mut entries = self.entries.lock().ok()?;
        culprits.iter().find_map(|c| {
            let until = entries.get(c)?.locked_until?;
            (until > now).then(|| until - now)
        })
    }

    /// Counts a failure against each culprit; returns those it just locked.
    pub fn failed(&self, culprits: &[Culprit], now: Instant) -> Vec<Culprit> {
        if self.cfg.max_failures == 0 {
            return Vec::new();
        }
        let Ok(mut entries) = self.entries.lock() else { return Vec::new() };
        let window = Duration::from_secs(self.cfg.window_secs);
        let mut locked = Vec::new();
        for c in culprits {
            let e =
                entries.get_or_insert_mut(c.clone(), || Entry { window_start: now, failures: 0, locked_until: None });
            if now.duration_since(e.window_start) > window || e.locked_until.is_some_and(|u| u <= now) {
                *e = Entry { window_start: now, failures: 0, locked_until: None };
            }
            e.failures += 1;
            if e.failures >= self.cfg.max_failures && e.locked_until.is_none() {
                e.locked_until = Some(now + Duration::from_secs(self.cfg.backoff_secs));
                locked.push(c.clone());
            }
        }
        locked
    }

    /// A verified key clears its own count (not its address's: one good key does not
    /// excuse the other keys tried from there).
    pub fn succeeded(&self, key: &KeyId) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.pop(&Culprit::Key(key.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nth_failure_in_a_window_locks_until_the_backoff_ends() {
        let l = Lockout::new(LockoutConfig { max_failures: 3, window_secs: 60, backoff_secs: 10 });
        let t0 = Instant::now();
        let ip = Culprit::Source("127.0.0.9".parse().unwrap());
        assert!(l.failed(std::slice::from_ref(&ip), t0).is_empty());
        assert!(l.failed(std::slice::from_ref(&ip), t0).is_empty());
        assert_eq!(l.locked(std::slice::from_ref(&ip), t0), None);
        assert_eq!(l.failed(std::slice::from_ref(&ip), t0), vec![ip.clone()]);
        assert_eq!(l.locked(std::slice::from_ref(&ip), t0), Some(Duration::from_secs(10)));
        assert_eq!(l.locked(std::slice::from_ref(&ip), t0 + Duration::from_secs(11)), None);
        // After the back-off the count starts again.
        assert!(l.failed(std::slice::from_ref(&ip), t0 + Duration::from_secs(11)).is_empty());
    }

    #[test]
    fn ipv6_sources_are_counted_per_slash_64() {
        let a = Culprit::source("2001:db8:1:2::1".parse().unwrap());
        let b = Culprit::source("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = Culprit::source("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(Culprit::source("::ffff:10.0.0.1".parse().unwrap()), Culprit::Source("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn failures_spread_beyond_the_window_do_not_lock() {
        let l = Lockout::new(LockoutConfig { max_failures: 2, window_secs: 5, backoff_secs: 10 });
        let k = Culprit::Key(KeyId::parse("0123456789abcdef").unwrap());
        let t0 = Instant::now();
        assert!(l.failed(std::slice::from_ref(&k), t0).is_empty());
        assert!(l.failed(std::slice::from_ref(&k), t0 + Duration::from_secs(6)).is_empty());
        assert_eq!(l.locked(std::slice::from_ref(&k), t0 + Duration::from_secs(6)), None);
    }
}
