//! Bulk reads for export: every readable transcript of a subject or of a tenant, one
//! transcript at a time and its messages in chunks, so memory stays bounded by one chunk
//! whatever the size of the transcript or the tenant.

use std::collections::HashSet;
use std::ops::ControlFlow;

use super::layout::{self, Blind};
use super::messages::Read;
use super::model::{MessageRef, TenantId, Transcript};
use super::records::Header;
use super::{Vault, VaultError};

/// Header and subject-index entries read per store scan.
const INDEX_CHUNK: usize = 256;
/// Sealed messages read per store scan: at 16 KiB each, about 1 MiB in memory at a time.
const MESSAGE_CHUNK: usize = 64;

/// Takes one index or header key; breaks to stop the scan.
type KeyVisitor<'a> = dyn FnMut(&[u8]) -> Result<ControlFlow<()>, VaultError> + 'a;

/// Whose transcripts a walk visits.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// One subject's current (not shredded) transcripts, newest `started_at` first.
    Subject(&'a str),
    /// Every readable transcript of the tenant, in an order that is stable but not
    /// meaningful (blind-id order). Transcripts of shredded subjects are not readable.
    Tenant,
}

/// What a walk hands its visitor. Per transcript: one `Begin` (everything but the
/// messages), then each `Message` in order, then `End` with the count. A message is lent
/// for the call only: its plaintext is zeroized when the visitor returns.
pub enum Visit<'a> {
    Begin(&'a Transcript),
    Message(MessageRef<'a>),
    End { message_count: u32 },
}

/// How much a walk visited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Walked {
    pub transcripts: u64,
    pub messages: u64,
}

