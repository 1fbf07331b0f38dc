//! The router's configuration (`deploy/router.toml`): where it listens and where each
//! region is served.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::TlsFiles;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Address chat backends call.
    pub listen: SocketAddr,
    /// TLS of the listener; plaintext when absent.
    pub tls: Option<TlsFiles>,
    /// A listener without TLS off loopback is refused unless this is set.
    pub allow_plaintext_non_loopback: bool,
    /// Every region, by name, and its node's data endpoint.
    pub regions: BTreeMap<String, RegionTarget>,
    /// Where keys issued before regions (which name none) are sent; none: refused.
    pub unnamed_keys_region: Option<String>,
    /// TLS (and the client certificate: mutual TLS) towards the region nodes.
    pub upstream_tls: Option<UpstreamTls>,
    /// How often each region node's health is asked.
    pub health_check_interval_ms: u64,
    /// Bounds on the listener's connections, as on a region node's (`grpc::connections`):
    /// the router is the piece that faces the internet.
    pub connections: crate::grpc::ConnectionLimits,
    /// Longest a call may take before the router gives up on it; an export may stream
    /// longer, as long as its reader keeps taking data.
    pub request_timeout_ms: u64,
    /// Load balancers in front of the router whose `x-forwarded-for` is kept (CIDRs).
    /// From anyone else the header is replaced by the address the router saw, so a
    /// client cannot write its own way past a tenant's allowlist.
    pub trusted_proxies: Vec<String>,
    /// A plaintext listener serving only grpc.health.v1 (the router's and each region's
    /// status), for probes inside the pod or host; none to turn it off.
    pub health_listen: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegionTarget {
    /// The region node's data listener, e.g. `https://eu.chatvault.internal:50051`.
    pub endpoint: String,
}

/// The router's side of mutual TLS with the region nodes: the CA that signed their
/// certificates, and the router's own certificate, which the nodes require
/// (`tls.client_ca_file`) and whose address they list in `auth.trusted_proxies`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    pub ca_file: PathBuf,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the nodes' certificates carry, if not the endpoint's host.
    pub domain_name: Option<String>,
}

impl UpstreamTls {
    pub fn client_config(&self) -> Result<ClientTlsConfig, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&self.ca_file)?));
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let key = crate::keys::read_secret_file(key).map_err(|e| e.to_string())?;
                cfg = cfg.identity(Identity::from_pem(read(cert)?, key.as_slice()));
            }
            (None, None) => {}
            _ => return Err("upstream_tls: cert_file and key_file go together".into()),
        }
        if let Some(d) = &self.domain_name {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(cfg)
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50061)),
            tls: None,
            allow_plaintext_non_loopback: false,
            regions: BTreeMap::new(),
            unnamed_keys_region: None,
            upstream_tls: None,
            health_check_interval_ms: 2000,
            health_listen: None,
            trusted_proxies: Vec::new(),
            connections: crate::grpc::ConnectionLimits::default(),
            request_timeout_ms: 30_000,
        }
    }
}

impl RouterConfig {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Refuses a router that could not route: no regions, bad names, two regions at one
    /// endpoint, an endpoint that is not a URL, keys sent to a region it does not know.
    pub fn check(&self) -> Result<(), String> {
        if self.regions.is_empty() {
            return Err("regions: no region configured ([regions.eu] endpoint = \"...\")".into());
        }
        let endpoints: BTreeMap<String, String> =
            self.regions.iter().map(|(n, t)| (n.clone(), t.endpoint.clone())).collect();
        crate::region::check_endpoints(&endpoints).map_err(|e| e.replace("region_endpoints", "regions"))?;
        for (name, t) in &self.regions {
            let uri: http::Uri =
                t.endpoint.parse().map_err(|e| format!("regions.{name}.endpoint: {:?}: {e}", t.endpoint))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(format!("regions.{name}.endpoint: {:?} is not an http(s)://host:port URL", t.endpoint));
            }
        }
        crate::tenancy::parse_list(&self.trusted_proxies).map_err(|e| format!("trusted_proxies: {e}"))?;
        if let Some(r) = &self.unnamed_keys_region
            && !self.regions.contains_key(r)
        {
            return Err(format!("unnamed_keys_region: {r:?} is not one of the configured regions"));
        }
        if self.tls.is_none() && !self.listen.ip().is_loopback() && !self.allow_plaintext_non_loopback {
            return Err(format!(
                "listen = {} is not loopback and has no TLS: configure [tls] or set allow_plaintext_non_loopback",
                self.listen
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> RouterConfig {
        toml::from_str(
            "[regions.eu]\nendpoint = \"http://127.0.0.1:1\"\n[regions.us]\nendpoint = \"http://127.0.0.1:2\"\n",
        )
        .unwrap()
    }

    #[test]
    fn a_router_config_that_cannot_route_is_refused_naming_the_field() {
        assert!(two().check().is_ok());
        assert!(RouterConfig::default().check().unwrap_err().starts_with("regions:"));
        let mut same = two();
        same.regions.get_mut("us").unwrap().endpoint = "http://127.0.0.1:1".into();
        assert!(same.check().unwrap_err().contains("both point at"));
        let mut bad = two();
        bad.regions.get_mut("eu").unwrap().endpoint = "eu-node:50051".into();
        assert!(bad.check().unwrap_err().starts_with("regions.eu.endpoint"));
        let unnamed = RouterConfig { unnamed_keys_region: Some("ap".into()), ..two() };
        assert!(unnamed.check().unwrap_err().starts_with("unnamed_keys_region"));
        let open = RouterConfig { listen: "0.0.0.0:1".parse().unwrap(), ..two() };
        assert!(open.check().unwrap_err().contains("allow_plaintext_non_loopback"));
        assert!(toml::from_str::<RouterConfig>("[regions.eu]\nendpoint = \"x\"\nextra = 1\n").is_err());
        let mut name = two();
        let t = name.regions.remove("us").unwrap();
        name.regions.insert("U S".into(), t);
        assert!(name.check().is_err());
    }
}
