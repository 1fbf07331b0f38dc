//! The edge under hostile load, against the real binary: work isolation between tenants,
//! a lockout that cannot be turned on a key's owner, bounded argon2 work and audit
//! growth, connection limits under a low fd limit, protocol errors as INVALID_ARGUMENT,
//! discovery and metrics.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use chatvault::grpc::pb::{self, transcript_service_client::TranscriptServiceClient};
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::common::*;

fn config_opts(path: &std::path::Path) -> Opts<'_> {
    Opts { args: vec!["--config", path.to_str().unwrap()], ..Opts::default() }
}

/// A channel whose streams grant the server no flow-control window: it takes headers,
/// never data, the way a hostile client stalls a response.
async fn stalled_channel(server: &Server) -> Channel {
    Endpoint::from_shared(server.url.clone()).unwrap().initial_stream_window_size(0).connect().await.expect("connect")
}

fn with_key<T>(msg: T, key: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {key}")).unwrap());
    req
}

async fn get_from(server: &Server, local: &str, key: &str) -> Result<(), tonic::Status> {
    let mut c = TranscriptServiceClient::new(server.channel_from(local).await);
    match c.get_transcript(with_key(pb::GetTranscriptRequest { transcript_id: "none".into() }, key)).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(s),
    }
}

/// A token that parses, for `key_id`, with a secret that is wrong.
fn wrong_secret(key_id: &str) -> String {
    format!("cvk_{key_id}_{}", "0".repeat(64))
}

fn key_id(api_key: &str) -> &str {
    api_key.split('_').nth(2).expect("cvk_<id>_<secret>")
}