impl Vault {
    /// Visits every readable transcript in `scope` with its messages, decrypted, until the
    /// visitor breaks. Returns what was visited.
    ///
    /// Not a snapshot: a transcript is read as it is when the walk reaches it. One that is
    /// replaced, deleted or shredded before that is skipped; one that changes while it is
    /// read fails the walk with `Aborted`. A failure after a transcript's `Begin` is
    /// returned, never skipped, so a visitor never sees half a transcript as whole.
    pub fn walk_transcripts(
        &self,
        tenant: &TenantId,
        scope: Scope<'_>,
        visit: &mut dyn FnMut(Visit<'_>) -> ControlFlow<()>,
    ) -> Result<Walked, VaultError> {
        let mut walked = Walked::default();
        match scope {
            Scope::Subject(subject_id) => {
                self.limits.id("subject_id", subject_id)?;
                let Some(tkey) = self.tenant_key(tenant, false)? else { return Ok(walked) };
                let (sb, _) = self.blinds(&tkey, Some(subject_id), None);
                let generation = match self.read_subject(tenant, &sb)? {
                    Some(s) if s.active => s.generation,
                    _ => return Ok(walked),
                };
                // The subject index is ordered by started_at, which a replace may change: a
                // cursor over it could meet a moved transcript twice, or pass it by. So the
                // ids come first (32 bytes each), then each transcript as it is when reached.
                let mut order = Vec::new();
                let mut seen = HashSet::new();
                let prefix = layout::by_subject_prefix(tenant.as_str(), &sb, generation);
                let _never_stops = self.for_each_key(&prefix, &mut |key| {
                    let tb = layout::trailing_blind(key).ok_or(VaultError::Corrupt("subject index"))?;
                    if seen.insert(tb) {
                        order.push(tb);
                    }
                    Ok(ControlFlow::Continue(()))
                })?;
                for tb in &order {
                    if self.walk_blind(tenant, tb, Some((sb, generation)), visit, &mut walked)?.is_break() {
                        break;
                    }
                }
            }
            Scope::Tenant => {
                self.check_open(tenant)?;
                // Header keys never move, so a cursor over them meets each transcript once.
                // Whether the visitor stopped it is the visitor's to know.
                let _stopped = self.for_each_key(&layout::headers_prefix(tenant.as_str()), &mut |key| {
                    let tb = layout::trailing_blind(key).ok_or(VaultError::Corrupt("transcript header"))?;
                    self.walk_blind(tenant, &tb, None, visit, &mut walked)
                })?;
            }
        }
        Ok(walked)
    }

    /// Calls `f` with every key under `prefix`, in order, a store scan of `INDEX_CHUNK` at
    /// a time, until `f` breaks.
    fn for_each_key(&self, prefix: &[u8], f: &mut KeyVisitor<'_>) -> Result<ControlFlow<()>, VaultError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let entries = self.store.scan(prefix, after.as_deref(), INDEX_CHUNK)?;
            for (key, _) in &entries {
                if f(key)?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            if entries.len() < INDEX_CHUNK {
                return Ok(ControlFlow::Continue(()));
            }
            after = entries.last().map(|(k, _)| k.clone());
        }
    }

    /// Visits one transcript by blind id, if it is still there (and, for a subject walk,
    /// still that subject generation's).
    fn walk_blind(
        &self,
        tenant: &TenantId,
        tb: &Blind,
        subject: Option<(Blind, u32)>,
        visit: &mut dyn FnMut(Visit<'_>) -> ControlFlow<()>,
        walked: &mut Walked,
    ) -> Result<ControlFlow<()>, VaultError> {
        let hkey = layout::header(tenant.as_str(), tb);
        let Some(h) = self.read_header(&hkey)? else { return Ok(ControlFlow::Continue(())) };
        if subject.is_some_and(|(sb, generation)| h.subject != sb || h.generation != generation) {
            return Ok(ControlFlow::Continue(()));
        }
        self.walk_one(tenant, tb, &hkey, &h, visit, walked)
    }

    fn walk_one(
        &self,
        tenant: &TenantId,
        tb: &Blind,
        hkey: &[u8],
        h: &Header,
        visit: &mut dyn FnMut(Visit<'_>) -> ControlFlow<()>,
        walked: &mut Walked,
    ) -> Result<ControlFlow<()>, VaultError> {
        let summary = self.check_live(tenant, h).and_then(|()| self.summary(tenant, tb, h));
        let (t, tk) = match summary.or_else(|e| self.unless_replaced(e, tenant, hkey, h)) {
            Ok(s) => s,
            // Gone (deleted, replaced or shredded) since the index was read.
            Err(VaultError::NotFound(_) | VaultError::Aborted(_) | VaultError::Erased(_)) => {
                return Ok(ControlFlow::Continue(()));
            }
            Err(e) => return Err(e),
        };
        if visit(Visit::Begin(&t)).is_break() {
            return Ok(ControlFlow::Break(()));
        }
        let mut flow = ControlFlow::Continue(());
        let count = self
            .read_messages(tenant, tb, h, &tk, MESSAGE_CHUNK, &mut |read| {
                if let Read::Message(m) = read {
                    flow = visit(Visit::Message(m));
                    walked.messages += 1;
                }
                Ok(flow)
            })
            .or_else(|e| self.unless_replaced(e, tenant, hkey, h))
            .map_err(changed_while_read)?;
        if flow.is_break() {
            return Ok(flow);
        }
        // A transcript replaced, deleted or shredded during the read has its messages
        // reclaimed after `reclaim_min_age_ms`; if that happened (a reader that stalled), the
        // messages read may stop short. What looks whole must be whole: stop instead.
        match self.read_header(hkey)? {
            // A close meanwhile changes only ended_at, not the messages: that read stands.
            Some(now) if now.incarnation == h.incarnation => self.check_live(tenant, h).map_err(changed_while_read)?,
            _ => return Err(changed_while_read(VaultError::Aborted(String::new()))),
        }
        walked.transcripts += 1;
        Ok(visit(Visit::End { message_count: count }))
    }
}

/// A transcript that went away after the walk began writing it: the reader has part of it,
/// so the export cannot go on, but nothing is corrupt. The client retries.
fn changed_while_read(e: VaultError) -> VaultError {
    match e {
        VaultError::NotFound(_) | VaultError::Erased(_) | VaultError::Aborted(_) => {
            VaultError::Aborted("a transcript changed while it was exported; retry".into())
        }
        other => other,
    }
}
