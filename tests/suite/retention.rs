//! Retention and legal holds against the real binary: each policy purges exactly what
//! expired, for the right tenant, across a crash mid-run; holds keep what they cover
//! from purges, deletions, shreds and tenant deletion until released. Time moves through
//! the debug build's clock file, never by sleeping.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatvault::grpc::pb;
use tonic::Code;

use super::common::*;

const DAY: i64 = 86_400;

/// The server's clock, moved by the test: seconds added to the system's.
struct TestClock(PathBuf);

impl TestClock {
    fn new(dirs: &Dirs) -> Self {
        let path = dirs.tmp.path().join("clock-offset");
        std::fs::write(&path, "0").unwrap();
        TestClock(path)
    }
    fn advance_to(&self, offset_secs: i64) {
        std::fs::write(&self.0, offset_secs.to_string()).unwrap();
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn ts(secs: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: secs, nanos: 0 }
}

fn closed(id: &str, subject: &str, started: i64, ended: i64) -> pb::Transcript {
    let mut t = transcript(id, subject, started, &["hello"]);
    t.ended_at = Some(ts(ended));
    t
}

/// A server with retention only on demand (RunRetention) and a clock the test moves.
fn start(dirs: &Dirs, clock: &TestClock) -> Server {
    let cfg = dirs.config("retention_interval_secs = 0\n");
    Server::start_with(
        dirs,
        Opts {
            args: vec!["--config", cfg.to_str().unwrap()],
            env: vec![("CHATVAULT_TEST_CLOCK_FILE", clock.path())],
            ..Opts::default()
        },
    )
}

async fn set_policy(server: &Server, tenant: &str, r: pb::Retention) {
    server.api_key(tenant).await;
    let req = pb::SetRetentionRequest { tenant_id: tenant.into(), retention: Some(r) };
    server.admin().await.set_retention(req).await.expect("set retention");
}

async fn run(server: &Server) -> pb::RunRetentionResponse {
    server.admin().await.run_retention(pb::RunRetentionRequest::default()).await.expect("run retention").into_inner()
}

async fn status(server: &Server, tenant: &str) -> pb::RetentionStatus {
    let req = pb::GetRetentionStatusRequest { tenant_id: tenant.into() };
    server.admin().await.get_retention_status(req).await.expect("status").into_inner()
}

/// Which of `ids` the tenant can still read.
async fn readable(server: &Server, tenant: &str, ids: &[&str]) -> Vec<String> {
    let mut c = server.transcripts(tenant).await;
    let mut out = Vec::new();
    for id in ids {
        match get(&mut c, id).await {
            Ok(_) => out.push(id.to_string()),
            Err(s) => assert_eq!(s.code(), Code::NotFound, "{id}: {s:?}"),
        }
    }
    out
}

async fn audit(server: &Server, ops: &[&str]) -> Vec<pb::AuditRecord> {
    let q = pb::QueryAuditRequest { operations: ops.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    server.admin().await.query_audit(q).await.unwrap().into_inner().records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_purges_exactly_the_expired_transcripts_of_its_tenant_and_says_how_many() {
    let dirs = Dirs::new();
    let clock = TestClock::new(&dirs);
    let server = start(&dirs, &clock);
    let n = now_secs();

    // Purge a week after close.
    set_policy(&server, "closer", pb::Retention { purge_after_close_seconds: 7 * DAY as u64, ..Default::default() })
        .await;
    let mut c = server.transcripts("closer").await;
    put(&mut c, closed("old", "alice", n - 20 * DAY, n - 8 * DAY)).await;
    put(&mut c, closed("recent", "alice", n - 20 * DAY, n - 6 * DAY)).await;
    put(&mut c, transcript("open", "bob", n - 400 * DAY, &["never closed"])).await;
    // No policy, the same ids: never touched.
    let mut k = server.transcripts("keeper").await;
    put(&mut k, closed("old", "alice", n - 20 * DAY, n - 8 * DAY)).await;
    put(&mut k, transcript("open", "bob", n - 400 * DAY, &["never closed"])).await;
    // At most 30 days from the start, closed or not.
    set_policy(&server, "ager", pb::Retention { max_age_seconds: 30 * DAY as u64, ..Default::default() }).await;
    let mut a = server.transcripts("ager").await;
    put(&mut a, transcript("old-open", "carol", n - 31 * DAY, &["x"])).await;
    put(&mut a, closed("old-closed", "carol", n - 40 * DAY, n - 39 * DAY)).await;
    put(&mut a, transcript("young", "carol", n - 29 * DAY, &["x"])).await;
    // Idle chats closed after an hour, and purged as soon as closed.
    let idle = pb::Retention { close_inactive_after_seconds: 3600, purge_on_close: true, ..Default::default() };
    set_policy(&server, "idler", idle).await;
    let mut i = server.transcripts("idler").await;
    put(&mut i, closed("done", "dave", n - 60, n - 1)).await;
    put(&mut i, transcript("quiet", "dave", n, &["x"])).await;
    put(&mut i, transcript("chatty", "erin", n, &["x"])).await;

    let first = run(&server).await;
    assert_eq!((first.purged, first.closed), (4, 0), "{first:?}");
    assert_eq!(readable(&server, "closer", &["old", "recent", "open"]).await, ["recent", "open"]);
    assert_eq!(readable(&server, "keeper", &["old", "open"]).await, ["old", "open"]);
    assert_eq!(readable(&server, "ager", &["old-open", "old-closed", "young"]).await, ["young"]);
    assert_eq!(readable(&server, "idler", &["done", "quiet", "chatty"]).await, ["quiet", "chatty"]);

    // 90 minutes on, "chatty" gets a message; two hours on, "quiet" has been idle for
    // more than an hour, "chatty" for 30 minutes.
    clock.advance_to(90 * 60);
    i.append_messages(pb::AppendMessagesRequest {
        transcript_id: "chatty".into(),
        messages: vec![msg("m9", pb::AuthorRole::Visitor, "V", "still here")],
        expected_message_count: None,
    })
    .await
    .unwrap();
    clock.advance_to(120 * 60);
    let second = run(&server).await;
    assert_eq!((second.purged, second.closed), (1, 1), "{second:?}");
    assert_eq!(readable(&server, "idler", &["quiet", "chatty"]).await, ["chatty"]);
    assert!(get(&mut i, "chatty").await.unwrap().ended_at.is_none(), "a chat with a recent message stays open");
    // Nothing else moved: a run costs what it purges, and what is not due stays.
    let third = run(&server).await;
    assert_eq!((third.purged, third.closed), (0, 0), "{third:?}");

    let s = status(&server, "idler").await;
    assert_eq!((s.purged_total, s.closed_total, s.backlog), (2, 1, 0), "{s:?}");
    assert!(s.last_run_at.is_some());
    assert_eq!(status(&server, "closer").await.purged_total, 1);
    assert_eq!(status(&server, "keeper").await.purged_total, 0);
    // The audit trail says how many for which tenant, and names no subject or transcript.
    let recs = audit(&server, &["retention.purge", "retention.close"]).await;
    let count = |op: &str, t: &str| -> u32 {
        recs.iter().filter(|r| r.operation == op && r.tenant_id == t).map(|r| r.count.max(1)).sum()
    };
    assert_eq!(count("retention.purge", "ager"), 2);
    assert_eq!(count("retention.purge", "idler"), 2);
    assert_eq!(count("retention.close", "idler"), 1);
    assert!(recs.iter().all(|r| r.subject_blind_id.is_empty() && r.transcript_blind_id.is_empty()), "{recs:?}");
    // The counts survive a restart.
    server.stop().await;
    let server = start(&dirs, &clock);
    assert_eq!(status(&server, "idler").await.purged_total, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_the_middle_of_a_purge_leaves_nothing_expired_behind_and_nothing_counted_twice() {
    let dirs = Dirs::new();
    let clock = TestClock::new(&dirs);
    let cfg = dirs.config("retention_interval_secs = 0\n");
    // The first start dies right after retention's first batch (like kill -9).
    let server = Server::start_with(
        &dirs,
        Opts {
            args: vec!["--config", cfg.to_str().unwrap()],
            env: vec![("CHATVAULT_TEST_CLOCK_FILE", clock.path()), ("CHATVAULT_FAILPOINT", "retention.after_batch")],
            ..Opts::default()
        },
    );
    let n = now_secs();
    set_policy(&server, "acme", pb::Retention { purge_after_close_seconds: DAY as u64, ..Default::default() }).await;
    let mut c = server.transcripts("acme").await;
    for i in 0..300 {
        let (started, ended) = if i % 10 == 0 { (n - 3600, n - 60) } else { (n - 9 * DAY, n - 8 * DAY) };
        put(&mut c, closed(&format!("t{i}"), &format!("s{}", i % 37), started, ended)).await;
    }
    let cut = server.admin().await.run_retention(pb::RunRetentionRequest::default()).await;
    assert!(cut.is_err(), "the server stopped in the middle of the run");
    let mut server = server;
    assert!(server.exited(Duration::from_secs(10)).await, "the crash point was reached");
    drop(server);

    // The dead run's lease on the tenant holds a minute; then the next run takes over.
    let server = start(&dirs, &clock);
    let s = status(&server, "acme").await;
    assert_eq!(s.purged_total, retention_batch(), "the first batch was done and counted: {s:?}");
    clock.advance_to(61);
    run(&server).await;
    let ids: Vec<String> = (0..300).map(|i| format!("t{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let left = readable(&server, "acme", &ids).await;
    let young: Vec<String> = (0..300).filter(|i| i % 10 == 0).map(|i| format!("t{i}")).collect();
    assert_eq!(left, young, "exactly the transcripts not yet due remain");
    let s = status(&server, "acme").await;
    assert_eq!(s.purged_total, 270, "each purge counted once across the crash: {s:?}");
    assert_eq!(s.backlog, 0);
}

fn retention_batch() -> u64 {
    chatvault::retention::BATCH as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legal_hold_keeps_what_it_covers_from_purges_and_erasures_until_it_is_released() {
    let dirs = Dirs::new();
    let clock = TestClock::new(&dirs);
    let server = start(&dirs, &clock);
    let n = now_secs();
    set_policy(&server, "legal", pb::Retention { purge_after_close_seconds: DAY as u64, ..Default::default() }).await;
    let mut c = server.transcripts("legal").await;
    for (id, subject) in [("a1", "alice"), ("b1", "bob"), ("c1", "carol"), ("c2", "carol")] {
        put(&mut c, closed(id, subject, n - 20 * DAY, n - 10 * DAY)).await;
    }
    let mut admin = server.admin().await;
    let hold = |subject: &str, transcript: &str, reason: &str| pb::SetHoldRequest {
        tenant_id: "legal".into(),
        subject_id: subject.into(),
        transcript_id: transcript.into(),
        reason: reason.into(),
    };
    let alice = admin.set_hold(hold("alice", "", "case 2026-114")).await.unwrap().into_inner();
    let c1 = admin.set_hold(hold("", "c1", "case 2026-115")).await.unwrap().into_inner();
    assert_eq!((alice.scope.as_str(), c1.scope.as_str()), ("subject", "transcript"));
    assert_eq!(c1.subject.len(), 64, "held subjects are named by blind id, never the raw id");
    assert!(!format!("{alice:?}{c1:?}").contains("alice"));
    // Setting the same hold again is not an error: it is the same hold.
    let again = admin.set_hold(hold("alice", "", "case 2026-114")).await.unwrap().into_inner();
    assert_eq!(again.hold_id, alice.hold_id);

    let r = run(&server).await;
    assert_eq!((r.purged, r.held), (2, 2), "{r:?}");
    assert_eq!(readable(&server, "legal", &["a1", "b1", "c1", "c2"]).await, ["a1", "c1"]);
    assert_eq!(status(&server, "legal").await.held, 2);

    // Erasures of what a hold covers are refused, naming the hold; nothing is erased.
    let mut s = server.subjects("legal").await;
    let refused = s.shred_subject(pb::ShredSubjectRequest { subject_id: "alice".into() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(&alice.hold_id), "{}", refused.message());
    let refused = s.shred_subject(pb::ShredSubjectRequest { subject_id: "carol".into() }).await.unwrap_err();
    assert!(refused.message().contains(&c1.hold_id), "carol's shred would erase the held c1: {refused:?}");
    let refused = c.delete_transcript(pb::DeleteTranscriptRequest { transcript_id: "a1".into() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    // Replacing a held transcript would destroy it as surely as deleting it.
    let replace = pb::PutTranscriptRequest { transcript: Some(transcript("c1", "carol", n, &["overwritten"])) };
    let refused = c.put_transcript(replace).await.unwrap_err();
    assert!(refused.message().contains(&c1.hold_id), "{refused:?}");
    assert_eq!(readable(&server, "legal", &["a1", "c1"]).await, ["a1", "c1"]);
    // A tenant hold stops the tenant's deletion; its keys keep working.
    let whole = admin.set_hold(hold("", "", "regulator inquiry")).await.unwrap().into_inner();
    let refused = admin.delete_tenant(pb::DeleteTenantRequest { tenant_id: "legal".into() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(&whole.hold_id));
    assert!(get(&mut c, "a1").await.is_ok());
    let release = |id: &str| pb::ReleaseHoldRequest {
        tenant_id: "legal".into(),
        hold_id: id.into(),
        reason: "inquiry closed".into(),
    };
    admin.release_hold(release(&whole.hold_id)).await.unwrap();

    // Holds are on the key volume's anchor like every registry record: a restart keeps
    // them, and a key-store rotation re-wraps what they hold rather than losing it.
    server.stop().await;
    let server = start(&dirs, &clock);
    let mut admin = server.admin().await;
    let listed = admin.list_holds(pb::ListHoldsRequest { tenant_id: "legal".into() }).await.unwrap().into_inner();
    assert_eq!(listed.holds.len(), 2);
    server.rotate_first_epoch_away(&dirs).await;
    assert_eq!(readable(&server, "legal", &["a1", "c1"]).await, ["a1", "c1"]);

    // Released, the subject is purged at the next run and can be shredded.
    admin.release_hold(release(&alice.hold_id)).await.unwrap();
    let r = run(&server).await;
    assert_eq!((r.purged, r.held), (1, 1), "{r:?}");
    assert_eq!(readable(&server, "legal", &["a1", "c1"]).await, ["c1"]);
    let mut s = server.subjects("legal").await;
    s.shred_subject(pb::ShredSubjectRequest { subject_id: "alice".into() }).await.unwrap();
    // Set and release are audited with the operator's reason.
    let recs = audit(&server, &["admin.hold.set", "admin.hold.release"]).await;
    assert!(recs.iter().any(|r| r.operation == "admin.hold.set" && r.detail.contains("case 2026-114")), "{recs:?}");
    assert!(recs.iter().any(|r| r.operation == "admin.hold.release" && r.detail.contains("inquiry closed")));
}

#[tokio::test]
async fn bad_retention_and_hold_requests_are_refused_naming_the_field_and_change_nothing() {
    let dirs = Dirs::new();
    let clock = TestClock::new(&dirs);
    let server = start(&dirs, &clock);
    server.api_key("acme").await;
    let mut admin = server.admin().await;
    let set = |r: pb::Retention| pb::SetRetentionRequest { tenant_id: "acme".into(), retention: Some(r) };
    let cases = [
        (pb::Retention { max_age_seconds: u64::MAX, ..Default::default() }, "retention.max_age_seconds"),
        (
            pb::Retention { purge_after_close_seconds: 1 << 40, ..Default::default() },
            "retention.purge_after_close_seconds",
        ),
        (
            pb::Retention { purge_on_close: true, purge_after_close_seconds: 60, ..Default::default() },
            "retention.purge_on_close",
        ),
    ];
    for (r, field) in cases {
        let e = admin.set_retention(set(r)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let t = admin.get_tenant(pb::GetTenantRequest { tenant_id: "acme".into() }).await.unwrap().into_inner();
    assert_eq!(t.retention.unwrap_or_default(), pb::Retention::default(), "nothing was half-set");

    let hold = |subject: &str, transcript: &str, reason: &str| pb::SetHoldRequest {
        tenant_id: "acme".into(),
        subject_id: subject.into(),
        transcript_id: transcript.into(),
        reason: reason.into(),
    };
    for (req, code, names) in [
        (hold("alice", "", ""), Code::InvalidArgument, "reason"),
        (hold("alice", "t1", "x"), Code::InvalidArgument, "subject_id, transcript_id"),
        (hold("", "no-such", "x"), Code::NotFound, "transcript"),
        (hold(&"x".repeat(5000), "", "x"), Code::InvalidArgument, "subject_id"),
    ] {
        let e = admin.set_hold(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(names), "{}", e.message());
    }
    let mut other = hold("alice", "", "x");
    other.tenant_id = "nobody".into();
    assert_eq!(admin.set_hold(other).await.unwrap_err().code(), Code::NotFound);
    let e = admin
        .release_hold(pb::ReleaseHoldRequest { tenant_id: "acme".into(), hold_id: "hold-0".into(), reason: "x".into() })
        .await
        .unwrap_err();
    assert!(e.message().contains("hold_id"), "{e:?}");
    let listed = admin.list_holds(pb::ListHoldsRequest { tenant_id: "acme".into() }).await.unwrap().into_inner();
    assert!(listed.holds.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_keeps_its_retention_by_whole_segments_and_still_verifies_from_a_checkpoint() {
    let dirs = Dirs::new();
    let clock = TestClock::new(&dirs);
    let cfg = dirs.config("retention_interval_secs = 0\naudit_retention_days = 1\naudit_segment_bytes = 4096\n");
    let opts = || Opts {
        args: vec!["--config", cfg.to_str().unwrap()],
        env: vec![("CHATVAULT_TEST_CLOCK_FILE", clock.path())],
        ..Opts::default()
    };
    let server = Server::start_with(&dirs, opts());
    let mut c = server.transcripts("acme").await;
    for i in 0..120 {
        put(&mut c, transcript(&format!("t{i}"), "alice", 1_700_000_000, &["x"])).await;
    }
    let mut admin = server.admin().await;
    let before = admin.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
    assert!(before.intact && before.pruned_records == 0, "{before:?}");
    let segments = || {
        let mut v: Vec<_> = std::fs::read_dir(dirs.data().join("audit"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "trail"))
            .collect();
        v.sort();
        v
    };
    let had = segments().len();
    assert!(had > 3, "small segments: {had}");

    // Two days on, a day's retention: every segment but the newest is older.
    clock.advance_to(2 * DAY);
    // Enough new records for more than one segment to be kept.
    for i in 0..60 {
        put(&mut c, transcript(&format!("fresh{i}"), "bob", 1_700_000_000, &["x"])).await;
    }
    run(&server).await;
    let after = admin.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
    assert!(after.intact, "{after:?}");
    assert!(after.pruned_records > 100 && after.first_sequence > 100, "{after:?}");
    assert_eq!(after.head_sequence, after.first_sequence + after.records_checked - 1);
    assert!(segments().len() < had, "whole segments went");
    let q = pb::QueryAuditRequest { operations: vec!["transcript.put".into()], ..Default::default() };
    let recs = admin.query_audit(q).await.unwrap().into_inner().records;
    assert!(recs.iter().all(|r| r.sequence >= after.first_sequence));
    assert!(!recs.is_empty(), "what is kept still answers queries");

    // A restart keeps it; a segment deleted by hand past the checkpoint is a break.
    server.stop().await;
    let kept = segments();
    assert!(kept.len() > 1, "{kept:?}");
    std::fs::remove_file(&kept[0]).unwrap();
    let checkpoint = dirs.data().join("audit").join("checkpoint");
    let server = Server::start_with(&dirs, opts());
    let mut admin = server.admin().await;
    let v = admin.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
    assert!(!v.intact && v.problem.contains("missing"), "{v:?}");
    // A forged checkpoint (moved past more records) fails its MAC.
    let mut bytes = std::fs::read(&checkpoint).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&checkpoint, &bytes).unwrap();
    let v = admin.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
    assert!(!v.intact && v.problem.contains("checkpoint"), "{v:?}");
}
