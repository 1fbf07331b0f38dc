//! TranscriptService: converts, calls the vault, converts back. No logic of its own.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{messages_in, timestamp_in, timestamp_out, transcript_in, transcript_out};
use super::pb::{self, transcript_service_server::TranscriptService};
use super::status::to_status;
use super::tenant::tenant_of;
use crate::vault::Vault;

pub struct Transcripts {
    vault: Arc<Vault>,
}

impl Transcripts {
    pub fn new(vault: Arc<Vault>) -> Self {
        Transcripts { vault }
    }
}

/// Runs a blocking vault read (it may decrypt thousands of records) off the executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::vault::VaultError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|_| Status::internal("worker failed"))?.map_err(to_status)
}

#[tonic::async_trait]
impl TranscriptService for Transcripts {
    async fn put_transcript(
        &self,
        req: Request<pb::PutTranscriptRequest>,
    ) -> Result<Response<pb::PutTranscriptResponse>, Status> {
        let tenant = tenant_of(&req)?;
        let pb::PutTranscriptRequest { transcript } = req.into_inner();
        let transcript = transcript_in(transcript)?;
        let replaced = self.vault.put_transcript(&tenant, transcript).await.map_err(to_status)?;
        Ok(Response::new(pb::PutTranscriptResponse { replaced }))
    }

    async fn append_messages(
        &self,
        req: Request<pb::AppendMessagesRequest>,
    ) -> Result<Response<pb::AppendMessagesResponse>, Status> {
        let tenant = tenant_of(&req)?;
        let pb::AppendMessagesRequest { transcript_id, messages, expected_message_count } = req.into_inner();
        let messages = messages_in("messages", messages)?;
        let message_count = self
            .vault
            .append_messages(&tenant, &transcript_id, messages, expected_message_count)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::AppendMessagesResponse { message_count }))
    }

    async fn close_transcript(
        &self,
        req: Request<pb::CloseTranscriptRequest>,
    ) -> Result<Response<pb::CloseTranscriptResponse>, Status> {
        let tenant = tenant_of(&req)?;
        let pb::CloseTranscriptRequest { transcript_id, ended_at } = req.into_inner();
        let ended_at = timestamp_in("ended_at", ended_at)?;
        let ended = self.vault.close_transcript(&tenant, &transcript_id, ended_at).await.map_err(to_status)?;
        Ok(Response::new(pb::CloseTranscriptResponse { ended_at: Some(timestamp_out(ended)) }))
    }

    async fn get_transcript(
        &self,
        req: Request<pb::GetTranscriptRequest>,
    ) -> Result<Response<pb::GetTranscriptResponse>, Status> {
        let tenant = tenant_of(&req)?;
        let pb::GetTranscriptRequest { transcript_id } = req.into_inner();
        let vault = self.vault.clone();
        let t = blocking(move || vault.get_transcript(&tenant, &transcript_id)).await?;
        Ok(Response::new(pb::GetTranscriptResponse { transcript: Some(transcript_out(t)) }))
    }

    async fn list_transcripts(
        &self,
        req: Request<pb::ListTranscriptsRequest>,
    ) -> Result<Response<pb::ListTranscriptsResponse>, Status> {
        let tenant = tenant_of(&req)?;
        let pb::ListTranscriptsRequest { subject_id, page_size, page_token } = req.into_inner();
        let vault = self.vault.clone();
        let page = blocking(move || vault.list_transcripts(&tenant, &subject_id, page_size, &page_token)).await?;
        Ok(Response::new(pb::ListTranscriptsResponse {
            transcripts: page.transcripts.into_iter().map(transcript_out).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn delete_transcript(
        &self,
        req: Request<pb::DeleteTranscriptRequest>,
    ) -> Result<Response<pb::DeleteTranscriptResponse>, Status> {
        let tenant = tenant_of(&req)?;
        let pb::DeleteTranscriptRequest { transcript_id } = req.into_inner();
        self.vault.delete_transcript(&tenant, &transcript_id).await.map_err(to_status)?;
        Ok(Response::new(pb::DeleteTranscriptResponse {}))
    }
}
