//! Data written by an earlier release keeps working after an upgrade, and its erasures
//! become final like new ones. The fixture is a data and key directory written by the
//! release at 81447d5 (before transcript keys had records of their own): tenant `acme`,
//! alice with chat-1 (3 messages, metadata), chat-2 (closed) and chat-3 (deleted), bob's
//! chat-4 (replaced), carol's chat-5 (carol shredded, the rotation not yet run), and dave,
//! whose only transcript, chat-7, was deleted; and tenant gone-co, deleted just before the
//! upgrade (its records not yet reclaimed).

use std::path::Path;
use std::time::Duration;

use chatvault::crypto::SecretKey;
use chatvault::grpc::pb::{self, SubjectStatus};
use tonic::Code;

use super::common::*;
use super::forensic::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/release-81447d5.tar.gz");
/// Written by the last release before regions (`scripts/make_fixture.sh b54b977`).
const BEFORE_REGIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/release-b54b977.tar.gz");

/// Written by the last release before messages were packed (`scripts/make_fixture.sh 134c4be`):
/// every message a record of its own.
const BEFORE_PACKING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/release-134c4be.tar.gz");

/// Unpacks the fixture into `dirs` and registers the API key it came with.
fn unpack(dirs: &Dirs) {
    unpack_from(dirs, FIXTURE)
}

fn unpack_from(dirs: &Dirs, fixture: &str) {
    let ok = std::process::Command::new("tar").arg("xzf").arg(fixture).arg("-C").arg(dirs.tmp.path()).status();
    assert!(ok.is_ok_and(|s| s.success()), "tar xzf {fixture}");
    let key = std::fs::read_to_string(dirs.tmp.path().join("api-key.txt")).unwrap();
    dirs.remember_api_key("acme", key.trim());
}

/// What both fixtures' writers left in alice's and bob's chats.
async fn assert_written_chats_read_back(c: &mut Transcripts) {
    let chat1 = get(c, "chat-1").await.unwrap();
    assert_eq!(texts(&chat1), ["Hi, my order is late", "Let me check", "Thanks!"]);
    assert_eq!(chat1.metadata.get("order").map(String::as_str), Some("42"));
    assert!(get(c, "chat-2").await.unwrap().ended_at.is_some());
    assert_eq!(texts(&get(c, "chat-4").await.unwrap()), ["replaced version"]);
}

fn texts(t: &pb::Transcript) -> Vec<&str> {
    t.messages.iter().map(|m| m.text.as_str()).collect()
}

async fn blind_of(server: &Server, subject_id: &str) -> (Vec<u8>, SubjectStatus) {
    let mut s = server.subjects("acme").await;
    let r = s.get_subject(pb::GetSubjectRequest { subject_id: subject_id.into() }).await.unwrap().into_inner();
    (hex::decode(&r.subject_blind_id).unwrap(), r.status())
}

