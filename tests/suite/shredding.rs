//! Crypto-shredding: immediate through the API, final against old copies after rotation.

use std::path::Path;
use std::time::{Duration, Instant};

use chatvault::crypto::SecretKey;
use chatvault::grpc::pb::{self, SubjectStatus};
use tonic::Code;

use super::common::*;
use super::forensic::*;

async fn shred(server: &Server, tenant: &str, subject: &str) -> pb::ShredReceipt {
    let mut s = server.subjects(tenant).await;
    s.shred_subject(pb::ShredSubjectRequest { subject_id: subject.into() }).await.unwrap().into_inner().receipt.unwrap()
}

async fn erasure(server: &Server, erasure_id: &str) -> pb::ErasureStatus {
    let mut s = server.subjects("acme").await;
    s.get_erasure(pb::GetErasureRequest { erasure_id: erasure_id.into() }).await.unwrap().into_inner()
}

async fn subject(server: &Server, tenant: &str, subject: &str) -> pb::GetSubjectResponse {
    let mut s = server.subjects(tenant).await;
    s.get_subject(pb::GetSubjectRequest { subject_id: subject.into() }).await.unwrap().into_inner()
}

#[tokio::test]
async fn shred_makes_every_transcript_of_the_subject_unreadable_at_once() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    for i in 0..3 {
        put(&mut c, transcript(&format!("a{i}"), "alice", 1_700_000_000 + i, &["alice's words"])).await;
    }
    put(&mut c, transcript("b0", "bob", 1_700_000_000, &["bob's words"])).await;
    assert_eq!(subject(&server, "acme", "alice").await.status(), SubjectStatus::Active);

    let receipt = shred(&server, "acme", "alice").await;
    assert_eq!(receipt.transcripts_shredded, 3);
    assert_eq!(receipt.subject_blind_id.len(), 64);
    assert!(!receipt.subject_blind_id.contains("alice"));
    assert!(receipt.shredded_at.is_some());

    for i in 0..3 {
        let err = get(&mut c, &format!("a{i}")).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("erased"), "{}", err.message());
    }
    let list = c
        .list_transcripts(pb::ListTranscriptsRequest { subject_id: "alice".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(list.code(), Code::NotFound);
    assert!(list.message().contains("erased"));
    let append = c
        .append_messages(pb::AppendMessagesRequest {
            transcript_id: "a0".into(),
            messages: vec![msg("m", pb::AuthorRole::Visitor, "A", "back?")],
            expected_message_count: None,
        })
        .await
        .unwrap_err();
    assert_eq!(append.code(), Code::NotFound);
    let info = subject(&server, "acme", "alice").await;
    assert_eq!((info.status(), info.transcript_count), (SubjectStatus::Shredded, 0));
    assert!(info.last_shredded_at.is_some());
    assert_eq!(get(&mut c, "b0").await.unwrap().messages[0].text, "bob's words");
    assert_eq!(shred(&server, "acme", "alice").await.transcripts_shredded, 0, "a retried shred is harmless");
    assert_eq!(subject(&server, "acme", "nobody").await.status(), SubjectStatus::Unknown);
}

#[tokio::test]
async fn a_returning_subject_gets_a_fresh_key_and_never_revives_old_data() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("old-1", "carol", 1_700_000_000, &["before erasure"])).await;
    put(&mut c, transcript("old-2", "carol", 1_700_000_001, &["before erasure"])).await;
    shred(&server, "acme", "carol").await;

    put(&mut c, transcript("new-1", "carol", 1_700_000_100, &["after erasure"])).await;
    // Re-using an erased transcript id makes a new transcript, not the old one.
    put(&mut c, transcript("old-2", "carol", 1_700_000_200, &["reused id"])).await;
    let list = c
        .list_transcripts(pb::ListTranscriptsRequest { subject_id: "carol".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = list.transcripts.iter().map(|t| t.transcript_id.as_str()).collect();
    assert_eq!(ids, ["old-2", "new-1"]);
    assert_eq!(get(&mut c, "old-1").await.unwrap_err().code(), Code::NotFound);
    let reused = get(&mut c, "old-2").await.unwrap();
    assert_eq!(reused.messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["reused id"]);
    let info = subject(&server, "acme", "carol").await;
    assert_eq!((info.status(), info.transcript_count), (SubjectStatus::Active, 2));
}

#[tokio::test]
async fn a_copy_taken_before_the_shred_is_useless_once_the_key_store_rotates() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("victim-chat", "victim@example.com", 1_700_000_000, &["victim's secret"])).await;
    put(&mut c, transcript("bystander-chat", "bystander@example.com", 1_700_000_000, &["bystander's text"])).await;
    let blind = hex::decode(subject(&server, "acme", "victim@example.com").await.subject_blind_id).unwrap();

    // The adversary's copy: the data directory as a backup or snapshot taken before the shred.
    let stolen = dirs.tmp.path().join("stolen-data");
    copy_dir(&dirs.data(), &stolen);
    // Control only: the key directory of that time. Backing it up with the data is exactly
    // what SECURITY.md forbids; here it proves the scan below finds a key when one is there.
    let old_keys = dirs.tmp.path().join("old-keys");
    copy_dir(&dirs.keys(), &old_keys);

    let receipt = shred(&server, "acme", "victim@example.com").await;
    assert_eq!(receipt.state(), pb::ErasureState::Pending);
    #[allow(deprecated)]
    let epoch = receipt.key_epoch;
    assert_eq!(epoch, 0, "the server-wide epoch is not shown to tenants");
    assert_eq!(erasure(&server, &receipt.erasure_id).await.state(), pb::ErasureState::Pending);
    server.rotate_first_epoch_away(&dirs).await;
    let status = erasure(&server, &receipt.erasure_id).await;
    assert_eq!(status.state(), pb::ErasureState::Final, "{status:?}");
    assert!(status.final_at.is_some());

    assert!(
        subject_keys_recoverable(&stolen, &key_store_keys(&old_keys), "acme", &blind) > 0,
        "control: the scan must find the victim's key with the pre-shred key directory"
    );
    assert_eq!(
        subject_keys_recoverable(&stolen, &key_store_keys(&dirs.keys()), "acme", &blind),
        0,
        "the pre-shred copy plus today's keys must not yield the victim's data key"
    );
    assert_eq!(
        subject_keys_recoverable(&dirs.data(), &key_store_keys(&dirs.keys()), "acme", &blind),
        0,
        "nor may the live store"
    );
    assert_eq!(get(&mut c, "bystander-chat").await.unwrap().messages[0].text, "bystander's text");
    assert_eq!(get(&mut c, "victim-chat").await.unwrap_err().code(), Code::NotFound);

    // And everything still reads back after a restart on the rotated key store.
    server.stop().await;
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "bystander-chat").await.unwrap().messages[0].text, "bystander's text");
}

