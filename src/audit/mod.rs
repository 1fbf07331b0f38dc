//! Records of processing: an append-only, tamper-evident trail of every data access,
//! erasure, admin change and failed authentication. Each record carries the MAC of the
//! one before it (HMAC-SHA256 under a root-derived key), so editing, removing or
//! reordering records breaks the chain; `verify` walks it. Cutting off the newest
//! records is only visible against a head published elsewhere (see SECURITY.md).

mod record;

use std::sync::{Arc, Mutex};

pub use record::{Event, Operation, Outcome, Record};

use crate::clock::Clock;
use crate::crypto::{SecretKey, blind_index};
use crate::store::{Batch, KvStore, StoreError, space};

const RECORD_V1: u8 = 1;
const MAC_LEN: usize = 32;
/// Records a query examines per call; it returns a page token to go on.
const SCAN_BUDGET: usize = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("audit record {0} is malformed")]
    Corrupt(u64),
    #[error("audit record {0} fails its MAC: altered, or written under another root key")]
    BadMac(u64),
    #[error("internal lock poisoned")]
    Poisoned,
}

/// Which records a query wants; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    pub key_id: Option<String>,
    pub operations: Vec<Operation>,
    pub subject: Option<String>,
    pub since_micros: Option<i64>,
    pub until_micros: Option<i64>,
}

impl Filter {
    fn matches(&self, r: &Record) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == r.tenant)
            && self.key_id.as_ref().is_none_or(|k| *k == r.key_id)
            && self.subject.as_ref().is_none_or(|s| *s == r.subject)
            && (self.operations.is_empty() || self.operations.contains(&r.operation))
            && self.since_micros.is_none_or(|t| r.at_micros >= t)
            && self.until_micros.is_none_or(|t| r.at_micros < t)
    }
}

/// A page of query results; `next_after` continues the scan when set.
#[derive(Debug)]
pub struct Page {
    pub records: Vec<Record>,
    pub next_after: Option<u64>,
}

/// What walking the chain found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verification {
    pub records: u64,
    /// Sequence number and MAC of the newest record: publish these elsewhere to detect truncation.
    pub head_seq: u64,
    pub head_mac: String,
    /// The first record that breaks the chain, and how.
    pub broken: Option<(u64, String)>,
}

struct Head {
    next_seq: u64,
    prev: [u8; MAC_LEN],
}

pub struct AuditLog {
    store: Arc<dyn KvStore>,
    key: SecretKey,
    clock: Arc<dyn Clock>,
    head: Mutex<Head>,
}