#[tokio::test]
async fn a_data_directory_written_by_release_81447d5_reads_back_and_its_erasures_become_final() {
    let dirs = Dirs::new();
    unpack(&dirs);
    let pristine = snapshot(&dirs.data(), dirs.tmp.path().join("pristine-data"));
    let old_keys = snapshot(&dirs.keys(), dirs.tmp.path().join("pristine-keys"));
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;

    assert_written_chats_read_back(&mut c).await;
    assert_eq!(get(&mut c, "chat-3").await.unwrap_err().code(), Code::NotFound);
    let erased = get(&mut c, "chat-5").await.unwrap_err();
    assert!(erased.code() == Code::NotFound && erased.message().contains("erased"), "{erased:?}");
    let list = c
        .list_transcripts(pb::ListTranscriptsRequest { subject_id: "alice@example.com".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = list.transcripts.iter().map(|t| t.transcript_id.as_str()).collect();
    assert_eq!(ids, ["chat-2", "chat-1"]);
    let (alice, _) = blind_of(&server, "alice@example.com").await;
    let (dave, dave_status) = blind_of(&server, "dave@example.com").await;
    assert_eq!(dave_status, SubjectStatus::Active);
    assert_eq!(get(&mut c, "chat-7").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(blind_of(&server, "carol@example.com").await.1, SubjectStatus::Shredded);
    let mut admin = server.admin().await;
    let gone = admin.get_tenant(pb::GetTenantRequest { tenant_id: "gone-co".into() }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "the deleted tenant stays deleted");

    // Old and new records side by side: appends and new transcripts work.
    let append = pb::AppendMessagesRequest {
        transcript_id: "chat-1".into(),
        messages: vec![msg("m9", pb::AuthorRole::Agent, "Bob", "after the upgrade")],
        expected_message_count: Some(3),
    };
    assert_eq!(c.append_messages(append).await.unwrap().into_inner().message_count, 4);
    put(&mut c, transcript("chat-6", "alice@example.com", 1_800_000_000, &["new chat"])).await;

    // The upgrade made a rotation due (the moved keys, carol's shred): run it.
    server.rotate_first_epoch_away(&dirs).await;
    server.stop().await;
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(texts(&get(&mut c, "chat-1").await.unwrap()).len(), 4);
    assert_eq!(texts(&get(&mut c, "chat-6").await.unwrap()), ["new chat"]);
    server.stop().await;

    // alice still has live transcripts; dave has none left, and his deleted chat's key
    // is just as much in the old files.
    assert_deletions_final(&dirs, &pristine, &old_keys, &alice);
    assert_deletions_final(&dirs, &pristine, &old_keys, &dave);
}

/// Directories written by the last release before regions open as region `eu`: every
/// record reads back (their envelopes name no region), the API key issued then (naming
/// no region) still works, new keys name the region, and after a rotation and a restart
/// old and new records read side by side.
#[tokio::test]
async fn a_data_directory_written_by_the_release_before_regions_opens_as_a_region_and_reads_back() {
    let dirs = Dirs::new();
    unpack_from(&dirs, BEFORE_REGIONS);
    let old_key = std::fs::read_to_string(dirs.tmp.path().join("api-key.txt")).unwrap();
    assert!(old_key.starts_with("cvk_") && !old_key.starts_with("cvk_eu_"), "a key from before regions: {old_key}");
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_written_chats_read_back(&mut c).await;
    assert_eq!(get(&mut c, "chat-5").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(&mut c, "chat-7").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(blind_of(&server, "carol@example.com").await.1, SubjectStatus::Shredded);
    assert!(dirs.keys().join("keydir.region").exists(), "the key directory is now region eu's");

    let mut admin = server.admin().await;
    let t = admin.get_tenant(pb::GetTenantRequest { tenant_id: "acme".into() }).await.unwrap().into_inner();
    assert_eq!(t.region, "eu");
    let new_key =
        admin.issue_api_key(pb::IssueApiKeyRequest { tenant_id: "acme".into() }).await.unwrap().into_inner().api_key;
    assert!(new_key.starts_with("cvk_eu_"), "{new_key}");
    put(&mut c, transcript("chat-8", "alice@example.com", 1_800_000_000, &["after regions"])).await;
    server.rotate_first_epoch_away(&dirs).await;
    server.stop().await;

    let server = Server::start(&dirs);
    dirs.remember_api_key("acme", &new_key);
    let mut c = server.transcripts("acme").await;
    assert_eq!(texts(&get(&mut c, "chat-1").await.unwrap()).len(), 3);
    assert_eq!(texts(&get(&mut c, "chat-8").await.unwrap()), ["after regions"]);
    let v = server.admin().await.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
    assert!(v.intact, "{v:?}");
    server.stop().await;
}

/// Single-message records an earlier release wrote are packed together with new ones once
/// their group fills, and everything reads back in order, before and after a restart.
#[tokio::test]
async fn messages_written_before_packing_read_back_and_are_packed_with_new_ones() {
    let dirs = Dirs::new();
    unpack_from(&dirs, BEFORE_PACKING);
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_written_chats_read_back(&mut c).await;
    let old = ["Hi, my order is late", "Let me check", "Thanks!"];
    // In appends of ten: group 0 fills with the three old records and 61 new ones; group
    // 1 gets a chunk of nine (an append that starts a group) and one more single record.
    let new: Vec<String> = (3..74).map(|i| format!("after the upgrade {i}")).collect();
    for batch in new.chunks(10) {
        let messages = batch.iter().map(|t| msg("n", pb::AuthorRole::Agent, "Bob", t)).collect();
        let req = pb::AppendMessagesRequest { transcript_id: "chat-1".into(), messages, expected_message_count: None };
        c.append_messages(req).await.unwrap();
    }
    let close = pb::CloseTranscriptRequest { transcript_id: "chat-1".into(), ..Default::default() };
    c.close_transcript(close).await.unwrap();
    // Filling group 0 queued it, and the close queued group 1.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while server.metric("chatvault_groups_packed_total").await < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was packed:\n{}\n{}",
            server.log_text(),
            server.metrics_text().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.metric("chatvault_groups_left_unpacked_total").await, 0.0);
    let want: Vec<&str> = old.iter().copied().chain(new.iter().map(String::as_str)).collect();
    assert_eq!(texts(&get(&mut c, "chat-1").await.unwrap()), want);
    assert_written_chats_read_back_but_chat_1(&mut c).await;
    server.stop().await;

    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(texts(&get(&mut c, "chat-1").await.unwrap()), want);
    server.stop().await;
}

async fn assert_written_chats_read_back_but_chat_1(c: &mut Transcripts) {
    assert!(get(c, "chat-2").await.unwrap().ended_at.is_some());
    assert_eq!(texts(&get(c, "chat-4").await.unwrap()), ["replaced version"]);
}

/// A transcript of `subject` (a blind id) was deleted before the upgrade: its key
/// lay in a body record, wrapped under the subject's key alone, and stale copies of that
/// record are in the files. The upgrade gave the subject a new key; once the rotation ran,
/// the old key — the only one that opens those copies — is gone from everything today's
/// keys can open.
fn assert_deletions_final(dirs: &Dirs, pristine: &Path, old_keys: &Path, subject: &[u8]) {
    let (old, now) = (key_store_keys(old_keys), key_store_keys(&dirs.keys()));
    let old_raw = subject_keys_found(&[pristine], &old, "acme", subject);
    assert!(!old_raw.is_empty(), "control: the old key directory opens the subject's old key");
    let old_key = SecretKey::from_slice(&old_raw[0]).unwrap();
    // Transcripts with a header in the live tree are not deleted; chat-3's header went.
    let headers = [&[kind::HEADER, 4][..], b"acme"].concat();
    let live: Vec<Vec<u8>> = raw_tree(dirs).1.scan_prefix(&headers).keys().map(|k| k.unwrap().to_vec()).collect();
    let named = incarnations_named(&[pristine], &[&[kind::BODY, 4][..], b"acme"].concat());
    let deleted: Vec<_> = named
        .iter()
        .filter(|(tb, _)| !live.contains(&[&headers[..], tb].concat()))
        .filter(|(tb, inc)| !bare_transcript_keys_found(&[pristine], &old_key, "acme", subject, tb, *inc).is_empty())
        .collect();
    assert_eq!(deleted.len(), 1, "control: exactly one deleted transcript lies in the old files under the old key");

    let today = subject_keys_found(&[pristine, &dirs.data()], &now, "acme", subject);
    assert!(!today.is_empty(), "the subject's live key opens with today's keys");
    assert!(today.iter().all(|k| *k != old_raw[0]), "the subject's old key must not open with today's keys");
    for k in &today {
        let k = SecretKey::from_slice(k).unwrap();
        let (tb, inc) = deleted[0];
        assert!(bare_transcript_keys_found(&[pristine, &dirs.data()], &k, "acme", subject, tb, *inc).is_empty());
    }
}
