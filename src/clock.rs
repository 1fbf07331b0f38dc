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
