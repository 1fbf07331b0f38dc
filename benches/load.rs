//! Load generator over real gRPC on loopback, with its baselines measured in the same run:
//! a tonic echo service with the same payload and client (the gRPC floor), and chatvault
//! itself with durability off. Also: shred latency with 10 vs 100,000 transcripts, and the
//! export of a large tenant (JSON throughput, server RSS while exporting).
//!
//! `cargo bench --bench load -- [--quick] [--clients N] [--seconds S] [--sizes 256,1024,16384]
//!  [--export-mib M] [--out FILE]`
//! Prints a markdown report (also written to --out, default target/bench-load.md).
//! `cargo bench --bench load -- --soak-minutes 10 --out target/bench-soak.md` runs only the
//! soak (`load/soak.rs`): mixed traffic at 70% of capacity beside a hostile client.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatvault::grpc::Bearer;
use chatvault::grpc::pb::admin_service_client::AdminServiceClient;
use chatvault::grpc::pb::{self, transcript_service_client::TranscriptServiceClient};
use chatvault::keys::RootKeySource;
use chatvault::store::Durability;
use chatvault::vault::{TenantId, Transcript, Vault, VaultOptions};
use tonic::transport::Channel;

mod echo {
    tonic::include_proto!("chatvault.bench.v1");
}

#[path = "load/soak.rs"]
mod soak;

const ROOT_KEY_HEX: &str = "4242424242424242424242424242424242424242424242424242424242424242";
const OPERATOR_TOKEN: &str = "bench-operator-token-0123456789abcdef";

struct Args {
    quick: bool,
    clients: usize,
    seconds: f64,
    sizes: Vec<usize>,
    out: String,
    /// Only the per-size runs (no listing, no shred, no export): for profiling one change quickly.
    sizes_only: bool,
    /// Message text loaded into the tenant that is then exported.
    export_mib: u64,
    /// Only the export run.
    export_only: bool,
    /// Only the soak, this many minutes.
    soak_minutes: Option<f64>,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        clients: 32,
        seconds: 5.0,
        sizes: vec![100, 256, 1024, 16384],
        out: "target/bench-load.md".into(),
        sizes_only: false,
        export_mib: 1024,
        export_only: false,
        soak_minutes: None,
    };
    // `cargo test --benches` runs this without `--bench`: a quick smoke run, not a measurement.
    if !std::env::args().any(|a| a == "--bench") {
        a.quick = true;
        a.seconds = 0.3;
        a.clients = 2;
        a.sizes = vec![1024];
        a.export_mib = 4;
    }
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                a.quick = true;
                a.seconds = 0.5;
                a.clients = 4;
                a.sizes = vec![1024];
                a.export_mib = 16;
            }
            "--clients" => a.clients = it.next().and_then(|v| v.parse().ok()).expect("--clients N"),
            "--seconds" => a.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds S"),
            "--sizes" => {
                a.sizes = it.next().expect("--sizes").split(',').map(|s| s.parse().expect("size")).collect();
            }
            "--export-mib" => a.export_mib = it.next().and_then(|v| v.parse().ok()).expect("--export-mib M"),
            "--out" => a.out = it.next().expect("--out FILE"),
            "--sizes-only" => a.sizes_only = true,
            "--soak-minutes" => {
                a.soak_minutes = Some(it.next().and_then(|v| v.parse().ok()).expect("--soak-minutes M"));
            }
            "--export-only" => {
                a.export_only = true;
                a.sizes.clear();
            }
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

/// A server process under test, with its resource use read from /proc.
struct Proc {
    child: Child,
    url: String,
    admin_url: String,
    /// The bench tenant's API key: the load goes through authentication like real traffic.
    api_key: String,
    _dir: Option<tempfile::TempDir>,
}

