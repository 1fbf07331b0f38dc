//! The one place vault errors become gRPC statuses. Client mistakes say what to fix;
//! server faults are logged here and answered without internal detail.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::audit::Outcome;
use crate::store::StoreError;
use crate::tenancy::{AuthError, TenancyError};
use crate::vault::VaultError;

pub fn to_status(e: VaultError) -> Status {
    match e {
        VaultError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        VaultError::NotFound(_) | VaultError::Erased(_) => Status::not_found(e.to_string()),
        VaultError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        VaultError::Held(ref hold) => {
            let details = ErrorDetails::with_error_info("LEGAL_HOLD", "chatvault", [("hold".to_owned(), hold.clone())]);
            Status::with_error_details(Code::FailedPrecondition, e.to_string(), details)
        }
        VaultError::Aborted(_) => Status::aborted(e.to_string()),
        VaultError::Busy(_) => Status::with_error_details(
            Code::ResourceExhausted,
            e.to_string(),
            ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
        ),
        VaultError::Integrity(_) | VaultError::Corrupt(_) => {
            tracing::error!(error = %e, "stored data failed verification");
            Status::data_loss(e.to_string())
        }
        VaultError::Store(StoreError::Failed | StoreError::Unavailable(_)) => Status::unavailable(e.to_string()),
        VaultError::Store(StoreError::Full { .. } | StoreError::FullAfterSync { .. }) => full(e.to_string()),
        VaultError::Store(StoreError::Io(_)) => {
            tracing::error!(error = %e, "a storage I/O error failed the request");
            Status::unavailable("the data volume failed an I/O operation; retry later")
        }
        VaultError::Ledger(_) => {
            tracing::error!(error = %e, "the erasure ledger on the key volume failed");
            Status::unavailable("the erasure could not be recorded on the key volume; retry (it is safe to)")
        }
        VaultError::Store(_)
        | VaultError::Key(_)
        | VaultError::Mismatch(_)
        | VaultError::Rollback(_)
        | VaultError::Internal(_) => {
            tracing::error!(error = %e, "request failed on a server fault");
            Status::internal("internal error; see the server log")
        }
    }
}

/// A full data volume: the client may retry later (RetryInfo); the message names the
/// volume for the operator.
pub(super) fn full(message: String) -> Status {
    tracing::error!(%message, "a write was refused: the data volume is full");
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(Duration::from_secs(5))),
    )
}

/// A refused authentication. Lockouts and overload carry RetryInfo so clients back off.
pub fn auth_status(e: &AuthError) -> Status {
    let retry = |code, after: Duration| {
        Status::with_error_details(code, e.to_string(), ErrorDetails::with_retry_info(Some(after)))
    };
    match e {
        AuthError::Missing | AuthError::Malformed | AuthError::Unrecognised | AuthError::Revoked => {
            Status::unauthenticated(e.to_string())
        }
        AuthError::Suspended | AuthError::SourceDenied { .. } => Status::permission_denied(e.to_string()),
        AuthError::LockedOut { retry_after } | AuthError::Throttled { retry_after } => {
            retry(Code::ResourceExhausted, *retry_after)
        }
        AuthError::Busy => retry(Code::Unavailable, Duration::from_secs(1)),
        AuthError::BadForwardedFor(_) => Status::invalid_argument(e.to_string()),
        AuthError::Internal => Status::internal(e.to_string()),
    }
}

pub fn tenancy_status(e: TenancyError) -> Status {
    match e {
        TenancyError::NotFound(_) | TenancyError::KeyNotFound(_) | TenancyError::HoldNotFound(_) => {
            Status::not_found(e.to_string())
        }
        TenancyError::AlreadyExists(_) | TenancyError::IdRetired(_) => Status::already_exists(e.to_string()),
        TenancyError::TooManyKeys(_) => Status::failed_precondition(e.to_string()),
        TenancyError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        TenancyError::Store(StoreError::Failed | StoreError::Unavailable(_)) => Status::unavailable(e.to_string()),
        TenancyError::Store(StoreError::Full { .. } | StoreError::FullAfterSync { .. }) => full(e.to_string()),
        TenancyError::Store(StoreError::Io(_)) => {
            tracing::error!(error = %e, "a storage I/O error failed an admin request");
            Status::unavailable("the data volume failed an I/O operation; retry later")
        }
        TenancyError::Vault(v) => to_status(*v),
        TenancyError::Store(_) | TenancyError::Crypto(_) | TenancyError::Corrupt | TenancyError::Poisoned => {
            tracing::error!(error = %e, "admin request failed on a server fault");
            Status::internal("internal error; see the server log")
        }
    }
}

/// How a call ended, as the audit trail records it.
pub fn outcome_of<T>(result: &Result<T, Status>) -> Outcome {
    let Err(s) = result else { return Outcome::Ok };
    match s.code() {
        Code::Ok => Outcome::Ok,
        Code::InvalidArgument | Code::OutOfRange => Outcome::InvalidArgument,
        Code::NotFound => Outcome::NotFound,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => Outcome::Conflict,
        Code::Unauthenticated => Outcome::Unauthenticated,
        Code::PermissionDenied => Outcome::PermissionDenied,
        Code::ResourceExhausted => Outcome::LockedOut,
        Code::Unavailable => Outcome::Unavailable,
        _ => Outcome::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::{Message, TenantId, Transcript, testing};

    /// An I/O error injected through the storage trait: UNAVAILABLE, nothing kept, and the
    /// next write, once the volume behaves, goes through; a full volume is
    /// RESOURCE_EXHAUSTED naming it.
    #[tokio::test]
    async fn storage_faults_are_unavailable_or_resource_exhausted_and_writes_resume_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let (v, faulty) = testing::open_faulty_store(dir.path(), testing::HandClock::new());
        let tenant = TenantId::parse("acme").unwrap();
        let t =
            |id: &str| Transcript::new(id, "s", vec![Message::new("m", crate::vault::AuthorRole::Visitor, "V", "hi")]);
        faulty.fail_apply.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = v.put_transcript(&tenant, t("a")).await.unwrap_err();
        assert_eq!(to_status(e).code(), Code::Unavailable);
        faulty.fail_apply.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(v.get_transcript(&tenant, "a").is_err(), "nothing of the failed write was kept");
        v.put_transcript(&tenant, t("b")).await.unwrap();
        assert_eq!(v.get_transcript(&tenant, "b").unwrap().messages.len(), 1);

        let full = to_status(VaultError::Store(StoreError::Full { volume: "/srv/chatvault/eu".into() }));
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert!(full.message().contains("/srv/chatvault/eu") && full.message().contains("no space"), "{full:?}");
        assert!(full.get_details_retry_info().is_some());
    }
}
