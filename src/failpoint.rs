//! Crash points for tests: `hit("name")` ends the process on the spot — no destructor,
//! no flush, like `kill -9` — when `CHATVAULT_FAILPOINT` names it (`name@N`: at its Nth
//! hit, for points every write passes). Only debug builds (what `cargo test` runs) read
//! the variable; in a release build `hit` does nothing.

/// Names the crash point, if any, this process is to stop at.
pub const ENV: &str = "CHATVAULT_FAILPOINT";

#[cfg(debug_assertions)]
fn armed() -> Option<&'static (String, u64)> {
    static ARMED: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var(ENV).ok().filter(|v| !v.is_empty())?;
            Some(match v.split_once('@') {
                Some((name, n)) => (name.to_owned(), n.parse().unwrap_or(1)),
                None => (v, 1),
            })
        })
        .as_ref()
}

/// Stops the process here if this crash point is armed (and this is its Nth hit).
#[inline]
pub fn hit(name: &str) {
    #[cfg(debug_assertions)]
    if let Some((armed, nth)) = armed()
        && armed == name
    {
        static HITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if HITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= *nth {
            eprintln!("chatvault: crash point {name} reached; aborting");
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
