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
    pub fn prune(&self, keep_micros: i64, anchored: Option<u64>) -> Result<Pruned, AuditError> {
        let cutoff = self.clock.now().micros().saturating_sub(keep_micros);
        let views = self.segments.snapshot()?;
        let mut drop = 0usize;
        let mut records = 0u64;
        // Never the last (active) segment: the next one's header says where the chain goes on.
        for (k, view) in views.iter().enumerate().take(views.len().saturating_sub(1)) {
            if anchored.is_some_and(|seq| views[k + 1].first_seq > seq) {
                break;
            }
            let mut r = Reader::open(view).map_err(|e| frame_err(e, view.first_seq))?;
            let (mut newest, mut n) = (i64::MIN, 0u64);
            let mut prev = r.header.prev;
            while let Some(p) = r.next_frame().map_err(|e| frame_err(e, view.first_seq))? {
                let (rec, mac) = self.decode(&p, &prev, view.first_seq)?;
                newest = newest.max(rec.at_micros);
                prev = mac;
                n += 1;
            }
            if newest >= cutoff {
                break;
            }
            drop += 1;
            records += n;
        }
        if drop == 0 {
            return Ok(Pruned::default());
        }
        let next = &views[drop];
        let header = Reader::open(next).map_err(|e| frame_err(e, next.first_seq))?.header;
        let pruned = self.checkpoint()?.map(|c| c.pruned).unwrap_or(0) + records;
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
        tracing::info!(segments = drop, records, first_kept = header.first_seq, "audit trail pruned");
        Ok(Pruned { segments: drop as u64, records })
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
