//! The router's one service: health and reflection answered here, every data call
//! forwarded as it came (headers, deadline, body stream) to the region its API key
//! names, and the node's answer passed back as it came (status details and trailers
//! included). Streams flow through with HTTP/2 flow control: a slow reader slows the
//! region node, the router holds no more than a window of bytes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tonic::Status;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Service, ServiceExt};

use super::FORWARDED;

#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
    local: Routes,
}

struct Inner {
    upstreams: BTreeMap<String, Channel>,
    unnamed: Option<String>,
    trusted: Vec<crate::tenancy::Cidr>,
}

impl Proxy {
    pub fn new(
        upstreams: BTreeMap<String, Channel>,
        unnamed: Option<String>,
        trusted: Vec<crate::tenancy::Cidr>,
        local: Routes,
    ) -> Self {
        Proxy { inner: Arc::new(Inner { upstreams, unnamed, trusted }), local }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

fn answer(status: Status) -> BoxFuture {
    Box::pin(async move { Ok(status.into_http()) })
}

/// The TCP peer of a call, through TLS or not.
fn peer<B>(req: &Request<B>) -> Option<std::net::IpAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.get_ref().remote_addr()))
        .map(|a| a.ip())
}

impl Inner {
    /// The region a call's API key names (or where unnamed keys go), and its channel.
    fn route<B>(&self, req: &Request<B>) -> Result<(String, Channel), Status> {
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::grpc::bearer_token);
        let named = token.and_then(crate::tenancy::region_of_key).map(str::to_owned);
        let region = match (named, &self.unnamed) {
            (Some(r), _) => r,
            (None, Some(r)) => r.clone(),
            (None, None) => {
                return Err(Status::unauthenticated(
                    "API key required and must name its region: `authorization: Bearer cvk_<region>_<id>_<secret>`",
                ));
            }
        };
        match self.upstreams.get(&region) {
            Some(ch) => Ok((region, ch.clone())),
            None => Err(crate::grpc::wrong_region(&region, None, self.upstreams.keys())),
        }
    }
}

impl Service<Request<Body>> for Proxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let path = req.uri().path();
        if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
            let local = self.local.clone();
            return Box::pin(async move { local.oneshot(req).await });
        }
        let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
        if !FORWARDED.contains(&service) {
            return answer(Status::unimplemented(format!("{service:?} is not a service this router forwards")));
        }
        let (region, channel) = match self.inner.route(&req) {
            Ok(r) => r,
            Err(status) => return answer(status),
        };
        // The node checks the tenant's allowlist against this address (the router is
        // one of its trusted proxies). What a client wrote there is dropped; only a load
        // balancer the router trusts may have named the client before it.
        let Some(ip) = peer(&req) else { return answer(Status::internal("no peer address")) };
        let Ok(v) = HeaderValue::from_str(&ip.to_string()) else { return answer(Status::internal("peer address")) };
        let ip = crate::tenancy::canonical_ip(ip);
        if !self.inner.trusted.iter().any(|c| c.contains(ip)) {
            req.headers_mut().remove("x-forwarded-for");
        }
        req.headers_mut().append("x-forwarded-for", v);
        Box::pin(async move {
            match channel.oneshot(req).await {
                Ok(response) => Ok(response),
                Err(e) => {
                    tracing::warn!(region, error = %e, "region node unreachable");
                    Ok(Status::unavailable(format!("region {region} is unavailable: {e}")).into_http())
                }
            }
        })
    }
}
