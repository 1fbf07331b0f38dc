//! Legal holds (GDPR Art. 17(3)(e)): what a hold covers is never erased, purged or
//! shredded until it is released. The holds themselves live with the tenant's registry
//! record (control-plane data, anchored in the erasure ledger); the vault asks through
//! [`HoldCheck`] under the same subject locks its erasures take, so a hold acknowledged
//! before an erasure reaches the lock always stops it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::layout::Blind;
use super::{TenantId, Vault, VaultError};

/// What one hold covers. Subjects and transcripts are named by their blind ids only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldScope {
    /// Every transcript of the tenant, and the tenant itself.
    Tenant,
    Subject(Blind),
    /// One transcript, and so its subject's shred (which would erase it too).
    Transcript {
        transcript: Blind,
        subject: Blind,
    },
}

/// Answers whether a hold covers something about to be erased: the id of one that does.
pub trait HoldCheck: Send + Sync {
    /// A hold on the tenant, on `subject`, or on a transcript of `subject` (or, when
    /// `transcript` is given, on that transcript only besides the tenant and subject).
    fn hold_on(&self, tenant: &str, subject: &Blind, transcript: Option<&Blind>) -> Option<String>;
    /// Any hold of the tenant's.
    fn any_hold(&self, tenant: &str) -> Option<String>;
}

/// Whether a hold covers `scope`'s target given a question about `subject`/`transcript`.
pub fn covers(scope: &HoldScope, subject: &Blind, transcript: Option<&Blind>) -> bool {
    match (scope, transcript) {
        (HoldScope::Tenant, _) => true,
        (HoldScope::Subject(s), _) => s == subject,
        (HoldScope::Transcript { transcript: t, .. }, Some(asked)) => t == asked,
        (HoldScope::Transcript { subject: s, .. }, None) => s == subject,
    }
}

impl Vault {
    /// Where the vault asks about holds (the tenant registry, once open).
    pub fn attach_holds(&self, holds: Arc<dyn HoldCheck>) {
        if let Ok(mut h) = self.holds.write() {
            *h = Some(holds);
        }
    }

    /// Forgets where holds are asked: the registry holds the vault too, so a process that
    /// closes a vault it keeps running past (`chatvault repair`) breaks the cycle first.
    pub fn detach_holds(&self) {
        if let Ok(mut h) = self.holds.write() {
            *h = None;
        }
    }

    pub(super) fn hold_on(&self, tenant: &TenantId, subject: &Blind, transcript: Option<&Blind>) -> Option<String> {
        // A poisoned lock still holds the holds: they are read, never lost to a panic.
        let h = self.holds.read().unwrap_or_else(|p| p.into_inner());
        h.as_ref()?.hold_on(tenant.as_str(), subject, transcript)
    }

    /// Refuses an erasure a hold covers, naming the hold.
    pub(super) fn refuse_if_held(
        &self,
        tenant: &TenantId,
        subject: &Blind,
        transcript: Option<&Blind>,
    ) -> Result<(), VaultError> {
        match self.hold_on(tenant, subject, transcript) {
            Some(id) => Err(VaultError::Held(id)),
            None => Ok(()),
        }
    }

    pub(super) fn refuse_if_tenant_held(&self, tenant: &TenantId) -> Result<(), VaultError> {
        let held =
            self.holds.read().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|h| h.any_hold(tenant.as_str()));
        match held {
            Some(id) => Err(VaultError::Held(id)),
            None => Ok(()),
        }
    }

    /// Runs `f` (setting a hold) while no erasure of what `scope` covers is under way:
    /// one that started first finishes, one that comes later sees the hold.
    /// A transcript's subject is checked again under the lock: one moved to another
    /// subject meanwhile is refused (ABORTED, retry), so a hold never names a stale one.
    pub fn while_erasures_wait<R>(
        &self,
        tenant: &TenantId,
        scope: &HoldScope,
        f: impl FnOnce() -> R,
    ) -> Result<R, VaultError> {
        let _held = match scope {
            HoldScope::Tenant => self.locks.lock_all(),
            HoldScope::Subject(s) | HoldScope::Transcript { subject: s, .. } => self.locks.lock(tenant.as_str(), &[s]),
        };
        if let HoldScope::Transcript { transcript, subject } = scope {
            let h = self.read_header(&super::layout::header(tenant.as_str(), transcript))?;
            if h.is_none_or(|h| h.subject != *subject) {
                return Err(VaultError::Aborted(
                    "transcript_id: the transcript was replaced or deleted while the hold was being set; retry".into(),
                ));
            }
        }
        Ok(f())
    }

    /// The blind id of a subject, for naming it in a hold.
    pub fn subject_blind(&self, tenant: &TenantId, subject_id: &str) -> Result<Blind, VaultError> {
        let _epoch = self.epoch_shared()?;
        let tkey = self.tenant_key(tenant, true)?.ok_or_else(|| VaultError::Internal("tenant key".into()))?;
        Ok(self.blinds(&tkey, Some(subject_id), None).0)
    }

    /// A transcript's blind id and its current subject's, for a hold on it.
    pub fn transcript_blinds(&self, tenant: &TenantId, transcript_id: &str) -> Result<(Blind, Blind), VaultError> {
        let tkey = self.tenant_key(tenant, false)?.ok_or(VaultError::NotFound("transcript"))?;
        let (_, tb) = self.blinds(&tkey, None, Some(transcript_id));
        let h = self
            .read_header(&super::layout::header(tenant.as_str(), &tb))?
            .ok_or(VaultError::NotFound("transcript"))?;
        self.check_live(tenant, &h)?;
        Ok((tb, h.subject))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transcript_hold_stops_its_subjects_shred_but_not_its_siblings_deletion() {
        let hold = HoldScope::Transcript { transcript: [1; 32], subject: [2; 32] };
        assert!(covers(&hold, &[2; 32], None), "shredding the subject would erase the held transcript");
        assert!(covers(&hold, &[2; 32], Some(&[1; 32])));
        assert!(!covers(&hold, &[2; 32], Some(&[3; 32])), "another transcript of the subject");
        assert!(!covers(&hold, &[4; 32], None));
        assert!(covers(&HoldScope::Subject([2; 32]), &[2; 32], Some(&[9; 32])));
        assert!(covers(&HoldScope::Tenant, &[7; 32], None));
    }
}
