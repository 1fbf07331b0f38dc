//! A crash (`abort`, as good as `kill -9`) at each step of a key-store rotation, of a key
//! file's destruction and of an erasure: the next start finishes what was cut short, and
//! loses nothing. Crash points are armed with `CHATVAULT_FAILPOINT` (debug builds only).

use std::time::Duration;

use chatvault::grpc::pb::{self, SubjectStatus};
use tonic::Code;

use super::common::*;

fn ksk_files(dirs: &Dirs) -> Vec<String> {
    files_below(&dirs.keys())
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ksk-"))
        .collect()
}

/// Stores three subjects' transcripts and shreds `gone`; returns the receipt's erasure id.
async fn populate(server: &Server) -> String {
    let mut c = server.transcripts("acme").await;
    for (id, subject) in [("a1", "gone"), ("b1", "bea"), ("b2", "bea"), ("c1", "cy")] {
        put(&mut c, transcript(id, subject, 1_700_000_000, &[&format!("{subject} in {id}")])).await;
    }
    let mut s = server.subjects("acme").await;
    let r = s.shred_subject(pb::ShredSubjectRequest { subject_id: "gone".into() }).await.unwrap().into_inner();
    r.receipt.unwrap().erasure_id
}

/// After the restart: everything acknowledged reads back, and the erasure holds.
async fn everything_is_there(server: &Server) {
    let mut c = server.transcripts("acme").await;
    for (id, subject) in [("b1", "bea"), ("b2", "bea"), ("c1", "cy")] {
        let t = get(&mut c, id).await.unwrap_or_else(|e| panic!("{id} lost: {e}"));
        assert_eq!(t.messages[0].text, format!("{subject} in {id}"));
    }
    assert_eq!(get(&mut c, "a1").await.unwrap_err().code(), Code::NotFound);
    let mut s = server.subjects("acme").await;
    let info = s.get_subject(pb::GetSubjectRequest { subject_id: "gone".into() }).await.unwrap().into_inner();
    assert_eq!(info.status(), SubjectStatus::Shredded);
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_rotation_is_finished_at_the_next_start() {
    for point in [
        "rotation.after_new_epoch",
        "rotation.mid_rewrap",
        "rotation.before_destroy",
        "destroy.after_rename",
        "destroy.after_wipe",
        "rotation.before_ledger",
    ] {
        let dirs = Dirs::new();
        let mut server =
            Server::start_with(&dirs, Opts { env: vec![("CHATVAULT_FAILPOINT", point)], ..Opts::default() });
        let erasure_id = populate(&server).await;
        server.signal("-HUP");
        assert!(server.exited(Duration::from_secs(30)).await, "{point}: no crash:\n{}", server.log_text());
        assert!(server.log_text().contains(&format!("crash point {point} reached")), "{point}");
        drop(server);

        let server = Server::start(&dirs);
        assert_eq!(ksk_files(&dirs).len(), 1, "{point}: the rotation was not finished: {:?}", ksk_files(&dirs));
        everything_is_there(&server).await;
        let mut s = server.subjects("acme").await;
        let status =
            s.get_erasure(pb::GetErasureRequest { erasure_id: erasure_id.clone() }).await.unwrap().into_inner();
        assert_eq!(status.state(), pb::ErasureState::Final, "{point}: {status:?}");
        let report = server.admin().await.get_erasure_status(pb::GetErasureStatusRequest::default()).await.unwrap();
        assert_eq!(report.into_inner().pending_erasures, 0, "{point}");
        server.stop().await;
    }
}

#[tokio::test]
async fn a_crash_between_recording_an_erasure_and_applying_it_is_finished_at_the_next_start() {
    for point in ["erasure.after_ledger", "erasure.after_apply"] {
        let dirs = Dirs::new();
        let mut server =
            Server::start_with(&dirs, Opts { env: vec![("CHATVAULT_FAILPOINT", point)], ..Opts::default() });
        let mut c = server.transcripts("acme").await;
        for (id, subject) in [("a1", "gone"), ("b1", "bea"), ("b2", "bea"), ("c1", "cy")] {
            put(&mut c, transcript(id, subject, 1_700_000_000, &[&format!("{subject} in {id}")])).await;
        }
        let mut s = server.subjects("acme").await;
        let cut = s.shred_subject(pb::ShredSubjectRequest { subject_id: "gone".into() }).await;
        assert!(cut.is_err(), "{point}: the shred answered before the crash");
        assert!(server.exited(Duration::from_secs(30)).await, "{point}: no crash");
        drop(server);

        // No operator choice needed: a crash is not a rollback.
        let server = Server::start(&dirs);
        everything_is_there(&server).await;
        let report = server.admin().await.get_erasure_status(pb::GetErasureStatusRequest::default()).await.unwrap();
        assert_eq!(report.into_inner().pending_erasures, 1, "{point}: the erasure is recorded, not yet final");
        server.stop().await;
    }
}

/// Puts transcript `id` with its first message, appends the others one by one, then
/// closes it: its messages are single records until packing. Whether all was answered.
async fn written_one_by_one_then_closed(c: &mut Transcripts, id: &str, i: usize, texts: &[&str]) -> bool {
    let t = transcript(id, &format!("s{}", i % 5), 1_700_000_000, &texts[..1]);
    if c.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await.is_err() {
        return false;
    }
    for (n, text) in texts.iter().enumerate().skip(1) {
        let messages = vec![msg(&format!("m{n}"), pb::AuthorRole::Visitor, "Visitor", text)];
        let req = pb::AppendMessagesRequest { transcript_id: id.into(), messages, expected_message_count: None };
        if c.append_messages(req).await.is_err() {
            return false;
        }
    }
    let close = pb::CloseTranscriptRequest { transcript_id: id.into(), ..Default::default() };
    c.close_transcript(close).await.is_ok()
}

/// A crash at each step of a commit round, of a segment rollover (value log, audit trail),
/// of a value-log compaction, of the index's checkpoint and of a packing: after the restart every acknowledged transcript reads
/// back, every deleted one stays deleted, and the audit trail verifies.
#[tokio::test]
async fn a_crash_in_a_commit_round_a_rollover_or_a_compaction_loses_nothing_acknowledged() {
    let text = |i: usize, n: usize| format!("{i}-{n}-{}", "x".repeat(250));
    // Points every round passes crash at their 25th hit: rounds before it acknowledged
    // writes, which the restart must find.
    for point in [
        "commit.before_store_sync@25",
        "commit.after_store_sync@25",
        "values.after_rollover",
        "audit.after_rollover",
        "compaction.after_copy",
        "compaction.after_retire",
        "compaction.after_remove",
        // The index's checkpoint against its write-ahead log, made every 20 ms here.
        "checkpoint.after_log_sync@5",
        "checkpoint.before_index_sync@5",
        "checkpoint.after_index_sync@5",
        // Packing a closed transcript's messages, appended one by one, into one record.
        "packing.after_value_sync@3",
        "packing.after_install@3",
        // Between a single write to the index and the record of its log position (appends
        // one by one are single writes): the restart replays that write again.
        "wal.before_position@40",
    ] {
        let dirs = Dirs::new();
        let often = if point.starts_with("checkpoint.") { "checkpoint_interval_ms = 20\n" } else { "" };
        let small = dirs.config(&format!(
            "value_segment_bytes = 4096\naudit_segment_bytes = 4096\nreclaim_interval_ms = 20\nreclaim_min_age_ms = 0\n{often}"
        ));
        let small = small.to_str().unwrap().to_owned();
        let args = vec!["--config", small.as_str()];
        // The tenant and its key exist before the crash point is armed.
        let server = Server::start_with(&dirs, Opts { args: args.clone(), ..Opts::default() });
        server.api_key("acme").await;
        server.stop().await;
        let env = vec![("CHATVAULT_FAILPOINT", point)];
        let mut server = Server::start_with(&dirs, Opts { args: args.clone(), env, ..Opts::default() });
        let mut c = server.transcripts("acme").await;
        let (mut acked, mut deleted) = (Vec::new(), Vec::new());
        for i in 0..60 {
            let texts: Vec<String> = (0..3).map(|n| text(i, n)).collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let id = format!("t{i}");
            let whole = if point.starts_with("packing.") || point.starts_with("wal.") {
                written_one_by_one_then_closed(&mut c, &id, i, &refs).await
            } else {
                let t = transcript(&id, &format!("s{}", i % 5), 1_700_000_000, &refs);
                c.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await.is_ok()
            };
            if !whole {
                break;
            }
            acked.push(i);
        }
        if point.starts_with("compaction.") {
            // Two of every three go: compaction then copies the rest out of each segment.
            for i in acked.clone().into_iter().filter(|i| i % 3 != 0) {
                let req = pb::DeleteTranscriptRequest { transcript_id: format!("t{i}") };
                // A delete the crash cut off may or may not have happened: neither list.
                acked.retain(|a| *a != i);
                if c.delete_transcript(req).await.is_err() {
                    break;
                }
                deleted.push(i);
            }
        }
        assert!(server.exited(Duration::from_secs(30)).await, "{point}: no crash:\n{}", server.log_text());
        let name = point.split('@').next().unwrap();
        assert!(server.log_text().contains(&format!("crash point {name} reached")), "{point}");
        assert!(!acked.is_empty(), "{point}: nothing was acknowledged before the crash");
        drop(server);

        let server = Server::start_with(&dirs, Opts { args: args.clone(), ..Opts::default() });
        let mut c = server.transcripts("acme").await;
        for i in &acked {
            let t =
                get(&mut c, &format!("t{i}")).await.unwrap_or_else(|e| panic!("{point}: acknowledged t{i} lost: {e}"));
            let texts: Vec<String> = t.messages.into_iter().map(|m| m.text).collect();
            assert_eq!(texts, (0..3).map(|n| text(*i, n)).collect::<Vec<_>>(), "{point}: t{i}");
        }
        for i in &deleted {
            assert_eq!(get(&mut c, &format!("t{i}")).await.unwrap_err().code(), Code::NotFound, "{point}: t{i}");
        }
        let v = server.admin().await.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
        assert!(v.intact, "{point}: {v:?}");
        server.stop().await;
    }
}