async fn audit_all(admin: &mut AdminClient, ops: &[&str]) -> Vec<pb::AuditRecord> {
    let q = pb::QueryAuditRequest { operations: ops.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    admin.query_audit(q).await.unwrap().into_inner().records
}

/// Raises this test process's own fd limit to its hard limit: it opens hundreds of sockets.
fn raise_own_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(Resource::Nofile, rustix::process::Rlimit { current: lim.maximum, maximum: lim.maximum });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_exports_from_one_tenant_do_not_slow_another_tenants_reads() {
    let dirs = Dirs::new();
    let cfg = dirs.config("[work]\nexport_stall_timeout_ms = 1000\n");
    let server = Server::start_with(&dirs, config_opts(&cfg));
    let mut mallory = server.transcripts("mallory").await;
    let text = "m".repeat(60 * 1024);
    for t in 0..12 {
        put(&mut mallory, transcript(&format!("big-{t}"), "s", 1_700_000_000 + t, &[text.as_str(); 8])).await;
    }
    let mut victim = server.transcripts("acme").await;
    put(&mut victim, transcript("chat-1", "alice", 1_700_000_000, &["hello"])).await;

    // The attacker opens 40 exports on a connection that never takes data.
    let key = server.api_key("mallory").await;
    let mut attacker = pb::export_service_client::ExportServiceClient::new(stalled_channel(&server).await);
    let mut opened = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..40 {
        match attacker.export_tenant(with_key(pb::ExportTenantRequest {}, &key)).await {
            Ok(stream) => opened.push(stream),
            Err(s) => refused.push(s),
        }
    }
    assert_eq!(opened.len(), 4, "the per-tenant export limit (4 by default)");
    assert!(refused.iter().all(|s| s.code() == Code::ResourceExhausted), "{refused:?}");
    let s = &refused[0];
    assert!(s.message().contains("max_exports_per_tenant") && s.message().contains('4'), "{}", s.message());
    use tonic_types::StatusExt;
    assert!(s.get_details_retry_info().is_some(), "RetryInfo with the refusal");

    // Meanwhile the other tenant's reads and exports answer in well under a second each.
    let mut exports = server.exports("acme").await;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(get(&mut victim, "chat-1").await.unwrap().messages.len(), 1);
        let mut stream = exports.export_tenant(pb::ExportTenantRequest {}).await.unwrap().into_inner();
        while stream.message().await.unwrap().is_some() {}
        assert!(started.elapsed() < Duration::from_secs(5), "a read and an export took {:?}", started.elapsed());
    }

    // The stalled exports are given up on in seconds: the attacker's tenant may export again.
    let mut own = server.exports("mallory").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match own.export_tenant(pb::ExportTenantRequest {}).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut bytes = 0;
                while let Some(c) = stream.message().await.unwrap() {
                    bytes += c.data.len();
                }
                assert!(bytes > 12 * 8 * 60 * 1024, "the whole export: {bytes} bytes");
                break;
            }
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("the stalled exports still hold their slots: {s:?}"),
        }
    }
    // Their streams are not kept either: the connection that took no data is closed.
    for stream in opened {
        let mut stream = stream.into_inner();
        let end = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    other => return other.map(|_| ()),
                }
            }
        });
        assert!(end.await.expect("the stalled stream ended").is_err(), "a stalled export ended as if whole");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_holds_only_its_tenants_response_bytes_and_only_until_the_send_deadline() {
    let dirs = Dirs::new();
    let cfg = dirs.config(
        "request_timeout_ms = 3000\n[limits]\nmax_response_bytes = 1048576\n\
         [work]\nmax_inflight_response_bytes_per_tenant = 2097152\nbusy_wait_ms = 200\n",
    );
    let server = Server::start_with(&dirs, config_opts(&cfg));
    let mut mallory = server.transcripts("mallory").await;
    let text = "b".repeat(60 * 1024);
    put(&mut mallory, transcript("big", "s", 1_700_000_000, &[text.as_str(); 12])).await;
    let mut victim = server.transcripts("acme").await;
    put(&mut victim, transcript("chat-1", "alice", 1_700_000_000, &["hello"])).await;

    let key = server.api_key("mallory").await;
    let mut stalled = TranscriptServiceClient::new(stalled_channel(&server).await);
    let req = with_key(pb::GetTranscriptRequest { transcript_id: "big".into() }, &key);
    let hung = tokio::spawn(async move { stalled.get_transcript(req).await.map(|_| ()) });
    // The stalled call has read its transcript once it holds its bytes.
    let deadline = Instant::now() + Duration::from_secs(10);
    // (~720 KiB decrypted and again encoded: ~1.4 MiB of the tenant's 2 MiB.)
    while server.metric("chatvault_response_bytes_held").await < 1400.0 * 1024.0 {
        assert!(Instant::now() < deadline && !hung.is_finished(), "the stalled call never held its bytes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // While ~720 KiB sit in a response nobody takes, the tenant's next read of as much
    // is refused, naming the limit; another tenant reads as ever.
    let refusal = get(&mut mallory, "big").await.expect_err("the tenant's bytes are held");
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains("max_inflight_response_bytes"), "{}", refusal.message());
    assert_eq!(get(&mut victim, "chat-1").await.unwrap().messages[0].text, "hello");

    // The send deadline (request_timeout_ms) closes the stalled connection, which frees it.
    let ended = tokio::time::timeout(Duration::from_secs(15), hung).await.expect("the stalled call ended");
    assert!(ended.unwrap().is_err(), "the stalled call cannot have succeeded");
    assert_eq!(get(&mut mallory, "big").await.unwrap().messages.len(), 12);
    assert!(server.metric("chatvault_limits_hit_total{reason=\"send_timeout\"").await >= 1.0);
}

#[tokio::test]
async fn a_key_id_known_to_an_attacker_does_not_lock_its_owner_out_from_another_address() {
    let dirs = Dirs::new();
    let cfg = dirs.config("[auth.lockout]\nmax_failures = 3\n");
    let server = Server::start_with(&dirs, config_opts(&cfg));
    let key = server.api_key("acme").await;
    let guess = wrong_secret(key_id(&key));
    let mut codes = Vec::new();
    for _ in 0..20 {
        codes.push(get_from(&server, "127.0.0.5", &guess).await.unwrap_err().code());
    }
    assert_eq!(codes[..3], [Code::Unauthenticated; 3]);
    assert!(codes[3..].iter().all(|c| *c == Code::ResourceExhausted), "{codes:?}");
    // The owner, never verified before (nothing cached), is let in from its own address.
    get_from(&server, "127.0.0.6", &key).await.expect("the owner is not locked out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_one_source_runs_at_most_the_configured_argon2_verifications() {
    let dirs = Dirs::new();
    let cfg = dirs.config("[auth.lockout]\nmax_failures = 5\n");
    let server = Server::start_with(&dirs, config_opts(&cfg));
    server.api_key("acme").await;
    let before = server.metric("chatvault_argon2_verifications_total").await;
    let ch = server.channel_from("127.0.0.9").await;
    let calls = (0..300).map(|i| {
        let mut c = TranscriptServiceClient::new(ch.clone());
        let token = wrong_secret(&format!("{i:016x}"));
        tokio::spawn(async move {
            c.get_transcript(with_key(pb::GetTranscriptRequest { transcript_id: "x".into() }, &token)).await
        })
    });
    let mut codes = Vec::new();
    for c in calls.collect::<Vec<_>>() {
        codes.push(c.await.unwrap().unwrap_err().code());
    }
    let ran = server.metric("chatvault_argon2_verifications_total").await - before;
    assert!((1.0..=5.0).contains(&ran), "{ran} argon2 verifications for a burst limited to 5");
    let unauthenticated = codes.iter().filter(|c| **c == Code::Unauthenticated).count();
    assert_eq!(unauthenticated as f64, ran, "one refusal per verification that ran");
    // (UNAVAILABLE: waited too long for one of the two argon2 slots, on a loaded machine.)
    let expected = |c: &Code| matches!(c, Code::Unauthenticated | Code::ResourceExhausted | Code::Unavailable);
    assert!(codes.iter().all(expected), "{codes:?}");
}

#[tokio::test]
async fn valid_keys_too_draw_on_their_sources_verification_allowance_but_cached_ones_do_not() {
    let dirs = Dirs::new();
    let cfg = dirs.config("[auth.lockout]\nverify_burst = 4\nverify_per_minute = 1\n");
    let server = Server::start_with(&dirs, config_opts(&cfg));
    let mut admin = server.admin().await;
    let first = server.api_key("acme").await;
    let mut keys = vec![first];
    for _ in 0..5 {
        let k = admin.issue_api_key(pb::IssueApiKeyRequest { tenant_id: "acme".into() }).await.unwrap();
        keys.push(k.into_inner().api_key);
    }
    for k in &keys[..4] {
        get_from(&server, "127.0.0.10", k).await.expect("within the burst");
    }
    let s = get_from(&server, "127.0.0.10", &keys[4]).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("verify_per_minute"), "{}", s.message());
    // A key verified before costs no argon2, so it is not throttled; another address has its own.
    get_from(&server, "127.0.0.10", &keys[0]).await.expect("cached");
    get_from(&server, "127.0.0.11", &keys[5]).await.expect("another source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_refused_calls_grow_the_audit_trail_by_a_bounded_number_of_records_with_counts() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    server.api_key("acme").await;
    let data = server.channel_from("127.0.0.12").await;
    for _ in 0..300 {
        let mut c = TranscriptServiceClient::new(data.clone());
        let s = c.get_transcript(with_key(pb::GetTranscriptRequest { transcript_id: "x".into() }, "junk")).await;
        assert!(matches!(s.unwrap_err().code(), Code::Unauthenticated | Code::ResourceExhausted));
    }
    let admin_ch = Endpoint::from_shared(server.admin_url.clone())
        .unwrap()
        .local_address(Some("127.0.0.13".parse().unwrap()))
        .connect()
        .await
        .unwrap();
    let mut codes = Vec::new();
    for _ in 0..300 {
        let mut wrong = pb::admin_service_client::AdminServiceClient::with_interceptor(
            admin_ch.clone(),
            chatvault::grpc::Bearer::new("not-the-operator-token-0123456789abcdef").unwrap(),
        );
        codes.push(wrong.list_tenants(pb::ListTenantsRequest::default()).await.unwrap_err().code());
    }
    // The admin listener locks a guessing address out too, but never the right token.
    assert_eq!(codes[0], Code::Unauthenticated);
    assert_eq!(codes.last(), Some(&Code::ResourceExhausted), "{codes:?}");
    let mut right = pb::admin_service_client::AdminServiceClient::with_interceptor(
        admin_ch.clone(),
        chatvault::grpc::Bearer::new(OPERATOR_TOKEN).unwrap(),
    );
    right.list_tenants(pb::ListTenantsRequest::default()).await.expect("the operator, from the locked address");
    // The operator, from elsewhere, is not.
    let mut admin = server.admin().await;
    let ops = ["auth.failed", "admin.denied", "auth.lockout"];
    let now = audit_all(&mut admin, &ops).await;
    assert!(now.len() <= 6, "600 refusals wrote {} records: {now:?}", now.len());

    // Every refusal is accounted for once the windows close (at shutdown at the latest).
    server.stop().await;
    let server = Server::start(&dirs);
    let mut admin = server.admin().await;
    let count = |recs: &[pb::AuditRecord], source: &str| -> u32 {
        recs.iter().filter(|r| r.source_address == source).map(|r| r.count.max(1)).sum()
    };
    let data_side = audit_all(&mut admin, &["auth.failed", "auth.failed.repeated"]).await;
    assert_eq!(count(&data_side, "127.0.0.12"), 300, "{data_side:?}");
    let admin_side = audit_all(&mut admin, &["admin.denied", "admin.denied.repeated"]).await;
    assert_eq!(count(&admin_side, "127.0.0.13"), 300, "{admin_side:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_under_a_low_fd_limit_do_not_stop_a_legitimate_call_and_are_closed() {
    if std::process::Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("SKIPPED: prlimit (util-linux) is not installed");
        return;
    }
    raise_own_fd_limit();
    let dirs = Dirs::new();
    let cfg = dirs.config("[connections]\nhandshake_timeout_ms = 1000\n");
    let server =
        Server::start_with(&dirs, Opts { wrapper: vec!["prlimit", "--nofile=128:128", "--"], ..config_opts(&cfg) });
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("chat-1", "alice", 1_700_000_000, &["still here"])).await;
    drop(c);
    let addr = server.url.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.expect("the kernel accepts");
        if i % 2 == 0 {
            // One byte of a preface does not make a connection one that is in use.
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(b"P").await;
        }
        idle.push(s);
    }
    let call = async {
        let mut c = server.transcripts("acme").await;
        get(&mut c, "chat-1").await
    };
    // The idle sockets queued before it are accepted and timed out a slot-full at a time
    // (handshake_timeout_ms); on a loaded 2-core machine that takes several seconds.
    let got = tokio::time::timeout(Duration::from_secs(25), call).await.expect("a legitimate call in time");
    let got = got.unwrap_or_else(|e| panic!("the legitimate call failed: {e:?}\n{}", server.log_text()));
    assert_eq!(got.messages[0].text, "still here");
    // Every silent connection is closed by the server within seconds (after, perhaps,
    // the server's half of the HTTP/2 preface).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for mut s in idle {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("a silent connection stayed open"),
            }
        }
    }
    assert!(server.metric("chatvault_connections_open{listener=\"data\"").await <= 2.0);
}

