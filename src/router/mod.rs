//! `chatvault route`: the stateless router in front of the region nodes. It reads the
//! region an API key names (`cvk_<region>_...`) and forwards the call, bytes unchanged,
//! to that region's endpoint; it stores nothing, holds no key, and never sends a call to
//! another region than the one its key names. The region node does the whole
//! authentication, against the client address the router adds to `x-forwarded-for`.

mod config;
mod proxy;

pub use config::{RouterConfig, UpstreamTls};

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The data services the router forwards (the admin API stays on each region's own
/// admin listener).
pub const FORWARDED: [&str; 3] =
    ["chatvault.v1.TranscriptService", "chatvault.v1.SubjectService", "chatvault.v1.ExportService"];

/// Health service name of one region, as the router sees it.
pub fn region_health(region: &str) -> String {
    format!("chatvault.region.{region}")
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("router configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Serve(#[from] crate::grpc::ServeError),
}

/// Serves until `shutdown` resolves. Prints `chatvault router listening on <addr>`.
pub async fn run(config: RouterConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), RouterError> {
    config.check().map_err(RouterError::Config)?;
    let mut upstreams = BTreeMap::new();
    for (name, target) in &config.regions {
        upstreams.insert(name.clone(), channel(&target.endpoint, config.upstream_tls.as_ref())?);
    }
    let health = tonic_health::server::HealthReporter::new();
    for name in FORWARDED {
        health.set_service_status(name, ServingStatus::Serving).await;
    }
    let (v1, v1alpha) = crate::grpc::discovery::reflection(&FORWARDED)?;
    let local = tonic::service::Routes::new(crate::grpc::discovery::health(health.clone()))
        .add_service(v1)
        .add_service(v1alpha)
        .prepare();
    let trusted =
        crate::tenancy::parse_list(&config.trusted_proxies).map_err(|e| RouterError::Config(e.to_string()))?;
    let svc = proxy::Proxy::new(upstreams.clone(), config.unnamed_keys_region.clone(), trusted, local);

    let bind = |a: std::net::SocketAddr| async move {
        let l = TcpListener::bind(a).await.map_err(|source| RouterError::Listen { addr: a, source })?;
        let local = l.local_addr().map_err(|source| RouterError::Listen { addr: a, source })?;
        Ok::<_, RouterError>((l, local))
    };
    let (listener, addr) = bind(config.listen).await?;
    let probes = match config.health_listen {
        Some(a) => {
            let (l, local) = bind(a).await?;
            let svc = crate::grpc::discovery::health(health.clone());
            println!("chatvault router health listening on {local}");
            let serve = Server::builder().add_service(svc).serve_with_incoming(crate::grpc::incoming(l));
            Some(tokio::spawn(async move {
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "router health listener failed");
                }
            }))
        }
        None => None,
    };
    let checks: Vec<_> = upstreams
        .into_iter()
        .map(|(name, ch)| tokio::spawn(health_check(name, ch, health.clone(), config.health_check_interval_ms)))
        .collect();
    tracing::info!(%addr, regions = ?config.regions.keys().collect::<Vec<_>>(), "chatvault router serving");
    println!("chatvault router listening on {addr}");
    let c = &config.connections;
    let mut server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(c.keepalive_interval_secs.max(1))))
        .http2_keepalive_timeout(Some(Duration::from_secs(c.keepalive_timeout_secs.max(1))))
        .max_concurrent_streams(c.max_concurrent_streams.max(1))
        .max_connection_age(Duration::from_secs(c.max_connection_age_secs.max(1)))
        .max_connection_age_grace(Duration::from_secs(c.max_connection_age_grace_secs));
    if let Some(tls) = &config.tls {
        server = server.tls_config(tls.server_config().map_err(|e| RouterError::Config(e.to_string()))?)?;
    }
    // The same connection accounting as a node's listeners: caps per source and in all,
    // handshake and idle timeouts.
    let (incoming, table) =
        crate::grpc::connections::incoming(listener, c.clone(), crate::metrics::get().clone(), "router");
    let timeout = Duration::from_millis(config.request_timeout_ms.max(1));
    let server = server.layer(crate::grpc::observe_layer(table, timeout));
    let served = server.serve_with_incoming_shutdown(svc, incoming, shutdown).await;
    for c in checks.into_iter().chain(probes) {
        c.abort();
    }
    served?;
    Ok(())
}

/// A lazily connected channel to one region node; it reconnects by itself.
fn channel(url: &str, tls: Option<&UpstreamTls>) -> Result<Channel, RouterError> {
    let mut ep = Endpoint::from_shared(url.to_owned())
        .map_err(|e| RouterError::Config(format!("endpoint {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if let Some(t) = tls {
        ep = ep.tls_config(t.client_config().map_err(RouterError::Config)?)?;
    }
    Ok(ep.connect_lazy())
}

/// Asks a region node's health service every `every_ms`, and reports the answer as the
/// router's `chatvault.region.<name>` status.
async fn health_check(region: String, ch: Channel, health: tonic_health::server::HealthReporter, every_ms: u64) {
    let name = region_health(&region);
    let mut last = None;
    loop {
        let mut client = HealthClient::new(ch.clone());
        let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: String::new() });
        req.set_timeout(Duration::from_secs(2));
        let up = matches!(client.check(req).await, Ok(r) if r.get_ref().status == 1);
        if last != Some(up) {
            if up {
                tracing::info!(region, "region node is serving");
            } else {
                tracing::warn!(region, "region node is not answering its health check");
            }
            let status = if up { ServingStatus::Serving } else { ServingStatus::NotServing };
            health.set_service_status(&name, status).await;
            last = Some(up);
        }
        tokio::time::sleep(Duration::from_millis(every_ms.max(100))).await;
    }
}
