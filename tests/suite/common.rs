//! Starts the real `chatvault` binary and talks to it over gRPC.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chatvault::grpc::Bearer;
use chatvault::grpc::pb;
use chatvault::grpc::pb::admin_service_client::AdminServiceClient;
use chatvault::grpc::pb::export_service_client::ExportServiceClient;
use chatvault::grpc::pb::subject_service_client::SubjectServiceClient;
use chatvault::grpc::pb::transcript_service_client::TranscriptServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const ROOT_KEY_HEX: &str = "5f1e0d2c3b4a59687766554433221100ffeeddccbbaa99887766554433221100";
pub const OTHER_ROOT_KEY_HEX: &str = "0000000000000000000000000000000000000000000000000000000000000001";

pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789abcdef";

pub type Transcripts = TranscriptServiceClient<InterceptedService<Channel, Bearer>>;
pub type Subjects = SubjectServiceClient<InterceptedService<Channel, Bearer>>;
pub type Exports = ExportServiceClient<InterceptedService<Channel, Bearer>>;
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// A data directory and a key directory that outlive server restarts, and the API key
/// of each tenant the tests made there.
pub struct Dirs {
    pub tmp: tempfile::TempDir,
    api_keys: Arc<Mutex<HashMap<String, String>>>,
    key_dir: PathBuf,
}

impl Dirs {
    pub fn new() -> Self {
        Self::with_key_dir("keys")
    }
    /// A key directory at `relative` to the temporary directory (the data directory is `data`).
    pub fn with_key_dir(relative: &str) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let key_dir = tmp.path().join(relative);
        Dirs { tmp, api_keys: Arc::default(), key_dir }
    }
    pub fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }
    pub fn keys(&self) -> PathBuf {
        self.key_dir.clone()
    }
    /// Makes `key` the API key the helpers use for `tenant` (one a fixture came with).
    pub fn remember_api_key(&self, tenant: &str, key: &str) {
        self.api_keys.lock().unwrap().insert(tenant.into(), key.into());
    }
    /// Writes a server configuration file and returns its path.
    pub fn config(&self, toml: &str) -> PathBuf {
        let path = self.tmp.path().join("chatvault.toml");
        std::fs::write(&path, toml).unwrap();
        path
    }
}

pub struct Server {
    child: Child,
    pub url: String,
    pub admin_url: String,
    /// Where `GET /metrics` is served.
    pub metrics_addr: Option<String>,
    pub log: PathBuf,
    api_keys: Arc<Mutex<HashMap<String, String>>>,
}

/// How to start a server beyond the directories.
pub struct Opts<'a> {
    pub root_key_hex: &'a str,
    pub args: Vec<&'a str>,
    pub env: Vec<(&'a str, &'a str)>,
    /// A command the server runs under (`prlimit --nofile=128:128`): it must exec it.
    pub wrapper: Vec<&'a str>,
    /// Variables the helpers set that this start must not have (`CHATVAULT_REGION`...).
    pub env_remove: Vec<&'a str>,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            root_key_hex: ROOT_KEY_HEX,
            args: Vec::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
            env_remove: Vec::new(),
        }
    }
}

impl Server {
    pub fn start(dirs: &Dirs) -> Server {
        Self::start_with(dirs, Opts::default())
    }

    pub fn start_with(dirs: &Dirs, opts: Opts<'_>) -> Server {
        match Self::try_start(dirs, opts) {
            Ok(s) => s,
            Err(stderr) => panic!("server did not start:\n{stderr}"),
        }
    }

