//! An acknowledged write survives `kill -9`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatvault::grpc::pb::{self, AuthorRole};

use super::common::*;

#[tokio::test]
async fn every_acknowledged_write_survives_sigkill_under_load() {
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
}