/// Bytes in, bytes out: to send what no generated client would.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

async fn raw_unary(ch: Channel, path: &'static str, body: Vec<u8>, key: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(with_key(body, key), path, Raw).await.expect_err("bad bytes refused")
}

fn field(tag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![tag << 3 | 2, bytes.len() as u8];
    v.extend_from_slice(bytes);
    v
}

#[tokio::test]
async fn messages_that_do_not_decode_answer_invalid_argument_naming_the_field_on_every_service() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let key = server.api_key("acme").await;
    const PUT: &str = "/chatvault.v1.TranscriptService/PutTranscript";
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        ("invalid UTF-8", PUT, field(1, &field(1, &[0xff, 0xfe])), "transcript_id"),
        ("a bad varint", PUT, vec![0xff; 11], "varint"),
        ("100,000 nested groups", PUT, vec![15 << 3 | 3; 100_000], "recursion"),
        ("an invalid wire type", PUT, vec![0x0f, 0x01], "wire type"),
        ("a length past the end", PUT, vec![0x0a, 0x7f, 0x01], "buffer"),
        ("garbage to a streaming call", "/chatvault.v1.ExportService/ExportSubject", vec![0x0a, 0x05, 0x01], "buffer"),
        ("garbage to health", "/grpc.health.v1.Health/Check", vec![0x0a, 0x05], "buffer"),
    ];
    for (what, path, body, names) in cases {
        let s = raw_unary(server.channel().await, path, body, &key).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert!(s.message().contains(names), "{what}: {}", s.message());
    }
    let admin = Channel::from_shared(server.admin_url.clone()).unwrap().connect().await.unwrap();
    let s = raw_unary(admin, "/chatvault.v1.AdminService/GetTenant", field(1, &[0xc3]), OPERATOR_TOKEN).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("tenant_id"), "{}", s.message());
}

