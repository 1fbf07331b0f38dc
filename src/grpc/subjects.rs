//! SubjectService: erasure and status.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{erasure_out, receipt_out, subject_out};
use super::gate::{Gate, Ids, erasing};
use super::pb::{self, subject_service_server::SubjectService};
use super::status::to_status;
use crate::audit::Operation;

pub struct Subjects {
    gate: Arc<Gate>,
}

impl Subjects {
    pub fn new(gate: Arc<Gate>) -> Self {
        Subjects { gate }
    }
}

#[tonic::async_trait]
impl SubjectService for Subjects {
    async fn shred_subject(
        &self,
        req: Request<pb::ShredSubjectRequest>,
    ) -> Result<Response<pb::ShredSubjectResponse>, Status> {
        let who = self.gate.admit(&req).await?;
        let pb::ShredSubjectRequest { subject_id } = req.into_inner();
        let (gate, tenant) = (self.gate.clone(), who.tenant.clone());
        erasing(&self.gate.work, tenant.as_str(), async move {
            let result = gate.vault.shred_subject(&who.tenant, &subject_id).await.map_err(to_status);
            gate.record(
                &who,
                Operation::ShredSubject,
                Ids { subject_id: Some(&subject_id), ..Ids::default() },
                &result,
            )
            .await?;
            let receipt = result?;
            tracing::info!(tenant = who.tenant.as_str(), subject = %receipt.subject_blind_id, "subject shredded");
            Ok(Response::new(pb::ShredSubjectResponse { receipt: Some(receipt_out(receipt)) }))
        })
        .await
    }

    async fn get_subject(
        &self,
        req: Request<pb::GetSubjectRequest>,
    ) -> Result<Response<pb::GetSubjectResponse>, Status> {
        let who = self.gate.admit(&req).await?;
        let pb::GetSubjectRequest { subject_id } = req.into_inner();
        let result = self.gate.vault.get_subject(&who.tenant, &subject_id).map_err(to_status);
        self.gate
            .record(&who, Operation::GetSubject, Ids { subject_id: Some(&subject_id), ..Ids::default() }, &result)
            .await?;
        Ok(Response::new(subject_out(result?)))
    }

    async fn get_erasure(&self, req: Request<pb::GetErasureRequest>) -> Result<Response<pb::ErasureStatus>, Status> {
        let who = self.gate.admit(&req).await?;
        let pb::GetErasureRequest { erasure_id } = req.into_inner();
        let result = self.gate.vault.erasure_status(&who.tenant, &erasure_id).map_err(to_status);
        self.gate.record(&who, Operation::GetErasure, Ids::default(), &result).await?;
        Ok(Response::new(erasure_out(result?)))
    }

    async fn get_receipt_key(
        &self,
        req: Request<pb::GetReceiptKeyRequest>,
    ) -> Result<Response<pb::ReceiptKey>, Status> {
        self.gate.admit(&req).await?;
        let pb::GetReceiptKeyRequest {} = req.into_inner();
        let (public_key_hex, key_id) = self.gate.vault.receipt_public_key();
        Ok(Response::new(pb::ReceiptKey { public_key_hex, key_id }))
    }
}
