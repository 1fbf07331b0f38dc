//! The audit trail's own retention: whole segments whose every record is older than the
//! retention go, oldest first. Before any goes, a checkpoint names the first record kept
//! and the MAC it chains to, MACed under the trail's key: `verify` then proves the chain
//! from the checkpoint on, and a segment deleted by anyone else is still a break.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::segment::Reader;
use super::{AuditError, AuditLog, MAC_LEN, frame_err};
use crate::crypto::blind_index;

const CHECKPOINT: &str = "checkpoint";
const CHECKPOINT_DOMAIN: &[u8] = b"chatvault/audit/checkpoint/v1";

/// Where the kept part of the trail begins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The first record kept.
    pub first_seq: u64,
    /// The MAC of the record before it (pruned), which it chains to.
    pub prev: [u8; MAC_LEN],
    /// Records pruned so far, in all.
    pub pruned: u64,
    pub at_micros: i64,
    mac: [u8; 32],
}

/// What one prune did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub segments: u64,
    pub records: u64,
}

impl AuditLog {
    fn checkpoint_mac(&self, first_seq: u64, prev: &[u8; MAC_LEN], pruned: u64, at: i64) -> [u8; 32] {
        let mut m = Vec::with_capacity(8 + MAC_LEN + 16);
        m.extend_from_slice(&first_seq.to_be_bytes());
        m.extend_from_slice(prev);
        m.extend_from_slice(&pruned.to_be_bytes());
        m.extend_from_slice(&at.to_be_bytes());
        blind_index(&self.key, CHECKPOINT_DOMAIN, &m)
    }

    /// The checkpoint, if the trail was ever pruned. One that fails its MAC is an error:
    /// it was not written by this trail's key.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let path = self.segments.dir().join(CHECKPOINT);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AuditError::Store(e.into())),
        };
        let c: Checkpoint = postcard::from_bytes(&bytes).map_err(|_| AuditError::BadCheckpoint)?;
        if self.checkpoint_mac(c.first_seq, &c.prev, c.pruned, c.at_micros) != c.mac {
            return Err(AuditError::BadCheckpoint);
        }
        Ok(Some(c))
    }

    /// Deletes the closed segments whose records are all older than `keep_micros`
    /// (the segment being written to always stays, and so does the one holding record
    /// `anchored`, which the erasure ledger checks the trail against at the next start).
    /// What goes is checked first, record by record, to chain on from the checkpoint into
    /// the first segment kept: a trail someone cut is refused, never laundered into a
    /// clean checkpoint.
    pub fn prune(&self, keep_micros: i64, anchored: Option<u64>) -> Result<Pruned, AuditError> {
        let cutoff = self.clock.now().micros().saturating_sub(keep_micros);
        let views = self.segments.snapshot()?;
        let old = self.checkpoint()?;
        let (mut expect, mut prev) = old.as_ref().map(|c| (c.first_seq, c.prev)).unwrap_or((1, [0; MAC_LEN]));
        // Left behind by a prune a crash cut short: already counted, and going now.
        let leftover = views.iter().take_while(|v| v.first_seq < expect).count();
        let mut drop = leftover;
        let mut records = 0u64;
        for k in leftover..views.len().saturating_sub(1) {
            if anchored.is_some_and(|seq| views[k + 1].first_seq > seq) {
                break;
            }
            let view = &views[k];
            let mut r = Reader::open(view).map_err(|e| frame_err(e, view.first_seq))?;
            self.chains_on(expect, &prev, &r.header)?;
            let (mut at, mut mac, mut newest, mut n) = (r.header.first_seq, r.header.prev, i64::MIN, 0u64);
            while let Some(p) = r.next_frame().map_err(|e| frame_err(e, view.first_seq))? {
                let (rec, m) = self.decode(&p, &mac, view.first_seq)?;
                if rec.seq != at {
                    return Err(AuditError::Broken(at, format!("record {} found where {at} belongs", rec.seq)));
                }
                newest = newest.max(rec.at_micros);
                (at, mac, n) = (at + 1, m, n + 1);
            }
            if newest >= cutoff {
                break;
            }
            (expect, prev) = (at, mac);
            drop = k + 1;
            records += n;
        }
        if drop == leftover {
            if leftover > 0 {
                self.segments.remove_oldest(leftover)?;
            }
            return Ok(Pruned::default());
        }
        let next = &views[drop];
        let header = Reader::open(next).map_err(|e| frame_err(e, next.first_seq))?.header;
        self.chains_on(expect, &prev, &header)?;
        let pruned = old.map(|c| c.pruned).unwrap_or(0) + records;
        let at = self.clock.now().micros();
        let c = Checkpoint {
            first_seq: header.first_seq,
            prev: header.prev,
            pruned,
            at_micros: at,
            mac: self.checkpoint_mac(header.first_seq, &header.prev, pruned, at),
        };
        write_atomically(&self.segments.dir().join(CHECKPOINT), &postcard::to_allocvec(&c).unwrap_or_default())?;
        // The checkpoint is durable first: a crash now leaves segments verify skips and
        // the next prune deletes.
        self.segments.remove_oldest(drop)?;
        tracing::info!(segments = drop - leftover, records, first_kept = header.first_seq, "audit trail pruned");
        Ok(Pruned { segments: (drop - leftover) as u64, records })
    }

    /// Whether a segment starting with `header` goes on from record `expect` - 1, whose
    /// MAC is `prev` (or across a loss the operator accepted).
    fn chains_on(
        &self,
        expect: u64,
        prev: &[u8; MAC_LEN],
        header: &super::segment::SegmentHeader,
    ) -> Result<(), AuditError> {
        if header.first_seq == expect && header.prev == *prev {
            return Ok(());
        }
        if let Some(gap) = self.accepted_gap(expect, header.first_seq)
            && header.prev == gap.to_mac
        {
            return Ok(());
        }
        Err(AuditError::Broken(expect, format!("the segment from record {} does not chain on", header.first_seq)))
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AuditError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let io = |e: std::io::Error| AuditError::Store(e.into());
    let mut f =
        std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}