/// Sends `frame` as the whole request body, bypassing every client's framing.
async fn raw_frame(server: &Server, frame: &'static [u8]) -> Code {
    let addr = server.url.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/chatvault.v1.TranscriptService/PutTranscript"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    send.send_data(bytes::Bytes::from_static(frame), true).unwrap();
    let resp = resp.await.unwrap();
    let code_of = |h: &http::HeaderMap| {
        h.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok()).map(Code::from_i32)
    };
    if let Some(code) = code_of(resp.headers()) {
        return code;
    }
    let mut body = resp.into_body();
    while let Some(d) = body.data().await {
        d.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    code_of(&trailers).expect("grpc-status")
}

#[tokio::test]
async fn frames_that_do_not_parse_answer_invalid_argument() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    // A frame that promises 100 bytes and ends after 3.
    assert_eq!(raw_frame(&server, &[0, 0, 0, 0, 100, 1, 2, 3]).await, Code::InvalidArgument);
    // The compressed flag with no compression agreed.
    assert_eq!(raw_frame(&server, &[1, 0, 0, 0, 1, 0]).await, Code::InvalidArgument);
}

pub(super) async fn list_services(ch: Channel) -> (Vec<String>, Vec<String>) {
    use tonic_reflection::pb::{v1, v1alpha};
    let mut c1 = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut resp = c1.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let mut one: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    let mut c2 = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut resp = c2.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let mut alpha: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    one.sort();
    alpha.sort();
    (one, alpha)
}