impl Proc {
    fn spawn(mut cmd: Command, ready_prefix: &str, dir: Option<tempfile::TempDir>) -> Proc {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut admin = String::new();
        let addr = loop {
            let line = lines.next().expect("server exited").expect("read");
            if let Some(a) = line.strip_prefix("chatvault admin listening on ") {
                admin = a.to_owned();
            } else if let Some(a) = line.strip_prefix(ready_prefix) {
                break a.to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Proc {
            child,
            url: format!("http://{addr}"),
            admin_url: format!("http://{admin}"),
            api_key: String::new(),
            _dir: dir,
        }
    }

    /// Creates the bench tenant (allowed from loopback) and its API key.
    async fn provision(mut self) -> Proc {
        let ch = Channel::from_shared(self.admin_url.clone()).unwrap().connect().await.expect("admin");
        let mut admin = AdminServiceClient::with_interceptor(ch, Bearer::new(OPERATOR_TOKEN).unwrap());
        let req = pb::CreateTenantRequest {
            region: "eu".into(),
            tenant_id: "bench".into(),
            allowlist: vec!["127.0.0.0/8".into()],
            ..Default::default()
        };
        admin.create_tenant(req).await.expect("create tenant");
        let key = admin.issue_api_key(pb::IssueApiKeyRequest { tenant_id: "bench".into() }).await.expect("issue key");
        self.api_key = key.into_inner().api_key;
        self
    }

    async fn chatvault(durability: &str) -> Proc {
        Proc::serve(tempfile::tempdir().unwrap(), durability, None).provision().await
    }

    /// `cache_mib`: sled's page cache (`store_cache_bytes`) if not the default.
    fn serve(dir: tempfile::TempDir, durability: &str, cache_mib: Option<u64>) -> Proc {
        let config = cache_mib.map(|mib| format!("store_cache_bytes = {}\n", mib << 20)).unwrap_or_default();
        Proc::serve_configured(dir, durability, &config)
    }

    /// A server with `config` (TOML) as its configuration file, if not empty.
    fn serve_configured(dir: tempfile::TempDir, durability: &str, config: &str) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatvault"));
        cmd.env("CHATVAULT_REGION", "eu");
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--durability", durability])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--key-dir")
        .arg(dir.path().join("keys"))
        .env("CHATVAULT_ROOT_KEY", ROOT_KEY_HEX)
        .env("CHATVAULT_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env("CHATVAULT_LOG", "warn");
        if !config.is_empty() {
            let file = dir.path().join("chatvault.toml");
            std::fs::write(&file, config).unwrap();
            cmd.arg("--config").arg(file);
        }
        Proc::spawn(cmd, "chatvault listening on ", Some(dir))
    }

    /// Stops the server gracefully and starts it again on the same directories, so the
    /// store is freshly opened (sled's cache empty; the OS page cache is not dropped).
    fn restart(mut self, durability: &str, cache_mib: Option<u64>) -> Proc {
        let api_key = std::mem::take(&mut self.api_key);
        let mut fresh = Proc::serve(self.stop(), durability, cache_mib);
        fresh.api_key = api_key;
        fresh
    }

    /// Stops the server gracefully and hands back its directories.
    fn stop(mut self) -> tempfile::TempDir {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        self._dir.take().expect("a chatvault server")
    }

    fn echo() -> Proc {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.arg("echo-server");
        Proc::spawn(cmd, "echo listening on ", None)
    }

    /// Bytes under each entry of the data directory (sled's files, `values/`, `audit/`).
    fn data_parts(&self) -> Vec<(String, u64)> {
        fn walk(p: &std::path::Path) -> u64 {
            match std::fs::metadata(p) {
                Ok(m) if m.is_dir() => {
                    std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| walk(&e.path())).sum()
                }
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        let Some(dir) = self._dir.as_ref() else { return Vec::new() };
        let mut parts: Vec<(String, u64)> = std::fs::read_dir(dir.path().join("data"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), walk(&e.path())))
            .collect();
        parts.sort();
        parts
    }

    /// The data directory's parts once background maintenance (packing, reclaim,
    /// compaction) has settled: its size unchanged for six seconds, or after 90 s.
    /// A quick (smoke) run does not wait.
    fn settled_data_parts(&self, quick: bool) -> Vec<(String, u64)> {
        if quick {
            return self.data_parts();
        }
        let total = |p: &[(String, u64)]| p.iter().map(|(_, n)| n).sum::<u64>();
        let deadline = Instant::now() + Duration::from_secs(90);
        let (mut last, mut still) = (self.data_parts(), 0);
        while Instant::now() < deadline && still < 3 {
            std::thread::sleep(Duration::from_secs(2));
            let now = self.data_parts();
            still = if total(&now) == total(&last) { still + 1 } else { 0 };
            last = now;
        }
        last
    }

    fn status_kib(&self, field: &str) -> u64 {
        status_kib(self.child.id(), field)
    }

    /// CPU seconds used so far (user + system).
    fn cpu_seconds(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let after = s.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        ticks / 100.0
    }
}

/// A field of /proc/PID/status, in KiB (0 if the process is gone).
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Throughput and latency of one run.
struct Run {
    name: String,
    ops: usize,
    secs: f64,
    lat_us: Vec<u32>,
    cpu: f64,
    idle_rss_mib: f64,
    peak_rss_mib: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn pct(&self, p: f64) -> u32 {
        if self.lat_us.is_empty() {
            return 0;
        }
        self.lat_us[((self.lat_us.len() - 1) as f64 * p).round() as usize]
    }
    fn row(&self, base: Option<&Run>) -> String {
        let ratio = base.map(|b| format!("{:.2}x", self.rate() / b.rate())).unwrap_or_else(|| "—".into());
        format!(
            "| {} | {:.0} | {} | {} | {} | {} | {:.0}% | {:.0} / {:.0} |",
            self.name,
            self.rate(),
            ratio,
            self.pct(0.5),
            self.pct(0.99),
            self.pct(0.999),
            100.0 * self.cpu / self.secs,
            self.idle_rss_mib,
            self.peak_rss_mib
        )
    }
}

/// Runs `clients` loops of `op` for `secs` against a server, collecting latencies.
async fn drive<F, Fut>(name: &str, server: &Proc, clients: usize, secs: f64, op: F) -> Run
where
    F: Fn(usize, Channel) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<
            Output = Box<dyn FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>,
        > + Send,
{
    let idle = server.status_kib("VmRSS:") as f64 / 1024.0;
    let cpu0 = server.cpu_seconds();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let ch = Channel::from_shared(server.url.clone()).unwrap().connect().await.expect("connect");
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut call = op(c, ch).await;
            let mut lat = Vec::with_capacity(1 << 14);
            while Instant::now() < deadline {
                let t = Instant::now();
                call().await;
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    let mut lat_us = Vec::new();
    for t in tasks {
        lat_us.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    lat_us.sort_unstable();
    Run {
        name: name.into(),
        ops: lat_us.len(),
        secs,
        lat_us,
        cpu: server.cpu_seconds() - cpu0,
        idle_rss_mib: idle,
        peak_rss_mib: server.status_kib("VmHWM:") as f64 / 1024.0,
    }
}

type Call = Box<dyn FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>;

fn tenant_client(
    ch: Channel,
    api_key: &str,
) -> TranscriptServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>> {
    TranscriptServiceClient::with_interceptor(ch, Bearer::new(api_key).unwrap())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn message(i: usize, size: usize) -> pb::Message {
    pb::Message {
        message_id: format!("m{i}"),
        author_role: pb::AuthorRole::Visitor as i32,
        author_name: "Visitor".into(),
        sent_at: None,
        text: "x".repeat(size),
    }
}

async fn echo_run(server: &Proc, a: &Args, size: usize) -> Run {
    drive(&format!("tonic echo floor, {size} B"), server, a.clients, a.seconds, move |_, ch| async move {
        let client = echo::echo_client::EchoClient::new(ch);
        let payload = vec![b'x'; size];
        Box::new(move || {
            let mut c = client.clone();
            let p = payload.clone();
            Box::pin(async move {
                c.echo(echo::EchoMessage { payload: p }).await.expect("echo");
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        }) as Call
    })
    .await
}

async fn append_run(name: &str, server: &Proc, a: &Args, size: usize) -> Run {
    let key = server.api_key.clone();
    drive(name, server, a.clients, a.seconds, move |c, ch| {
        let key = key.clone();
        async move {
            let mut client = tenant_client(ch, &key);
            let id = format!("live-{c}-{size}");
            let t =
                pb::Transcript { transcript_id: id.clone(), subject_id: format!("subject-{c}"), ..Default::default() };
            client.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await.expect("put");
            let mut n = 0;
            Box::new(move || {
                let mut cl = client.clone();
                n += 1;
                let req = pb::AppendMessagesRequest {
                    transcript_id: id.clone(),
                    messages: vec![message(n, size)],
                    expected_message_count: None,
                };
                Box::pin(async move {
                    cl.append_messages(req).await.expect("append");
                }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
            }) as Call
        }
    })
    .await
}

/// Where a run measures disk: value-log segments of 4 MiB, which a few seconds of load
/// fill several of, so compaction reaches the steady state a large store is in (its
/// active segment a small part of it) instead of everything sitting in the first 64 MiB;
/// and a grace of 2 s instead of 60 s before reclaimed space is given back, so the run
/// sees it given back. Neither changes what the steady state holds.
const SMALL_SEGMENTS: &str = "value_segment_bytes = 4194304\nreclaim_min_age_ms = 2000\n";

/// Bytes on disk per byte of text, and per acknowledged item by part of the data directory.
fn disk_report(parts: &[(String, u64)], text: u64, items: usize) -> (f64, String) {
    let total: u64 = parts.iter().map(|(_, n)| n).sum();
    let (mut sled, mut per) = (0u64, String::new());
    for (part, bytes) in parts {
        match part.as_str() {
            "values" | "audit" => per += &format!("{part} {} B, ", bytes / items.max(1) as u64),
            _ => sled += bytes,
        }
    }
    per += &format!("sled {} B", sled / items.max(1) as u64);
    (total as f64 / text.max(1) as f64, per)
}

/// Messages per chat and their size in the realistic workload.
const CHAT_MESSAGES: usize = 15;
const CHAT_MESSAGE_BYTES: usize = 80;

/// The realistic chat workload: each chat a new subject and a new transcript, opened
/// empty, fifteen messages of 80 B appended one by one, then closed. Reports chats and
/// messages per second, disk per byte of text once maintenance settled (audit included),
/// and server RSS as subjects accumulate.
async fn chat_run(a: &Args) -> String {
    let srv = Proc::serve_configured(tempfile::tempdir().unwrap(), "fsync", SMALL_SEGMENTS).provision().await;
    let key = srv.api_key.clone();
    let secs = if a.quick { a.seconds } else { a.seconds * 6.0 };
    let run = drive(
        &format!("chat: put, {CHAT_MESSAGES} appends of {CHAT_MESSAGE_BYTES} B, close (durability fsync)"),
        &srv,
        a.clients,
        secs,
        move |c, ch| {
            let key = key.clone();
            async move {
                let client = tenant_client(ch, &key);
                let mut n = 0usize;
                Box::new(move || {
                    let mut cl = client.clone();
                    n += 1;
                    let id = format!("chat-{c}-{n}");
                    Box::pin(async move {
                        let t = pb::Transcript {
                            transcript_id: id.clone(),
                            subject_id: format!("customer-{c}-{n}@example.com"),
                            ..Default::default()
                        };
                        cl.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await.expect("put");
                        for i in 0..CHAT_MESSAGES {
                            let req = pb::AppendMessagesRequest {
                                transcript_id: id.clone(),
                                messages: vec![message(i, CHAT_MESSAGE_BYTES)],
                                expected_message_count: None,
                            };
                            cl.append_messages(req).await.expect("append");
                        }
                        let close = pb::CloseTranscriptRequest { transcript_id: id, ..Default::default() };
                        cl.close_transcript(close).await.expect("close");
                    }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
                }) as Call
            }
        },
    )
    .await;
    let chats = run.ops;
    let text = (chats * CHAT_MESSAGES * CHAT_MESSAGE_BYTES) as u64;
    std::thread::sleep(Duration::from_millis(1500));
    let (disk_now, _) = disk_report(&srv.data_parts(), text, chats);
    let (disk, per_chat) = disk_report(&srv.settled_data_parts(a.quick), text, chats);
    let rss = srv.status_kib("VmRSS:") as f64 / 1024.0;
    format!(
        "\n#### realistic chats\n\n| run | chats/s | messages/s | p50 µs per chat | p99 µs | server CPU | server RSS idle / peak MiB |\n|---|---|---|---|---|---|---|\n\
         | {} | {:.0} | {:.0} | {} | {} | {:.0}% | {:.0} / {:.0} |\n\n\
         Disk once packing and compaction settled: {disk:.2}x the message text, audit trail included (target <= 3.0x; {disk_now:.2}x right after the run); per chat: {per_chat}. \
         {chats} subjects written; server RSS {rss:.0} MiB after them (idle before: {:.0} MiB).\n",
        run.name,
        run.rate(),
        run.rate() * CHAT_MESSAGES as f64,
        run.pct(0.5),
        run.pct(0.99),
        100.0 * run.cpu / run.secs,
        run.idle_rss_mib,
        run.peak_rss_mib,
        run.idle_rss_mib,
    )
}

async fn get_run(server: &Proc, a: &Args, size: usize) -> Run {
    let key = server.api_key.clone();
    drive(&format!("chatvault GetTranscript (1 message), {size} B"), server, a.clients, a.seconds, move |c, ch| {
        let key = key.clone();
        async move {
            let mut client = tenant_client(ch, &key);
            let id = format!("read-{c}-{size}");
            let t = pb::Transcript {
                transcript_id: id.clone(),
                subject_id: format!("reader-{c}"),
                messages: vec![message(0, size)],
                ..Default::default()
            };
            client.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await.expect("put");
            Box::new(move || {
                let mut cl = client.clone();
                let req = pb::GetTranscriptRequest { transcript_id: id.clone() };
                Box::pin(async move {
                    cl.get_transcript(req).await.expect("get");
                }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
            }) as Call
        }
    })
    .await
}

async fn list_run(server: &Proc, a: &Args) -> Run {
    let key = server.api_key.clone();
    drive("chatvault ListTranscripts (page of 20)", server, a.clients, a.seconds, move |c, ch| {
        let key = key.clone();
        async move {
            let mut client = tenant_client(ch, &key);
            let subject = format!("lister-{c}");
            for i in 0..20 {
                let t = pb::Transcript {
                    transcript_id: format!("{subject}-{i}"),
                    subject_id: subject.clone(),
                    messages: vec![message(0, 256)],
                    ..Default::default()
                };
                client.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await.expect("put");
            }
            Box::new(move || {
                let mut cl = client.clone();
                let req = pb::ListTranscriptsRequest {
                    subject_id: subject.clone(),
                    page_size: 20,
                    page_token: String::new(),
                };
                Box::pin(async move {
                    assert_eq!(cl.list_transcripts(req).await.expect("list").into_inner().transcripts.len(), 20);
                }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
            }) as Call
        }
    })
    .await
}

/// What exporting a large tenant cost.
struct ExportRun {
    cache: String,
    text_bytes: u64,
    json_bytes: u64,
    transcripts: u64,
    secs: f64,
    idle_rss_mib: f64,
    peak_rss_mib: f64,
    cpu: f64,
}

impl ExportRun {
    fn row(&self) -> String {
        format!(
            "| {} | {:.0} MiB | {} | {:.0} MiB | {:.2} | {:.0} | {:.0}% | {:.0} / {:.0} | {:.0} |",
            self.cache,
            self.text_bytes as f64 / (1 << 20) as f64,
            self.transcripts,
            self.json_bytes as f64 / (1 << 20) as f64,
            self.secs,
            self.json_bytes as f64 / 1e6 / self.secs,
            100.0 * self.cpu / self.secs,
            self.idle_rss_mib,
            self.peak_rss_mib,
            self.peak_rss_mib - self.idle_rss_mib,
        )
    }
}

const EXPORT_MESSAGE: usize = 16 * 1024;
const EXPORT_PER_TRANSCRIPT: usize = 64;

/// Loads `mib` MiB of 16 KiB messages into one tenant (1 MiB transcripts, 16 per subject;
/// durability none: loading is not measured). Returns the server and the transcript count.
async fn load_tenant(a: &Args, mib: u64) -> (Proc, usize) {
    let srv = Proc::chatvault("none").await;
    let transcripts = (mib as usize).max(1);
    let writers = a.clients.clamp(1, 8);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let ch = Channel::from_shared(srv.url.clone()).unwrap().connect().await.expect("connect");
        let mut client = tenant_client(ch, &srv.api_key);
        tasks.push(tokio::spawn(async move {
            for t in (w..transcripts).step_by(writers) {
                let tr = pb::Transcript {
                    transcript_id: format!("export-{t}"),
                    subject_id: format!("exported-{}", t / 16),
                    messages: (0..EXPORT_PER_TRANSCRIPT).map(|i| message(i, EXPORT_MESSAGE)).collect(),
                    ..Default::default()
                };
                client.put_transcript(pb::PutTranscriptRequest { transcript: Some(tr) }).await.expect("put");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (srv, transcripts)
}

/// Reads ExportTenant to the end with one client, sampling the server's RSS meanwhile.
async fn export_run(srv: &Proc, cache: &str, transcripts: usize) -> ExportRun {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = srv.status_kib("VmRSS:") as f64 / 1024.0;
    let cpu0 = srv.cpu_seconds();
    let ch = Channel::from_shared(srv.url.clone()).unwrap().connect().await.expect("connect");
    let mut client =
        pb::export_service_client::ExportServiceClient::with_interceptor(ch, Bearer::new(&srv.api_key).unwrap());
    let pid = srv.child.id();
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(status_kib(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let start = Instant::now();
    let mut stream = client.export_tenant(pb::ExportTenantRequest {}).await.expect("export").into_inner();
    let mut json_bytes = 0u64;
    let mut tail = Vec::new();
    while let Some(chunk) = stream.message().await.expect("export chunk") {
        json_bytes += chunk.data.len() as u64;
        tail = chunk.data;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = srv.cpu_seconds() - cpu0;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap() as f64 / 1024.0;
    let expected = format!("\"transcript_count\":{transcripts},");
    assert!(String::from_utf8_lossy(&tail).contains(&expected), "the export did not hold every transcript");
    ExportRun {
        cache: cache.into(),
        text_bytes: (transcripts * EXPORT_PER_TRANSCRIPT * EXPORT_MESSAGE) as u64,
        json_bytes,
        transcripts: transcripts as u64,
        secs,
        idle_rss_mib: idle,
        peak_rss_mib: peak.max(idle),
        cpu,
    }
}

/// The floor under the export's memory: a fresh process that opens the same sled data
/// directory with the same cache and reads every value once, in key order (no decryption,
/// no JSON, no gRPC). Returns its RSS (MiB) after opening and at its peak.
fn raw_scan_rss(data: &std::path::Path, cache_mib: u64) -> (f64, f64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("sled-scan")
        .arg(data)
        .arg(cache_mib.to_string())
        .output()
        .expect("run sled-scan");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> f64 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("sled-scan said: {text}{}", String::from_utf8_lossy(&out.stderr)))
    };
    (field("idle_kib=") / 1024.0, field("peak_kib=") / 1024.0)
}

fn sled_scan(data: &str, cache_mib: u64) {
    let me = std::process::id();
    let db = sled::Config::new().path(data).cache_capacity(cache_mib << 20).open().expect("open sled");
    let tree = db.open_tree("vault").expect("open tree");
    let values = chatvault::store::ValueLog::open(&std::path::Path::new(data).join("values"), 1 << 26).expect("values");
    let idle = status_kib(me, "VmRSS:");
    let (mut peak, mut bytes) = (idle, 0usize);
    for (i, kv) in tree.iter().enumerate() {
        let v = kv.expect("read").1;
        bytes += match chatvault::store::ValuePointer::decode(&v) {
            Some(p) => values.read(&p).expect("value log").len(),
            None => v.len(),
        };
        if i % 256 == 0 {
            peak = peak.max(status_kib(me, "VmRSS:"));
        }
    }
    peak = peak.max(status_kib(me, "VmRSS:"));
    println!("idle_kib={idle} peak_kib={peak} bytes={bytes}");
}

/// Shred latency, in process, durable (fsync). Small and large subjects live in the same
/// store and are shredded alternately, so the only difference between the two series is
/// how many transcripts the subject has.
async fn shred_latencies(small: (usize, usize), large: (usize, usize)) -> (Vec<u32>, Vec<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let root = || RootKeySource::Hex(zeroize::Zeroizing::new(ROOT_KEY_HEX.into()));
    let tenant = TenantId::parse("bench").unwrap();
    let transcript = |id: String, subject: String| Transcript::new(id, subject, Vec::new());
    {
        // Loading is not what is measured: no sync per write.
        let mut opts = VaultOptions::new(dir.path().join("data"), dir.path().join("keys"), root());
        opts.durability = Durability::None;
        let (v, _) = Vault::open(opts).unwrap();
        for (kind, (subjects, per)) in [("small", small), ("large", large)] {
            for s in 0..subjects {
                for t in 0..per {
                    v.put_transcript(&tenant, transcript(format!("{kind}{s}-t{t}"), format!("{kind}-{s}")))
                        .await
                        .unwrap();
                }
            }
        }
        v.sync().unwrap();
    }
    let opts = VaultOptions::new(dir.path().join("data"), dir.path().join("keys"), root());
    let (v, _) = Vault::open(opts).unwrap();
    // Warm up the reopened store (first flushes after recovery are not shred costs).
    for i in 0..20 {
        v.put_transcript(&tenant, transcript(format!("warm{i}"), "warm".into())).await.unwrap();
    }
    let (mut lat_small, mut lat_large) = (Vec::new(), Vec::new());
    for i in 0..small.0.max(large.0) {
        for (kind, (subjects, per), lat) in [("small", small, &mut lat_small), ("large", large, &mut lat_large)] {
            if i >= subjects {
                continue;
            }
            let t = Instant::now();
            let r = v.shred_subject(&tenant, &format!("{kind}-{i}")).await.unwrap();
            lat.push(t.elapsed().as_micros() as u32);
            assert_eq!(r.transcripts_shredded, per as u64);
        }
    }
    lat_small.sort_unstable();
    lat_large.sort_unstable();
    (lat_small, lat_large)
}

async fn run_echo_server() {
    #[derive(Default)]
    struct E;
    #[tonic::async_trait]
    impl echo::echo_server::Echo for E {
        async fn echo(
            &self,
            r: tonic::Request<echo::EchoMessage>,
        ) -> Result<tonic::Response<echo::EchoMessage>, tonic::Status> {
            Ok(tonic::Response::new(r.into_inner()))
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("echo listening on {}", listener.local_addr().unwrap());
    tonic::transport::Server::builder()
        .add_service(echo::echo_server::EchoServer::new(E).max_decoding_message_size(64 << 20))
        .serve_with_incoming(chatvault::grpc::incoming(listener))
        .await
        .unwrap();
}

/// sled alone, loaded with records of a message pointer record's shape (a 47-byte
/// transcript prefix, a 4-byte sequence number, a 17-byte value) round-robin over 100
/// transcripts: its own bytes on disk per record, without a flush and with one every 10
/// inserts (as group commit under load does). The floor under chatvault's sled share.
fn sled_amplification() -> String {
    const RECORDS: u32 = 200_000;
    let mut out = String::from(
        "\nsled 0.34 alone, 200,000 records of a message pointer record's shape (68 B of key and value, round-robin over 100 transcripts):",
    );
    for flush_every in [0u32, 10] {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path().join("db")).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        for i in 0..RECORDS {
            let mut key = [3u8; 51];
            key[1] = (i % 100) as u8;
            key[47..].copy_from_slice(&(i / 100).to_be_bytes());
            tree.insert(key, &[0xB0u8; 17]).unwrap();
            if flush_every > 0 && i % flush_every == 0 {
                db.flush().unwrap();
            }
        }
        db.flush().unwrap();
        drop((tree, db));
        let bytes: u64 = std::fs::read_dir(dir.path().join("db"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.metadata().ok().filter(|m| m.is_file()).map(|m| m.len()))
            .sum();
        let how =
            if flush_every == 0 { "no flush".to_string() } else { format!("a flush every {flush_every} inserts") };
        out += &format!(" {} B per record with {how};", bytes / u64::from(RECORDS));
    }
    out.pop();
    out + ".\n"
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("sled-scan") {
        return sled_scan(&argv[2], argv[3].parse().expect("cache MiB"));
    }
    if std::env::args().nth(1).as_deref() == Some("echo-server") {
        return rt.block_on(run_echo_server());
    }
    let a = args();
    if let Some(minutes) = a.soak_minutes {
        let out = rt.block_on(soak::run(soak::Plan::full(minutes, a.clients)));
        println!("{out}");
        return std::fs::write(&a.out, &out).expect("write report");
    }
    let mut out = String::new();
    let head = "| run | req/s | ratio | p50 µs | p99 µs | p999 µs | server CPU | server RSS idle / peak MiB |\n|---|---|---|---|---|---|---|---|";
    out += &format!("### gRPC over loopback: {} clients, {} s per run\n\n", a.clients, a.seconds);
    rt.block_on(async {
        for &size in &a.sizes {
            out += &format!("\n#### {size} B payload\n\n{head}\n");
            let echo_srv = Proc::echo();
            let echo = echo_run(&echo_srv, &a, size).await;
            drop(echo_srv);
            let none_srv = Proc::chatvault("none").await;
            let none = append_run(&format!("chatvault append, durability none, {size} B"), &none_srv, &a, size).await;
            drop(none_srv);
            let srv = Proc::serve_configured(tempfile::tempdir().unwrap(), "fsync", SMALL_SEGMENTS).provision().await;
            let fsync = append_run(&format!("chatvault append, durability fsync, {size} B"), &srv, &a, size).await;
            // Disk: what the durable run left on disk vs the message text it acknowledged.
            let text = fsync.ops as u64 * size as u64;
            std::thread::sleep(Duration::from_millis(1500)); // sled's background flush
            let (disk_now, _) = disk_report(&srv.data_parts(), text, fsync.ops);
            let (disk, per_message) = disk_report(&srv.settled_data_parts(a.quick), text, fsync.ops);
            let get = get_run(&srv, &a, size).await;
            out += &format!("{}\n", echo.row(None));
            out += &format!("{}\n", none.row(Some(&echo)));
            out += &format!("{}\n", fsync.row(Some(&echo)));
            out += &format!("{}\n", get.row(Some(&echo)));
            out += &format!("\nDurable group commit (fsync) vs durability none: {:.2}x (target >= 0.5x); vs echo floor {:.2}x (target >= 0.25x).\n", fsync.rate() / none.rate(), fsync.rate() / echo.rate());
            out += &format!("Disk after the durable run, once packing and compaction settled: {disk:.2}x the message text acknowledged, audit trail included (target <= 2.0x; envelope overhead is 30 B per message; {disk_now:.2}x right after the run); per message acknowledged: {per_message}.\n");
            eprintln!("{size} B done");
        }
        if !a.export_only {
            out += &chat_run(&a).await;
        }
        if !a.quick && !a.export_only {
            out += &sled_amplification();
        }
        if a.sizes_only {
            return;
        }
        if !a.export_only {
            let srv = Proc::chatvault("fsync").await;
            out += &format!("\n#### listing\n\n{head}\n{}\n", list_run(&srv, &a).await.row(None));
        }

        let (srv, transcripts) = load_tenant(&a, a.export_mib).await;
        let srv = srv.restart("none", None);
        let default_cache = export_run(&srv, "256 MiB (default)", transcripts).await;
        let srv = srv.restart("none", Some(32));
        let small_cache = export_run(&srv, "32 MiB", transcripts).await;
        let dir = srv.stop();
        let (scan_idle, scan_peak) = raw_scan_rss(&dir.path().join("data"), 32);
        let (grown, floor) = (small_cache.peak_rss_mib - small_cache.idle_rss_mib, scan_peak - scan_idle);
        out += &format!(
            "\n#### export of one tenant over gRPC (ExportTenant, one client, store freshly opened)\n\n\
             | sled cache | message text | transcripts | JSON | seconds | JSON MB/s | server CPU | server RSS idle / peak MiB | peak - idle MiB |\n\
             |---|---|---|---|---|---|---|---|---|\n{}\n{}\n\
             | baseline: raw read of the same data directory (sled scan, value-log reads, no decryption), 32 MiB cache, fresh process | | | | | | | {scan_idle:.0} / {scan_peak:.0} | {floor:.0} |\n\n\
             Server RSS growth while exporting, 32 MiB cache: {grown:.0} MiB, {:.2}x the raw read's growth (target: within 64 MB of idle).\n\
             JSON MB/s is compared with the in-process export in BENCHMARKS.md (target >= 0.5x).\n",
            default_cache.row(),
            small_cache.row(),
            grown / floor.max(1.0),
        );
        // For scripts/bench_report.py, which sets these beside the in-process export.
        let summary = format!(
            "{{\"text_mib\": {:.1}, \"json_mb_s\": {:.1}, \"json_mb_s_small_cache\": {:.1}, \
             \"rss_growth_mib\": {grown:.1}, \"rss_growth_default_cache_mib\": {:.1}, \"raw_scan_growth_mib\": {floor:.1}}}\n",
            small_cache.text_bytes as f64 / (1 << 20) as f64,
            default_cache.json_bytes as f64 / 1e6 / default_cache.secs,
            small_cache.json_bytes as f64 / 1e6 / small_cache.secs,
            default_cache.peak_rss_mib - default_cache.idle_rss_mib,
        );
        let _ = std::fs::write(std::path::Path::new(&a.out).with_extension("export.json"), summary);
        eprintln!("export done");
        if a.export_only {
            return;
        }

        if a.quick {
            // The soak's smoke run: proves it runs; its measurement is `--soak-minutes`.
            out += &soak::run(soak::Plan::smoke()).await;
        }
        let (n_small, n_big, subjects) = if a.quick { (10, 1_000, 3) } else { (10, 100_000, 5) };
        let (small, big) = shred_latencies((subjects, n_small), (subjects, n_big)).await;
        let p50 = |v: &Vec<u32>| v[v.len() / 2];
        let max = |v: &Vec<u32>| *v.last().unwrap();
        out += &format!(
            "\n#### shred, in process, durability fsync (includes the durable flush), both kinds of subject in one store, shredded alternately\n\n\
             | transcripts per subject | shreds | p50 µs | max µs |\n|---|---|---|---|\n\
             | {n_small} | {} | {} | {} |\n| {n_big} | {} | {} | {} |\n\n\
             p50 ratio {n_big} vs {n_small}: {:.2}x\n",
            small.len(),
            p50(&small),
            max(&small),
            big.len(),
            p50(&big),
            max(&big),
            p50(&big) as f64 / p50(&small) as f64
        );
    });
    println!("{out}");
    if let Some(parent) = std::path::Path::new(&a.out).parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&a.out, &out).expect("write report");
}
