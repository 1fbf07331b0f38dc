//! Message ciphertext in the value log: older inline records stay readable, and the space
//! of dead values comes back through compaction without touching live ones.

use std::path::Path;
use std::time::{Duration, Instant};

use chatvault::grpc::pb::{self, AuthorRole};
use tonic::Code;

use super::common::*;

fn config(dirs: &Dirs, name: &str, text: &str) -> String {
    let path = dirs.tmp.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Runs `chatvault <command>` (check, repair) on the stopped server's region: whether it
/// succeeded, and the JSON report it printed.
fn offline(dirs: &Dirs, command: &str) -> (bool, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatvault"))
        .arg(command)
        .arg("--data-dir")
        .arg(dirs.data())
        .arg("--key-dir")
        .arg(dirs.keys())
        .env("CHATVAULT_REGION", "eu")
        .env("CHATVAULT_ROOT_KEY", ROOT_KEY_HEX)
        .env_remove("CHATVAULT_CONFIG")
        .output()
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success(), report)
}

/// How many message records of the stopped server point into the value log.
fn pointer_records(dirs: &Dirs) -> usize {
    let (_db, tree) = raw_tree(dirs);
    tree.scan_prefix([kind::MESSAGE])
        .values()
        .filter(|v| chatvault::store::ValuePointer::decode(&v.as_ref().unwrap()[..]).is_some())
        .count()
}

/// Appends message three to transcript "t", which must hold two.
async fn append_third(c: &mut Transcripts, text: &str) {
    c.append_messages(pb::AppendMessagesRequest {
        transcript_id: "t".into(),
        messages: vec![msg("m3", AuthorRole::Agent, "agent", text)],
        expected_message_count: Some(2),
    })
    .await
    .unwrap();
}

fn bytes_below(dir: &Path) -> u64 {
    files_below(dir).iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum()
}

#[tokio::test]
async fn messages_stored_inline_stay_readable_beside_ones_in_the_value_log() {
    let dirs = Dirs::new();
    let inline = config(&dirs, "inline.toml", "inline_values_below = 1048576\n");
    let server = Server::start_with(&dirs, Opts { args: vec!["--config", &inline], ..Opts::default() });
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t", "s", 1_700_000_000, &["inline one", "inline two"])).await;
    server.stop().await;
    assert_eq!((raw_count(&dirs, kind::MESSAGE), pointer_records(&dirs)), (1, 0), "both stored inline, in one chunk");

    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    append_third(&mut c, "logged three").await;
    let texts: Vec<String> = get(&mut c, "t").await.unwrap().messages.into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["inline one", "inline two", "logged three"]);
    server.stop().await;
    assert_eq!((raw_count(&dirs, kind::MESSAGE), pointer_records(&dirs)), (2, 1), "the new one went to the log");
}

