//! Region-pinned shards and the router, as an operator runs them: an EU node, a US node
//! (separate processes, directories and root keys) and a router in front, on loopback.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chatvault::grpc::Bearer;
use chatvault::grpc::pb;
use chatvault::grpc::pb::subject_service_client::SubjectServiceClient;
use chatvault::grpc::pb::transcript_service_client::TranscriptServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use super::common::*;

/// A region node: its own directories, its own root key, the other region's endpoint
/// known, and the router's network trusted for `x-forwarded-for` (all of loopback, as a
/// cluster's pod network would be: a client inside it must not pass for another).
fn region_node(dirs: &Dirs, region: &str, root: &str, other: Option<(&str, &str)>) -> Server {
    let mut toml = String::from("[auth]\ntrusted_proxies = [\"127.0.0.0/8\"]\n");
    if let Some((name, url)) = other {
        toml.push_str(&format!("[region_endpoints]\n{name} = \"{url}\"\n"));
    }
    let config = dirs.config(&toml);
    let config = config.to_str().unwrap().to_owned();
    Server::start_with(
        dirs,
        Opts {
            root_key_hex: root,
            args: vec!["--config", Box::leak(config.into_boxed_str())],
            env: vec![("CHATVAULT_REGION", Box::leak(region.to_owned().into_boxed_str()))],
            ..Opts::default()
        },
    )
}

/// `chatvault route` over `regions` (name, data URL).
pub(super) struct Router {
    child: Child,
    pub(super) url: String,
    /// The plaintext health-only listener (`health_listen`), for probes.
    health_url: String,
}

impl Router {
    fn start(dir: &Path, regions: &[(&str, &str)]) -> Router {
        Self::start_with(dir, regions, "")
    }

    /// With `extra` (TOML tables) appended to the configuration.
    pub(super) fn start_with(dir: &Path, regions: &[(&str, &str)], extra: &str) -> Router {
        let mut toml =
            String::from("listen = \"127.0.0.1:0\"\nhealth_listen = \"127.0.0.1:0\"\nhealth_check_interval_ms = 200\n");
        for (name, url) in regions {
            toml.push_str(&format!("[regions.{name}]\nendpoint = \"{url}\"\n"));
        }
        toml.push_str(extra);
        let name = format!("router-{}", rand_suffix());
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatvault"))
            .args(["route", "--config"])
            .arg(&path)
            .env("CHATVAULT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut health = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("chatvault router health listening on ") {
                    health = addr.to_owned();
                } else if let Some(addr) = line.strip_prefix("chatvault router listening on ") {
                    let _ = tx.send((addr.to_owned(), health.clone()));
                }
            }
        });
        let (addr, health) = rx.recv_timeout(Duration::from_secs(30)).expect("router did not start");
        Router { child, url: format!("http://{addr}"), health_url: format!("http://{health}") }
    }

    pub(super) async fn channel_from(&self, local: &str) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .local_address(Some(local.parse().unwrap()))
            .connect()
            .await
            .unwrap()
    }

    /// Resident memory (VmRSS, KiB).
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

/// Tells apart the configuration files of routers started in one directory.
fn rand_suffix() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates `tenant` in `region` on `server`, allowed only from `allow`; its API key.
pub(super) async fn tenant(server: &Server, tenant: &str, region: &str, allow: &str) -> String {
    let mut admin = server.admin().await;
    let req = pb::CreateTenantRequest {
        tenant_id: tenant.into(),
        region: region.into(),
        allowlist: vec![allow.into()],
        ..Default::default()
    };
    let t = admin.create_tenant(req).await.expect("create tenant").into_inner();
    assert_eq!(t.region, region);
    admin.issue_api_key(pb::IssueApiKeyRequest { tenant_id: tenant.into() }).await.unwrap().into_inner().api_key
}

pub(super) fn transcripts(ch: Channel, key: &str) -> Transcripts {
    TranscriptServiceClient::with_interceptor(ch, Bearer::new(key).unwrap())
}

