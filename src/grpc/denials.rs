//! Refused calls go to the audit trail in aggregate, so that no flood can grow the trail
//! faster than a bounded rate: per source (an IPv4 address, an IPv6 /64), outcome and
//! window, the first refusal is recorded as it is and the rest are counted, then written
//! as one `*.repeated` record with the count when the window closes. Across all sources, at most
//! `records_per_second` refusals are recorded one by one; past that they are counted in
//! one aggregate for the whole server.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::audit::{Event, Outcome};
use crate::tenancy::source_of;

const WINDOW: Duration = Duration::from_secs(60);
/// Refusals recorded one by one per second across all sources (burst: 10 seconds' worth).
const RECORDS_PER_SECOND: f64 = 20.0;
/// Sources tracked at once; beyond, refusals go to the server-wide aggregate.
const TRACKED: usize = 65_536;

/// Whether a refusal is recorded now, or counted for later.
#[derive(Debug, PartialEq, Eq)]
pub enum Note {
    Record,
    Counted,
}

struct Window {
    start: Instant,
    suppressed: u32,
    ev: Event,
}

struct State {
    windows: HashMap<(IpAddr, Outcome), Window>,
    /// Aggregates of windows that closed and were replaced before the next flush.
    due: Vec<(Outcome, Event)>,
    tokens: f64,
    refilled: Instant,
    /// Refusals past the server-wide rate, or from sources beyond `TRACKED`, by outcome.
    overflow: HashMap<Outcome, u32>,
}

/// What an aggregate says: the source and how many, not the tenant or key id of the
/// first refusal (the others may have named different ones).
fn aggregate(outcome: Outcome, w: &Window) -> (Outcome, Event) {
    (outcome, Event { source: w.ev.source.clone(), count: w.suppressed, ..Event::default() })
}

pub struct Denials {
    state: Mutex<State>,
}

impl Default for Denials {
    fn default() -> Self {
        Denials {
            state: Mutex::new(State {
                windows: HashMap::new(),
                due: Vec::new(),
                tokens: RECORDS_PER_SECOND * 10.0,
                refilled: Instant::now(),
                overflow: HashMap::new(),
            }),
        }
    }
}

impl Denials {
    /// Notes one refusal from `ip`, described by `ev` and `outcome`.
    pub fn note(&self, ip: IpAddr, outcome: Outcome, ev: &Event, now: Instant) -> Note {
        let Ok(mut st) = self.state.lock() else { return Note::Record };
        let key = (source_of(ip), outcome);
        if let Some(w) = st.windows.get_mut(&key)
            && now.duration_since(w.start) < WINDOW
        {
            w.suppressed += 1;
            crate::metrics::get().audit_denials_suppressed.inc();
            return Note::Counted;
        }
        let elapsed = now.duration_since(st.refilled).as_secs_f64();
        st.tokens = (st.tokens + elapsed * RECORDS_PER_SECOND).min(RECORDS_PER_SECOND * 10.0);
        st.refilled = now;
        if st.tokens < 1.0 || (st.windows.len() >= TRACKED && !st.windows.contains_key(&key)) {
            *st.overflow.entry(outcome).or_default() += 1;
            crate::metrics::get().audit_denials_suppressed.inc();
            return Note::Counted;
        }
        st.tokens -= 1.0;
        let fresh = Window { start: now, suppressed: 0, ev: ev.clone() };
        // A closed window not flushed yet keeps its count, for the next flush.
        if let Some(old) = st.windows.insert(key, fresh)
            && old.suppressed > 0
        {
            st.due.push(aggregate(outcome, &old));
        }
        Note::Record
    }

    /// The aggregates due: every closed window that counted refusals (and the server-wide
    /// overflow), as events with their counts. Closed windows are forgotten.
    pub fn take_closed(&self, now: Instant, all: bool) -> Vec<(Outcome, Event)> {
        let Ok(mut st) = self.state.lock() else { return Vec::new() };
        let mut out = std::mem::take(&mut st.due);
        st.windows.retain(|(_, outcome), w| {
            let closed = all || now.duration_since(w.start) >= WINDOW;
            if closed && w.suppressed > 0 {
                out.push(aggregate(*outcome, w));
            }
            !closed
        });
        for (outcome, count) in st.overflow.drain() {
            out.push((outcome, Event { source: "*".into(), count, ..Event::default() }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(src: &str) -> Event {
        Event { source: src.into(), ..Event::default() }
    }

    #[test]
    fn a_flood_from_one_source_is_one_record_and_one_aggregate_per_window() {
        let d = Denials::default();
        let t0 = Instant::now();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(d.note(ip, Outcome::Unauthenticated, &ev("198.51.100.7"), t0), Note::Record);
        for _ in 0..999 {
            assert_eq!(d.note(ip, Outcome::Unauthenticated, &ev("198.51.100.7"), t0), Note::Counted);
        }
        assert!(d.take_closed(t0 + Duration::from_secs(30), false).is_empty(), "the window is still open");
        let due = d.take_closed(t0 + WINDOW, false);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].1.count, due[0].1.source.as_str()), (999, "198.51.100.7"));
        assert_eq!(d.note(ip, Outcome::Unauthenticated, &ev("198.51.100.7"), t0 + WINDOW), Note::Record);
    }

    #[test]
    fn a_window_replaced_before_the_flush_keeps_its_count_and_names_no_tenant() {
        let d = Denials::default();
        let t0 = Instant::now();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let first = Event { tenant: "acme".into(), key_id: "k1".into(), ..ev("198.51.100.7") };
        assert_eq!(d.note(ip, Outcome::Unauthenticated, &first, t0), Note::Record);
        for _ in 0..5 {
            d.note(ip, Outcome::Unauthenticated, &ev("198.51.100.7"), t0);
        }
        // The flood goes on past the window, before any flush.
        assert_eq!(d.note(ip, Outcome::Unauthenticated, &ev("198.51.100.7"), t0 + WINDOW), Note::Record);
        let due = d.take_closed(t0 + WINDOW, false);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].1.count, due[0].1.tenant.as_str(), due[0].1.key_id.as_str()), (5, "", ""));
    }

    #[test]
    fn many_sources_are_recorded_at_a_bounded_rate_and_the_rest_counted() {
        let d = Denials::default();
        let t0 = Instant::now();
        let recorded = (0..5000u32)
            .filter(|i| {
                let ip = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, *i as u8]);
                d.note(ip, Outcome::Unauthenticated, &ev("x"), t0) == Note::Record
            })
            .count();
        assert_eq!(recorded, 200, "ten seconds' worth at most in a burst");
        let due = d.take_closed(t0, false);
        assert_eq!(due.iter().find(|(_, e)| e.source == "*").map(|(_, e)| e.count), Some(4800));
    }
}