#[tokio::test]
async fn compaction_gives_back_the_space_of_deleted_transcripts_and_keeps_the_rest_readable() {
    let dirs = Dirs::new();
    let fast =
        config(&dirs, "compact.toml", "value_segment_bytes = 4096\nreclaim_interval_ms = 20\nreclaim_min_age_ms = 0\n");
    let server = Server::start_with(&dirs, Opts { args: vec!["--config", &fast], ..Opts::default() });
    let mut c = server.transcripts("acme").await;
    let text = |i: usize, n: usize| format!("{i}-{n}-{}", "x".repeat(250));
    for i in 0..30 {
        let texts: Vec<String> = (0..3).map(|n| text(i, n)).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        put(&mut c, transcript(&format!("t{i}"), &format!("s{}", i % 5), 1_700_000_000 + i as i64, &refs)).await;
    }
    let values = dirs.data().join("values");
    let before = bytes_below(&values);
    assert!(files_below(&values).len() > 8, "the load must fill many segments");
    for i in (0..30).filter(|i| i % 3 != 0) {
        c.delete_transcript(pb::DeleteTranscriptRequest { transcript_id: format!("t{i}") }).await.unwrap();
    }
    // Three transcripts fill a segment, and two of every three are deleted: the reclaimer
    // drops their records, then compaction copies the live third out of each segment
    // and deletes it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while bytes_below(&values) * 2 > before {
        assert!(Instant::now() < deadline, "value log still {} of {before} bytes", bytes_below(&values));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
    assert_eq!(pointer_records(&dirs), 10, "ten transcripts of three messages (one chunk each) are left");

    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    for i in 0..30 {
        match get(&mut c, &format!("t{i}")).await {
            Ok(t) if i % 3 == 0 => {
                let texts: Vec<String> = t.messages.into_iter().map(|m| m.text).collect();
                assert_eq!(texts, (0..3).map(|n| text(i, n)).collect::<Vec<_>>(), "t{i}");
            }
            Err(e) if i % 3 != 0 => assert_eq!(e.code(), Code::NotFound, "t{i}"),
            other => panic!("t{i}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_write_cut_short_in_the_value_log_leaves_its_transcript_readable_up_to_it() {
    let dirs = Dirs::new();
    // No checkpoint of the index may run before the kill: it would make the cut-off
    // bytes acknowledged-and-checkpointed, which is damage (the next test).
    let config = config(&dirs, "no-checkpoint.toml", "checkpoint_interval_ms = 600000\n");
    let opts = || Opts { args: vec!["--config", config.as_str()], ..Opts::default() };
    let server = Server::start_with(&dirs, opts());
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t", "s", 1_700_000_000, &["one", "two"])).await;
    let segment = files_below(&dirs.data().join("values")).into_iter().max().unwrap();
    let before_third = std::fs::metadata(&segment).unwrap().len();
    append_third(&mut c, "three").await;
    server.kill9();
    // A power loss during the last write's sync: the log lost the tail from inside the
    // third message's frame on, the commit frame that would have said the sync happened
    // with it; the index's last checkpoint is from the start.
    std::fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(before_third + 12).unwrap();

    let server = Server::start_with(&dirs, opts());
    let mut c = server.transcripts("acme").await;
    let texts: Vec<String> = get(&mut c, "t").await.unwrap().messages.into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["one", "two"], "the transcript up to the cut, not DATA_LOSS");
    append_third(&mut c, "three again").await;
    assert_eq!(get(&mut c, "t").await.unwrap().messages[2].text, "three again");
    server.stop().await;
    let kept = files_below(&dirs.data().join("values"));
    assert!(kept.iter().any(|f| f.to_string_lossy().contains(".torn-")), "the cut bytes are kept aside: {kept:?}");
}

/// Stores "first" and then "second" (both acknowledged, so in the log's durable part) and
/// kills the server: the value segment, and where "second"'s frames begin.
async fn two_acknowledged_then_kill9(dirs: &Dirs) -> (std::path::PathBuf, u64) {
    two_acknowledged_then_kill9_with(dirs, Opts::default()).await
}

async fn two_acknowledged_then_kill9_with(dirs: &Dirs, opts: Opts<'_>) -> (std::path::PathBuf, u64) {
    let server = Server::start_with(dirs, opts);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("first", "s", 1_700_000_000, &["one"])).await;
    let segment = files_below(&dirs.data().join("values")).into_iter().max().unwrap();
    let first_end = std::fs::metadata(&segment).unwrap().len();
    put(&mut c, transcript("second", "s", 1_700_000_000, &["two", "three"])).await;
    server.kill9();
    (segment, first_end)
}

/// A flipped byte in what was acknowledged is damage, not a torn write: the server
/// refuses to start, naming the file and the offset, and changes nothing; told to accept
/// the loss, it cuts there (the bytes kept beside it) and serves what is before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_acknowledged_values_refuses_the_start_naming_the_file_and_offset() {
    let dirs = Dirs::new();
    let (segment, first_end) = two_acknowledged_then_kill9(&dirs).await;
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = first_end as usize + 20; // inside the second transcript's first frame
    bytes[at] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();

    let refused = Server::try_start(&dirs, Opts::default()).err().expect("a damaged value log is refused");
    assert!(refused.contains(&segment.display().to_string()), "{refused}");
    assert!(refused.contains(&format!("offset {first_end}")) && refused.contains("not a torn"), "{refused}");
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "nothing was changed");

    let server = Server::start_with(&dirs, Opts { args: vec!["--accept-damage"], ..Opts::default() });
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "first").await.unwrap().messages[0].text, "one");
    assert!(server.log_text().contains("accepted (--accept-damage)"));
    let kept = files_below(&dirs.data().join("values"));
    assert!(kept.iter().any(|f| f.to_string_lossy().contains(".torn-")), "the cut bytes are kept aside: {kept:?}");
}

/// A segment that ends early, on a frame boundary, before what the index's checkpoint says
/// was synced (a drive that lied about a flush): refused; accepted, the messages lost are
/// dropped (their transcripts read up to them, never DATA_LOSS) and writing goes on in a
/// new segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_values_missing_at_the_end_are_refused_then_dropped_whole_when_accepted() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("first", "s", 1_700_000_000, &["one"])).await;
    let segment = files_below(&dirs.data().join("values")).into_iter().max().unwrap();
    let first_end = std::fs::metadata(&segment).unwrap().len();
    put(&mut c, transcript("second", "s", 1_700_000_000, &["two", "three"])).await;
    // A clean stop checkpoints the index: it records the log synced past "second".
    server.stop().await;
    std::fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(first_end).unwrap();
    let refused = Server::try_start(&dirs, Opts::default()).err().expect("missing acknowledged values are refused");
    assert!(refused.contains(&format!("offset {first_end}")), "{refused}");
    let server = Server::start_with(&dirs, Opts { args: vec!["--accept-damage"], ..Opts::default() });
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "first").await.unwrap().messages[0].text, "one");
    let second = get(&mut c, "second").await.expect("its header and body were in the index");
    assert!(second.messages.is_empty(), "its lost message is dropped, not served as DATA_LOSS: {second:?}");
    put(&mut c, transcript("third", "s", 1_700_000_000, &["three"])).await;
    assert_eq!(get(&mut c, "third").await.unwrap().messages[0].text, "three");
    server.stop().await;
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "third").await.unwrap().messages[0].text, "three", "a plain restart after it works");
}

