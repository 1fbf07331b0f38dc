//! Crash points for tests: `hit("name")` ends the process on the spot — no destructor,
//! no flush, like `kill -9` — when `CHATVAULT_FAILPOINT` names it. Only debug builds
//! (what `cargo test` runs) read the variable; in a release build `hit` does nothing.

/// Names the crash point, if any, this process is to stop at.
pub const ENV: &str = "CHATVAULT_FAILPOINT";

#[cfg(debug_assertions)]
fn armed() -> Option<&'static str> {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED.get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty())).as_deref()
}

/// Stops the process here if this crash point is armed.
#[inline]
pub fn hit(name: &str) {
    #[cfg(debug_assertions)]
    if armed() == Some(name) {
        eprintln!("chatvault: crash point {name} reached; aborting");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