#[tokio::test]
async fn an_interrupted_rotation_is_finished_at_the_next_start() {
    use chatvault::keys::{FileKeyDir, KeyStore, RootKeySource};
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t", "dana", 1_700_000_000, &["survives"])).await;
    server.stop().await;

    // A crash right after the new epoch was created: both key files exist, nothing re-wrapped.
    let root = RootKeySource::Hex(zeroize::Zeroizing::new(ROOT_KEY_HEX.to_owned()));
    let (keydir, _) = FileKeyDir::open(&dirs.keys(), &root, "eu").unwrap();
    assert_eq!(keydir.add_epoch().unwrap(), 2);
    drop(keydir);

    let server = Server::start(&dirs);
    assert!(!dirs.keys().join(format!("ksk-{:020}.key", 1)).exists(), "old epoch must be destroyed");
    assert!(dirs.keys().join(format!("ksk-{:020}.key", 2)).exists());
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "t").await.unwrap().messages[0].text, "survives");
}

#[tokio::test]
async fn shredded_ciphertext_is_reclaimed_in_the_background() {
    let dirs = Dirs::new();
    let config = dirs.tmp.path().join("fast-reclaim.toml");
    std::fs::write(&config, "reclaim_interval_ms = 20\nreclaim_min_age_ms = 0\n").unwrap();
    let server =
        Server::start_with(&dirs, Opts { args: vec!["--config", config.to_str().unwrap()], ..Opts::default() });
    let mut c = server.transcripts("acme").await;
    for i in 0..5 {
        put(&mut c, transcript(&format!("t{i}"), "erin", 1_700_000_000 + i, &["one", "two", "three"])).await;
    }
    shred(&server, "acme", "erin").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.stop().await;

    for k in [kind::HEADER, kind::BY_SUBJECT, kind::MESSAGE, kind::BODY] {
        assert_eq!(raw_count(&dirs, k), 0, "records of type {k} left");
    }
    assert_eq!(raw_count(&dirs, kind::GARBAGE), 0, "reclaim work left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_during_writes_of_new_subjects_keep_every_key_readable() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = server.transcripts("acme").await;
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..60 {
                // Every write is a new subject, so every write wraps a new data key.
                let id = format!("w{w}-{i}");
                put(&mut c, transcript(&id, &format!("subject-{w}-{i}"), 1_700_000_000, &["kept"])).await;
                ids.push(id);
            }
            ids
        }));
    }
    for _ in 0..5 {
        server.signal("-HUP");
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let mut ids = Vec::new();
    for w in writers {
        ids.extend(w.await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.log_text().matches("key-store rotation complete").count() < 5 {
        assert!(Instant::now() < deadline, "rotations did not finish:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
    let server = Server::start(&dirs);
    let ksks = files_below(&dirs.keys()).iter().filter(|f| f.to_string_lossy().contains("ksk-")).count();
    assert_eq!(ksks, 1, "every old epoch destroyed after the rotations finished");
    let mut c = server.transcripts("acme").await;
    for id in ids {
        assert_eq!(get(&mut c, &id).await.unwrap_or_else(|e| panic!("{id}: {e}")).messages[0].text, "kept");
    }
}

#[tokio::test]
async fn a_sighup_the_moment_the_server_is_ready_rotates_instead_of_killing_it() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    server.signal("-HUP");
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t", "s", 1_700_000_000, &["still serving"])).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.log_text().contains("key-store rotation complete") {
        assert!(Instant::now() < deadline, "no rotation:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&mut c, "t").await.unwrap().messages[0].text, "still serving");
}

/// `chattr +i` on a file for as long as this lives: an immutable file can be neither
/// renamed nor unlinked, the transient "cannot write the key directory" fault of a full
/// or read-only volume. `None` where the file system or the user may not (the test then
/// says so and skips).
struct Immutable(std::path::PathBuf);

impl Immutable {
    /// Where the file system or the user does not allow it, the test says so and skips
    /// (vault::rotation's unit tests inject the same fault through the `KeyStore` trait).
    fn set(path: &Path) -> Option<Immutable> {
        if chattr("+i", path) {
            return Some(Immutable(path.to_path_buf()));
        }
        eprintln!("SKIPPED: `chattr +i` needs root on ext4/xfs/btrfs; vault::rotation's unit tests cover the logic");
        None
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, path: &Path) -> bool {
    std::process::Command::new("chattr").arg(flag).arg(path).status().is_ok_and(|s| s.success())
}

async fn erasure_health(server: &Server) -> i32 {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let ch = tonic::transport::Channel::from_shared(server.admin_url.clone()).unwrap().connect().await.unwrap();
    let req = HealthCheckRequest { service: chatvault::grpc::ERASURE_HEALTH.into() };
    HealthClient::new(ch).check(req).await.unwrap().into_inner().status
}

#[tokio::test]
async fn a_rotation_the_key_directory_refuses_is_retried_until_it_finishes_and_the_old_copy_is_then_useless() {
    use tonic_health::ServingStatus;
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("victim-chat", "victim@example.com", 1_700_000_000, &["victim's secret"])).await;
    put(&mut c, transcript("bystander-chat", "bystander@example.com", 1_700_000_000, &["bystander's text"])).await;
    let blind = hex::decode(subject(&server, "acme", "victim@example.com").await.subject_blind_id).unwrap();
    let stolen = dirs.tmp.path().join("stolen-data");
    copy_dir(&dirs.data(), &stolen);
    shred(&server, "acme", "victim@example.com").await;

    // The old key file cannot be destroyed: every attempt gets as far as destroying it.
    let first_ksk = dirs.keys().join(format!("ksk-{:020}.key", 1));
    let Some(fault) = Immutable::set(&first_ksk) else { return };
    server.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.log_text().matches("key-store rotation failed").count() < 3 {
        assert!(Instant::now() < deadline, "no retries:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(erasure_health(&server).await, ServingStatus::NotServing as i32, "a failing rotation is loud");
    let ksks = || files_below(&dirs.keys()).iter().filter(|f| f.to_string_lossy().contains("/ksk-")).count();
    assert_eq!(ksks(), 2, "retries resume the rotation instead of adding epochs");
    let mut admin = server.admin().await;
    let report = admin.get_erasure_status(pb::GetErasureStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!((report.pending_erasures, report.live_epochs, report.rotation_due), (1, 2, true), "{report:?}");
    assert!(report.consecutive_failures >= 3 && !report.last_failure.is_empty(), "{report:?}");
    assert_eq!(get(&mut c, "bystander-chat").await.unwrap().messages[0].text, "bystander's text");

    // The fault clears: the next retry finishes the rotation on its own.
    drop(fault);
    while first_ksk.exists() {
        assert!(Instant::now() < deadline, "the rotation was not retried:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ksks(), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while erasure_health(&server).await != ServingStatus::Serving as i32 {
        assert!(Instant::now() < deadline, "erasure health did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = admin.get_erasure_status(pb::GetErasureStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!((report.pending_erasures, report.live_epochs, report.consecutive_failures), (0, 1, 0), "{report:?}");
    assert_eq!(subject_keys_recoverable(&stolen, &key_store_keys(&dirs.keys()), "acme", &blind), 0);
    assert_eq!(get(&mut c, "bystander-chat").await.unwrap().messages[0].text, "bystander's text");
}

#[tokio::test]
async fn a_deleted_transcript_cannot_be_decrypted_from_a_copy_taken_before_the_delete_once_the_key_store_rotates() {
    a_transcript_erased_by_cannot_be_decrypted_from_an_earlier_copy(false).await;
}

/// A retention purge is the same crypto-shred: the forensic scan finds nothing of it either.
#[tokio::test]
async fn a_transcript_retention_purged_cannot_be_decrypted_from_a_copy_taken_before_once_the_key_store_rotates() {
    a_transcript_erased_by_cannot_be_decrypted_from_an_earlier_copy(true).await;
}

/// "doomed" (closed long ago) is erased by DeleteTranscript, or by retention purging it.
async fn a_transcript_erased_by_cannot_be_decrypted_from_an_earlier_copy(by_retention: bool) {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    let mut doomed = transcript("doomed", "dana", 1_700_000_000, &["dana's deleted words"]);
    doomed.ended_at = Some(prost_types::Timestamp { seconds: 1_700_000_100, nanos: 0 });
    put(&mut c, doomed).await;
    put(&mut c, transcript("kept", "dana", 1_700_000_001, &["dana's kept words"])).await;
    let sb = hex::decode(subject(&server, "acme", "dana").await.subject_blind_id).unwrap();
    // The adversary's copy, and (control only) the key directory of that time.
    let stolen = snapshot(&dirs.data(), dirs.tmp.path().join("stolen-data"));
    let old_keys = snapshot(&dirs.keys(), dirs.tmp.path().join("old-keys"));
    if by_retention {
        let mut admin = server.admin().await;
        let policy = pb::Retention { purge_after_close_seconds: 86_400, ..Default::default() };
        let req = pb::SetRetentionRequest { tenant_id: "acme".into(), retention: Some(policy) };
        admin.set_retention(req).await.unwrap();
        let run = admin.run_retention(pb::RunRetentionRequest::default()).await.unwrap().into_inner();
        assert_eq!(run.purged, 1, "{run:?}");
    } else {
        c.delete_transcript(pb::DeleteTranscriptRequest { transcript_id: "doomed".into() }).await.unwrap();
    }
    server.rotate_first_epoch_away(&dirs).await;
    assert_eq!(get(&mut c, "doomed").await.unwrap_err().code(), Code::NotFound);
    server.stop().await;

    // Which incarnation was deleted: named in the copy, gone from the live tree.
    let prefix = transcript_keys_prefix("acme");
    let live: Vec<Vec<u8>> = raw_tree(&dirs).1.scan_prefix(&prefix).keys().map(|k| k.unwrap().to_vec()).collect();
    let named = incarnations_named(&[&stolen], &prefix);
    let doomed: Vec<_> =
        named.iter().filter(|(tb, inc)| !live.contains(&[&prefix[..], tb, &inc.to_be_bytes()].concat())).collect();
    assert_eq!((named.len(), live.len(), doomed.len()), (2, 1, 1), "{named:?}");
    let (tb, inc) = *doomed[0];

    let (old, now) = (key_store_keys(&old_keys), key_store_keys(&dirs.keys()));
    let subject_key = SecretKey::from_slice(&subject_keys_found(&[&dirs.data()], &now, "acme", &sb)[0]).unwrap();
    // Control: with the key directory of that time, the copy yields the transcript key.
    let inner = sealed_transcript_keys_found(&[&stolen], &old, "acme", &tb, inc);
    assert!(!inner.is_empty(), "control: the scan must find the key with the old key directory");
    let aad = transcript_key_aad("acme", &sb, &tb, inc);
    assert!(region().open(&subject_key, &aad, &inner[0]).is_ok(), "control: the live subject key opens it");
    // With today's keys nothing of it opens, in the copy or in the live files, and it
    // never lay anywhere wrapped under the (still live) subject key alone.
    assert!(sealed_transcript_keys_found(&[&stolen, &dirs.data()], &now, "acme", &tb, inc).is_empty());
    assert!(bare_transcript_keys_found(&[&stolen, &dirs.data()], &subject_key, "acme", &sb, &tb, inc).is_empty());

    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "kept").await.unwrap().messages[0].text, "dana's kept words");
}