/// `chatvault check` on a stopped region: nothing to report on intact files; a flipped
/// byte in acknowledged values, and one in an audit record with records after it, are
/// listed with their file and offset (exit status 1), and no file is changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chatvault_check_lists_acknowledged_damage_with_its_file_and_offset_and_changes_nothing() {
    let dirs = Dirs::new();
    let (segment, first_end) = two_acknowledged_then_kill9(&dirs).await;
    let check = || offline(&dirs, "check");
    let (ok, report) = check();
    assert!(ok && report["ok"] == true && report["damage"].as_array().unwrap().is_empty(), "{report}");
    assert!(report["value_segments"].as_u64().unwrap() >= 1 && report["audit_segments"].as_u64().unwrap() >= 1);

    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[first_end as usize + 20] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();
    let trail = files_below(&dirs.data().join("audit")).into_iter().max().unwrap();
    let mut audit = std::fs::read(&trail).unwrap();
    let at = 48 + 8 + 3; // inside the first record, after the segment header and frame head
    audit[at] ^= 0x01;
    std::fs::write(&trail, &audit).unwrap();

    let (ok, report) = check();
    assert!(!ok && report["ok"] == false, "{report}");
    let damage = report["damage"].as_array().unwrap();
    let listed = |file: &std::path::Path, offset: u64| {
        damage.iter().any(|d| d["file"] == file.display().to_string() && d["offset"] == offset)
    };
    assert!(listed(&segment, first_end), "{report}");
    assert!(listed(&trail, 48), "{report}");
    assert!(report["advice"].as_str().unwrap().contains("--accept-damage"));
    assert_eq!((std::fs::read(&segment).unwrap(), std::fs::read(&trail).unwrap()), (bytes, audit), "nothing changed");
}

/// The index (sled) put back to an older state than was acknowledged — its files damaged
/// or restored by hand, the value log as it is: the log is its write-ahead log, so the
/// start applies the batches the index lacks, and every acknowledged transcript is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_put_back_to_an_older_state_is_brought_forward_from_the_log_not_served_as_missing_transcripts() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("first", "s", 1_700_000_000, &["one"])).await;
    server.stop().await;
    let old_store = dirs.tmp.path().join("old-store");
    for entry in std::fs::read_dir(dirs.data()).unwrap().flatten() {
        let name = entry.file_name();
        if name != "values" && name != "audit" {
            let to = old_store.join(&name);
            if entry.path().is_dir() {
                copy_dir(&entry.path(), &to);
            } else {
                std::fs::create_dir_all(&old_store).unwrap();
                std::fs::copy(entry.path(), &to).unwrap();
            }
        }
    }
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    for id in ["second", "third", "fourth"] {
        put(&mut c, transcript(id, "s", 1_700_000_000, &[id])).await;
    }
    server.kill9();
    for entry in std::fs::read_dir(&old_store).unwrap().flatten() {
        let to = dirs.data().join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::remove_dir_all(&to).unwrap();
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    for id in ["first", "second", "third", "fourth"] {
        assert_eq!(get(&mut c, id).await.unwrap().messages[0].text, if id == "first" { "one" } else { id });
    }
    assert!(server.log_text().contains("applied the batches the index had not absorbed"), "{}", server.log_text());
}

/// Under `durability = flush` nothing is fsynced, so there is no durable mark; but a kill
/// leaves no hole, so a damaged frame with whole frames after it is damage there too:
/// refused, naming the file and offset, instead of cut off as a torn write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_flush_durability_a_flipped_byte_before_good_frames_is_damage_not_a_torn_write() {
    let dirs = Dirs::new();
    let flush = Opts { args: vec!["--durability", "flush"], ..Opts::default() };
    let (segment, first_end) = two_acknowledged_then_kill9_with(&dirs, flush).await;
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[first_end as usize + 20] ^= 0x40; // inside "two"; "three" follows it whole
    std::fs::write(&segment, &bytes).unwrap();

    let flush = Opts { args: vec!["--durability", "flush"], ..Opts::default() };
    let refused = Server::try_start(&dirs, flush).err().expect("damage under flush is refused");
    assert!(refused.contains(&segment.display().to_string()), "{refused}");
    assert!(refused.contains(&format!("offset {first_end}")) && refused.contains("not a torn write"), "{refused}");
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "nothing was changed");
    let accept = Opts { args: vec!["--durability", "flush", "--accept-damage"], ..Opts::default() };
    let server = Server::start_with(&dirs, accept);
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "first").await.unwrap().messages[0].text, "one");
}

