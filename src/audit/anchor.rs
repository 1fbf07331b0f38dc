//! The trail against the erasure ledger: its durable head is anchored there now and then
//! (`keys::AuditAnchor`), so at start a trail cut short or rolled back with its data
//! directory is noticed, instead of `verify` calling a shortened chain intact. A loss the
//! operator accepted (a restore) is recorded in the ledger as a gap, and the chain goes
//! on from the anchored record, so what comes after still verifies.

use super::segment::{Reader, SegmentHeader};
use super::{AuditError, AuditLog, Head, MAC_LEN, Stored, frame_err, stored_mac};
use crate::keys::{AuditAnchor, AuditGap};
use crate::store::Durability;

/// How the trail compares with an anchored head.
#[derive(Debug, PartialEq, Eq)]
pub enum AnchorCheck {
    /// The anchored record is there, unchanged.
    Holds,
    /// The trail ends at `last`, before the anchored record: records were removed.
    Behind { last: u64 },
    /// A record with the anchored number is there but is another record.
    Differs,
}

impl AuditLog {
    /// The newest record made durable with `fsync`, if any: what may be anchored (a power
    /// loss cannot take it back).
    pub fn durable_head(&self) -> Option<AuditAnchor> {
        self.durable.lock().ok().and_then(|d| *d)
    }

    /// Called by the group commit's sync: remembers the head the sync covered.
    pub(super) fn sync_and_note(&self, mode: Durability) -> Result<(), crate::store::StoreError> {
        let head = match mode {
            Durability::Fsync => self.head.lock().ok().map(|h| (h.next_seq.saturating_sub(1), h.prev)),
            _ => None,
        };
        self.segments.sync(mode)?;
        if let Some((seq, mac)) = head
            && seq > 0
            && let Ok(mut d) = self.durable.lock()
        {
            *d = Some(AuditAnchor { seq, mac });
        }
        Ok(())
    }

    /// Whether the trail still holds the anchored record.
    pub fn check_anchor(&self, anchor: AuditAnchor) -> Result<AnchorCheck, AuditError> {
        let last = self.head.lock().map_err(|_| AuditError::Poisoned)?.next_seq.saturating_sub(1);
        if last < anchor.seq {
            return Ok(AnchorCheck::Behind { last });
        }
        let views = self.segments.snapshot()?;
        // A segment that starts right after the anchored record names its MAC: the case of
        // a trail that goes on after an accepted loss, whose anchored record is not kept.
        if let Some(next) = views.iter().find(|v| v.first_seq == anchor.seq + 1) {
            let header = Reader::open(next).map_err(|e| frame_err(e, next.first_seq))?.header;
            if header.prev == anchor.mac {
                return Ok(AnchorCheck::Holds);
            }
        }
        let Some(view) = views.iter().rev().find(|v| v.first_seq <= anchor.seq) else {
            return Ok(AnchorCheck::Differs);
        };
        let mut reader = Reader::open(view).map_err(|e| frame_err(e, view.first_seq))?;
        let mut seq = view.first_seq;
        while let Some(p) = reader.next_frame().map_err(|e| frame_err(e, seq))? {
            let body = p.get(1..p.len().saturating_sub(MAC_LEN)).ok_or(AuditError::Corrupt(seq))?;
            let stored: Stored = postcard::from_bytes(body).map_err(|_| AuditError::Corrupt(seq))?;
            seq = stored.seq;
            if seq == anchor.seq {
                let holds = stored_mac(&p) == Some(anchor.mac);
                return Ok(if holds { AnchorCheck::Holds } else { AnchorCheck::Differs });
            }
        }
        Ok(AnchorCheck::Differs)
    }

    /// Goes on after an accepted loss: the next record is `anchor.seq + 1`, in a segment of
    /// its own that chains to the anchored record. Returns the gap to record in the ledger.
    pub fn continue_after(&self, anchor: AuditAnchor, at_micros: i64) -> Result<AuditGap, AuditError> {
        let mut head = self.head.lock().map_err(|_| AuditError::Poisoned)?;
        let from = head.next_seq;
        self.segments.begin(SegmentHeader { first_seq: anchor.seq + 1, prev: anchor.mac })?;
        *head = Head { next_seq: anchor.seq + 1, prev: anchor.mac };
        Ok(AuditGap { from, to: anchor.seq, to_mac: anchor.mac, at_micros })
    }

    /// Makes `verify` accept these gaps (the ledger's record of accepted losses).
    pub fn accept_gaps(&self, gaps: Vec<AuditGap>) {
        if let Ok(mut g) = self.gaps.lock() {
            *g = gaps;
        }
    }

    pub(super) fn accepted_gap(&self, from: u64, next: u64) -> Option<AuditGap> {
        let gaps = self.gaps.lock().ok()?;
        gaps.iter().copied().find(|g| g.from == from && g.to + 1 == next)
    }
}