/// Every file below `dirs` with its bytes.
/// [`contents`] once two looks half a second apart agree (at most ten seconds).
async fn settled(dirs: &[PathBuf]) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut last = contents(dirs);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = contents(dirs);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the files under {dirs:?} kept changing with no request");
}

fn contents(dirs: &[PathBuf]) -> BTreeMap<PathBuf, Vec<u8>> {
    dirs.iter().flat_map(|d| files_below(d)).map(|f| (f.clone(), std::fs::read(&f).unwrap_or_default())).collect()
}

fn holds(files: &BTreeMap<PathBuf, Vec<u8>>, needle: &[u8]) -> Vec<PathBuf> {
    files.iter().filter(|(_, b)| b.windows(needle.len()).any(|w| w == needle)).map(|(p, _)| p.clone()).collect()
}

#[tokio::test]
async fn two_region_nodes_behind_a_router_keep_each_tenant_in_its_region() {
    let (eu_dirs, us_dirs) = (Dirs::new(), Dirs::new());
    // Each node is told where the other region is served (the public name operators give).
    const EU_PUBLIC: &str = "https://eu.chatvault.example:50051";
    let us = region_node(&us_dirs, "us", OTHER_ROOT_KEY_HEX, Some(("eu", EU_PUBLIC)));
    let eu = region_node(&eu_dirs, "eu", ROOT_KEY_HEX, Some(("us", &us.url)));
    let router = Router::start(eu_dirs.tmp.path(), &[("eu", &eu.url), ("us", &us.url)]);

    // Allowed from 127.0.0.5 only: the router's own address (127.0.0.1) must not count.
    let eu_key = tenant(&eu, "euco", "eu", "127.0.0.5/32").await;
    let us_key = tenant(&us, "usco", "us", "127.0.0.5/32").await;
    assert!(eu_key.starts_with("cvk_eu_") && us_key.starts_with("cvk_us_"), "{eu_key} {us_key}");

    // Through the router, each tenant's calls reach its own region.
    let via = router.channel_from("127.0.0.5").await;
    let (mut eu_c, mut us_c) = (transcripts(via.clone(), &eu_key), transcripts(via.clone(), &us_key));
    put(&mut eu_c, transcript("eu-chat", "anna@example.eu", 1_700_000_000, &["Hallo", "Guten Tag"])).await;
    put(&mut us_c, transcript("us-chat", "bob@example.com", 1_700_000_000, &["Hi there"])).await;
    assert_eq!(get(&mut eu_c, "eu-chat").await.unwrap().messages.len(), 2);
    assert_eq!(get(&mut us_c, "us-chat").await.unwrap().messages[0].text, "Hi there");
    assert_eq!(get(&mut eu_c, "us-chat").await.unwrap_err().code(), Code::NotFound);
    // The allowlist is checked against the real client, not the router.
    let mut elsewhere = transcripts(router.channel_from("127.0.0.6").await, &eu_key);
    assert_eq!(get(&mut elsewhere, "eu-chat").await.unwrap_err().code(), Code::PermissionDenied);
    // Nor can a client name the allowed address itself: the router replaces the header.
    let mut forged = tonic::Request::new(pb::GetTranscriptRequest { transcript_id: "eu-chat".into() });
    forged.metadata_mut().insert("x-forwarded-for", "127.0.0.5".parse().unwrap());
    let e = elsewhere.get_transcript(forged).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "a forged x-forwarded-for passed the allowlist: {e:?}");
    // The scheme is read in any case, as the node reads it: a US key never reaches EU.
    let mut lower = tonic::Request::new(pb::GetTranscriptRequest { transcript_id: "us-chat".into() });
    lower.metadata_mut().insert("authorization", format!("bearer {us_key}").parse().unwrap());
    let mut bare = TranscriptServiceClient::new(router.channel_from("127.0.0.5").await);
    assert_eq!(bare.get_transcript(lower).await.unwrap().into_inner().transcript.unwrap().transcript_id, "us-chat");

    // The US node refuses an EU tenant, naming the region and where it is served; it
    // never falls back.
    let mut direct = transcripts(us.channel_from("127.0.0.5").await, &eu_key);
    let refused = get(&mut direct, "eu-chat").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("\"eu\"") && refused.message().contains(EU_PUBLIC), "{refused:?}");
    let info = refused.get_details_error_info().expect("ErrorInfo");
    assert_eq!((info.reason.as_str(), info.metadata.get("region").map(String::as_str)), ("WRONG_REGION", Some("eu")));
    assert_eq!(info.metadata.get("endpoint").map(String::as_str), Some(EU_PUBLIC));
    // Admin calls name the region where it matters.
    let mut eu_admin = eu.admin().await;
    // Asked of the wrong node, about a tenant of the other region: refused, and recorded
    // without the id (the scan below finds no US tenant id in EU's files).
    let us_create = pb::CreateTenantRequest { tenant_id: "usco".into(), region: "us".into(), ..Default::default() };
    let e = eu_admin.create_tenant(us_create).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let suspend = eu_admin.suspend_tenant(pb::SuspendTenantRequest { tenant_id: "usco".into() }).await.unwrap_err();
    assert_eq!(suspend.code(), Code::NotFound);
    let unknown = pb::CreateTenantRequest { tenant_id: "x".into(), region: "mars".into(), ..Default::default() };
    let e = eu_admin.create_tenant(unknown).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().starts_with("region:"), "{e:?}");
    let none = pb::CreateTenantRequest { tenant_id: "x".into(), ..Default::default() };
    let e = eu_admin.create_tenant(none).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().starts_with("region: required"), "{e:?}");
    let got = eu_admin.get_tenant(pb::GetTenantRequest { tenant_id: "euco".into() }).await.unwrap().into_inner();
    assert_eq!(got.region, "eu");

    // Nothing of the EU tenant lies in the US node's files, and the other way round.
    let mut eu_subjects = SubjectServiceClient::with_interceptor(via.clone(), Bearer::new(&eu_key).unwrap());
    let mut us_subjects = SubjectServiceClient::with_interceptor(via.clone(), Bearer::new(&us_key).unwrap());
    let blind = |r: pb::GetSubjectResponse| hex::decode(r.subject_blind_id).unwrap();
    let anna = blind(
        eu_subjects
            .get_subject(pb::GetSubjectRequest { subject_id: "anna@example.eu".into() })
            .await
            .unwrap()
            .into_inner(),
    );
    let bob = blind(
        us_subjects
            .get_subject(pb::GetSubjectRequest { subject_id: "bob@example.com".into() })
            .await
            .unwrap()
            .into_inner(),
    );
    eu.signal("-HUP"); // nothing pending, but every file is written as it would be
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The nodes' own background work (the index's checkpoint after the writes) settles
    // first: from then on, only a request changes a file.
    let us_files = settled(&[us_dirs.data(), us_dirs.keys()]).await;
    let eu_files = contents(&[eu_dirs.data(), eu_dirs.keys()]);
    // The transcript blind ids (part of every record key) as the EU trail names them.
    let trail = eu_admin
        .query_audit(pb::QueryAuditRequest { tenant_id: "euco".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .records;
    let eu_chat = trail
        .iter()
        .find(|r| !r.transcript_blind_id.is_empty())
        .map(|r| hex::decode(&r.transcript_blind_id).unwrap())
        .expect("a transcript in the trail");
    for (needle, what) in
        [(&b"euco"[..], "EU tenant id"), (&anna[..], "EU blind subject id"), (&eu_chat[..], "EU blind transcript id")]
    {
        assert!(!holds(&eu_files, needle).is_empty(), "control: the EU node holds the {what}");
        assert_eq!(holds(&us_files, needle), Vec::<PathBuf>::new(), "the US node holds the {what}");
    }
    for (needle, what) in [(&b"usco"[..], "US tenant id"), (&bob[..], "US blind subject id")] {
        assert!(!holds(&us_files, needle).is_empty(), "control: the US node holds the {what}");
        assert_eq!(holds(&eu_files, needle), Vec::<PathBuf>::new(), "the EU node holds the {what}");
    }

    // Shredding an EU subject through the router writes nothing on the US node.
    let shred = pb::ShredSubjectRequest { subject_id: "anna@example.eu".into() };
    eu_subjects.shred_subject(shred).await.unwrap();
    assert_eq!(get(&mut eu_c, "eu-chat").await.unwrap_err().code(), Code::NotFound);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = contents(&[us_dirs.data(), us_dirs.keys()]);
    let changed: Vec<&PathBuf> = after.iter().filter(|(p, b)| us_files.get(*p) != Some(b)).map(|(p, _)| p).collect();
    assert!(changed.is_empty() && after.len() == us_files.len(), "the EU shred touched US files: {changed:?}");

    // An export of many megabytes streams through the router; its memory stays flat.
    let big = "x".repeat(1000);
    let texts: Vec<&str> = std::iter::repeat_n(big.as_str(), 100).collect();
    let mut direct_eu = transcripts(eu.channel_from("127.0.0.5").await, &eu_key);
    for i in 0..240 {
        put(&mut direct_eu, transcript(&format!("big-{i}"), "carl@example.eu", 1_700_000_000 + i, &texts)).await;
    }
    let before = router.rss_kib();
    let mut exports =
        pb::export_service_client::ExportServiceClient::with_interceptor(via.clone(), Bearer::new(&eu_key).unwrap())
            .max_decoding_message_size(64 << 20);
    let mut stream = exports.export_tenant(pb::ExportTenantRequest {}).await.unwrap().into_inner();
    let (mut bytes, mut peak) = (0usize, before);
    while let Some(chunk) = stream.message().await.unwrap() {
        bytes += chunk.data.len();
        peak = peak.max(router.rss_kib());
    }
    assert!(bytes > 24 << 20, "the export is {bytes} bytes");
    let grew_kib = peak.saturating_sub(before);
    eprintln!("router RSS: {before} KiB before, {peak} KiB at most during a {} MiB export", bytes >> 20);
    assert!(grew_kib < 12 * 1024, "router RSS grew {grew_kib} KiB for a {} MiB export", bytes >> 20);

    // With the US node down, EU traffic goes on and US calls say which region is down.
    us.kill9();
    assert_eq!(get(&mut eu_c, "big-3").await.unwrap().messages.len(), 100);
    let down = get(&mut us_c, "us-chat").await.unwrap_err();
    assert!(down.code() == Code::Unavailable && down.message().contains("region us"), "{down:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = super::edge::health(via.clone(), "chatvault.region.us").await;
        if status == Ok(2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the router still reports us as {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(super::edge::health(via.clone(), "chatvault.region.eu").await, Ok(1));
    // What a container probe runs: the binary's own health client on the health listener.
    let probe = |service: &str| {
        Command::new(env!("CARGO_BIN_EXE_chatvault"))
            .args(["health", "--server", &router.health_url, "--service", service])
            .output()
            .unwrap()
    };
    let (eu_up, us_up) = (probe("chatvault.region.eu"), probe("chatvault.region.us"));
    assert!(eu_up.status.success(), "{eu_up:?}");
    assert!(!us_up.status.success() && String::from_utf8_lossy(&us_up.stdout).contains("NOT_SERVING"), "{us_up:?}");
    let (v1, _) = super::edge::list_services(via.clone()).await;
    assert!(
        v1.contains(&"chatvault.v1.TranscriptService".to_string()) && !v1.iter().any(|s| s.contains("Admin")),
        "{v1:?}"
    );
}

/// The development default: one process, two regions, each under its own root key and
/// in its own folders.
#[tokio::test]
async fn one_process_hosts_eu_and_us_by_default_each_in_its_own_folders() {
    let dirs = Dirs::new();
    let dual = || Opts {
        env: vec![("CHATVAULT_ROOT_KEY_EU", ROOT_KEY_HEX), ("CHATVAULT_ROOT_KEY_US", OTHER_ROOT_KEY_HEX)],
        env_remove: vec!["CHATVAULT_REGION", "CHATVAULT_ROOT_KEY"],
        ..Opts::default()
    };
    let server = Server::start_with(&dirs, dual());
    let eu_key = tenant(&server, "euco", "eu", "127.0.0.0/8").await;
    let us_key = tenant(&server, "usco", "us", "127.0.0.0/8").await;
    let (mut eu_c, mut us_c) =
        (transcripts(server.channel().await, &eu_key), transcripts(server.channel().await, &us_key));
    put(&mut eu_c, transcript("t", "anna", 1_700_000_000, &["in eu"])).await;
    put(&mut us_c, transcript("t", "anna", 1_700_000_000, &["in us"])).await;
    assert_eq!(get(&mut eu_c, "t").await.unwrap().messages[0].text, "in eu");
    assert_eq!(get(&mut us_c, "t").await.unwrap().messages[0].text, "in us");

    let mut admin = server.admin().await;
    let again = pb::CreateTenantRequest { tenant_id: "euco".into(), region: "us".into(), ..Default::default() };
    let e = admin.create_tenant(again).await.unwrap_err();
    assert!(e.code() == Code::AlreadyExists && e.message().contains("region eu"), "{e:?}");
    let e = admin.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("hosts eu, us"), "{e:?}");
    for region in ["eu", "us"] {
        let v = admin.verify_audit(pb::VerifyAuditRequest { region: region.into() }).await.unwrap().into_inner();
        assert!(v.intact && v.records_checked > 0, "{region}: {v:?}");
    }
    let listed = admin.list_tenants(pb::ListTenantsRequest::default()).await.unwrap().into_inner().tenants;
    let pins: Vec<(&str, &str)> = listed.iter().map(|t| (t.tenant_id.as_str(), t.region.as_str())).collect();
    assert_eq!(pins, [("euco", "eu"), ("usco", "us")]);
    server.stop().await;

    let (eu_files, us_files) = (
        contents(&[dirs.data().join("eu"), dirs.keys().join("eu")]),
        contents(&[dirs.data().join("us"), dirs.keys().join("us")]),
    );
    assert!(holds(&us_files, b"euco").is_empty() && !holds(&eu_files, b"euco").is_empty());
    assert!(holds(&eu_files, b"usco").is_empty() && !holds(&us_files, b"usco").is_empty());

    // The same key given to both regions is refused before either is opened.
    let same = Opts {
        env: vec![("CHATVAULT_ROOT_KEY_EU", ROOT_KEY_HEX), ("CHATVAULT_ROOT_KEY_US", ROOT_KEY_HEX)],
        env_remove: vec!["CHATVAULT_REGION", "CHATVAULT_ROOT_KEY"],
        ..Opts::default()
    };
    let e = Server::try_start(&Dirs::new(), same).err().expect("one root key for two regions");
    assert!(e.contains("regions eu and us have the same root key"), "{e}");
    // One root key for two regions is refused, naming the per-region variables.
    let shared = Opts { env_remove: vec!["CHATVAULT_REGION"], ..Opts::default() };
    let e = Server::try_start(&dirs, shared).err().expect("one root key for two regions");
    assert!(e.contains("CHATVAULT_ROOT_KEY_EU") && e.contains("CHATVAULT_ROOT_KEY_US"), "{e}");

    // A data directory from before regions is not silently made one of them.
    let single = Dirs::new();
    Server::start(&single).stop().await;
    let e = Server::try_start(&single, dual()).err().expect("a single-region directory opened as the dual default");
    assert!(e.contains("from before regions") && e.contains("--region eu"), "{e}");
    // Nor opened as another region; the refusal changes nothing.
    let stamp = std::fs::read(single.keys().join("keydir.region")).unwrap();
    let as_us = Opts { env: vec![("CHATVAULT_REGION", "us")], ..Opts::default() };
    let e = Server::try_start(&single, as_us).err().expect("eu's directories opened as us");
    assert!(e.contains("region \"eu\"") && e.contains("\"us\""), "{e}");
    assert_eq!(std::fs::read(single.keys().join("keydir.region")).unwrap(), stamp);
}
