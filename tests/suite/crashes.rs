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
