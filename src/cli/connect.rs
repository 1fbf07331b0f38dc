//! Connecting the CLI to a server: plaintext for http://, TLS (optionally with a client
//! certificate) for https://, and a bearer credential read from the environment or a file,
//! never from the command line (where `ps` would show it).

use std::path::{Path, PathBuf};

use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::grpc::Bearer;

pub type Authed = InterceptedService<Channel, Bearer>;

/// TLS material for https:// servers.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, env = "CHATVAULT_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for servers that require mutual TLS.
    #[arg(long, env = "CHATVAULT_CLIENT_CERT", global = true, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "CHATVAULT_CLIENT_KEY", global = true)]
    pub client_key: Option<PathBuf>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

pub async fn channel(url: &str, tls: &TlsArgs) -> Result<Channel, String> {
    let mut ep = Channel::from_shared(url.to_owned()).map_err(|e| format!("server URL {url:?}: {e}"))?;
    if url.starts_with("https://") {
        // No system roots are built in: chatvault servers use a private CA.
        let ca = tls.ca_file.as_deref().ok_or("an https:// server needs --ca-file (or CHATVAULT_CA_FILE)")?;
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "--ca-file")?));
        if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
            let key = crate::keys::read_secret_file(key).map_err(|e| format!("--client-key: {e}"))?;
            cfg = cfg.identity(Identity::from_pem(read(cert, "--client-cert")?, key.as_slice()));
        }
        ep = ep.tls_config(cfg).map_err(|e| format!("TLS: {e}"))?;
    }
    ep.connect().await.map_err(|e| format!("cannot connect to {url}: {e}"))
}

/// A credential from `env` or, failing that, from `file` (mode 0600).
pub fn credential(env: &str, file: Option<&Path>, what: &str) -> Result<Bearer, String> {
    let token = match (std::env::var(env), file) {
        (Ok(t), _) => zeroize::Zeroizing::new(t),
        (Err(_), Some(path)) => {
            let bytes = crate::keys::read_secret_file(path).map_err(|e| e.to_string())?;
            let text = std::str::from_utf8(&bytes).map_err(|_| format!("{}: not UTF-8", path.display()))?;
            zeroize::Zeroizing::new(text.trim().to_owned())
        }
        (Err(_), None) => return Err(format!("no {what}: set {env} or pass its file")),
    };
    Bearer::new(token.trim()).map_err(|_| format!("{what}: not a valid header value"))
}
