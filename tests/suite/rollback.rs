//! A data directory put back to an earlier state (a restored backup, a rolled-back VM
//! snapshot) next to the current key directory: the erasure ledger on the key volume
//! remembers what it has forgotten.

use tonic::Code;

use chatvault::grpc::Bearer;
use chatvault::grpc::pb;
use chatvault::grpc::pb::transcript_service_client::TranscriptServiceClient;

use super::common::*;

/// What a data directory holds: a digest of every file outside sled's own, and of every
/// record in sled's tree (sled itself rewrites its files whenever it is opened).
fn contents(dirs: &Dirs) -> Vec<(String, u32)> {
    let data = dirs.data();
    let mut all: Vec<(String, u32)> = files_below(&data)
        .into_iter()
        .filter(|f| f.parent() != Some(data.as_path()))
        .map(|f| (f.display().to_string(), crc32fast::hash(&std::fs::read(&f).unwrap())))
        .collect();
    let (_db, tree) = raw_tree(dirs);
    let mut h = crc32fast::Hasher::new();
    for kv in tree.iter() {
        let (k, v) = kv.unwrap();
        h.update(&k);
        h.update(&v);
    }
    all.push(("sled tree".into(), h.finalize()));
    all.sort();
    all
}

#[tokio::test]
async fn a_rolled_back_data_directory_is_refused_and_brought_forward_only_on_request() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("s-chat", "sam", 1_700_000_000, &["sam's words"])).await;
    put(&mut c, transcript("t-chat", "tess", 1_700_000_000, &["deleted later"])).await;
    put(&mut c, transcript("t-other", "tess", 1_700_000_001, &["tess keeps this"])).await;
    let mut admin = server.admin().await;
    let extra = admin.issue_api_key(pb::IssueApiKeyRequest { tenant_id: "acme".into() }).await.unwrap().into_inner();
    let extra_id = extra.key.unwrap().key_id;
    server.stop().await;

    // The backup / snapshot.
    let copy = dirs.tmp.path().join("backup");
    copy_dir(&dirs.data(), &copy);

    let server = Server::start(&dirs);
    let mut s = server.subjects("acme").await;
    s.shred_subject(pb::ShredSubjectRequest { subject_id: "sam".into() }).await.unwrap();
    let mut c = server.transcripts("acme").await;
    c.delete_transcript(pb::DeleteTranscriptRequest { transcript_id: "t-chat".into() }).await.unwrap();
    let mut admin = server.admin().await;
    admin.revoke_api_key(pb::RevokeApiKeyRequest { tenant_id: "acme".into(), key_id: extra_id }).await.unwrap();
    server.stop().await;

    // Put the copy back.
    std::fs::remove_dir_all(dirs.data()).unwrap();
    std::fs::rename(&copy, dirs.data()).unwrap();
    let before = contents(&dirs);
    let err = Server::try_start(&dirs, Opts::default()).err().expect("a rolled-back data directory started");
    assert!(err.contains("rolled back"), "{err}");
    assert!(err.contains("1 subject erasure(s), 1 transcript deletion(s)"), "{err}");
    assert!(err.contains("--replay-erasures"), "{err}");
    assert!(!err.contains("sam") && !err.contains("tess"), "no subject id in the message: {err}");
    assert_eq!(contents(&dirs), before, "the refusal changed what the data directory holds");

    let server = Server::start_with(&dirs, Opts { args: vec!["--replay-erasures"], ..Opts::default() });
    let mut c = server.transcripts("acme").await;
    let gone = get(&mut c, "s-chat").await.unwrap_err();
    assert!(gone.code() == Code::NotFound && gone.message().contains("erased"), "{gone:?}");
    assert_eq!(get(&mut c, "t-chat").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(&mut c, "t-other").await.unwrap().messages[0].text, "tess keeps this");
    let mut revoked =
        TranscriptServiceClient::with_interceptor(server.channel().await, Bearer::new(&extra.api_key).unwrap());
    let denied = get(&mut revoked, "t-other").await.unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated, "the revoked key works again: {denied:?}");
    let mut admin = server.admin().await;
    let v = admin.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
    assert!(v.intact, "{v:?}");
    assert_eq!(v.accepted_gaps.len(), 1, "the records lost with the rollback are reported: {v:?}");
    server.stop().await;

    // Brought forward once, it starts as usual from then on.
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "t-other").await.unwrap().messages[0].text, "tess keeps this");
    assert_eq!(get(&mut c, "s-chat").await.unwrap_err().code(), Code::NotFound);
}