pub(super) async fn health(ch: Channel, service: &str) -> Result<i32, Code> {
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    h.check(tonic_health::pb::HealthCheckRequest { service: service.into() })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
}

#[tokio::test]
async fn both_reflection_versions_list_exactly_the_services_each_listener_serves() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let common =
        ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];
    let mut data: Vec<String> =
        ["chatvault.v1.ExportService", "chatvault.v1.SubjectService", "chatvault.v1.TranscriptService"]
            .into_iter()
            .chain(common)
            .map(String::from)
            .collect();
    data.sort();
    let mut admin: Vec<String> = ["chatvault.v1.AdminService"].into_iter().chain(common).map(String::from).collect();
    admin.sort();
    let admin_ch = Channel::from_shared(server.admin_url.clone()).unwrap().connect().await.unwrap();
    assert_eq!(list_services(server.channel().await).await, (data.clone(), data.clone()));
    assert_eq!(list_services(admin_ch.clone()).await, (admin.clone(), admin.clone()));
    // Health answers per service, and only for the services of its listener.
    const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    for s in data.iter().filter(|s| s.starts_with("chatvault.")) {
        assert_eq!(health(server.channel().await, s).await, Ok(SERVING), "{s}");
        assert_eq!(health(admin_ch.clone(), s).await, Err(Code::NotFound), "{s} on the admin listener");
    }
    assert_eq!(health(admin_ch.clone(), "chatvault.v1.AdminService").await, Ok(SERVING));
    assert_eq!(health(server.channel().await, "chatvault.v1.AdminService").await, Err(Code::NotFound));
}

