//! What is on disk: no plaintext personal data, records bound to their place, the right keys.

use chatvault::grpc::pb::{self, AuthorRole};
use tonic::Code;

use super::common::*;

/// The encodings a marker could appear in: raw UTF-8 (what postcard writes), UTF-16LE, hex.
fn encodings(marker: &str) -> Vec<Vec<u8>> {
    vec![
        marker.as_bytes().to_vec(),
        marker.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        hex::encode(marker).into_bytes(),
    ]
}

#[tokio::test]
async fn no_personal_data_is_stored_in_plaintext() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    let markers = [
        "subject-7f3a91@example.com",
        "TEXT-MARKER-c41d2e",
        "AGENTNAME-b7e6f0",
        "CHANNEL-MARKER-19ac",
        "META-VALUE-5d2e71",
        "APPENDED-TEXT-88f0",
    ];
    let mut t = transcript("tr-1", markers[0], 1_700_000_000, &[]);
    t.messages = vec![msg("m1", AuthorRole::Agent, markers[2], markers[1])];
    t.channel = markers[3].into();
    t.metadata.insert("note".into(), markers[4].into());
    put(&mut c, t).await;
    c.append_messages(pb::AppendMessagesRequest {
        transcript_id: "tr-1".into(),
        messages: vec![msg("m2", AuthorRole::Visitor, "v", markers[5])],
        expected_message_count: None,
    })
    .await
    .unwrap();
    let back = get(&mut c, "tr-1").await.unwrap();
    assert_eq!(back.messages[1].text, markers[5], "the data is really there");
    server.stop().await;

    let files: Vec<_> = files_below(&dirs.data()).into_iter().chain(files_below(&dirs.keys())).collect();
    assert!(files.len() >= 4, "{files:?}");
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        for m in markers {
            for enc in encodings(m) {
                assert!(!bytes.windows(enc.len()).any(|w| w == enc.as_slice()), "{m} found in {}", f.display());
            }
        }
    }
}

/// Swaps the values of two records in the stopped server's sled tree.
fn swap_values(dirs: &Dirs, a: &[u8], b: &[u8]) {
    let (db, tree) = raw_tree(dirs);
    let va = tree.get(a).unwrap().unwrap();
    let vb = tree.get(b).unwrap().unwrap();
    tree.insert(a, vb).unwrap();
    tree.insert(b, va).unwrap();
    db.flush().unwrap();
}

/// The keys of all message records, in key order.
fn message_keys(dirs: &Dirs) -> Vec<Vec<u8>> {
    raw_tree(dirs).1.scan_prefix([kind::MESSAGE]).keys().map(|k| k.unwrap().to_vec()).collect()
}

#[tokio::test]
async fn records_swapped_on_disk_fail_to_decrypt_instead_of_being_served() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    // Appended alone, the second message is a record of its own.
    put(&mut c, transcript("one", "s1", 1_700_000_000, &["first"])).await;
    let messages = vec![msg("m1", pb::AuthorRole::Agent, "agent", "second")];
    c.append_messages(pb::AppendMessagesRequest {
        transcript_id: "one".into(),
        messages,
        expected_message_count: None,
    })
    .await
    .unwrap();
    server.stop().await;

    // Reordering within a transcript: message 0 and 1 trade places.
    let keys = message_keys(&dirs);
    assert_eq!(keys.len(), 2);
    swap_values(&dirs, &keys[0], &keys[1]);
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    let err = get(&mut c, "one").await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
    assert!(err.message().contains("failed authentication"), "{}", err.message());
    server.stop().await;
    swap_values(&dirs, &keys[0], &keys[1]);

    // Moving across transcripts (even of the same subject) fails the same way; "two"'s two
    // messages are one packed chunk, traded for a single message.
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "one").await.unwrap().messages[0].text, "first", "restored");
    put(&mut c, transcript("two", "s1", 1_700_000_001, &["other", "more"])).await;
    server.stop().await;
    let before: std::collections::HashSet<_> = keys.into_iter().collect();
    let other = message_keys(&dirs).into_iter().find(|k| !before.contains(k)).unwrap();
    let first = before.iter().min().unwrap().clone();
    swap_values(&dirs, &first, &other);
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "one").await.unwrap_err().code(), Code::DataLoss);
    assert_eq!(get(&mut c, "two").await.unwrap_err().code(), Code::DataLoss);
}

#[tokio::test]
async fn a_wrong_root_key_is_refused_at_start_and_nothing_is_touched() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t", "s", 1_700_000_000, &["keep me"])).await;
    server.stop().await;

    let err = Server::try_start(&dirs, Opts { root_key_hex: OTHER_ROOT_KEY_HEX, ..Opts::default() }).err().unwrap();
    assert!(err.contains("root key does not match"), "{err}");
    assert!(!err.contains(OTHER_ROOT_KEY_HEX) && !err.contains(ROOT_KEY_HEX), "a key leaked into the log");

    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "t").await.unwrap().messages[0].text, "keep me");
}

#[tokio::test]
async fn a_data_directory_with_another_key_directory_is_refused() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t", "s", 1_700_000_000, &["x"])).await;
    server.stop().await;
    std::fs::rename(dirs.keys(), dirs.tmp.path().join("keys-elsewhere")).unwrap();
    let err = Server::try_start(&dirs, Opts::default()).err().unwrap();
    assert!(err.contains("different key directory"), "{err}");
}

