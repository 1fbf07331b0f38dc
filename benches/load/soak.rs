//! Soak: mixed traffic from good clients at 70% of the capacity measured first in the same
//! run, for minutes, beside a hostile client doing what once broke the edge — stalled
//! exports and reads on connections that take no data, key-id guessing, junk credentials,
//! bad requests, silent sockets. Reports the good clients' p99 (against the same rate with
//! no attacker, measured just before), their errors, and the server's RSS and open fds over
//! time: both must stay flat.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatvault::grpc::Bearer;
use chatvault::grpc::pb::{self, admin_service_client::AdminServiceClient};
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, Endpoint};

use super::{OPERATOR_TOKEN, Proc, message, tenant_client};

pub struct Plan {
    pub warmup_secs: f64,
    pub capacity_secs: f64,
    pub baseline_secs: f64,
    pub soak_secs: f64,
    pub sample_secs: f64,
    pub clients: usize,
    pub idle_sockets: usize,
}

impl Plan {
    pub fn full(minutes: f64, clients: usize) -> Plan {
        Plan {
            warmup_secs: 60.0,
            capacity_secs: 20.0,
            baseline_secs: 30.0,
            soak_secs: minutes * 60.0,
            sample_secs: 30.0,
            clients,
            idle_sockets: 200,
        }
    }
    pub fn smoke() -> Plan {
        Plan {
            warmup_secs: 1.0,
            capacity_secs: 1.0,
            baseline_secs: 1.0,
            soak_secs: 2.0,
            sample_secs: 1.0,
            clients: 2,
            idle_sockets: 10,
        }
    }
}

const SEEDED_MESSAGES: usize = 10;
const MESSAGE_BYTES: usize = 1024;

