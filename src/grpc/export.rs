//! ExportService: admit, check the request, record the export, then stream the JSON
//! document from a blocking thread through a small channel, so a slow reader holds back
//! the vault walk instead of letting chunks pile up in memory.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{self, error::SendTimeoutError};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::gate::{Gate, Ids};
use super::observe::Connection;
use super::pb::{self, export_service_server::ExportService};
use super::regions::Regions;
use super::status::to_status;
use crate::audit::Operation;
use crate::export::{DEFAULT_CHUNK_BYTES, Export, ExportError};
use crate::tenancy::Principal;
use crate::vault::Scope;

/// Chunks in flight between the walk and the connection: with HTTP/2's own window, a
/// stalled reader costs the server a few hundred KiB, not the export.
const CHANNEL_CHUNKS: usize = 4;

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ExportChunk, Status>> + Send>>;

pub struct Exports {
    regions: Arc<Regions>,
}

impl Exports {
    pub fn new(regions: Arc<Regions>) -> Self {
        Exports { regions }
    }

    async fn stream(
        &self,
        gate: Arc<Gate>,
        who: Principal,
        subject_id: Option<String>,
        conn: Option<Connection>,
    ) -> Result<Response<ChunkStream>, Status> {
        let (op, scope) = match &subject_id {
            Some(id) => (Operation::ExportSubject, Scope::Subject(id)),
            None => (Operation::ExportTenant, Scope::Tenant),
        };
        // A place in the export pool, per tenant and in all, or RESOURCE_EXHAUSTED now.
        let slot = self.regions.work.export_slot(who.tenant.as_str())?;
        // A reader that takes no data for this long is given up on, so a stalled client
        // holds one of the export pool's threads for seconds, not for ever.
        let stall_limit: Duration = self.regions.work.export_stall();
        let export = Export::start(&gate.vault, &who.tenant, scope).map_err(export_status);
        let ids = Ids { subject_id: subject_id.as_deref(), ..Ids::default() };
        // Recorded before the first byte leaves: an export the trail cannot hold is refused.
        gate.record(&who, op, ids, &export).await?;
        let export = export?;
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        // The closing status has a channel of its own, so it follows the chunks even when a
        // stalled reader has left the chunk channel full.
        let (end_tx, end_rx) = mpsc::channel(1);
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let mut stalled = false;
            let mut send = |data| match rt.block_on(tx.send_timeout(Ok(pb::ExportChunk { data }), stall_limit)) {
                Ok(()) => true,
                Err(SendTimeoutError::Timeout(_)) => {
                    stalled = true;
                    false
                }
                Err(SendTimeoutError::Closed(_)) => false,
            };
            let result = export.write(&gate.vault, DEFAULT_CHUNK_BYTES, &mut send);
            let tenant = who.tenant.as_str();
            let end = match result {
                Ok(done) => {
                    tracing::info!(
                        tenant,
                        operation = %op,
                        transcripts = done.transcripts,
                        messages = done.messages,
                        bytes = done.bytes,
                        "export finished"
                    );
                    return;
                }
                Err(ExportError::Cancelled) if stalled => {
                    tracing::warn!(tenant, operation = %op, "export stopped: its reader took no data in time");
                    // Its stream holds chunks nobody takes, with the status behind them: a
                    // reader that comes back gets them; one that does not loses the
                    // connection, and the stream with it.
                    if let Some(c) = &conn {
                        c.response_due_by(std::time::Instant::now() + stall_limit);
                    }
                    Status::deadline_exceeded(format!(
                        "the export stopped: no data was read for {} ms",
                        stall_limit.as_millis()
                    ))
                }
                Err(ExportError::Cancelled) => {
                    tracing::info!(tenant, operation = %op, "export cancelled by its reader");
                    return;
                }
                Err(e) => export_status(e),
            };
            // The reader gets the status after a partial document: not valid JSON.
            let _ = end_tx.try_send(Err(end));
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).chain(ReceiverStream::new(end_rx)))))
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
        let (gate, who) = self.regions.admit(&req).await?;
        let conn = req.extensions().get::<Connection>().cloned();
        let pb::ExportSubjectRequest { subject_id } = req.into_inner();
        self.stream(gate, who, Some(subject_id), conn).await
    }

    async fn export_tenant(&self, req: Request<pb::ExportTenantRequest>) -> Result<Response<ChunkStream>, Status> {
        let (gate, who) = self.regions.admit(&req).await?;
        let conn = req.extensions().get::<Connection>().cloned();
        self.stream(gate, who, None, conn).await
    }
}
