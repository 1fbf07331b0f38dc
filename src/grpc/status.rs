//! The one place vault errors become gRPC statuses. Client mistakes say what to fix;
//! server faults are logged here and answered without internal detail.

use tonic::Status;

use crate::store::StoreError;
use crate::vault::VaultError;

pub fn to_status(e: VaultError) -> Status {
    match e {
        VaultError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        VaultError::NotFound(_) | VaultError::Erased(_) => Status::not_found(e.to_string()),
        VaultError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        VaultError::Aborted(_) => Status::aborted(e.to_string()),
        VaultError::Integrity(_) | VaultError::Corrupt(_) => {
            tracing::error!(error = %e, "stored data failed verification");
            Status::data_loss(e.to_string())
        }
        VaultError::Store(StoreError::Failed) => Status::unavailable(e.to_string()),
        VaultError::Store(_) | VaultError::Key(_) | VaultError::Mismatch(_) | VaultError::Internal(_) => {
            tracing::error!(error = %e, "request failed on a server fault");
            Status::internal("internal error; see the server log")
        }
    }
}
