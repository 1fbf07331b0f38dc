//! Time as a dependency, so retention and receipts are testable without sleeping.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::vault::Timestamp;

pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let micros = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
        Timestamp::from_micros(micros).unwrap_or(Timestamp::from_micros(0).expect("zero is in range"))
    }
}

/// The clock a server runs on: the system's. Debug builds only (tests) may set
/// `CHATVAULT_TEST_CLOCK_FILE` to a file holding seconds to add to it, read at every
/// call, so a test moves a running server's time forward without waiting.
pub fn server_clock() -> std::sync::Arc<dyn Clock> {
    #[cfg(debug_assertions)]
    if let Some(path) = std::env::var_os("CHATVAULT_TEST_CLOCK_FILE") {
        return std::sync::Arc::new(OffsetFileClock(path.into()));
    }
    std::sync::Arc::new(SystemClock)
}

#[cfg(debug_assertions)]
struct OffsetFileClock(std::path::PathBuf);

#[cfg(debug_assertions)]
impl Clock for OffsetFileClock {
    fn now(&self) -> Timestamp {
        let secs: i64 = std::fs::read_to_string(&self.0).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        let base = SystemClock.now().micros();
        Timestamp::from_micros(base.saturating_add(secs.saturating_mul(1_000_000))).unwrap_or(SystemClock.now())
    }
}