/// The index (sled's files) lost altogether, the value log whole: the start is refused,
/// saying so; told to accept it, the server rebuilds the index from the log, its
/// write-ahead log since the directory was made, and the tenant, its API key and every
/// acknowledged transcript are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_lost_altogether_is_refused_then_rebuilt_from_the_log_when_accepted() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let key = server.api_key("acme").await;
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("first", "s", 1_700_000_000, &["one"])).await;
    put(&mut c, transcript("second", "t", 1_700_000_000, &["two", "three"])).await;
    c.delete_transcript(pb::DeleteTranscriptRequest { transcript_id: "first".into() }).await.unwrap();
    server.stop().await;
    for entry in std::fs::read_dir(dirs.data()).unwrap().flatten() {
        let name = entry.file_name();
        if name != "values" && name != "audit" {
            if entry.path().is_dir() {
                std::fs::remove_dir_all(entry.path()).unwrap();
            } else {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
    }
    let refused = Server::try_start(&dirs, Opts::default()).err().expect("a lost index is refused");
    assert!(refused.contains("the index lost its state") && refused.contains("--accept-damage"), "{refused}");

    let server = Server::start_with(&dirs, Opts { args: vec!["--accept-damage"], ..Opts::default() });
    let bearer = chatvault::grpc::Bearer::new(&key).unwrap();
    let mut c =
        pb::transcript_service_client::TranscriptServiceClient::with_interceptor(server.channel().await, bearer);
    let texts: Vec<String> = get(&mut c, "second").await.unwrap().messages.into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["two", "three"]);
    assert_eq!(get(&mut c, "first").await.unwrap_err().code(), Code::NotFound, "the delete is replayed too");
    assert!(server.log_text().contains("rebuilding the index from the log"), "{}", server.log_text());
}

/// `chatvault repair` on a stopped region with a flipped byte in acknowledged values: it
/// says what was lost (the file and offset) and where the cut bytes were kept; after it,
/// `check` finds nothing and a plain start serves what was before the damage. On an
/// intact region it changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chatvault_repair_cuts_acknowledged_damage_saying_what_was_lost_and_a_plain_start_then_serves() {
    let dirs = Dirs::new();
    let (segment, first_end) = two_acknowledged_then_kill9(&dirs).await;
    let cli = |command: &str| offline(&dirs, command);
    // The logs (sled may rewrite its own files whenever it is opened).
    let logs = || -> Vec<Vec<u8>> {
        let mut files = files_below(&dirs.data().join("values"));
        files.extend(files_below(&dirs.data().join("audit")));
        files.iter().map(|f| std::fs::read(f).unwrap()).collect()
    };
    let before = logs();
    let (ok, report) = cli("repair");
    assert!(ok && report["lost"].as_array().unwrap().is_empty(), "{report}");
    assert!(before == logs(), "a repair of an intact region changed its logs");

    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[first_end as usize + 20] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();
    let (ok, report) = cli("repair");
    assert!(ok && report["ok"] == true, "{report}");
    let lost = report["lost"].as_array().unwrap();
    assert!(lost.iter().any(|d| d["file"] == segment.display().to_string() && d["offset"] == first_end), "{report}");
    assert!(!report["kept_aside"].as_array().unwrap().is_empty(), "{report}");
    let (ok, report) = cli("check");
    assert!(ok && report["damage"].as_array().unwrap().is_empty(), "{report}");

    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_eq!(get(&mut c, "first").await.unwrap().messages[0].text, "one");
}

/// Under `durability = none` (and `flush`) nothing waits for a sync, but every change is in
/// the kernel, written to the write-ahead log, before the answer: a kill -9 loses nothing
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_durability_none_what_was_answered_survives_kill9() {
    let dirs = Dirs::new();
    for durability in ["none", "flush"] {
        let opts = || Opts { args: vec!["--durability", durability], ..Opts::default() };
        let server = Server::start_with(&dirs, opts());
        let mut c = server.transcripts("acme").await;
        for i in 0..20 {
            put(&mut c, transcript(&format!("{durability}-{i}"), "s", 1_700_000_000, &["kept"])).await;
        }
        server.kill9();
        let server = Server::start_with(&dirs, opts());
        let mut c = server.transcripts("acme").await;
        for i in 0..20 {
            let t = get(&mut c, &format!("{durability}-{i}")).await.unwrap_or_else(|e| panic!("{durability}-{i}: {e}"));
            assert_eq!(t.messages[0].text, "kept");
        }
        server.stop().await;
    }
}
