//! The gRPC edge: wire types in and out, statuses for errors. The vault never sees prost.

mod admin;
pub mod codec;
pub mod connections;
mod convert;
mod credentials;
mod denials;
pub(crate) mod discovery;
mod export;
mod gate;
pub mod limits;
mod observe;
mod regions;
mod status;
mod subjects;
mod transcripts;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

pub use connections::{ConnectionLimits, METRICS_MAX as METRICS_CONNECTIONS};
pub use limits::{Work, WorkLimits};

pub use admin::{Admin, AdminGuard, AdminRegion};
pub use credentials::{Bearer, bearer_token};
pub use gate::Gate;
pub use regions::{Regions, wrong_region};
pub use subjects::MAX_BATCH as SHRED_BATCH_MAX;

/// Generated wire types and stubs of `proto/chatvault/v1`.
pub mod pb {
    tonic::include_proto!("chatvault.v1");
    /// Encoded descriptors, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chatvault_descriptor.bin"));
}

/// Transport settings of one listener.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// For logs and metrics: `data` or `admin`.
    pub name: &'static str,
    pub max_message_bytes: usize,
    pub request_timeout: Duration,
    pub tls: Option<ServerTlsConfig>,
    pub connections: ConnectionLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The server of one listener: deadline, HTTP/2 keepalive, TLS, connection accounting.
macro_rules! server {
    ($opts:expr, $table:expr) => {{
        let opts: &ServeOptions = $opts;
        let c = &opts.connections;
        let b = Server::builder()
            .timeout(opts.request_timeout)
            .http2_keepalive_interval(Some(Duration::from_secs(c.keepalive_interval_secs.max(1))))
            .http2_keepalive_timeout(Some(Duration::from_secs(c.keepalive_timeout_secs.max(1))))
            .max_concurrent_streams(c.max_concurrent_streams.max(1))
            .max_connection_age(Duration::from_secs(c.max_connection_age_secs.max(1)))
            .max_connection_age_grace(Duration::from_secs(c.max_connection_age_grace_secs));
        let b = match &opts.tls {
            Some(tls) => b.tls_config(tls.clone())?,
            None => b,
        };
        b.layer(observe::ObserveLayer::new($table, opts.request_timeout))
    }};
}

/// Serves the data API, health and reflection on `listener` until `shutdown` resolves.
pub async fn serve(
    gate: Arc<Regions>,
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
    let exports = ExportServiceServer::new(export::Exports::new(gate))
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes.max(64 * 1024 * 1024));
    let served = [
        <TranscriptServiceServer<transcripts::Transcripts> as NamedService>::NAME,
        <SubjectServiceServer<subjects::Subjects> as NamedService>::NAME,
        <ExportServiceServer<export::Exports> as NamedService>::NAME,
    ];
    let health = tonic_health::server::HealthReporter::new();
    for name in served {
        health.set_service_status(name, tonic_health::ServingStatus::Serving).await;
    }
    let (v1, v1alpha) = discovery::reflection(&served)?;
    let (incoming, table) =
        connections::incoming(listener, opts.connections.clone(), crate::metrics::get().clone(), opts.name);
    server!(&opts, table)
        .add_service(discovery::health(health))
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(transcripts)
        .add_service(subjects)
        .add_service(exports)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Serves the admin API on its own listener, with the health service `health` reports
/// to (the erasure check, [`ERASURE_HEALTH`], among others) and reflection.
pub async fn serve_admin(
    admin: Admin,
    listener: TcpListener,
    opts: ServeOptions,
    health: tonic_health::server::HealthReporter,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    use pb::admin_service_server::AdminServiceServer;
    let svc = AdminServiceServer::new(admin)
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(64 * 1024 * 1024);
    let served = [<AdminServiceServer<Admin> as NamedService>::NAME];
    health.set_service_status(served[0], tonic_health::ServingStatus::Serving).await;
    let (v1, v1alpha) = discovery::reflection(&served)?;
    let (incoming, table) =
        connections::incoming(listener, opts.connections.clone(), crate::metrics::get().clone(), opts.name);
    server!(&opts, table)
        .add_service(discovery::health(health))
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Health service name, on the admin listener, that is NOT_SERVING while a key-store
/// rotation keeps failing: erasures are not becoming final.
pub const ERASURE_HEALTH: &str = "chatvault.erasure";

/// Health service name, on the admin listener, that is NOT_SERVING (with the server's
/// overall status) once a region's storage failed a durable sync: restart the server.
pub const STORAGE_HEALTH: &str = "chatvault.storage";

/// The observing layer of a listener (deadlines, connection accounting, metrics), for
/// listeners built outside this module (the router's).
pub fn observe_layer(table: connections::ConnTable, send_timeout: Duration) -> observe::ObserveLayer {
    observe::ObserveLayer::new(table, send_timeout)
}

/// Accepted connections with TCP_NODELAY and keepalive, and nothing more: for the load
/// benchmark's echo floor, which must not pay for chatvault's accounting.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(Duration::from_secs(60)))
}
