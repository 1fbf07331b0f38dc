//! SubjectService: erasure and status.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{receipt_out, subject_out};
use super::pb::{self, subject_service_server::SubjectService};
use super::status::to_status;
use super::tenant::tenant_of;
use crate::vault::Vault;

pub struct Subjects {
    vault: Arc<Vault>,
}

impl Subjects {
    pub fn new(vault: Arc<Vault>) -> Self {
        Subjects { vault }
    }
}

#[tonic::async_trait]
impl SubjectService for Subjects {
    async fn shred_subject(
        &self,
        req: Request<pb::ShredSubjectRequest>,
    ) -> Result<Response<pb::ShredSubjectResponse>, Status> {
        let tenant = tenant_of(&req)?;
        let pb::ShredSubjectRequest { subject_id } = req.into_inner();
        let receipt = self.vault.shred_subject(&tenant, &subject_id).await.map_err(to_status)?;
        tracing::info!(tenant = tenant.as_str(), subject = %receipt.subject_blind_id, "subject shredded");
        Ok(Response::new(pb::ShredSubjectResponse { receipt: Some(receipt_out(receipt)) }))
    }

    async fn get_subject(
        &self,
        req: Request<pb::GetSubjectRequest>,
    ) -> Result<Response<pb::GetSubjectResponse>, Status> {
        let tenant = tenant_of(&req)?;
        let pb::GetSubjectRequest { subject_id } = req.into_inner();
        let info = self.vault.get_subject(&tenant, &subject_id).map_err(to_status)?;
        Ok(Response::new(subject_out(info)))
    }
}
