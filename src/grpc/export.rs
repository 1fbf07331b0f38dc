//! ExportService: admit, check the request, record the export, then stream the JSON
//! document from a blocking thread through a small channel, so a slow reader holds back
//! the vault walk instead of letting chunks pile up in memory.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::gate::{Gate, Ids};
use super::pb::{self, export_service_server::ExportService};
use super::status::to_status;
use crate::audit::Operation;
use crate::export::{DEFAULT_CHUNK_BYTES, Export, ExportError};
use crate::tenancy::Principal;
use crate::vault::Scope;

/// Chunks in flight between the walk and the connection: with HTTP/2's own window, a
/// stalled reader costs the server a few hundred KiB, not the export.
const CHANNEL_CHUNKS: usize = 4;

pub type ChunkStream = ReceiverStream<Result<pb::ExportChunk, Status>>;

pub struct Exports {
    gate: Arc<Gate>,
}

impl Exports {
    pub fn new(gate: Arc<Gate>) -> Self {
        Exports { gate }
    }

    async fn stream(&self, who: Principal, subject_id: Option<String>) -> Result<Response<ChunkStream>, Status> {
        let (op, scope) = match &subject_id {
            Some(id) => (Operation::ExportSubject, Scope::Subject(id)),
            None => (Operation::ExportTenant, Scope::Tenant),
        };
        let export = Export::start(&self.gate.vault, &who.tenant, scope).map_err(export_status);
        let ids = Ids { subject_id: subject_id.as_deref(), ..Ids::default() };
        // Recorded before the first byte leaves: an export the trail cannot hold is refused.
        self.gate.record(&who, op, ids, &export).await?;
        let export = export?;
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let gate = self.gate.clone();
        tokio::task::spawn_blocking(move || {
            let mut send = |data| tx.blocking_send(Ok(pb::ExportChunk { data })).is_ok();
            match export.write(&gate.vault, DEFAULT_CHUNK_BYTES, &mut send) {
                Ok(done) => tracing::info!(
                    tenant = who.tenant.as_str(),
                    operation = %op,
                    transcripts = done.transcripts,
                    messages = done.messages,
                    bytes = done.bytes,
                    "export finished"
                ),
                Err(ExportError::Cancelled) => {
                    tracing::info!(tenant = who.tenant.as_str(), operation = %op, "export cancelled by its reader")
                }
                Err(e) => {
                    // The reader gets the status after a partial document: not valid JSON.
                    let _ = tx.blocking_send(Err(export_status(e)));
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn export_status(e: ExportError) -> Status {
    match e {
        ExportError::Vault(v) => to_status(v),
        ExportError::Cancelled => Status::cancelled(e.to_string()),
        ExportError::Json => {
            tracing::error!(error = %e, "export failed");
            Status::internal(e.to_string())
        }
    }
}

#[tonic::async_trait]
impl ExportService for Exports {
    type ExportSubjectStream = ChunkStream;
    type ExportTenantStream = ChunkStream;

    async fn export_subject(&self, req: Request<pb::ExportSubjectRequest>) -> Result<Response<ChunkStream>, Status> {
        let who = self.gate.admit(&req).await?;
        let pb::ExportSubjectRequest { subject_id } = req.into_inner();
        self.stream(who, Some(subject_id)).await
    }

    async fn export_tenant(&self, req: Request<pb::ExportTenantRequest>) -> Result<Response<ChunkStream>, Status> {
        let who = self.gate.admit(&req).await?;
        self.stream(who, None).await
    }
}
