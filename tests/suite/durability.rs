//! An acknowledged write survives `kill -9`, and so does its audit record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatvault::grpc::pb::{self, AuthorRole};

use super::common::*;

#[tokio::test]
async fn every_acknowledged_write_and_its_audit_record_survive_sigkill_under_load() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    // transcript id -> messages acknowledged (put counts as 1).
    let acked: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = server.transcripts("acme").await;
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("w{w}-t{i}");
                let t = transcript(&id, &format!("subject-{w}"), 1_700_000_000 + i, &["opening"]);
                if c.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await.is_err() {
                    return;
                }
                acked.lock().unwrap().insert(id.clone(), 1);
                for n in 1..4u32 {
                    let req = pb::AppendMessagesRequest {
                        transcript_id: id.clone(),
                        messages: vec![msg(&format!("m{n}"), AuthorRole::Agent, "agent", "reply")],
                        expected_message_count: None,
                    };
                    match c.append_messages(req).await {
                        Ok(r) => {
                            acked.lock().unwrap().insert(id.clone(), r.into_inner().message_count);
                        }
                        Err(_) => return,
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let snapshot_before_kill = acked.lock().unwrap().len();
    server.kill9();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(snapshot_before_kill > 20, "the load generated too few writes ({snapshot_before_kill}) to prove anything");

    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    for (id, count) in &acked {
        let t = get(&mut c, id).await.unwrap_or_else(|e| panic!("acknowledged {id} lost: {e}"));
        assert!(t.message_count >= *count, "{id}: {} messages, {count} acknowledged", t.message_count);
        assert_eq!(t.messages.len() as u32, t.message_count);
    }

    // Every acknowledged change was recorded before its reply: at least as many records
    // of successful puts and appends as acknowledgements, and the chain is intact.
    let mut admin = server.admin().await;
    let mut recorded: HashMap<String, u32> = HashMap::new();
    let mut token = String::new();
    loop {
        let page = admin
            .query_audit(pb::QueryAuditRequest {
                tenant_id: "acme".into(),
                operations: vec!["transcript.put".into(), "transcript.append".into()],
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for r in page.records.iter().filter(|r| r.outcome == "ok") {
            *recorded.entry(r.operation.clone()).or_default() += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let puts = acked.len() as u32;
    let appends: u32 = acked.values().map(|n| n - 1).sum();
    assert!(recorded.get("transcript.put").copied().unwrap_or(0) >= puts, "{recorded:?} vs {puts} puts");
    assert!(recorded.get("transcript.append").copied().unwrap_or(0) >= appends, "{recorded:?} vs {appends} appends");
    let v = admin.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
    assert!(v.intact, "{v:?}");
}