#[tokio::test]
async fn a_key_directory_inside_or_equal_to_the_data_directory_is_refused_before_anything_is_written() {
    for relative in ["data/keys", "data", "data/../data/"] {
        let dirs = Dirs::with_key_dir(relative);
        let err = Server::try_start(&dirs, Opts::default()).err().unwrap_or_else(|| panic!("{relative} started"));
        assert!(err.contains("key_dir") && err.contains("own volume"), "{relative}: {err}");
        assert!(!dirs.data().exists(), "{relative}: the refusal created the data directory");
    }
    let dirs = Dirs::with_key_dir(".");
    let err = Server::try_start(&dirs, Opts::default()).err().expect("a key directory holding the data directory");
    assert!(err.contains("inside the key directory"), "{err}");
}

#[tokio::test]
async fn chacha20_poly1305_records_read_back_after_switching_to_aes() {
    let dirs = Dirs::new();
    let server = Server::start_with(&dirs, Opts { args: vec!["--cipher", "chacha20-poly1305"], ..Opts::default() });
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("cc", "s", 1_700_000_000, &["written with chacha"])).await;
    server.stop().await;
    let algs: Vec<u8> = raw_message_envelopes(&dirs).iter().map(|v| v[1]).collect();
    assert_eq!(algs, [2], "the message envelope records ChaCha20-Poly1305");
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "cc").await.unwrap().messages[0].text, "written with chacha");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_writes_of_new_tenants_share_one_blind_index_key() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut tasks = Vec::new();
    for tenant in 0..6 {
        for w in 0..8 {
            let mut c = server.transcripts(&format!("fresh-{tenant}")).await;
            tasks.push(tokio::spawn(async move {
                put(&mut c, transcript(&format!("t{w}"), &format!("s{w}"), 1_700_000_000, &["first"])).await;
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    server.stop().await;
    // After a restart nothing is cached: every lookup goes through the stored key.
    let server = Server::start(&dirs);
    for tenant in 0..6 {
        let mut c = server.transcripts(&format!("fresh-{tenant}")).await;
        for w in 0..8 {
            assert_eq!(get(&mut c, &format!("t{w}")).await.unwrap().messages[0].text, "first", "tenant {tenant} t{w}");
        }
    }
}

#[tokio::test]
async fn delete_removes_the_transcript_key_from_the_store_at_once() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("doomed", "s", 1_700_000_000, &["bye"])).await;
    put(&mut c, transcript("kept", "s", 1_700_000_000, &["hi"])).await;
    c.delete_transcript(pb::DeleteTranscriptRequest { transcript_id: "doomed".into() }).await.unwrap();
    server.stop().await;
    // Body records hold the wrapped transcript keys: only "kept"'s is left, although the
    // reclaimer (60 s minimum age by default) has not run.
    assert_eq!(raw_count(&dirs, kind::BODY), 1);
    assert_eq!(raw_count(&dirs, kind::MESSAGE), 2, "message ciphertext awaits the reclaimer");
}

/// Every file and folder the server writes is its own alone, whatever the umask it was
/// started with, a data directory others could enter is closed, and it never dumps core.
#[tokio::test]
async fn the_server_keeps_its_files_to_itself_and_never_dumps_core() {
    use std::os::unix::fs::PermissionsExt;
    let dirs = Dirs::new();
    std::fs::create_dir_all(dirs.data()).unwrap();
    std::fs::set_permissions(dirs.data(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Started under the usual umask 022 (and an unlimited core size, where allowed).
    let server = Server::start_with(
        &dirs,
        Opts {
            wrapper: vec!["sh", "-c", "umask 022; ulimit -c unlimited 2>/dev/null; exec \"$0\" \"$@\""],
            ..Opts::default()
        },
    );
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t1", "alice", 1_700_000_000, &["private"])).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap().to_owned();
    assert!(core.split_whitespace().skip(4).take(2).all(|v| v == "0"), "{core}");
    server.stop().await;
    for root in [dirs.data(), dirs.keys()] {
        let mut open = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(p) = stack.pop() {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                open.push(format!("{} {mode:o}", p.display()));
            }
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            }
        }
        assert!(open.is_empty(), "open to other users: {open:?}");
    }
}

/// With `lock_memory`, every page the server has is locked (none of it can be swapped
/// out), the key pages among them; without it, none is.
#[tokio::test]
async fn with_lock_memory_the_server_is_locked_in_memory() {
    let locked_kib = |server: &Server| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmLck:")).unwrap().to_owned();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    server.api_key("acme").await;
    assert_eq!(locked_kib(&server), 0, "locked without being asked to");
    server.stop().await;

    let config = dirs.config("lock_memory = true\n");
    let server =
        Server::start_with(&dirs, Opts { args: vec!["--config", config.to_str().unwrap()], ..Opts::default() });
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t1", "alice", 1_700_000_000, &["private"])).await;
    assert!(locked_kib(&server) > 1024, "VmLck: {} KiB", locked_kib(&server));
    assert!(server.log_text().contains("locked in memory"));
}
