//! TLS on both listeners, and mutual TLS on the data listener, with a throwaway CA.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use chatvault::grpc::Bearer;
use chatvault::grpc::pb;
use chatvault::grpc::pb::admin_service_client::AdminServiceClient;
use chatvault::grpc::pb::transcript_service_client::TranscriptServiceClient;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::common::*;

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    /// A client certificate from a CA the server does not trust.
    stranger: (String, String),
}

fn ca() -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    (p.self_signed(&key).unwrap(), key)
}

fn leaf(name: &str, usage: ExtendedKeyUsagePurpose, ca: &(rcgen::Certificate, KeyPair)) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![name.to_owned()]).unwrap();
    p.extended_key_usages = vec![usage];
    (p.signed_by(&key, &ca.0, &ca.1).unwrap().pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let root = ca();
    let other = ca();
    Pki {
        ca: root.0.pem(),
        server: leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth, &root),
        client: leaf("chat-backend", ExtendedKeyUsagePurpose::ClientAuth, &root),
        stranger: leaf("chat-backend", ExtendedKeyUsagePurpose::ClientAuth, &other),
    }
}

fn write(dir: &Path, name: &str, text: &str, private: bool) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    if private {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    p
}

async fn tls_channel(url: &str, ca: &str, identity: Option<&(String, String)>) -> Result<Channel, String> {
    let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        cfg = cfg.identity(Identity::from_pem(cert, key));
    }
    let url = url.replace("http://", "https://");
    Channel::from_shared(url).unwrap().tls_config(cfg).unwrap().connect().await.map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_configured_ca() {
    let dirs = Dirs::new();
    let pki = pki();
    let d = dirs.tmp.path();
    let ca = write(d, "ca.pem", &pki.ca, false);
    let cert = write(d, "server.pem", &pki.server.0, false);
    let key = write(d, "server.key", &pki.server.1, true);
    let cfg = dirs.config(&format!(
        "[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nclient_ca_file = {ca:?}\n\n\
         [admin_tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n"
    ));
    let server = Server::start_with(&dirs, Opts { args: vec!["--config", cfg.to_str().unwrap()], ..Opts::default() });

    // The admin listener: TLS, no client certificate needed (the operator token is).
    let admin_ch = tls_channel(&server.admin_url, &pki.ca, None).await.expect("admin over TLS");
    let mut admin = AdminServiceClient::with_interceptor(admin_ch, Bearer::new(OPERATOR_TOKEN).unwrap());
    admin
        .create_tenant(pb::CreateTenantRequest {
            region: "eu".into(),
            tenant_id: "acme".into(),
            allowlist: vec!["127.0.0.0/8".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let api_key =
        admin.issue_api_key(pb::IssueApiKeyRequest { tenant_id: "acme".into() }).await.unwrap().into_inner().api_key;

    // With a client certificate from the CA: served, end to end.
    let ch = tls_channel(&server.url, &pki.ca, Some(&pki.client)).await.expect("mTLS connect");
    let mut c = TranscriptServiceClient::with_interceptor(ch, Bearer::new(&api_key).unwrap());
    put(&mut c, transcript("chat-1", "alice", 1_700_000_000, &["over TLS"])).await;
    assert_eq!(get(&mut c, "chat-1").await.unwrap().messages[0].text, "over TLS");

    // Without a certificate, or with one from another CA, or in plaintext: no service.
    for identity in [None, Some(&pki.stranger)] {
        let refused = match tls_channel(&server.url, &pki.ca, identity).await {
            Err(_) => true,
            Ok(ch) => {
                let mut c = TranscriptServiceClient::with_interceptor(ch, Bearer::new(&api_key).unwrap());
                get(&mut c, "chat-1").await.is_err()
            }
        };
        assert!(refused, "served a client without a valid certificate");
    }
    let plain = Channel::from_shared(server.url.clone()).unwrap().connect().await;
    if let Ok(ch) = plain {
        let mut c = TranscriptServiceClient::with_interceptor(ch, Bearer::new(&api_key).unwrap());
        assert!(get(&mut c, "chat-1").await.is_err(), "plaintext served on a TLS listener");
    }
}

#[test]
fn a_world_readable_tls_key_is_refused_at_start() {
    let dirs = Dirs::new();
    let pki = pki();
    let d = dirs.tmp.path();
    let cert = write(d, "server.pem", &pki.server.0, false);
    let key = write(d, "server.key", &pki.server.1, false);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dirs.config(&format!("[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n"));
    let err = match Server::try_start(&dirs, Opts { args: vec!["--config", cfg.to_str().unwrap()], ..Opts::default() })
    {
        Ok(_) => panic!("started with a world-readable TLS key"),
        Err(stderr) => stderr,
    };
    assert!(err.contains("server.key"), "{err}");
}

/// The router is the region node's trusted proxy over mutual TLS: with the router's
/// client certificate the call goes through (and the tenant's allowlist is checked
/// against the real client); a router without it is turned away by the node.
#[tokio::test]
async fn the_router_reaches_a_region_node_over_mutual_tls_and_one_without_its_certificate_does_not() {
    let dirs = Dirs::new();
    let pki = pki();
    let d = dirs.tmp.path();
    let ca = write(d, "ca.pem", &pki.ca, false);
    let cert = write(d, "server.pem", &pki.server.0, false);
    let key = write(d, "server.key", &pki.server.1, true);
    let router_cert = write(d, "router.pem", &pki.client.0, false);
    let router_key = write(d, "router.key", &pki.client.1, true);
    let cfg = dirs.config(&format!(
        "[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nclient_ca_file = {ca:?}\n\n\
         [auth]\ntrusted_proxies = [\"127.0.0.1/32\"]\n"
    ));
    let node = Server::start_with(&dirs, Opts { args: vec!["--config", cfg.to_str().unwrap()], ..Opts::default() });
    let api_key = super::regions::tenant(&node, "acme", "eu", "127.0.0.7/32").await;
    let endpoint = node.url.replace("http://", "https://");
    let upstream = |with_cert: bool| {
        let mut t = format!("[upstream_tls]\nca_file = {ca:?}\ndomain_name = \"localhost\"\n");
        if with_cert {
            t.push_str(&format!("cert_file = {router_cert:?}\nkey_file = {router_key:?}\n"));
        }
        t
    };
    let router = super::regions::Router::start_with(d, &[("eu", &endpoint)], &upstream(true));
    let mut c = super::regions::transcripts(router.channel_from("127.0.0.7").await, &api_key);
    put(&mut c, transcript("t", "s", 1_700_000_000, &["over mTLS"])).await;
    assert_eq!(get(&mut c, "t").await.unwrap().messages[0].text, "over mTLS");
    let mut other_ip = super::regions::transcripts(router.channel_from("127.0.0.8").await, &api_key);
    assert_eq!(get(&mut other_ip, "t").await.unwrap_err().code(), tonic::Code::PermissionDenied);

    let stranger = super::regions::Router::start_with(d, &[("eu", &endpoint)], &upstream(false));
    let mut c = super::regions::transcripts(stranger.channel_from("127.0.0.7").await, &api_key);
    let e = get(&mut c, "t").await.unwrap_err();
    assert!(e.code() == tonic::Code::Unavailable && e.message().contains("region eu"), "{e:?}");
}