/// Outcomes of the good clients: latencies (µs, from the time an op was due) and errors.
#[derive(Default)]
struct Tally {
    lat_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn p(&self, q: f64) -> f64 {
        let mut v = self.lat_us.clone();
        v.sort_unstable();
        v.get(((v.len().max(1) - 1) as f64 * q).round() as usize).map(|&u| u as f64 / 1000.0).unwrap_or(0.0)
    }
    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// One good op, chosen by `n`: 60% GetTranscript, 20% AppendMessages, 5% PutTranscript
/// (replacing the client's live chat with a fresh one, so the data stays the same size
/// and the old one becomes garbage to reclaim), 10% ListTranscripts, 5% ExportSubject.
async fn good_op(ch: Channel, key: &str, client: usize, n: u64) -> Result<(), tonic::Status> {
    let mut c = tenant_client(ch.clone(), key);
    let live = || pb::Transcript {
        transcript_id: format!("live-{client}"),
        subject_id: subject(client),
        ..Default::default()
    };
    match n % 20 {
        0..=11 => c.get_transcript(pb::GetTranscriptRequest { transcript_id: seeded(client) }).await.map(|_| ()),
        12..=15 => {
            let req = pb::AppendMessagesRequest {
                transcript_id: format!("live-{client}"),
                messages: vec![message(n as usize, MESSAGE_BYTES)],
                expected_message_count: None,
            };
            match c.append_messages(req.clone()).await {
                Err(s) if s.code() == tonic::Code::NotFound => {
                    c.put_transcript(pb::PutTranscriptRequest { transcript: Some(live()) }).await?;
                    c.append_messages(req).await.map(|_| ())
                }
                r => r.map(|_| ()),
            }
        }
        16 => c.put_transcript(pb::PutTranscriptRequest { transcript: Some(live()) }).await.map(|_| ()),
        17 | 18 => {
            let req =
                pb::ListTranscriptsRequest { subject_id: subject(client), page_size: 20, page_token: String::new() };
            c.list_transcripts(req).await.map(|_| ())
        }
        _ => {
            let mut e = pb::export_service_client::ExportServiceClient::with_interceptor(ch, Bearer::new(key).unwrap());
            let mut s =
                e.export_subject(pb::ExportSubjectRequest { subject_id: format!("seed-{client}") }).await?.into_inner();
            while s.message().await?.is_some() {}
            Ok(())
        }
    }
}

fn seeded(client: usize) -> String {
    format!("seeded-{client}")
}
fn subject(client: usize) -> String {
    format!("soak-subject-{client}")
}

/// Closed loop, `clients` at once, for `secs`: the capacity of the good mix, counting
/// only the ops that succeeded (a refusal is fast, and not capacity).
async fn capacity(channels: &[Channel], key: &str, clients: usize, secs: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (ch, key, done, failed) =
            (channels[c % channels.len()].clone(), key.to_owned(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = c as u64;
            while Instant::now() < deadline {
                match good_op(ch.clone(), &key, c, n).await {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => {
                        *failed.lock().unwrap().entry(format!("{:?} {}", s.code(), s.message())).or_default() += 1
                    }
                }
                n += clients as u64;
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let failed = failed.lock().unwrap();
    if !failed.is_empty() {
        eprintln!("soak: refused while measuring capacity: {failed:?}");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Open loop at `rate` for `secs`: ops are due on a fixed schedule whatever the server does,
/// and a latency counts from when its op was due (no coordinated omission). `every` gets
/// the tally of each sampling interval.
async fn open_loop(
    channels: &[Channel],
    key: &str,
    clients: usize,
    rate: f64,
    secs: f64,
    sample: Duration,
    mut every: impl FnMut(f64, &Tally),
) -> Tally {
    let total = Arc::new(Mutex::new(Tally::default()));
    let window = Arc::new(Mutex::new(Tally::default()));
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(2048));
    let mut next_sample = start + sample;
    let mut n = 0u64;
    let mut due = start;
    while due < end {
        tokio::time::sleep_until(due.into()).await;
        if Instant::now() >= next_sample {
            let w = std::mem::take(&mut *window.lock().unwrap());
            every(start.elapsed().as_secs_f64(), &w);
            next_sample += sample;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        let client = (n as usize) % clients;
        let (ch, key) = (channels[n as usize % channels.len()].clone(), key.to_owned());
        let (total, window) = (total.clone(), window.clone());
        let scheduled = due;
        tokio::spawn(async move {
            let r = good_op(ch, &key, client, n).await;
            let us = scheduled.elapsed().as_micros().min(u32::MAX as u128) as u32;
            for t in [&total, &window] {
                let mut t = t.lock().unwrap();
                t.lat_us.push(us);
                if let Err(s) = &r {
                    let what = s.message().split(" (").next().unwrap_or_default();
                    *t.errors.entry(format!("{:?}: {what}", s.code())).or_default() += 1;
                }
            }
            drop(permit);
        });
        n += 1;
        due += interval;
    }
    // Let the last ops finish.
    let _ = in_flight.acquire_many(2048).await;
    let w = std::mem::take(&mut *window.lock().unwrap());
    every(start.elapsed().as_secs_f64(), &w);
    std::mem::take(&mut *total.lock().unwrap())
}

/// What the hostile client did and how the server answered it.
#[derive(Default)]
struct Hostile {
    answers: Mutex<BTreeMap<String, u64>>,
    sockets_closed_by_server: AtomicU64,
}

impl Hostile {
    fn count(&self, what: &str, r: Result<(), tonic::Status>) {
        let code = match r {
            Ok(()) => "OK".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        *self.answers.lock().unwrap().entry(format!("{what}: {code}")).or_default() += 1;
    }
}

fn from(url: &str, local: &str) -> Endpoint {
    Endpoint::from_shared(url.to_owned()).unwrap().local_address(Some(local.parse().unwrap()))
}

/// Everything the attacker does at once, until `stop`.
async fn attack(
    srv: &Proc,
    hostile_key: String,
    good_key_id: String,
    plan: &Plan,
    stop: Arc<AtomicBool>,
) -> (Arc<Hostile>, Vec<tokio::task::JoinHandle<()>>) {
    let h = Arc::new(Hostile::default());
    let mut tasks = Vec::new();
    let url = srv.url.clone();
    // SOAK_ATTACKS=stalls,guesses,junk,sockets picks parts of the attack (all by default).
    let parts = std::env::var("SOAK_ATTACKS").unwrap_or_else(|_| "stalls,guesses,junk,sockets".into());
    let on = |part: &str| parts.split(',').any(|p| p == part);
    // Stalled exports and stalled big reads, on connections that never take data.
    if on("stalls") {
        let (h, stop, key, url) = (h.clone(), stop.clone(), hostile_key.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let ch = from(&url, "127.0.0.61").initial_stream_window_size(0).connect().await.expect("connect");
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Ordering::Relaxed) {
                let mut e = pb::export_service_client::ExportServiceClient::with_interceptor(
                    ch.clone(),
                    Bearer::new(&key).unwrap(),
                );
                match e.export_tenant(pb::ExportTenantRequest {}).await {
                    Ok(s) => {
                        h.count("stalled ExportTenant", Ok(()));
                        held.push_back(s);
                        if held.len() > 4 {
                            held.pop_front();
                        }
                    }
                    Err(s) => h.count("stalled ExportTenant", Err(s)),
                }
                let mut c = tenant_client(ch.clone(), &key);
                let hh = h.clone();
                tokio::spawn(async move {
                    let r = c.get_transcript(pb::GetTranscriptRequest { transcript_id: "hostile-big".into() }).await;
                    match r {
                        // The server closed the connection on it (the send deadline): no status.
                        Err(s) if s.code() == tonic::Code::Unknown => {
                            *hh.answers
                                .lock()
                                .unwrap()
                                .entry("stalled big GetTranscript: connection closed".into())
                                .or_default() += 1;
                        }
                        r => hh.count("stalled big GetTranscript", r.map(|_| ())),
                    }
                });
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    // Guessing the good tenant's key id, 20 a second, from one address.
    if on("guesses") {
        let (h, stop, url) = (h.clone(), stop.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let ch = from(&url, "127.0.0.62").connect().await.expect("connect");
            let guess = format!("cvk_{good_key_id}_{}", "0".repeat(64));
            while !stop.load(Ordering::Relaxed) {
                let mut c = tenant_client(ch.clone(), &guess);
                let r = c.get_transcript(pb::GetTranscriptRequest { transcript_id: "x".into() }).await;
                h.count("guessed secret", r.map(|_| ()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    // Junk credentials (no argon2), and bad requests with a valid key, 50 a second each.
    if on("junk") {
        let (h, stop, url, key) = (h.clone(), stop.clone(), url.clone(), hostile_key.clone());
        tasks.push(tokio::spawn(async move {
            let junk = from(&url, "127.0.0.63").connect().await.expect("connect");
            let bad = from(&url, "127.0.0.64").connect().await.expect("connect");
            while !stop.load(Ordering::Relaxed) {
                let mut c = tenant_client(junk.clone(), "junk");
                let r = c.get_transcript(pb::GetTranscriptRequest { transcript_id: "x".into() }).await;
                h.count("junk credential", r.map(|_| ()));
                let mut c = tenant_client(bad.clone(), &key);
                let t = pb::Transcript { transcript_id: String::new(), ..Default::default() };
                let r = c.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await;
                h.count("invalid PutTranscript", r.map(|_| ()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Silent sockets: each reconnects as soon as the server closes it.
    let addr = url.trim_start_matches("http://").to_owned();
    for _ in 0..if on("sockets") { plan.idle_sockets } else { 0 } {
        let (h, stop, addr) = (h.clone(), stop.clone(), addr.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut buf = [0u8; 256];
                loop {
                    match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            h.sockets_closed_by_server.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(Ok(_)) => continue,
                        Err(_) if stop.load(Ordering::Relaxed) => break,
                        Err(_) => continue,
                    }
                }
            }
        }));
    }
    (h, tasks)
}

/// Audit records of refused calls, and the refusals they stand for (after a restart, so
/// every aggregate window is closed and written).
async fn audit_counts(srv: &Proc) -> (usize, u64) {
    let ch = Channel::from_shared(srv.admin_url.clone()).unwrap().connect().await.expect("admin");
    let mut admin = AdminServiceClient::with_interceptor(ch, Bearer::new(OPERATOR_TOKEN).unwrap());
    let ops = ["auth.failed", "auth.failed.repeated", "auth.lockout"];
    let (mut records, mut refusals, mut token) = (0, 0, String::new());
    loop {
        let q = pb::QueryAuditRequest {
            operations: ops.iter().map(|s| s.to_string()).collect(),
            page_size: 1000,
            page_token: token,
            ..Default::default()
        };
        let page = admin.query_audit(q).await.expect("audit").into_inner();
        for r in &page.records {
            records += 1;
            if r.operation != "auth.lockout" {
                refusals += u64::from(r.count.max(1));
            }
        }
        if page.next_page_token.is_empty() {
            return (records, refusals);
        }
        token = page.next_page_token;
    }
}

/// Bytes of the files under `dir`, recursively.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

async fn provision(srv: &Proc, tenant: &str) -> String {
    let ch = Channel::from_shared(srv.admin_url.clone()).unwrap().connect().await.expect("admin");
    let mut admin = AdminServiceClient::with_interceptor(ch, Bearer::new(OPERATOR_TOKEN).unwrap());
    let req = pb::CreateTenantRequest {
        region: "eu".into(),
        tenant_id: tenant.into(),
        allowlist: vec!["127.0.0.0/8".into()],
        ..Default::default()
    };
    admin.create_tenant(req).await.expect("create tenant");
    admin.issue_api_key(pb::IssueApiKeyRequest { tenant_id: tenant.into() }).await.expect("key").into_inner().api_key
}

/// Runs the soak and returns its markdown section.
pub async fn run(plan: Plan) -> String {
    let srv = Proc::serve(tempfile::tempdir().unwrap(), "fsync", Some(64)).provision().await;
    let key = srv.api_key.clone();
    let hostile_key = provision(&srv, "hostile").await;
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(Channel::from_shared(srv.url.clone()).unwrap().connect().await.expect("connect"));
    }
    // Each good client's subject has one seeded transcript to read and export.
    for c in 0..plan.clients {
        let mut cl = tenant_client(channels[0].clone(), &key);
        let t = pb::Transcript {
            transcript_id: seeded(c),
            subject_id: format!("seed-{c}"),
            messages: (0..SEEDED_MESSAGES).map(|i| message(i, MESSAGE_BYTES)).collect(),
            ..Default::default()
        };
        cl.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await.expect("seed");
    }
    // The attacker's tenant: ~6 MiB to export, and one large transcript to read.
    let mut hc = tenant_client(channels[0].clone(), &hostile_key);
    for t in 0..12 {
        let tr = pb::Transcript {
            transcript_id: format!("hostile-{t}"),
            subject_id: "h".into(),
            messages: (0..8).map(|i| message(i, 60 * 1024)).collect(),
            ..Default::default()
        };
        hc.put_transcript(pb::PutTranscriptRequest { transcript: Some(tr) }).await.expect("seed hostile");
    }
    let big = pb::Transcript {
        transcript_id: "hostile-big".into(),
        subject_id: "h".into(),
        messages: (0..12).map(|i| message(i, 60 * 1024)).collect(),
        ..Default::default()
    };
    hc.put_transcript(pb::PutTranscriptRequest { transcript: Some(big) }).await.expect("seed big");

    // Capacity is measured with the attacker at work (it shares the two cores), then the
    // baseline at 70% of it without the attacker, then the soak at the same rate with it.
    let good_key_id = key.split('_').nth(1).unwrap_or_default().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let (_, probe) = attack(&srv, hostile_key.clone(), good_key_id.clone(), &plan, stop.clone()).await;
    // A first run warms the store up to the shape it keeps (live transcripts grown,
    // garbage being reclaimed): capacity measured on a fresh store is more than it sustains.
    let warm = capacity(&channels, &key, plan.clients, plan.warmup_secs).await;
    let cap = capacity(&channels, &key, plan.clients, plan.capacity_secs).await.min(warm);
    stop.store(true, Ordering::Relaxed);
    for t in probe {
        let _ = t.await;
    }
    let rate = 0.7 * cap;
    eprintln!("soak: capacity {cap:.0} ops/s; driving {rate:.0} ops/s");
    let sample = Duration::from_secs_f64(plan.sample_secs);
    let baseline = open_loop(&channels, &key, plan.clients, rate, plan.baseline_secs, sample, |_, _| {}).await;
    eprintln!("soak baseline: p99 {:.1} ms, errors {:?}", baseline.p(0.99), baseline.errors);

    let stop = Arc::new(AtomicBool::new(false));
    // SOAK_ATTACK=0: the same soak with no attacker, to tell what the attacker costs.
    let attacking = std::env::var("SOAK_ATTACK").map(|v| v != "0").unwrap_or(true);
    let (hostile, attacker) = if attacking {
        attack(&srv, hostile_key, good_key_id, &plan, stop.clone()).await
    } else {
        (Arc::new(Hostile::default()), Vec::new())
    };
    let pid = srv.child.id();
    let data_dir = srv._dir.as_ref().map(|d| d.path().to_path_buf());
    let mut rows = Vec::new();
    let mut last = 0.0;
    let soak = open_loop(&channels, &key, plan.clients, rate, plan.soak_secs, sample, |at, w| {
        let rss = super::status_kib(pid, "VmRSS:") as f64 / 1024.0;
        let fds = open_fds(pid);
        let disk = data_dir.as_deref().map(dir_bytes).unwrap_or(0) as f64 / (1024.0 * 1024.0);
        let rps = w.lat_us.len() as f64 / (at - last).max(0.001);
        last = at;
        rows.push((at, rps, w.p(0.99), w.error_count(), rss, fds, disk));
        eprintln!("soak {at:.0}s: p99 {:.1} ms, RSS {rss:.0} MiB, fds {fds}, disk {disk:.0} MiB", w.p(0.99));
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in attacker {
        let _ = t.await;
    }
    let srv = srv.restart("fsync", Some(64));
    let denied = audit_counts(&srv).await;

    let mut out = format!(
        "\n### Soak: {:.1} min of mixed traffic at 70% of capacity, beside a hostile client\n\n\
         Good clients: {} subjects, 60% GetTranscript ({SEEDED_MESSAGES} × 1 KiB), 20% AppendMessages (1 KiB) to a live \
         chat, 5% PutTranscript replacing that chat with a fresh one (the live chats stay about the same size and reclaim runs; the audit trail grows with every call), \
         10% ListTranscripts, 5% ExportSubject; open loop at {rate:.0} ops/s (capacity of the mix, measured \
         closed-loop in this run after a warm-up, with the attacker at work: {cap:.0} ops/s), latency from when each op was due. Durability fsync, \
         store_cache_bytes 64 MiB, every other setting default. The hostile client, all the while: exports and \
         720 KiB reads on a connection that grants no flow-control window (one of each every 0.5 s), 20 guesses \
         a second at the good tenant's key id from one address, 50 junk credentials and 50 invalid requests \
         a second, {} silent sockets reconnecting as soon as the server closes them.\n\n\
         | at s | good ops/s | good p99 ms | good errors | server RSS MiB | open fds | files on disk MiB |\n|---|---|---|---|---|---|---|\n",
        plan.soak_secs / 60.0,
        plan.clients,
        plan.idle_sockets,
    );
    for (at, rps, p99, errs, rss, fds, disk) in &rows {
        out += &format!("| {at:.0} | {rps:.0} | {p99:.1} | {errs} | {rss:.0} | {fds} | {disk:.0} |\n");
    }
    let rss_of = |part: &[(f64, f64, f64, u64, f64, usize, f64)]| part.iter().map(|r| r.4).fold(0.0, f64::max);
    let tenth = (rows.len() / 10).max(1);
    let (early, late) = (rss_of(&rows[..tenth.min(rows.len())]), rss_of(&rows[rows.len().saturating_sub(tenth)..]));
    out += &format!(
        "\nGood-client p99 under attack {:.1} ms vs {:.1} ms at the same rate with no attacker ({:.2}x); p50 {:.1} vs {:.1} ms. \
         Good-client errors: {} of {} ({}). Server RSS, highest of the first vs the last tenth: {early:.0} / {late:.0} MiB \
         ({:.2}x); open fds at most {} (the connection cap follows the fd limit).\n\n",
        soak.p(0.99),
        baseline.p(0.99),
        soak.p(0.99) / baseline.p(0.99).max(0.001),
        soak.p(0.5),
        baseline.p(0.5),
        soak.error_count(),
        soak.lat_us.len(),
        if soak.errors.is_empty() { "none".to_owned() } else { format!("{:?}", soak.errors) },
        late / early.max(1.0),
        rows.iter().map(|r| r.5).max().unwrap_or(0),
    );
    out += "| hostile call | answered | count |\n|---|---|---|\n";
    for (what, n) in hostile.answers.lock().unwrap().iter() {
        let (call, code) = what.split_once(": ").unwrap_or((what, ""));
        out += &format!("| {call} | {code} | {n} |\n");
    }
    out += &format!(
        "| silent socket | closed by the server | {} |\n\nAudit records of refused calls: {} records standing for {} refusals.\n",
        hostile.sockets_closed_by_server.load(Ordering::Relaxed),
        denied.0,
        denied.1
    );
    out
}