#[tokio::test]
async fn the_metrics_endpoint_serves_every_family_and_no_tenant_or_subject_id() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme-metrics").await;
    put(&mut c, transcript("chat-1", "alice@example.com", 1_700_000_000, &["hi"])).await;
    get(&mut c, "chat-1").await.unwrap();
    let mut e = server.exports("acme-metrics").await;
    let mut s = e.export_tenant(pb::ExportTenantRequest {}).await.unwrap().into_inner();
    while s.message().await.unwrap().is_some() {}
    let _ = get_from(&server, "127.0.0.20", &wrong_secret("0123456789abcdef")).await.unwrap_err();
    let mut text = String::new();
    let put_ok = r#"chatvault_requests_total{rpc="/chatvault.v1.TranscriptService/PutTranscript",code="OK""#;
    // A call is counted once its response has ended, a moment after the client has it.
    for _ in 0..50 {
        text = server.metrics_text().await;
        if sum_series(&text, put_ok) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for family in [
        "requests",
        "request_seconds",
        "auth_failures",
        "lockouts",
        "argon2_waiting",
        "argon2_running",
        "argon2_verifications",
        "commit_batch_size",
        "commit_sync_seconds",
        "key_cache",
        "exports_open",
        "response_bytes_held",
        "connections_open",
        "connections_refused",
        "limits_hit",
        "audit_denials_suppressed",
        "erasures_pending",
        "oldest_pending_erasure_seconds",
        "rotation_due",
        "rotation_failures",
        "key_store_epochs",
        "reclaim_backlog_records",
        "value_log_dead_bytes",
        "disk_bytes",
    ] {
        assert!(text.contains(&format!("# TYPE chatvault_{family} ")), "chatvault_{family} missing:\n{text}");
    }
    assert_eq!(sum_series(&text, put_ok), 1.0, "{text}");
    assert!(
        sum_series(&text, r#"chatvault_request_seconds_count{rpc="/chatvault.v1.ExportService/ExportTenant""#) >= 1.0
    );
    assert!(sum_series(&text, r#"chatvault_auth_failures_total{reason="unrecognised""#) >= 1.0, "{text}");
    assert!(sum_series(&text, "chatvault_argon2_verifications_total") >= 2.0);
    assert!(sum_series(&text, "chatvault_commit_batch_size_count") >= 1.0);
    for area in ["index", "values", "audit", "ledger"] {
        assert!(text.contains(&format!("chatvault_disk_bytes{{area=\"{area}\"}}")), "{area}:\n{text}");
    }
    assert!(!text.contains("acme-metrics") && !text.contains("alice"), "no tenant or subject ids:\n{text}");
    // An invented method is not a label of its own.
    let _ = raw_unary(server.channel().await, "/chatvault.v1.TranscriptService/Invented", vec![], "x").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!server.metrics_text().await.contains("Invented"));
}

#[test]
fn a_plaintext_listener_on_a_non_loopback_address_refuses_to_start_unless_allowed() {
    let dirs = Dirs::new();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_chatvault"))
            .arg("serve")
            .args(["--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .env("CHATVAULT_REGION", "eu")
            .arg("--data-dir")
            .arg(dirs.data())
            .arg("--key-dir")
            .arg(dirs.keys())
            .args(extra)
            .env("CHATVAULT_ROOT_KEY", ROOT_KEY_HEX)
            .env("CHATVAULT_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env_remove("CHATVAULT_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let out = run(&[]).wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen = 0.0.0.0") && err.contains("allow_plaintext_non_loopback"), "{err}");
    assert!(!dirs.data().exists(), "nothing was opened");

    let cfg = dirs.config("allow_plaintext_non_loopback = true\n");
    let mut child = run(&["--config", cfg.to_str().unwrap()]);
    let stdout = child.stdout.take().unwrap();
    use std::io::BufRead;
    let up =
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.starts_with("chatvault listening on"));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(up, "allowed explicitly, it serves: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("plaintext on a non-loopback address"));
}
