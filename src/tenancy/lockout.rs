//! Lockout: too many failed authentications within a window lock what made them — a key
//! id *from one source*, a source (an IPv4 address, an IPv6 /64), a network (an IPv6 /48)
//! — for a back-off period, before any argon2 work is spent on them. A key id is never
//! locked for every address: knowing a victim's key id (it is in every token, in audit
//! records and in logs) must not let anyone lock its owner out.
//!
//! An attempt is counted when it *starts*, before it waits for argon2, so a burst from one
//! source runs at most `max_failures` verifications, not as many as fit in the wait; and
//! each source has a bucket of argon2 work, refilled slowly, whatever its outcome.
//!
//! Bounded without letting an attacker evict their own entries cheaply: entries that are
//! counting live in an LRU (evicting one takes a failure from a fresh source, and sources
//! are themselves counted per /48), locked ones in a table of their own that only ever
//! drops the lock nearest its end, so a newer lock never gives way to an older one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::apikey::KeyId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LockoutConfig {
    /// Failures within `window_secs` that lock a key id from one source, or a source;
    /// 0 disables lockout.
    pub max_failures: u32,
    /// Failures within `window_secs` that lock an IPv6 /48.
    pub max_failures_per_network: u32,
    pub window_secs: u64,
    /// How long a locked key id, source or network is refused.
    pub backoff_secs: u64,
    /// argon2 verifications one source may start in a burst, and per minute after it.
    pub verify_burst: u32,
    pub verify_per_minute: u32,
    /// Entries tracked (counting ones, and locked ones, each).
    pub tracked: usize,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            max_failures: 10,
            max_failures_per_network: 100,
            window_secs: 60,
            backoff_secs: 300,
            verify_burst: 20,
            verify_per_minute: 20,
            tracked: 65_536,
        }
    }
}

/// What is being counted.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Culprit {
    /// A key id tried from one source (someone guessing its secret there).
    Key(KeyId, IpAddr),
    /// An IPv4 address or an IPv6 /64 (one host usually owns a whole /64).
    Source(IpAddr),
    /// An IPv6 /48 (one site).
    Network(IpAddr),
}

/// The source an address counts as: the address itself for IPv4, its /64 for IPv6.
pub fn source_of(ip: IpAddr) -> IpAddr {
    prefix(ip, 64)
}

fn prefix(ip: IpAddr, bits: u32) -> IpAddr {
    match super::cidr::canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & (u128::MAX << (128 - bits))).into()),
        v4 => v4,
    }
}

impl Culprit {
    /// Everything an attempt from `ip` (for `key`, if it named one) counts against.
    pub fn of(key: Option<&KeyId>, ip: IpAddr) -> Vec<Culprit> {
        let source = source_of(ip);
        let mut all = Vec::with_capacity(3);
        if let Some(k) = key {
            all.push(Culprit::Key(k.clone(), source));
        }
        all.push(Culprit::Source(source));
        if matches!(super::cidr::canonical(ip), IpAddr::V6(_)) {
            all.push(Culprit::Network(prefix(ip, 48)));
        }
        all
    }

    /// What a failure of this culprit is shown as (audit trail, logs).
    pub fn describe(&self) -> String {
        match self {
            Culprit::Key(k, src) => format!("key id {k} from {src}"),
            Culprit::Source(src) => format!("address {src}"),
            Culprit::Network(net) => format!("network {net}/48"),
        }
    }
}

#[derive(Clone, Copy)]
struct Count {
    window_start: Instant,
    failures: u32,
    /// Attempts started and not yet finished: counted against the limit too.
    in_flight: u32,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Why an attempt may not start.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Locked, or at its limit with attempts in flight: retry after this long.
    Locked(Duration),
    /// The source spent its argon2 allowance: retry after this long.
    Throttled(Duration),
    /// The lockout's state is unusable (a poisoned lock): nothing is verified.
    Full,
}

/// An attempt under way: its culprits, counted as in flight. Dropped without
/// [`Lockout::finish`] (its caller went away, or it was never verified) it is taken back,
/// neither a failure nor a success.
pub struct Attempt<'a> {
    lockout: &'a Lockout,
    culprits: Vec<Culprit>,
}

