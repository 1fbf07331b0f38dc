//! SubjectService: erasure and status.

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::convert::{erasure_out, receipt_out, subject_out};
use super::gate::{Gate, Ids, erasing};
use super::pb::{self, subject_service_server::SubjectService};
use super::regions::Regions;
use super::status::to_status;
use crate::audit::Operation;

/// Subjects per ShredSubjects call at most.
pub const MAX_BATCH: usize = 1000;

/// What a batch asked, for telling a replay from a reuse of its request id.
fn batch_digest(subject_ids: &[String]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for id in subject_ids {
        h.update((id.len() as u64).to_be_bytes());
        h.update(id.as_bytes());
    }
    h.finalize().into()
}

/// One subject's outcome in a batch.
fn shred_result(
    gate: &Gate,
    tenant: &crate::vault::TenantId,
    subject_id: &str,
    result: Result<crate::vault::ShredReceipt, Status>,
) -> pb::ShredSubjectResult {
    let blind = || gate.vault.blind_ids(tenant, Some(subject_id), None).ok().and_then(|(b, _)| b).unwrap_or_default();
    match result {
        Ok(r) => {
            let outcome = if !matches!(r.state, crate::vault::ErasureState::NothingErased) {
                pb::ShredOutcome::Shredded
            } else {
                pb::ShredOutcome::Unknown
            };
            pb::ShredSubjectResult {
                subject_blind_id: r.subject_blind_id.clone(),
                outcome: outcome as i32,
                reason: String::new(),
                receipt: Some(receipt_out(r)),
            }
        }
        Err(s) => {
            // The status's ErrorInfo says a hold kept it (`to_status` of `VaultError::Held`).
            let held = tonic_types::StatusExt::get_details_error_info(&s).is_some_and(|i| i.reason == "LEGAL_HOLD");
            let outcome = if held { pb::ShredOutcome::Held } else { pb::ShredOutcome::Failed };
            pb::ShredSubjectResult {
                subject_blind_id: if s.code() == tonic::Code::InvalidArgument { String::new() } else { blind() },
                outcome: outcome as i32,
                reason: s.message().to_owned(),
                receipt: None,
            }
        }
    }
}

pub struct Subjects {
    regions: Arc<Regions>,
}

impl Subjects {
    pub fn new(regions: Arc<Regions>) -> Self {
        Subjects { regions }
    }
}

#[tonic::async_trait]
impl SubjectService for Subjects {
    async fn shred_subject(
        &self,
        req: Request<pb::ShredSubjectRequest>,
    ) -> Result<Response<pb::ShredSubjectResponse>, Status> {
        let (gate, who) = self.regions.admit(&req).await?;
        let pb::ShredSubjectRequest { subject_id } = req.into_inner();
        let (gate, tenant) = (gate.clone(), who.tenant.clone());
        erasing(&self.regions.work, tenant.as_str(), async move {
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

    async fn shred_subjects(
        &self,
        req: Request<pb::ShredSubjectsRequest>,
    ) -> Result<Response<pb::ShredSubjectsResponse>, Status> {
        let (gate, who) = self.regions.admit(&req).await?;
        let pb::ShredSubjectsRequest { subject_ids, request_id } = req.into_inner();
        if subject_ids.is_empty() || subject_ids.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "subject_ids: 1 to {MAX_BATCH} per batch, got {}",
                subject_ids.len()
            )));
        }
        if request_id.chars().count() > 128 || request_id.chars().any(char::is_control) {
            return Err(Status::invalid_argument("request_id: at most 128 characters, no control characters"));
        }
        let (gate, tenant) = (gate.clone(), who.tenant.clone());
        erasing(&self.regions.work, tenant.as_str(), async move {
            let asked = batch_digest(&subject_ids);
            if !request_id.is_empty()
                && let Some(bytes) = gate.vault.recall_request(&who.tenant, &request_id).map_err(to_status)?
            {
                let (kept_for, answer) = bytes.split_at_checked(32).unwrap_or((&[], &[]));
                if kept_for != asked.as_slice() {
                    return Err(Status::invalid_argument(
                        "request_id: already used within the last day for a different list of subject_ids",
                    ));
                }
                let mut answer = pb::ShredSubjectsResponse::decode(answer)
                    .map_err(|_| Status::data_loss("the kept answer to this request_id is corrupt"))?;
                answer.replayed = true;
                return Ok(Response::new(answer));
            }
            let mut results = Vec::with_capacity(subject_ids.len());
            for subject_id in &subject_ids {
                let result = gate.vault.shred_subject(&who.tenant, subject_id).await.map_err(to_status);
                let ids = Ids { subject_id: Some(subject_id), ..Ids::default() };
                gate.note(&who, Operation::ShredSubject, ids, &result)?;
                results.push(shred_result(&gate, &who.tenant, subject_id, result));
            }
            gate.vault.wait_durable().await.map_err(to_status)?;
            let shredded = results.iter().filter(|r| r.outcome() == pb::ShredOutcome::Shredded).count();
            tracing::info!(
                tenant = who.tenant.as_str(),
                subjects = results.len(),
                shredded,
                "subjects shredded in a batch"
            );
            let answer = pb::ShredSubjectsResponse { results, replayed: false };
            if !request_id.is_empty() {
                let mut kept = asked.to_vec();
                kept.extend_from_slice(&answer.encode_to_vec());
                gate.vault.keep_request(&who.tenant, &request_id, &kept).await.map_err(to_status)?;
            }
            Ok(Response::new(answer))
        })
        .await
    }

    async fn get_subject(
        &self,
        req: Request<pb::GetSubjectRequest>,
    ) -> Result<Response<pb::GetSubjectResponse>, Status> {
        let (gate, who) = self.regions.admit(&req).await?;
        let pb::GetSubjectRequest { subject_id } = req.into_inner();
        let result = gate.vault.get_subject(&who.tenant, &subject_id).map_err(to_status);
        gate.record(&who, Operation::GetSubject, Ids { subject_id: Some(&subject_id), ..Ids::default() }, &result)
            .await?;
        Ok(Response::new(subject_out(result?)))
    }

    async fn get_erasure(&self, req: Request<pb::GetErasureRequest>) -> Result<Response<pb::ErasureStatus>, Status> {
        let (gate, who) = self.regions.admit(&req).await?;
        let pb::GetErasureRequest { erasure_id } = req.into_inner();
        let result = gate.vault.erasure_status(&who.tenant, &erasure_id).map_err(to_status);
        gate.record(&who, Operation::GetErasure, Ids::default(), &result).await?;
        Ok(Response::new(erasure_out(result?)))
    }

    async fn get_receipt_key(
        &self,
        req: Request<pb::GetReceiptKeyRequest>,
    ) -> Result<Response<pb::ReceiptKey>, Status> {
        let (gate, _) = self.regions.admit(&req).await?;
        let pb::GetReceiptKeyRequest {} = req.into_inner();
        let (public_key_hex, key_id) = gate.vault.receipt_public_key();
        Ok(Response::new(pb::ReceiptKey { public_key_hex, key_id }))
    }
}
