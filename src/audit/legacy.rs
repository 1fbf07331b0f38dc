//! Trails kept in the store by earlier versions: one record per sequence number under
//! `space::AUDIT`, each carrying its predecessor's MAC in its body. They are checked,
//! re-chained into segment files (staged, then renamed into place), and removed from
//! the store, once. A crash at any step leaves something the next open finishes.

use std::fs::{self, File};
use std::path::Path;
use std::sync::Arc;

use super::segment::Segments;
use super::{AuditError, AuditLog, Event, Operation, Outcome};
use crate::clock::SystemClock;
use crate::crypto::{SecretKey, blind_index};
use crate::store::{Batch, Durability, KvStore, space};

const RECORD_V1: u8 = 1;
const V1_DOMAIN: &[u8] = b"chatvault/audit/v1";
const MAC_LEN: usize = 32;

/// A record as version 1 serialized it: the layout is frozen, whatever `Record` becomes.
#[derive(serde::Serialize, serde::Deserialize)]
struct V1Record {
    seq: u64,
    at_micros: i64,
    operation: Operation,
    outcome: Outcome,
    tenant: String,
    key_id: String,
    subject: String,
    transcript: String,
    source: String,
    prev: [u8; MAC_LEN],
}

pub fn migrate(dir: &Path, store: &dyn KvStore, key: &SecretKey, segment_bytes: u64) -> Result<(), AuditError> {
    let staging = dir.with_extension("migrating");
    if staging.exists() {
        // A copy cut short: the store still holds everything; start it over.
        fs::remove_dir_all(&staging)?;
    }
    if store.scan(&[space::AUDIT], None, 1)?.is_empty() {
        return Ok(());
    }
    if !dir.exists() {
        let moved = copy(&staging, store, key, segment_bytes)?;
        fs::rename(&staging, dir)?;
        if let Some(parent) = dir.parent() {
            File::open(parent)?.sync_all()?;
        }
        tracing::info!(records = moved, dir = %dir.display(), "audit trail moved from the store into segment files");
    }
    // The copy is in place (now or before a crash): the store's records go.
    loop {
        let page = store.scan(&[space::AUDIT], None, 1024)?;
        if page.is_empty() {
            break;
        }
        let mut b = Batch::default();
        for (k, _) in page {
            b.delete(k);
        }
        store.apply(b)?;
    }
    store.sync(Durability::Fsync)?;
    Ok(())
}

/// Re-chains every stored record into segments under `staging`, checking the old chain
/// as it goes: a broken trail is not silently re-signed.
fn copy(staging: &Path, store: &dyn KvStore, key: &SecretKey, segment_bytes: u64) -> Result<u64, AuditError> {
    let new_key = SecretKey::from_slice(key.expose()).map_err(|_| AuditError::Poisoned)?;
    let log = AuditLog::open_segments(Segments::open(staging, segment_bytes)?, new_key, Arc::new(SystemClock))?;
    let mut prev = [0u8; MAC_LEN];
    let mut expect = 1u64;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(&[space::AUDIT], after.as_deref(), 1024)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (_, v) in &page {
            let (rec, mac) =
                decode_v1(key, v).ok_or_else(|| AuditError::Legacy(expect, "unreadable or altered".into()))?;
            if rec.seq != expect {
                return Err(AuditError::Legacy(expect, format!("records {expect}..{} are missing", rec.seq)));
            }
            if rec.prev != prev {
                return Err(AuditError::Legacy(expect, "does not chain to the record before it".into()));
            }
            let ev = Event {
                tenant: rec.tenant,
                key_id: rec.key_id,
                subject: rec.subject,
                transcript: rec.transcript,
                source: rec.source,
                count: 1,
                detail: String::new(),
            };
            log.append_at(rec.at_micros, rec.operation, rec.outcome, ev)?;
            prev = mac;
            expect += 1;
        }
    }
    log.segments.sync(Durability::Fsync)?;
    Ok(expect - 1)
}

fn decode_v1(key: &SecretKey, value: &[u8]) -> Option<(V1Record, [u8; MAC_LEN])> {
    let (&v, rest) = value.split_first()?;
    if v != RECORD_V1 || rest.len() < MAC_LEN {
        return None;
    }
    let (body, mac) = rest.split_at(rest.len() - MAC_LEN);
    if blind_index(key, V1_DOMAIN, body) != mac {
        return None;
    }
    Some((postcard::from_bytes(body).ok()?, mac.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Filter;
    use crate::store::SledStore;

    /// Writes a trail the way the store-based version did.
    fn write_v1(store: &dyn KvStore, key: &SecretKey, subjects: &[&str]) {
        let mut prev = [0u8; MAC_LEN];
        for (i, s) in subjects.iter().enumerate() {
            let rec = V1Record {
                seq: i as u64 + 1,
                at_micros: 1_700_000_000_000_000 + i as i64,
                operation: Operation::GetTranscript,
                outcome: Outcome::Ok,
                tenant: "acme".into(),
                key_id: "k1".into(),
                subject: s.to_string(),
                transcript: String::new(),
                source: "127.0.0.1".into(),
                prev,
            };
            let mut value = vec![RECORD_V1];
            value.extend_from_slice(&postcard::to_allocvec(&rec).unwrap());
            let mac = blind_index(key, V1_DOMAIN, &value[1..]);
            value.extend_from_slice(&mac);
            let mut k = vec![space::AUDIT];
            k.extend_from_slice(&rec.seq.to_be_bytes());
            let mut b = Batch::default();
            b.put(k, value);
            store.apply(b).unwrap();
            prev = mac;
        }
    }

    #[test]
    fn a_trail_kept_in_the_store_moves_into_segments_intact_and_leaves_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("db"), 1 << 20).unwrap();
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        let subjects = ["aa".repeat(32), "bb".repeat(32), "cc".repeat(32)];
        write_v1(&store, &key, &subjects.iter().map(String::as_str).collect::<Vec<_>>());
        let trail = dir.path().join("audit");
        let log =
            AuditLog::open(&trail, &store, SecretKey::from_slice(&[7; 32]).unwrap(), Arc::new(SystemClock)).unwrap();
        assert!(store.scan(&[space::AUDIT], None, 10).unwrap().is_empty());
        log.append(Operation::ShredSubject, Outcome::Ok, Event::default()).unwrap();
        let v = log.verify().unwrap();
        assert_eq!((v.records, v.broken), (4, None));
        let page = log.query(&Filter::default(), 0, 10).unwrap();
        let got: Vec<_> = page.records.iter().take(3).map(|r| (r.seq, r.subject.clone(), r.at_micros)).collect();
        assert_eq!(got[2], (3, subjects[2].clone(), 1_700_000_000_000_002));
    }

    #[test]
    fn a_broken_trail_in_the_store_is_not_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("db"), 1 << 20).unwrap();
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        write_v1(&store, &key, &["s1", "s2", "s3"]);
        let mut k = vec![space::AUDIT];
        k.extend_from_slice(&2u64.to_be_bytes());
        let mut b = Batch::default();
        b.delete(k);
        store.apply(b).unwrap();
        let trail = dir.path().join("audit");
        let err = AuditLog::open(&trail, &store, SecretKey::from_slice(&[7; 32]).unwrap(), Arc::new(SystemClock))
            .err()
            .expect("a gap must stop the migration");
        assert!(matches!(err, AuditError::Legacy(2, _)), "{err}");
        assert!(!trail.exists());
        assert_eq!(store.scan(&[space::AUDIT], None, 10).unwrap().len(), 2);
    }
}