impl Attempt<'_> {
    pub fn culprits(&self) -> &[Culprit] {
        &self.culprits
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.culprits.is_empty() {
            return;
        }
        let Ok(mut st) = self.lockout.state.lock() else { return };
        for c in &self.culprits {
            if let Some(n) = st.counting.peek_mut(c) {
                n.in_flight = n.in_flight.saturating_sub(1);
            }
        }
    }
}

struct State {
    counting: lru::LruCache<Culprit, Count>,
    locked: HashMap<Culprit, Instant>,
    buckets: lru::LruCache<IpAddr, Bucket>,
    pruned: Instant,
}

impl State {
    /// When `c` is locked until, if it is now.
    fn locked_until(&self, c: &Culprit, now: Instant) -> Option<Instant> {
        self.locked.get(c).copied().filter(|until| *until > now)
    }

    /// Drops expired locks, at most once a second (not on every attempt).
    fn prune(&mut self, now: Instant) {
        if now.duration_since(self.pruned) >= Duration::from_secs(1) {
            self.locked.retain(|_, until| *until > now);
            self.pruned = now;
        }
    }

    /// Locks `c` until `until`. A full table first drops every expired lock, then, if it
    /// must, the lock nearest its end: a flood of locks never unlocks the newest culprit.
    fn lock(&mut self, c: Culprit, until: Instant, now: Instant, cap: usize) {
        if self.locked.len() >= cap {
            self.locked.retain(|_, u| *u > now);
            self.pruned = now;
        }
        if self.locked.len() >= cap
            && let Some(soonest) = self.locked.iter().min_by_key(|(_, u)| **u).map(|(k, _)| k.clone())
        {
            self.locked.remove(&soonest);
        }
        self.locked.insert(c, until);
    }
}

pub struct Lockout {
    cfg: LockoutConfig,
    state: Mutex<State>,
}

impl Lockout {
    pub fn new(cfg: LockoutConfig) -> Self {
        let cap = NonZeroUsize::new(cfg.tracked.max(16)).unwrap_or(NonZeroUsize::MIN);
        Lockout {
            cfg,
            state: Mutex::new(State {
                counting: lru::LruCache::new(cap),
                locked: HashMap::new(),
                buckets: lru::LruCache::new(cap),
                pruned: Instant::now(),
            }),
        }
    }

    fn limit(&self, c: &Culprit) -> u32 {
        match c {
            Culprit::Network(_) => self.cfg.max_failures_per_network,
            _ => self.cfg.max_failures,
        }
    }

