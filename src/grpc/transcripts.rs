//! TranscriptService: admit, convert, call the vault, record, convert back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{messages_in, receipt_out, timestamp_in, timestamp_out, transcript_in, transcript_out};
use super::gate::{Ids, detached, erasing};
use super::pb::{self, transcript_service_server::TranscriptService};
use super::regions::Regions;
use super::status::to_status;
use crate::audit::Operation;

pub struct Transcripts {
    regions: Arc<Regions>,
}

impl Transcripts {
    pub fn new(regions: Arc<Regions>) -> Self {
        Transcripts { regions }
    }
}

/// Runs a blocking vault read (it may decrypt thousands of records) off the executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::vault::VaultError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|_| Status::internal("worker failed"))?.map_err(to_status)
}

fn transcript(id: &str) -> Ids<'_> {
    Ids { transcript_id: Some(id), ..Ids::default() }
}

#[tonic::async_trait]
impl TranscriptService for Transcripts {
    async fn put_transcript(
        &self,
        req: Request<pb::PutTranscriptRequest>,
    ) -> Result<Response<pb::PutTranscriptResponse>, Status> {
        let (gate, who) = self.regions.admit(&req).await?;
        let pb::PutTranscriptRequest { transcript } = req.into_inner();
        detached(async move {
            let (tid, sid) =
                transcript.as_ref().map(|t| (t.transcript_id.clone(), t.subject_id.clone())).unwrap_or_default();
            let result = match transcript_in(transcript) {
                Ok(t) => gate.vault.put_transcript(&who.tenant, t).await.map_err(to_status),
                Err(e) => Err(e),
            };
            let ids = Ids { subject_id: Some(&sid), transcript_id: Some(&tid), subject_blind: None };
            gate.record(&who, Operation::PutTranscript, ids, &result).await?;
            Ok(Response::new(pb::PutTranscriptResponse { replaced: result? }))
        })
        .await
    }

    async fn append_messages(
        &self,
        req: Request<pb::AppendMessagesRequest>,
    ) -> Result<Response<pb::AppendMessagesResponse>, Status> {
        let (gate, who) = self.regions.admit(&req).await?;
        let pb::AppendMessagesRequest { transcript_id, messages, expected_message_count } = req.into_inner();
        detached(async move {
            let result = match messages_in("messages", messages) {
                Ok(m) => gate
                    .vault
                    .append_messages(&who.tenant, &transcript_id, m, expected_message_count)
                    .await
                    .map_err(to_status),
                Err(e) => Err(e),
            };
            let ids = Ids {
                subject_blind: result.as_ref().ok().map(|t| t.subject_blind_id.clone()),
                ..transcript(&transcript_id)
            };
            gate.record(&who, Operation::AppendMessages, ids, &result).await?;
            Ok(Response::new(pb::AppendMessagesResponse { message_count: result?.value }))
        })
        .await
    }

    async fn close_transcript(
        &self,
        req: Request<pb::CloseTranscriptRequest>,
    ) -> Result<Response<pb::CloseTranscriptResponse>, Status> {
        let (gate, who) = self.regions.admit(&req).await?;
        let pb::CloseTranscriptRequest { transcript_id, ended_at } = req.into_inner();
        detached(async move {
            let result = match timestamp_in("ended_at", ended_at) {
                Ok(at) => gate.vault.close_transcript(&who.tenant, &transcript_id, at).await.map_err(to_status),
                Err(e) => Err(e),
            };
            let ids = Ids {
                subject_blind: result.as_ref().ok().map(|t| t.subject_blind_id.clone()),
                ..transcript(&transcript_id)
            };
            gate.record(&who, Operation::CloseTranscript, ids, &result).await?;
            Ok(Response::new(pb::CloseTranscriptResponse { ended_at: Some(timestamp_out(result?.value)) }))
        })
        .await
    }

    async fn get_transcript(
        &self,
        req: Request<pb::GetTranscriptRequest>,
    ) -> Result<Response<pb::GetTranscriptResponse>, Status> {
        let (gate, who) = self.regions.admit(&req).await?;
        let pb::GetTranscriptRequest { transcript_id } = req.into_inner();
        let (vault, tenant, id) = (gate.vault.clone(), who.tenant.clone(), transcript_id.clone());
        let result = match self.regions.work.read_slot(who.tenant.as_str()).await {
            Ok(slot) => {
                let mut budget = self.regions.work.byte_budget(tenant.as_str());
                blocking(move || {
                    let _slot = slot;
                    let t = vault.get_transcript_reserving(&tenant, &id, &mut |n| budget.reserve(n))?;
                    Ok((t, budget))
                })
                .await
            }
            Err(busy) => Err(busy),
        };
        let subject = result.as_ref().ok().map(|(t, _)| t.subject_id.clone());
        let ids = Ids { subject_id: subject.as_deref(), ..transcript(&transcript_id) };
        gate.record(&who, Operation::GetTranscript, ids, &result).await?;
        let (t, budget) = result?;
        let mut resp = Response::new(pb::GetTranscriptResponse { transcript: Some(transcript_out(t)) });
        // The bytes stay counted until the response is out, not just decrypted.
        resp.extensions_mut().insert(super::observe::Hold::new(budget));
        Ok(resp)
    }

    async fn list_transcripts(
        &self,
        req: Request<pb::ListTranscriptsRequest>,
    ) -> Result<Response<pb::ListTranscriptsResponse>, Status> {
        let (gate, who) = self.regions.admit(&req).await?;
        let pb::ListTranscriptsRequest { subject_id, page_size, page_token } = req.into_inner();
        let (vault, tenant, sid) = (gate.vault.clone(), who.tenant.clone(), subject_id.clone());
        let result = match self.regions.work.read_slot(who.tenant.as_str()).await {
            Ok(slot) => {
                blocking(move || {
                    let _slot = slot;
                    vault.list_transcripts(&tenant, &sid, page_size, &page_token)
                })
                .await
            }
            Err(busy) => Err(busy),
        };
        let ids = Ids { subject_id: Some(&subject_id), ..Ids::default() };
        gate.record(&who, Operation::ListTranscripts, ids, &result).await?;
        let page = result?;
        Ok(Response::new(pb::ListTranscriptsResponse {
            transcripts: page.transcripts.into_iter().map(transcript_out).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn delete_transcript(
        &self,
        req: Request<pb::DeleteTranscriptRequest>,
    ) -> Result<Response<pb::DeleteTranscriptResponse>, Status> {
        let (gate, who) = self.regions.admit(&req).await?;
        let pb::DeleteTranscriptRequest { transcript_id } = req.into_inner();
        let (gate, tenant) = (gate.clone(), who.tenant.clone());
        erasing(&self.regions.work, tenant.as_str(), async move {
            let result = gate.vault.delete_transcript(&who.tenant, &transcript_id).await.map_err(to_status);
            let ids = Ids {
                subject_blind: result.as_ref().ok().map(|t| t.subject_blind_id.clone()),
                ..transcript(&transcript_id)
            };
            gate.record(&who, Operation::DeleteTranscript, ids, &result).await?;
            Ok(Response::new(pb::DeleteTranscriptResponse { receipt: Some(receipt_out(result?.value)) }))
        })
        .await
    }
}
