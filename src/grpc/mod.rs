//! The gRPC edge: wire types in and out, statuses for errors. The vault never sees prost.

mod admin;
mod convert;
mod credentials;
mod export;
mod gate;
mod status;
mod subjects;
mod transcripts;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

pub use admin::Admin;
pub use credentials::Bearer;
pub use gate::Gate;

/// Generated wire types and stubs of `proto/chatvault/v1`.
pub mod pb {
    tonic::include_proto!("chatvault.v1");
    /// Encoded descriptors, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chatvault_descriptor.bin"));
}

/// Transport settings of one listener.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub max_message_bytes: usize,
    pub request_timeout: Duration,
    pub tls: Option<ServerTlsConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

fn builder(opts: &ServeOptions) -> Result<Server, ServeError> {
    let b = Server::builder().timeout(opts.request_timeout);
    Ok(match &opts.tls {
        Some(tls) => b.tls_config(tls.clone())?,
        None => b,
    })
}

/// Serves the data API, health and reflection on `listener` until `shutdown` resolves.
pub async fn serve(
    gate: Arc<Gate>,
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    use pb::export_service_server::ExportServiceServer;
    use pb::subject_service_server::SubjectServiceServer;
    use pb::transcript_service_server::TranscriptServiceServer;

    let transcripts = TranscriptServiceServer::new(transcripts::Transcripts::new(gate.clone()))
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes.max(64 * 1024 * 1024));
    let subjects = SubjectServiceServer::new(subjects::Subjects::new(gate.clone()))
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes);
    // A chunk is 64 KiB plus at most one message as JSON: not bounded by the request limit.
    let exports = ExportServiceServer::new(export::Exports::new(gate, opts.request_timeout))
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes.max(64 * 1024 * 1024));
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TranscriptServiceServer<transcripts::Transcripts>>().await;
    health.set_serving::<SubjectServiceServer<subjects::Subjects>>().await;
    health.set_serving::<ExportServiceServer<export::Exports>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    builder(&opts)?
        .add_service(health_service)
        .add_service(reflection)
        .add_service(transcripts)
        .add_service(subjects)
        .add_service(exports)
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await?;
    Ok(())
}

/// Serves the admin API on its own listener.
/// Serves the admin API on its own listener, with the health service `health` reports
/// to (the erasure check, [`ERASURE_HEALTH`], among others).
pub async fn serve_admin(
    admin: Admin,
    listener: TcpListener,
    opts: ServeOptions,
    health: tonic_health::server::HealthReporter,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let svc = pb::admin_service_server::AdminServiceServer::new(admin)
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(64 * 1024 * 1024);
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health),
    );
    builder(&opts)?
        .add_service(health)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await?;
    Ok(())
}

/// Health service name, on the admin listener, that is NOT_SERVING while a key-store
/// rotation keeps failing: erasures are not becoming final.
pub const ERASURE_HEALTH: &str = "chatvault.erasure";

/// Accepted connections with TCP_NODELAY (without it, Nagle's algorithm and delayed ACKs
/// add ~40 ms to small responses) and keepalive (dead peers are noticed).
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(Duration::from_secs(60)))
}