    /// Whether an attempt from `ip` would be refused as locked, counting nothing: for
    /// checks that cost no argon2 (the operator token).
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.cfg.max_failures == 0 {
            return Ok(());
        }
        let mut st = self.state.lock().map_err(|_| Refusal::Full)?;
        st.prune(now);
        match Culprit::of(None, ip).iter().filter_map(|c| st.locked_until(c, now)).max() {
            Some(until) => Err(Refusal::Locked(until - now)),
            None => Ok(()),
        }
    }

    /// Starts an attempt that will cost an argon2 verification, or says why it may not.
    pub fn begin(&self, key: Option<&KeyId>, ip: IpAddr, now: Instant) -> Result<Attempt<'_>, Refusal> {
        let culprits = Culprit::of(key, ip);
        if self.cfg.max_failures == 0 {
            return Ok(Attempt { lockout: self, culprits: Vec::new() });
        }
        let mut st = self.state.lock().map_err(|_| Refusal::Full)?;
        let window = Duration::from_secs(self.cfg.window_secs);
        st.prune(now);
        if let Some(until) = culprits.iter().filter_map(|c| st.locked_until(c, now)).max() {
            return Err(Refusal::Locked(until - now));
        }
        for c in &culprits {
            if let Some(n) = st.counting.peek(c)
                && now.duration_since(n.window_start) <= window
                && n.failures + n.in_flight >= self.limit(c)
            {
                // At the limit counting the attempts still being verified: their outcome
                // is a moment away.
                return Err(Refusal::Locked(Duration::from_secs(1)));
            }
        }
        self.take_token(&mut st, source_of(ip), now)?;
        for c in &culprits {
            let n = st.counting.get_or_insert_mut(c.clone(), || Count { window_start: now, failures: 0, in_flight: 0 });
            if now.duration_since(n.window_start) > window {
                *n = Count { window_start: now, failures: 0, in_flight: n.in_flight };
            }
            n.in_flight += 1;
        }
        Ok(Attempt { lockout: self, culprits })
    }

    fn take_token(&self, st: &mut State, source: IpAddr, now: Instant) -> Result<(), Refusal> {
        let (burst, per_min) = (f64::from(self.cfg.verify_burst.max(1)), f64::from(self.cfg.verify_per_minute.max(1)));
        let b = st.buckets.get_or_insert_mut(source, || Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * per_min / 60.0).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - b.tokens) * 60.0 / per_min);
            return Err(Refusal::Throttled(wait));
        }
        b.tokens -= 1.0;
        Ok(())
    }

    /// Ends an attempt. A success takes it back from every count (and clears the key's);
    /// a failure stays counted. Returns the culprits this failure locked.
    pub fn finish(&self, mut attempt: Attempt<'_>, ok: bool, now: Instant) -> Vec<Culprit> {
        let culprits = std::mem::take(&mut attempt.culprits);
        if self.cfg.max_failures == 0 {
            return Vec::new();
        }
        let Ok(mut st) = self.state.lock() else { return Vec::new() };
        let backoff = Duration::from_secs(self.cfg.backoff_secs);
        let cap = self.cfg.tracked.max(16);
        let mut locked = Vec::new();
        for c in culprits {
            let limit = self.limit(&c);
            let Some(n) = st.counting.get_mut(&c) else { continue };
            n.in_flight = n.in_flight.saturating_sub(1);
            if ok {
                if matches!(c, Culprit::Key(..)) {
                    st.counting.pop(&c);
                }
                continue;
            }
            n.failures += 1;
            if n.failures >= limit {
                st.counting.pop(&c);
                st.lock(c.clone(), now + backoff, now, cap);
                locked.push(c);
            }
        }
        locked
    }

    /// Counts a malformed credential (no key id, no argon2): against the source only.
    pub fn junk(&self, ip: IpAddr, now: Instant) -> Result<Vec<Culprit>, Refusal> {
        let attempt = self.begin(None, ip, now)?;
        Ok(self.finish(attempt, false, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LockoutConfig {
        LockoutConfig { max_failures: 3, window_secs: 60, backoff_secs: 10, ..LockoutConfig::default() }
    }

    fn key() -> KeyId {
        KeyId::parse("0123456789abcdef").unwrap()
    }

    fn fail(l: &Lockout, k: Option<&KeyId>, ip: &str, t: Instant) -> Result<Vec<Culprit>, Refusal> {
        let a = l.begin(k, ip.parse().unwrap(), t)?;
        Ok(l.finish(a, false, t))
    }

    #[test]
    fn failures_for_a_key_id_lock_it_from_that_source_only() {
        let l = Lockout::new(cfg());
        let t0 = Instant::now();
        for _ in 0..2 {
            assert!(fail(&l, Some(&key()), "198.51.100.7", t0).unwrap().is_empty());
        }
        let locked = fail(&l, Some(&key()), "198.51.100.7", t0).unwrap();
        assert!(locked.contains(&Culprit::Key(key(), "198.51.100.7".parse().unwrap())), "{locked:?}");
        assert!(matches!(l.begin(Some(&key()), "198.51.100.7".parse().unwrap(), t0), Err(Refusal::Locked(_))));
        // The owner, elsewhere, still gets to try.
        assert!(l.begin(Some(&key()), "203.0.113.9".parse().unwrap(), t0).is_ok());
        // After the back-off the attacker may try again.
        assert!(l.begin(Some(&key()), "198.51.100.7".parse().unwrap(), t0 + Duration::from_secs(11)).is_ok());
    }

    #[test]
    fn attempts_are_counted_before_they_are_verified_so_a_burst_runs_at_most_the_limit() {
        let l = Lockout::new(cfg());
        let t0 = Instant::now();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let started: Vec<_> = (0..50).filter_map(|_| l.begin(Some(&key()), ip, t0).ok()).collect();
        assert_eq!(started.len(), 3, "a burst starts only as many verifications as the limit");
        for a in started {
            l.finish(a, false, t0);
        }
        assert!(matches!(l.begin(None, ip, t0), Err(Refusal::Locked(_))));
    }

    #[test]
    fn a_success_takes_its_attempt_back() {
        let l = Lockout::new(cfg());
        let t0 = Instant::now();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..10 {
            let a = l.begin(Some(&key()), ip, t0).unwrap();
            assert!(l.finish(a, true, t0).is_empty());
        }
    }

    #[test]
    fn ipv6_is_counted_per_64_and_per_48() {
        let l = Lockout::new(LockoutConfig { max_failures: 1000, max_failures_per_network: 4, ..cfg() });
        let t0 = Instant::now();
        // Four /64s of one /48, one failure each: the /48 locks.
        for net in 1..=4 {
            let _ = fail(&l, None, &format!("2001:db8:1:{net}::1"), t0);
        }
        assert!(matches!(l.begin(None, "2001:db8:1:9::1".parse().unwrap(), t0), Err(Refusal::Locked(_))));
        assert!(l.begin(None, "2001:db8:2:1::1".parse().unwrap(), t0).is_ok(), "another /48 is not");
        assert_eq!(source_of("2001:db8:1:2:ffff::9".parse().unwrap()), source_of("2001:db8:1:2::1".parse().unwrap()));
        assert_eq!(source_of("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_source_has_a_bucket_of_verifications_whatever_their_outcome() {
        let l = Lockout::new(LockoutConfig { verify_burst: 2, verify_per_minute: 60, ..cfg() });
        let t0 = Instant::now();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..2 {
            let a = l.begin(Some(&key()), ip, t0).unwrap();
            l.finish(a, true, t0);
        }
        assert!(matches!(l.begin(Some(&key()), ip, t0), Err(Refusal::Throttled(_))));
        assert!(l.begin(Some(&key()), ip, t0 + Duration::from_secs(2)).is_ok(), "refilled one a second");
    }

    #[test]
    fn an_attempt_abandoned_midway_is_taken_back_not_left_in_flight() {
        // (The argon2 allowance is spent by abandoned attempts too: it is not what is tested.)
        let l = Lockout::new(LockoutConfig { verify_burst: 1000, ..cfg() });
        let t0 = Instant::now();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        // Callers that went away while waiting for argon2, many times the limit.
        for _ in 0..30 {
            drop(l.begin(Some(&key()), ip, t0).unwrap());
        }
        assert!(l.begin(Some(&key()), ip, t0).is_ok(), "abandoned attempts must not hold the source at its limit");
    }

    #[test]
    fn a_full_lock_table_drops_the_lock_nearest_its_end_never_the_new_one() {
        let l = Lockout::new(LockoutConfig { max_failures: 1, tracked: 16, backoff_secs: 100, ..cfg() });
        let t0 = Instant::now();
        for i in 0..16u8 {
            fail(&l, None, &format!("198.51.100.{i}"), t0 + Duration::from_secs(u64::from(i))).unwrap();
        }
        let late = t0 + Duration::from_secs(20);
        let locked = fail(&l, None, "203.0.113.1", late).unwrap();
        assert_eq!(locked, [Culprit::Source("203.0.113.1".parse().unwrap())]);
        assert!(matches!(l.begin(None, "203.0.113.1".parse().unwrap(), late), Err(Refusal::Locked(_))));
        // The oldest lock (ending first) gave way; the others hold.
        assert!(l.begin(None, "198.51.100.0".parse().unwrap(), late).is_ok());
        assert!(matches!(l.begin(None, "198.51.100.1".parse().unwrap(), late), Err(Refusal::Locked(_))));
    }

    #[test]
    fn failures_spread_beyond_the_window_do_not_lock() {
        let l = Lockout::new(LockoutConfig { max_failures: 2, window_secs: 5, ..cfg() });
        let t0 = Instant::now();
        assert!(fail(&l, Some(&key()), "198.51.100.7", t0).unwrap().is_empty());
        assert!(fail(&l, Some(&key()), "198.51.100.7", t0 + Duration::from_secs(6)).unwrap().is_empty());
    }
}