/// `chatvault restore ...` with the test root key; returns (success, stderr).
fn restore(dirs: &Dirs, from: &std::path::Path, key_dir: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatvault"))
        .arg("restore")
        .arg("--from")
        .arg(from)
        .arg("--data-dir")
        .arg(dirs.data())
        .arg("--key-dir")
        .arg(key_dir)
        .env("CHATVAULT_ROOT_KEY", ROOT_KEY_HEX)
        .env("CHATVAULT_REGION", "eu")
        .env_remove("CHATVAULT_CONFIG")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn a_restored_backup_never_revives_what_was_erased_after_it_was_taken() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("s-chat", "sam", 1_700_000_000, &["sam's words"])).await;
    put(&mut c, transcript("t-chat", "tess", 1_700_000_000, &["deleted later"])).await;
    put(&mut c, transcript("kept", "tess", 1_700_000_001, &["in the backup"])).await;
    let mut admin = server.admin().await;
    let extra = admin.issue_api_key(pb::IssueApiKeyRequest { tenant_id: "acme".into() }).await.unwrap().into_inner();

    // Where a backup may not go, and where it may.
    let inside_keys = dirs.keys().join("backup");
    let refused =
        |out: &std::path::Path| pb::BackupRequest { out_dir: out.display().to_string(), region: String::new() };
    for (out, why) in [(inside_keys.as_path(), "key directory"), (dirs.data().as_path(), "data directory")] {
        let e = admin.backup(refused(out)).await.unwrap_err();
        assert!(e.code() == Code::InvalidArgument && e.message().contains(why), "{e:?}");
    }
    let e =
        admin.backup(pb::BackupRequest { out_dir: "relative/dir".into(), region: String::new() }).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("absolute"), "{e:?}");
    assert!(!inside_keys.exists());
    let backup = dirs.tmp.path().join("backup");
    let made = admin.backup(refused(&backup)).await.unwrap().into_inner();
    assert!(made.records > 0 && made.key_epochs == [1], "{made:?}");
    let e = admin.backup(refused(&backup)).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("not empty"), "{e:?}");

    // After the backup: erasures, a revocation, and an ordinary write.
    let mut s = server.subjects("acme").await;
    s.shred_subject(pb::ShredSubjectRequest { subject_id: "sam".into() }).await.unwrap();
    c.delete_transcript(pb::DeleteTranscriptRequest { transcript_id: "t-chat".into() }).await.unwrap();
    admin
        .revoke_api_key(pb::RevokeApiKeyRequest { tenant_id: "acme".into(), key_id: extra.key.unwrap().key_id })
        .await
        .unwrap();
    put(&mut c, transcript("after", "tess", 1_700_000_002, &["written after the backup"])).await;
    server.stop().await;

    // The data volume is lost; the key volume is not.
    std::fs::remove_dir_all(dirs.data()).unwrap();
    let (ok, err) = restore(&dirs, &backup, &dirs.tmp.path().join("no-such-keys"));
    assert!(!ok && err.contains("not a key directory"), "{err}");
    assert!(!dirs.data().exists(), "a refused restore wrote the data directory");
    let (ok, err) = restore(&dirs, &backup, &dirs.keys());
    assert!(ok, "{err}");
    let (ok, err) = restore(&dirs, &backup, &dirs.keys());
    assert!(!ok && err.contains("not empty"), "restoring over a data directory: {err}");

    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "kept").await.unwrap().messages[0].text, "in the backup");
    assert_eq!(get(&mut c, "s-chat").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(&mut c, "t-chat").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(&mut c, "after").await.unwrap_err().code(), Code::NotFound, "writes after the backup are lost");
    let mut revoked =
        TranscriptServiceClient::with_interceptor(server.channel().await, Bearer::new(&extra.api_key).unwrap());
    assert_eq!(get(&mut revoked, "kept").await.unwrap_err().code(), Code::Unauthenticated);
    let v = server.admin().await.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
    assert!(v.intact && v.accepted_gaps.len() == 1, "{v:?}");

    // Once a rotation has destroyed the epoch the backup was taken under, it is dead.
    server.rotate_first_epoch_away(&dirs).await;
    server.stop().await;
    std::fs::remove_dir_all(dirs.data()).unwrap();
    let (ok, err) = restore(&dirs, &backup, &dirs.keys());
    assert!(!ok && err.contains("older than the last completed key-store rotation"), "{err}");
    assert!(!dirs.data().exists());
}

#[tokio::test]
async fn a_backup_of_another_key_directory_is_refused_and_nothing_is_written() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t", "s", 1_700_000_000, &["x"])).await;
    let backup = dirs.tmp.path().join("backup");
    server
        .admin()
        .await
        .backup(pb::BackupRequest { out_dir: backup.display().to_string(), region: String::new() })
        .await
        .unwrap();
    server.stop().await;
    std::fs::remove_dir_all(dirs.data()).unwrap();

    // Another deployment's key directory (same root key, another store).
    let other = Dirs::new();
    Server::start(&other).stop().await;
    let (ok, err) = restore(&dirs, &backup, &other.keys());
    assert!(!ok && err.contains("different key directory"), "{err}");
    assert!(!dirs.data().exists(), "a refused restore left a data directory");
    let leftovers: Vec<_> = std::fs::read_dir(dirs.tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!leftovers.iter().any(|n| n.to_string_lossy().contains("restoring")), "{leftovers:?}");
}

#[tokio::test]
async fn a_backup_is_dead_once_a_rotation_destroys_its_epoch_even_with_no_erasure_since() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t", "s", 1_700_000_000, &["x"])).await;
    let backup = dirs.tmp.path().join("backup");
    server
        .admin()
        .await
        .backup(pb::BackupRequest { out_dir: backup.display().to_string(), region: String::new() })
        .await
        .unwrap();
    server.rotate_first_epoch_away(&dirs).await;
    server.stop().await;
    std::fs::remove_dir_all(dirs.data()).unwrap();
    let (ok, err) = restore(&dirs, &backup, &dirs.keys());
    assert!(!ok && err.contains("older than the last completed key-store rotation"), "{err}");
    assert!(!dirs.data().exists());
    // An empty data directory beside a key directory that served one is refused too.
    let err = Server::try_start(&dirs, Opts::default()).err().expect("an empty data directory started");
    assert!(err.contains("is empty, but this key directory has served one"), "{err}");
}
