//! The gate every data call passes: authenticate (tenant from the credential only),
//! then, after the vault answered, record the call in the audit trail.

use std::future::Future;
use std::sync::Arc;

use tonic::{Request, Status};

use super::credentials::{bearer, forwarded_for};
use super::denials::Note;
use super::status::{auth_status, outcome_of, to_status};
use crate::audit::{AuditError, AuditLog, Event, Operation, Outcome};
use crate::tenancy::{Authenticator, Culprit, Denied, Principal};
use crate::vault::Vault;

pub struct Gate {
    pub vault: Arc<Vault>,
    auth: Arc<Authenticator>,
    audit: Arc<AuditLog>,
    denials: super::denials::Denials,
    /// The bounded pools calls draw on (`limits`).
    pub work: Arc<super::limits::Work>,
}

/// The ids a call names: raw ones are blinded with the tenant's key before recording.
#[derive(Default)]
pub struct Ids<'a> {
    pub subject_id: Option<&'a str>,
    pub transcript_id: Option<&'a str>,
    /// Already blinded (hex), when the vault reported it.
    pub subject_blind: Option<String>,
}

impl Gate {
    pub fn new(
        vault: Arc<Vault>,
        auth: Arc<Authenticator>,
        audit: Arc<AuditLog>,
        work: Arc<super::limits::Work>,
    ) -> Self {
        Gate { vault, auth, audit, denials: Default::default(), work }
    }

    /// Who the call acts for. A refusal is recorded (in aggregate, see `denials`), then
    /// answered.
    pub async fn admit<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        let peer = req.remote_addr().map(|a| a.ip()).ok_or_else(|| Status::internal("no peer address"))?;
        let md = req.metadata();
        // A non-bearer authorization header is checked as an empty (malformed) key.
        let token = bearer(md).unwrap_or(Some(""));
        match self.auth.authenticate(token, peer, forwarded_for(md).as_deref()).await {
            Ok(p) => Ok(p),
            Err(denied) => {
                let status = auth_status(&denied.error);
                crate::metrics::get().auth_failure(denied.error.reason());
                if !denied.locked.is_empty() {
                    crate::metrics::get().lockouts.inc_by(denied.locked.len() as u64);
                }
                self.record_denial(&denied, outcome_of::<()>(&Err(status.clone())));
                Err(status)
            }
        }
    }

    fn record_denial(&self, d: &Denied, outcome: Outcome) {
        let ev = Event {
            tenant: d.tenant.as_ref().map(|t| t.as_str().to_owned()).unwrap_or_default(),
            key_id: d.key_id.as_ref().map(|k| k.as_str().to_owned()).unwrap_or_default(),
            source: d.source.to_string(),
            ..Event::default()
        };
        if self.denials.note(d.source, outcome, &ev, std::time::Instant::now()) == Note::Record
            && let Err(e) = self.audit.append(Operation::Authenticate, outcome, ev.clone())
        {
            tracing::error!(error = %e, "cannot record a failed authentication");
        }
        for c in &d.locked {
            // One record per culprit locked: at most one per key id and source, source or
            // network per back-off period.
            let what = c.describe();
            let ev = match c {
                Culprit::Key(..) => ev.clone(),
                Culprit::Source(_) | Culprit::Network(_) => Event { key_id: String::new(), ..ev.clone() },
            };
            tracing::warn!(locked = %what, "authentication locked out after repeated failures");
            if let Err(e) = self.audit.append(Operation::Lockout, Outcome::LockedOut, ev) {
                tracing::error!(error = %e, "cannot record a lockout");
            }
        }
    }

    /// Writes the aggregates of refusals whose window closed (all of them at shutdown).
    pub fn flush_denials(&self, all: bool) {
        for (outcome, ev) in self.denials.take_closed(std::time::Instant::now(), all) {
            if let Err(e) = self.audit.append(Operation::AuthFailedRepeated, outcome, ev) {
                tracing::error!(error = %e, "cannot record refused authentications");
            }
        }
    }

    /// Records a served call. Changes are made durable (with their record) before the
    /// reply; if the record cannot be written the call is answered UNAVAILABLE.
    pub async fn record<T>(
        &self,
        who: &Principal,
        op: Operation,
        ids: Ids<'_>,
        result: &Result<T, Status>,
    ) -> Result<(), Status> {
        self.note(who, op, ids, result)?;
        if op.is_change() && result.is_ok() {
            self.vault.wait_durable().await.map_err(to_status)?;
        }
        Ok(())
    }

    /// Appends a served call's record without waiting for it to be durable: for a batch,
    /// whose one wait before the reply covers every record.
    pub fn note<T>(
        &self,
        who: &Principal,
        op: Operation,
        ids: Ids<'_>,
        result: &Result<T, Status>,
    ) -> Result<(), Status> {
        let (subject, transcript) =
            self.vault.blind_ids(&who.tenant, ids.subject_id, ids.transcript_id).unwrap_or((None, None));
        let ev = Event {
            tenant: who.tenant.as_str().to_owned(),
            key_id: who.key_id.as_str().to_owned(),
            subject: ids.subject_blind.or(subject).unwrap_or_default(),
            transcript: transcript.unwrap_or_default(),
            source: who.source.to_string(),
            count: 1,
            detail: String::new(),
        };
        self.audit.append(op, outcome_of(result), ev).map_err(audit_status)?;
        Ok(())
    }
}

/// Runs a change to its end on its own task, even if the client goes away or the deadline
/// passes: a change that was applied is always recorded. The vault does not wait for
/// durability inside it; the recording does, once, for the change and its record.
pub async fn detached<T: Send + 'static>(
    call: impl Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(Vault::deferring_durability(call)).await.map_err(|_| Status::internal("worker failed"))?
}

/// Runs an erasure on the blocking pool, to its end: it syncs the key volume (the
/// erasure ledger) while holding its subject's lock, which must not stall an executor
/// thread, and like every change it finishes even if the client goes away.
pub async fn erasing<T: Send + 'static>(
    work: &super::limits::Work,
    tenant: &str,
    call: impl Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    let slot = work.erasure_slot(tenant).await?;
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        // Held by the erasure itself: a caller that goes away does not free it early.
        let _slot = slot;
        handle.block_on(Vault::deferring_durability(call))
    })
    .await
    .map_err(|_| Status::internal("worker failed"))?
}

pub fn audit_status(e: AuditError) -> Status {
    if let AuditError::Store(full @ crate::store::StoreError::Full { .. }) = e {
        return super::status::full(full.to_string());
    }
    tracing::error!(error = %e, "audit trail write failed; refusing to serve unrecorded");
    Status::unavailable("the audit trail could not record this call; retry later")
}