    /// Starts the server; on failure returns what it wrote to stderr.
    pub fn try_start(dirs: &Dirs, opts: Opts<'_>) -> Result<Server, String> {
        let log = dirs.tmp.path().join(format!(
            "server-{}.log",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let bin = env!("CARGO_BIN_EXE_chatvault");
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .env("CHATVAULT_REGION", "eu")
            .arg("--data-dir")
            .arg(dirs.data())
            .arg("--key-dir")
            .arg(dirs.keys())
            .args(&opts.args)
            .env("CHATVAULT_ROOT_KEY", opts.root_key_hex)
            .env("CHATVAULT_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("CHATVAULT_LOG", "info")
            .env_remove("CHATVAULT_CONFIG")
            .envs(opts.env.iter().copied());
        for v in &opts.env_remove {
            cmd.env_remove(v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn chatvault");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut admin, mut metrics) = (None, None);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("chatvault metrics listening on ") {
                    metrics = Some(addr.to_owned());
                } else if let Some(addr) = line.strip_prefix("chatvault admin listening on ") {
                    admin = Some(addr.to_owned());
                } else if let Some(addr) = line.strip_prefix("chatvault listening on ") {
                    let _ = tx.send((addr.to_owned(), admin.clone().unwrap_or_default(), metrics.clone()));
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok((addr, admin, metrics)) => Ok(Server {
                child,
                url: format!("http://{addr}"),
                admin_url: format!("http://{admin}"),
                metrics_addr: metrics,
                log,
                api_keys: dirs.api_keys.clone(),
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(std::fs::read_to_string(&log).unwrap_or_default())
            }
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone()).unwrap().connect().await.expect("connect")
    }

    /// A connection whose client socket is bound to `local` (127.0.0.2, 127.0.0.3, ...:
    /// the loopback range has many addresses, so allowlists can be tested for real).
    pub async fn channel_from(&self, local: &str) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .local_address(Some(local.parse().unwrap()))
            .connect()
            .await
            .expect("connect")
    }

    pub async fn admin(&self) -> AdminClient {
        let ch = Channel::from_shared(self.admin_url.clone()).unwrap().connect().await.expect("connect admin");
        AdminServiceClient::with_interceptor(ch, Bearer::new(OPERATOR_TOKEN).unwrap())
    }

    /// The API key of `tenant`, creating the tenant (allowed from loopback) on first use.
    pub async fn api_key(&self, tenant: &str) -> String {
        if let Some(k) = self.api_keys.lock().unwrap().get(tenant) {
            return k.clone();
        }
        let mut admin = self.admin().await;
        let req = pb::CreateTenantRequest {
            region: "eu".into(),
            tenant_id: tenant.into(),
            allowlist: vec!["127.0.0.0/8".into(), "::1".into()],
            ..Default::default()
        };
        admin.create_tenant(req).await.expect("create tenant");
        let key = admin
            .issue_api_key(pb::IssueApiKeyRequest { tenant_id: tenant.into() })
            .await
            .expect("issue key")
            .into_inner()
            .api_key;
        self.api_keys.lock().unwrap().insert(tenant.into(), key.clone());
        key
    }

    pub async fn transcripts(&self, tenant: &str) -> Transcripts {
        let key = self.api_key(tenant).await;
        TranscriptServiceClient::with_interceptor(self.channel().await, Bearer::new(&key).unwrap())
    }

    pub async fn subjects(&self, tenant: &str) -> Subjects {
        let key = self.api_key(tenant).await;
        SubjectServiceClient::with_interceptor(self.channel().await, Bearer::new(&key).unwrap())
    }

    pub async fn exports(&self, tenant: &str) -> Exports {
        let key = self.api_key(tenant).await;
        ExportServiceClient::with_interceptor(self.channel().await, Bearer::new(&key).unwrap())
    }

    /// What `GET /metrics` answers (the body), over a plain socket.
    pub async fn metrics_text(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr.as_deref().expect("a metrics listener");
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect metrics");
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
    }

    /// The sum of every sample whose series starts with `prefix` (a name, or a name and
    /// the start of its labels: `chatvault_requests_total{rpc="/x"`).
    pub async fn metric(&self, prefix: &str) -> f64 {
        sum_series(&self.metrics_text().await, prefix)
    }

    /// Asks for a key-store rotation (SIGHUP) and waits until it has destroyed the first
    /// epoch's key-store key: every erasure made under it is then final.
    pub async fn rotate_first_epoch_away(&self, dirs: &Dirs) {
        self.signal("-HUP");
        let first_ksk = dirs.keys().join(format!("ksk-{:020}.key", 1));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while first_ksk.exists() {
            assert!(std::time::Instant::now() < deadline, "rotation did not finish:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.pid()]).status().expect("kill").success();
        assert!(ok, "kill {sig} failed");
    }

    /// SIGTERM and wait for the exit without blocking the runtime (the server's
    /// graceful shutdown needs this process's clients to answer).
    pub async fn stop(mut self) {
        self.signal("-TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(std::time::Instant::now() < deadline, "server did not stop:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits up to `timeout` for the process to end on its own (a crash point); true if it did.
    pub async fn exited(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.child.try_wait().expect("wait").is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// SIGKILL: no shutdown code runs at all.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn msg(id: &str, role: pb::AuthorRole, name: &str, text: &str) -> pb::Message {
    pb::Message {
        message_id: id.into(),
        author_role: role as i32,
        author_name: name.into(),
        sent_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 123_000 }),
        text: text.into(),
    }
}

pub fn transcript(id: &str, subject: &str, started_secs: i64, texts: &[&str]) -> pb::Transcript {
    pb::Transcript {
        transcript_id: id.into(),
        subject_id: subject.into(),
        channel: "web".into(),
        started_at: Some(prost_types::Timestamp { seconds: started_secs, nanos: 0 }),
        messages: texts
            .iter()
            .enumerate()
            .map(|(i, t)| msg(&format!("m{i}"), pb::AuthorRole::Visitor, "Visitor", t))
            .collect(),
        ..Default::default()
    }
}

pub async fn put(c: &mut Transcripts, t: pb::Transcript) -> pb::PutTranscriptResponse {
    c.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await.expect("put").into_inner()
}

pub async fn get(c: &mut Transcripts, id: &str) -> Result<pb::Transcript, tonic::Status> {
    c.get_transcript(pb::GetTranscriptRequest { transcript_id: id.into() })
        .await
        .map(|r| r.into_inner().transcript.expect("transcript"))
}

/// Every regular file below `dir`, recursively.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in files_below(from) {
        let dest = to.join(f.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}

/// Record type bytes of the vault's key layout (src/vault/layout.rs), for tests that
/// inspect or tamper with the stopped server's files.
pub mod kind {
    pub const HEADER: u8 = 0x03;
    pub const BY_SUBJECT: u8 = 0x04;
    pub const MESSAGE: u8 = 0x05;
    pub const GARBAGE: u8 = 0x06;
    pub const BODY: u8 = 0x07;
}

/// The stopped server's sled tree, opened directly.
pub fn raw_tree(dirs: &Dirs) -> (sled::Db, sled::Tree) {
    // sled's background flusher of an earlier handle in this process may hold the file
    // lock a moment after that handle is dropped.
    let mut tries = 0;
    let db = loop {
        match sled::open(dirs.data()) {
            Ok(db) => break db,
            Err(e) if tries < 50 && e.to_string().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let tree = db.open_tree("vault").unwrap();
    (db, tree)
}

/// The sealed envelopes of every message record of the stopped server, in key order:
/// inline in sled, or read from the value log a record points at.
pub fn raw_message_envelopes(dirs: &Dirs) -> Vec<Vec<u8>> {
    use chatvault::store::{ValueLog, ValuePointer};
    let (_db, tree) = raw_tree(dirs);
    let log = ValueLog::open(&dirs.data().join("values"), 1 << 20).unwrap();
    tree.scan_prefix([kind::MESSAGE])
        .values()
        .map(|v| {
            let v = v.unwrap();
            match ValuePointer::decode(&v) {
                Some(p) => log.read(&p).unwrap().to_vec(),
                None => v.to_vec(),
            }
        })
        .collect()
}

/// How many records of one type the stopped server left.
pub fn raw_count(dirs: &Dirs, kind: u8) -> usize {
    raw_tree(dirs).1.scan_prefix([kind]).count()
}

/// The sum of the samples of `text` (Prometheus exposition) whose series starts with `prefix`.
pub fn sum_series(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with([' ', '{', ',', '}']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[path = "../../src/store/test_postgres.rs"]
mod test_postgres;
pub use test_postgres::postgres_url;
