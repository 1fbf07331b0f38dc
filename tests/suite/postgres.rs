//! A region on PostgreSQL, over gRPC on loopback: `[regions.eu] store = "postgres"`. The
//! core calls, a kill -9 and a restart with everything acknowledged there, nothing of the
//! tree in the data directory, and a second node refused while the first writes.

use chatvault::grpc::pb::{self, SubjectStatus};
use tonic::Code;

use super::common::*;

/// The configuration of region `eu` on the database `url` names (written to a file).
fn region_on(dirs: &Dirs, url: &str) -> std::path::PathBuf {
    let url_file = dirs.tmp.path().join("pg-url");
    std::fs::write(&url_file, url).unwrap();
    std::fs::set_permissions(&url_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    dirs.config(&format!(
        "[regions.eu]\ndata_dir = {:?}\nkey_dir = {:?}\nstore = \"postgres\"\npostgres_url_file = {:?}\n",
        dirs.data(),
        dirs.keys(),
        url_file
    ))
}

/// The configuration of a region `eu` on the test database, its tables emptied first.
fn on_postgres(dirs: &Dirs, url: &str) -> std::path::PathBuf {
    // The synchronous client runs a runtime of its own: off this test's worker.
    tokio::task::block_in_place(|| {
        let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
        c.batch_execute("DROP TABLE IF EXISTS chatvault_eu_kv; DROP TABLE IF EXISTS chatvault_eu_kv_meta;").unwrap();
    });
    region_on(dirs, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_on_postgres_serves_the_core_calls_and_keeps_what_it_acknowledged_across_kill_9() {
    let Some(url) = postgres_url() else { return };
    let dirs = Dirs::new();
    let config = on_postgres(&dirs, &url);
    let config = config.to_str().unwrap().to_owned();
    let opts = || Opts {
        args: vec!["--config", &config],
        env: vec![("CHATVAULT_ROOT_KEY_EU", ROOT_KEY_HEX)],
        ..Opts::default()
    };
    let server = Server::start_with(&dirs, opts());
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("chat-1", "alice", 1_700_000_000, &["hello", "how can I help?"])).await;
    put(&mut c, transcript("chat-2", "alice", 1_700_000_100, &["second chat"])).await;
    put(&mut c, transcript("chat-3", "bob", 1_700_000_200, &["bob's chat"])).await;
    let messages = vec![msg("m2", pb::AuthorRole::Visitor, "Alice", "thanks")];
    let req = pb::AppendMessagesRequest { transcript_id: "chat-1".into(), messages, expected_message_count: Some(2) };
    c.append_messages(req).await.unwrap();
    let listed = c
        .list_transcripts(pb::ListTranscriptsRequest { subject_id: "alice".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = listed.transcripts.iter().map(|t| t.transcript_id.as_str()).collect();
    assert_eq!(ids, ["chat-2", "chat-1"]);
    c.delete_transcript(pb::DeleteTranscriptRequest { transcript_id: "chat-2".into() }).await.unwrap();
    let mut s = server.subjects("acme").await;
    s.shred_subject(pb::ShredSubjectRequest { subject_id: "bob".into() }).await.unwrap();

    // A second node on the same region is refused while this one writes.
    let refused = Server::try_start(&dirs, opts()).err().expect("a second writer of the region started");
    assert!(refused.contains("writer lease"), "{refused}");

    server.kill9();
    let server = Server::start_with(&dirs, opts());
    let mut c = server.transcripts("acme").await;
    let chat1 = get(&mut c, "chat-1").await.unwrap();
    let texts: Vec<_> = chat1.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["hello", "how can I help?", "thanks"]);
    assert_eq!(get(&mut c, "chat-2").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(&mut c, "chat-3").await.unwrap_err().code(), Code::NotFound);
    let mut s = server.subjects("acme").await;
    let bob = s.get_subject(pb::GetSubjectRequest { subject_id: "bob".into() }).await.unwrap().into_inner();
    assert_eq!(bob.status(), SubjectStatus::Shredded);
    assert!(!dirs.data().join("db").exists(), "the tree is in the database, not in sled");
    let v = server.admin().await.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
    assert!(v.intact, "{v:?}");
    server.stop().await;
}

/// A database that does not answer (not up yet, or failing over): the node keeps trying,
/// says why, and serves nothing meanwhile; it never starts half-open.
#[tokio::test]
async fn a_node_whose_database_does_not_answer_keeps_trying_and_serves_nothing_meanwhile() {
    let dirs = Dirs::new();
    let config = region_on(&dirs, "host=/nonexistent/chatvault-pg port=5432 user=postgres dbname=postgres");
    let config = config.to_str().unwrap().to_owned();
    let opts = Opts {
        args: vec!["--config", &config],
        env: vec![("CHATVAULT_ROOT_KEY_EU", ROOT_KEY_HEX)],
        // Stopped from outside after 16 s (each attempt waits 5 s for a connection): on its
        // own it would go on for minutes.
        wrapper: vec!["timeout", "-s", "KILL", "16"],
        ..Opts::default()
    };
    let log = Server::try_start(&dirs, opts).err().expect("a node served without its database");
    let retries = log.matches("not serving yet, retrying").count();
    assert!(retries >= 2, "it must keep trying ({retries} attempts logged):\n{log}");
    assert!(!log.contains("chatvault serving"), "{log}");
    assert!(!log.contains("host=/nonexistent"), "the connection string stays out of the log:\n{log}");
}

/// Runs an offline `chatvault` command on region `eu` with `config`: whether it succeeded,
/// and what it said.
fn offline(config: &std::path::Path, command: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatvault"))
        .args(command)
        .arg("--config")
        .arg(config)
        .env("CHATVAULT_REGION", "eu")
        .env("CHATVAULT_ROOT_KEY_EU", ROOT_KEY_HEX)
        .env_remove("CHATVAULT_CONFIG")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
}

/// `check`, `repair` and `restore` work on sled data directories; on a region in
/// PostgreSQL they refuse, saying what to use instead, and touch nothing.
#[test]
fn offline_tools_for_sled_directories_refuse_a_region_on_postgres() {
    let dirs = Dirs::new();
    let config = region_on(&dirs, "host=/nonexistent port=5432 user=postgres");
    for command in [&["check"][..], &["repair"], &["restore", "--from", "/nonexistent-backup"]] {
        let (ok, said) = offline(&config, command);
        assert!(!ok, "{command:?}: {said}");
        assert!(said.contains("data is in PostgreSQL"), "{command:?}: {said}");
        assert!(!dirs.data().join("db").exists(), "{command:?} made a sled directory");
    }
    // The URL file may hold a password: readable by others, it is refused.
    std::fs::set_permissions(dirs.tmp.path().join("pg-url"), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .unwrap();
    let (ok, said) = offline(&config, &["check"]);
    assert!(!ok && said.contains("readable by group or others"), "{said}");
}
