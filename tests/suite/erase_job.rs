//! `chatvault erase --subjects FILE`, the erasure job, against the real server: bad lines
//! reported by number and skipped, duplicates shredded once, interruptions (SIGINT and
//! kill -9) resumed with exactly one receipt per id, and a receipts file that does not
//! match its journal refused.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatvault::grpc::pb;

use super::common::*;

const IDS: usize = 10_000;

fn erase(server: &Server, key: &str, input: &Path, receipts: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatvault"));
    cmd.args(["erase", "--server", &server.url, "--subjects"])
        .arg(input)
        .arg("--receipts")
        .arg(receipts)
        .args(["--batch", "250", "--rate", "4000"])
        .env("CHATVAULT_API_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits until the receipts file holds more than `n` lines.
fn wait_for_receipts(child: &mut Child, path: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0) <= n {
        assert!(child.try_wait().unwrap().is_none(), "the job ended before it could be interrupted");
        assert!(Instant::now() < deadline, "no receipts appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_job_interrupted_by_sigint_and_kill_9_ends_with_exactly_one_receipt_per_id() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let key = server.api_key("acme").await;
    let mut c = server.transcripts("acme").await;
    for i in 0..50 {
        put(&mut c, transcript(&format!("chat-{i}"), &format!("user-{i}"), 1_700_000_000, &["hi"])).await;
    }
    // The input: 10,000 distinct ids (some as NDJSON with a request id of the caller's),
    // three lines that are not ids, two duplicates.
    let mut text = String::new();
    let mut expected_lines = BTreeSet::new();
    let mut line = 0;
    let mut push = |s: String, valid: bool, text: &mut String| {
        line += 1;
        text.push_str(&s);
        text.push('\n');
        if valid {
            expected_lines.insert(line);
        }
        line
    };
    for i in 0..IDS {
        let l = if i % 7 == 0 {
            format!("{{\"subject_id\": \"user-{i}\", \"request_id\": \"dsr-{i}\"}}")
        } else {
            format!("user-{i}")
        };
        push(l, true, &mut text);
        if i == 10 {
            push("{\"subject\": \"user-x\"}".into(), false, &mut text);
            push("{not json".into(), false, &mut text);
            push("x".repeat(2000), false, &mut text);
            push("user-3".into(), false, &mut text);
        }
    }
    let dup = push("user-9999".into(), false, &mut text);
    let input = dirs.tmp.path().join("subjects.txt");
    std::fs::write(&input, &text).unwrap();
    let receipts = dirs.tmp.path().join("receipts.ndjson");

    // Ctrl-C once the first receipts are down: it stops cleanly, saying how to resume.
    let mut job = erase(&server, &key, &input, &receipts).spawn().unwrap();
    wait_for_receipts(&mut job, &receipts, 0);
    Command::new("kill").args(["-INT", &job.id().to_string()]).status().unwrap();
    let out = job.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("interrupted") && err.contains("resume"), "{err}");
    for bad in ["line 12: no \"subject_id\"", "line 13: not valid JSON", "line 14: subject_id must be"] {
        assert!(err.contains(bad), "{bad}: {err}");
    }
    assert!(err.contains("line 15: the same subject as line 4"), "{err}");
    assert!(err.contains(&format!("line {dup}: the same subject as line")), "{err}");
    let after_int = lines(&receipts).len();
    assert!(after_int < IDS, "interrupted before the end");

    // kill -9 later on: whatever it was doing is redone or kept, never doubled.
    let mut job = erase(&server, &key, &input, &receipts).spawn().unwrap();
    wait_for_receipts(&mut job, &receipts, after_int + 2000);
    job.kill().unwrap();
    job.wait().unwrap();

    let out = erase(&server, &key, &input, &receipts).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["subjects"], IDS);
    let got = lines(&receipts);
    assert_eq!(got.len(), IDS, "one receipt per id");
    let got_lines: BTreeSet<usize> = got.iter().map(|r| r["line"].as_u64().unwrap() as usize).collect();
    assert_eq!(got_lines, expected_lines, "each valid line once, and only those");
    let shredded: Vec<_> = got.iter().filter(|r| r["outcome"] == "shredded").collect();
    assert_eq!(shredded.len(), 50, "the 50 subjects with data; the rest had none");
    assert!(shredded.iter().all(|r| r["signed_receipt"]["payload"].is_string() && r["erasure_id"].is_string()));
    assert!(got.iter().all(|r| r["outcome"] == "shredded" || r["outcome"] == "unknown"), "no failures");
    assert_eq!(got.iter().find(|r| r["line"] == 1).unwrap()["request_id"], "dsr-0");
    assert!(!std::fs::read_to_string(&receipts).unwrap().contains("user-"), "receipts hold blind ids only");
    let mut s = server.subjects("acme").await;
    let st = s.get_subject(pb::GetSubjectRequest { subject_id: "user-7".into() }).await.unwrap().into_inner();
    assert_eq!(st.status(), pb::SubjectStatus::Shredded);
    assert_eq!(get(&mut c, "chat-7").await.unwrap_err().code(), tonic::Code::NotFound);

    // Running it again finds nothing left to do; a changed input or a receipts file
    // that lost lines is refused, naming what does not match.
    let again = erase(&server, &key, &input, &receipts).output().unwrap();
    assert!(again.status.success());
    assert_eq!(lines(&receipts).len(), IDS);
    let cut = std::fs::read(&receipts).unwrap();
    std::fs::write(&receipts, &cut[..cut.len() / 2]).unwrap();
    let refused = erase(&server, &key, &input, &receipts).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("does not match its journal"));
    std::fs::write(&receipts, &cut).unwrap();
    std::fs::write(&input, format!("{text}user-new\n")).unwrap();
    let refused = erase(&server, &key, &input, &receipts).output().unwrap();
    assert!(String::from_utf8_lossy(&refused.stderr).contains("another input"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_again_with_its_request_id_gets_the_same_answer_and_shreds_nothing_more() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("chat-1", "alice", 1_700_000_000, &["hi"])).await;
    let mut s = server.subjects("acme").await;
    let req = pb::ShredSubjectsRequest {
        subject_ids: vec!["alice".into(), "nobody".into(), "".into()],
        request_id: "batch-1".into(),
    };
    let first = s.shred_subjects(req.clone()).await.unwrap().into_inner();
    let outcomes: Vec<_> = first.results.iter().map(|r| r.outcome()).collect();
    assert_eq!(outcomes, [pb::ShredOutcome::Shredded, pb::ShredOutcome::Unknown, pb::ShredOutcome::Failed]);
    assert!(first.results[2].reason.contains("subject_id"), "{:?}", first.results[2]);
    assert!(!first.replayed);
    // Alice writes again after the shred: a replay must not shred her new data.
    put(&mut c, transcript("chat-2", "alice", 1_700_000_000, &["back"])).await;
    let again = s.shred_subjects(req).await.unwrap().into_inner();
    assert!(again.replayed);
    assert_eq!(again.results, first.results);
    assert!(get(&mut c, "chat-2").await.is_ok(), "the replay shredded nothing");
    let reused = pb::ShredSubjectsRequest { subject_ids: vec!["bob".into()], request_id: "batch-1".into() };
    let e = s.shred_subjects(reused).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("request_id"), "{e:?}");
    for bad in [
        pb::ShredSubjectsRequest { subject_ids: vec![], request_id: String::new() },
        pb::ShredSubjectsRequest { subject_ids: vec!["a".into(); 1001], request_id: String::new() },
    ] {
        let e = s.shred_subjects(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("subject_ids"), "{e:?}");
    }
}