fn slot(seq: u64) -> Vec<u8> {
    let mut k = vec![space::AUDIT];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl AuditLog {
    /// Opens the trail and checks its newest record, which the next one will chain to.
    pub fn open(store: Arc<dyn KvStore>, key: SecretKey, clock: Arc<dyn Clock>) -> Result<Self, AuditError> {
        let log = AuditLog { store, key, clock, head: Mutex::new(Head { next_seq: 1, prev: [0; MAC_LEN] }) };
        if let Some((k, v)) = log.store.last(&[space::AUDIT])? {
            let seq = seq_of(&k).ok_or(AuditError::Corrupt(0))?;
            let (rec, mac) = log.decode(seq, &v)?;
            *log.head.lock().map_err(|_| AuditError::Poisoned)? = Head { next_seq: rec.seq + 1, prev: mac };
        }
        Ok(log)
    }

    fn mac(&self, body: &[u8]) -> [u8; MAC_LEN] {
        blind_index(&self.key, b"chatvault/audit/v1", body)
    }

    fn decode(&self, seq: u64, value: &[u8]) -> Result<(Record, [u8; MAC_LEN]), AuditError> {
        let (&v, rest) = value.split_first().ok_or(AuditError::Corrupt(seq))?;
        if v != RECORD_V1 || rest.len() < MAC_LEN {
            return Err(AuditError::Corrupt(seq));
        }
        let (body, mac) = rest.split_at(rest.len() - MAC_LEN);
        if self.mac(body) != mac {
            return Err(AuditError::BadMac(seq));
        }
        let rec: Record = postcard::from_bytes(body).map_err(|_| AuditError::Corrupt(seq))?;
        if rec.seq != seq {
            return Err(AuditError::Corrupt(seq));
        }
        Ok((rec, mac.try_into().map_err(|_| AuditError::Corrupt(seq))?))
    }

    /// Appends one record. The write is applied now; it becomes durable with the next
    /// group commit, which callers wait for when the operation changed state.
    pub fn append(&self, operation: Operation, outcome: Outcome, ev: Event) -> Result<u64, AuditError> {
        let mut head = self.head.lock().map_err(|_| AuditError::Poisoned)?;
        let rec = Record {
            seq: head.next_seq,
            at_micros: self.clock.now().micros(),
            operation,
            outcome,
            tenant: ev.tenant,
            key_id: ev.key_id,
            subject: ev.subject,
            transcript: ev.transcript,
            source: ev.source,
            prev: head.prev,
        };
        let mut value = vec![RECORD_V1];
        postcard::to_io(&rec, &mut value).map_err(|_| AuditError::Corrupt(rec.seq))?;
        let mac = self.mac(&value[1..]);
        value.extend_from_slice(&mac);
        let mut b = Batch::default();
        b.put(slot(rec.seq), value);
        self.store.apply(b)?;
        *head = Head { next_seq: rec.seq + 1, prev: mac };
        Ok(rec.seq)
    }

    /// Records after `after` (a sequence number) that match, oldest first, up to `limit`.
    pub fn query(&self, filter: &Filter, after: u64, limit: usize) -> Result<Page, AuditError> {
        let limit = limit.clamp(1, 1000);
        let mut records = Vec::new();
        let mut cursor = slot(after);
        let mut scanned = 0;
        loop {
            let page = self.store.scan(&[space::AUDIT], Some(&cursor), 512)?;
            let Some((last, _)) = page.last() else { return Ok(Page { records, next_after: None }) };
            cursor = last.clone();
            for (k, v) in &page {
                let seq = seq_of(k).ok_or(AuditError::Corrupt(0))?;
                let (rec, _) = self.decode(seq, v)?;
                scanned += 1;
                if filter.matches(&rec) {
                    records.push(rec);
                }
                if records.len() == limit || scanned == SCAN_BUDGET {
                    return Ok(Page { records, next_after: Some(seq) });
                }
            }
        }
    }

    /// Walks the whole chain: every MAC, every link, no gaps in the sequence.
    pub fn verify(&self) -> Result<Verification, AuditError> {
        let mut expect_seq = 1u64;
        let mut prev = [0u8; MAC_LEN];
        let mut after: Option<Vec<u8>> = None;
        let mut records = 0;
        let broken = |seq, why: String| Some((seq, why));
        loop {
            let page = self.store.scan(&[space::AUDIT], after.as_deref(), 1024)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (k, v) in &page {
                let Some(seq) = seq_of(k) else {
                    return Ok(self.report(records, expect_seq, prev, broken(expect_seq, "malformed key".into())));
                };
                if seq != expect_seq {
                    let why = format!("records {expect_seq}..{seq} are missing");
                    return Ok(self.report(records, expect_seq, prev, broken(expect_seq, why)));
                }
                let (rec, mac) = match self.decode(seq, v) {
                    Ok(r) => r,
                    Err(e) => return Ok(self.report(records, seq, prev, broken(seq, e.to_string()))),
                };
                if rec.prev != prev {
                    let why = "does not chain to the record before it".to_string();
                    return Ok(self.report(records, seq, prev, broken(seq, why)));
                }
                prev = mac;
                records += 1;
                expect_seq += 1;
            }
        }
        Ok(self.report(records, expect_seq, prev, None))
    }

    fn report(&self, records: u64, next_seq: u64, prev: [u8; MAC_LEN], broken: Option<(u64, String)>) -> Verification {
        Verification { records, head_seq: next_seq.saturating_sub(1), head_mac: hex::encode(prev), broken }
    }
}

fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(1..9)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::store::SledStore;

    fn log(dir: &std::path::Path) -> (Arc<dyn KvStore>, AuditLog) {
        let store: Arc<dyn KvStore> = Arc::new(SledStore::open(dir, 1 << 20).unwrap());
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        (store.clone(), AuditLog::open(store, key, Arc::new(SystemClock)).unwrap())
    }

    fn ev(tenant: &str, subject: &str) -> Event {
        Event { tenant: tenant.into(), key_id: "k1".into(), subject: subject.into(), ..Event::default() }
    }

    #[test]
    fn an_intact_chain_verifies_and_queries_filter_by_tenant_and_operation() {
        let dir = tempfile::tempdir().unwrap();
        let (_, log) = log(dir.path());
        log.append(Operation::GetTranscript, Outcome::Ok, ev("a", "s1")).unwrap();
        log.append(Operation::ShredSubject, Outcome::Ok, ev("b", "s2")).unwrap();
        log.append(Operation::GetTranscript, Outcome::NotFound, ev("a", "s3")).unwrap();
        let v = log.verify().unwrap();
        assert_eq!((v.records, v.head_seq, v.broken), (3, 3, None));
        let f = Filter { tenant: Some("a".into()), operations: vec![Operation::GetTranscript], ..Filter::default() };
        let page = log.query(&f, 0, 10).unwrap();
        assert_eq!(page.records.iter().map(|r| r.subject.as_str()).collect::<Vec<_>>(), ["s1", "s3"]);
        let first = log.query(&f, 0, 1).unwrap();
        assert_eq!(first.records.len(), 1);
        let rest = log.query(&f, first.next_after.unwrap(), 10).unwrap();
        assert_eq!(rest.records[0].subject, "s3");
    }

    #[test]
    fn the_chain_survives_reopening_and_detects_an_edit_and_a_removal() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_, log) = log(dir.path());
            log.append(Operation::GetTranscript, Outcome::Ok, ev("a", "s1")).unwrap();
        }
        let (store, log) = log(dir.path());
        log.append(Operation::GetTranscript, Outcome::Ok, ev("a", "s2")).unwrap();
        log.append(Operation::GetTranscript, Outcome::Ok, ev("a", "s3")).unwrap();
        assert_eq!(log.verify().unwrap().broken, None);

        // Flip one byte of record 2's body: its MAC no longer holds.
        let mut v = store.get(&slot(2)).unwrap().unwrap();
        v[5] ^= 1;
        let mut b = Batch::default();
        b.put(slot(2), v);
        store.apply(b).unwrap();
        assert_eq!(log.verify().unwrap().broken.map(|(s, _)| s), Some(2));

        // Remove record 2 altogether: a gap.
        let mut b = Batch::default();
        b.delete(slot(2));
        store.apply(b).unwrap();
        let broken = log.verify().unwrap().broken.unwrap();
        assert_eq!(broken.0, 2);
        assert!(broken.1.contains("missing"), "{}", broken.1);
    }

    #[test]
    fn a_record_moved_to_another_place_in_the_chain_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (store, log) = log(dir.path());
        for s in ["s1", "s2", "s3"] {
            log.append(Operation::GetTranscript, Outcome::Ok, ev("a", s)).unwrap();
        }
        // Swap the values of records 2 and 3.
        let (v2, v3) = (store.get(&slot(2)).unwrap().unwrap(), store.get(&slot(3)).unwrap().unwrap());
        let mut b = Batch::default();
        b.put(slot(2), v3);
        b.put(slot(3), v2);
        store.apply(b).unwrap();
        assert_eq!(log.verify().unwrap().broken.map(|(s, _)| s), Some(2));
    }
}
