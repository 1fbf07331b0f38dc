//! ExportService: decrypted JSON documents per subject and per tenant, over real gRPC.

use chatvault::grpc::pb::{self, AuthorRole};
use serde_json::Value;
use tonic::Code;

use super::common::*;

/// Reads a whole export stream: the parsed document and the size of each chunk.
async fn read_export(
    stream: Result<tonic::Response<tonic::Streaming<pb::ExportChunk>>, tonic::Status>,
) -> Result<(Value, Vec<usize>), tonic::Status> {
    let mut stream = stream?.into_inner();
    let (mut doc, mut sizes) = (Vec::new(), Vec::new());
    while let Some(chunk) = stream.message().await? {
        sizes.push(chunk.data.len());
        doc.extend_from_slice(&chunk.data);
    }
    let value = serde_json::from_slice(&doc).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&doc)));
    Ok((value, sizes))
}

async fn export_subject(c: &mut Exports, subject: &str) -> Result<(Value, Vec<usize>), tonic::Status> {
    read_export(c.export_subject(pb::ExportSubjectRequest { subject_id: subject.into() }).await).await
}

async fn export_tenant(c: &mut Exports) -> Value {
    read_export(c.export_tenant(pb::ExportTenantRequest {}).await).await.expect("export tenant").0
}

fn ids(doc: &Value) -> Vec<&str> {
    doc["transcripts"].as_array().unwrap().iter().map(|t| t["transcript_id"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_subject_export_is_one_json_document_with_every_field_decrypted() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    let mut old = transcript("chat-old", "alice@example.com", 1_700_000_000, &[]);
    old.channel = "whatsapp".into();
    old.ended_at = Some(prost_types::Timestamp { seconds: 1_700_000_600, nanos: 5_000 });
    old.metadata.insert("order".into(), "A-42".into());
    old.messages = vec![
        msg("m1", AuthorRole::Visitor, "Alice", "Hi, \"quoted\"\nand a new line 🚚"),
        msg("m2", AuthorRole::Agent, "Bob (agent)", "On its way"),
        msg("m3", AuthorRole::Bot, "", ""),
        msg("m4", AuthorRole::System, "system", "transferred"),
    ];
    put(&mut c, old).await;
    put(&mut c, transcript("chat-new", "alice@example.com", 1_700_100_000, &["second chat"])).await;
    c.append_messages(pb::AppendMessagesRequest {
        transcript_id: "chat-new".into(),
        messages: vec![msg("a1", AuthorRole::Agent, "Bob", "appended")],
        expected_message_count: None,
    })
    .await
    .unwrap();
    put(&mut c, transcript("chat-bob", "bob@example.com", 1_700_000_000, &["not alice's"])).await;

    let (doc, _) = export_subject(&mut server.exports("acme").await, "alice@example.com").await.unwrap();
    assert_eq!(doc["format"], "chatvault.export.v1");
    assert_eq!((doc["scope"].as_str(), doc["tenant_id"].as_str()), (Some("subject"), Some("acme")));
    assert_eq!(
        (doc["subject_id"].as_str(), doc["subject_status"].as_str()),
        (Some("alice@example.com"), Some("active"))
    );
    assert!(doc["exported_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(ids(&doc), ["chat-new", "chat-old"], "newest started_at first, only alice's");
    assert_eq!((doc["transcript_count"].as_u64(), doc["message_count"].as_u64()), (Some(2), Some(6)));

    let old = &doc["transcripts"][1];
    assert_eq!(old["subject_id"], "alice@example.com");
    assert_eq!(old["channel"], "whatsapp");
    assert_eq!(old["started_at"], "2023-11-14T22:13:20.000000Z");
    assert_eq!(old["ended_at"], "2023-11-14T22:23:20.000005Z");
    assert_eq!(old["metadata"]["order"], "A-42");
    assert_eq!(old["message_count"], 4);
    let m = &old["messages"];
    assert_eq!(m[0]["text"], "Hi, \"quoted\"\nand a new line 🚚");
    assert_eq!(m[0]["sent_at"], "2023-11-14T22:13:20.000123Z");
    let roles: Vec<&str> = m.as_array().unwrap().iter().map(|m| m["author_role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["visitor", "agent", "bot", "system"]);
    assert_eq!((m[1]["message_id"].as_str(), m[1]["author_name"].as_str()), (Some("m2"), Some("Bob (agent)")));
    let new = &doc["transcripts"][0];
    assert_eq!(new["ended_at"], Value::Null);
    let texts: Vec<&str> = new["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["second chat", "appended"]);
}

#[tokio::test]
async fn a_large_export_arrives_in_bounded_chunks_in_order_and_a_reader_may_walk_away() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    let text = "x".repeat(1000);
    for t in 0..3 {
        let mut tr = transcript(&format!("long-{t}"), "carol", 1_700_000_000 + t, &[]);
        tr.messages = (0..150).map(|i| msg(&format!("m{i}"), AuthorRole::Visitor, "Carol", &text)).collect();
        put(&mut c, tr).await;
    }
    let mut e = server.exports("acme").await;
    let (doc, sizes) = export_subject(&mut e, "carol").await.unwrap();
    assert!(sizes.len() >= 6, "450 KB of messages in {} chunks", sizes.len());
    assert!(sizes.iter().all(|&n| n <= 64 * 1024 + 2048), "a chunk was {:?}", sizes.iter().max());
    assert_eq!(doc["message_count"], 450);
    for t in doc["transcripts"].as_array().unwrap() {
        let seq: Vec<String> =
            t["messages"].as_array().unwrap().iter().map(|m| m["message_id"].as_str().unwrap().to_owned()).collect();
        assert_eq!(seq, (0..150).map(|i| format!("m{i}")).collect::<Vec<_>>());
    }

    // A reader that takes one chunk and hangs up leaves the server serving.
    let mut stream = e.export_tenant(pb::ExportTenantRequest {}).await.unwrap().into_inner();
    assert!(!stream.message().await.unwrap().unwrap().data.is_empty());
    drop(stream);
    assert_eq!(export_tenant(&mut e).await["transcript_count"], 3);
}

#[tokio::test]
async fn a_tenant_export_holds_its_readable_transcripts_and_nothing_of_another_tenant_or_a_shredded_subject() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut acme = server.transcripts("acme").await;
    put(&mut acme, transcript("a1", "alice", 1_700_000_000, &["one"])).await;
    put(&mut acme, transcript("a2", "alice", 1_700_000_100, &["two", "three"])).await;
    put(&mut acme, transcript("b1", "bob", 1_700_000_000, &["bob's"])).await;
    let mut other = server.transcripts("other").await;
    put(&mut other, transcript("c1", "carol", 1_700_000_000, &["other tenant"])).await;
    server.subjects("acme").await.shred_subject(pb::ShredSubjectRequest { subject_id: "bob".into() }).await.unwrap();

    let doc = export_tenant(&mut server.exports("acme").await).await;
    assert_eq!((doc["scope"].as_str(), doc["tenant_id"].as_str()), (Some("tenant"), Some("acme")));
    assert!(doc.get("subject_id").is_none());
    let mut got = ids(&doc);
    got.sort();
    assert_eq!(got, ["a1", "a2"]);
    assert_eq!((doc["transcript_count"].as_u64(), doc["message_count"].as_u64()), (Some(2), Some(3)));
    assert!(!doc.to_string().contains("bob's"));

    let doc = export_tenant(&mut server.exports("other").await).await;
    assert_eq!(ids(&doc), ["c1"]);
}

#[tokio::test]
async fn an_unknown_or_shredded_subject_exports_as_empty_with_its_status_and_a_bad_id_is_refused() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    let mut e = server.exports("acme").await;
    let (doc, _) = export_subject(&mut e, "nobody").await.unwrap();
    assert_eq!((doc["subject_status"].as_str(), doc["transcript_count"].as_u64()), (Some("unknown"), Some(0)));

    put(&mut c, transcript("t1", "dora", 1_700_000_000, &["secret"])).await;
    server.subjects("acme").await.shred_subject(pb::ShredSubjectRequest { subject_id: "dora".into() }).await.unwrap();
    let (doc, _) = export_subject(&mut e, "dora").await.unwrap();
    assert_eq!((doc["subject_status"].as_str(), doc["transcript_count"].as_u64()), (Some("shredded"), Some(0)));
    assert_eq!(doc["transcripts"], Value::Array(vec![]));

    let err = export_subject(&mut e, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("subject_id"), "{}", err.message());
}

#[tokio::test]
async fn every_export_is_recorded_with_the_subject_blinded() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    put(&mut server.transcripts("acme").await, transcript("t1", "erin@example.com", 1_700_000_000, &["hi"])).await;
    let mut e = server.exports("acme").await;
    export_subject(&mut e, "erin@example.com").await.unwrap();
    export_tenant(&mut e).await;
    export_subject(&mut e, "").await.unwrap_err();

    let records = server
        .admin()
        .await
        .query_audit(pb::QueryAuditRequest {
            operations: vec!["subject.export".into(), "tenant.export".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let seen: Vec<(&str, &str)> = records.iter().map(|r| (r.operation.as_str(), r.outcome.as_str())).collect();
    assert_eq!(seen, [("subject.export", "ok"), ("tenant.export", "ok"), ("subject.export", "invalid_argument")]);
    assert_eq!(records[0].subject_blind_id.len(), 64, "the subject is recorded by its blind id");
    assert!(records.iter().all(|r| r.tenant_id == "acme"));
    assert!(!format!("{records:?}").contains("erin"), "the trail holds the raw subject id");
}

#[tokio::test]
async fn exports_page_past_one_index_scan_and_meet_a_transcript_moved_meanwhile_once() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    let text = "y".repeat(32 * 1024);
    for i in 0..300 {
        put(&mut c, transcript(&format!("p{i:03}"), "pat", 1_700_000_000 + i, &[&text])).await;
    }
    let mut e = server.exports("acme").await;
    let req = pb::ExportSubjectRequest { subject_id: "pat".into() };
    let mut stream = e.export_subject(req).await.unwrap().into_inner();
    let mut doc = Vec::new();
    // Newest first: once p298 has begun, p299 was written whole.
    while !String::from_utf8_lossy(&doc).contains("\"p298\"") {
        doc.extend(stream.message().await.unwrap().expect("more chunks").data);
    }
    // Replacing p299 with the oldest start moves its index entry behind the walk.
    put(&mut c, transcript("p299", "pat", 1_600_000_000, &["moved"])).await;
    while let Some(chunk) = stream.message().await.unwrap() {
        doc.extend(chunk.data);
    }
    let doc: Value = serde_json::from_slice(&doc).unwrap();
    let mut got = ids(&doc);
    assert_eq!(got.iter().filter(|id| **id == "p299").count(), 1, "p299 exported twice or never");
    got.sort();
    got.dedup();
    assert_eq!((got.len(), doc["transcript_count"].as_u64()), (300, Some(300)));

    let tenant = export_tenant(&mut e).await;
    assert_eq!(tenant["transcript_count"], 300, "the tenant walk pages past one scan too");
}

#[tokio::test]
async fn a_reader_that_stalls_is_given_up_on_with_deadline_exceeded_and_an_invalid_document() {
    let dirs = Dirs::new();
    let cfg = dirs.config("[work]\nexport_stall_timeout_ms = 1000\n");
    let server = Server::start_with(&dirs, Opts { args: vec!["--config", cfg.to_str().unwrap()], ..Opts::default() });
    let mut c = server.transcripts("acme").await;
    let text = "z".repeat(60 * 1024);
    for t in 0..20 {
        put(&mut c, transcript(&format!("big-{t}"), "quinn", 1_700_000_000 + t, &[text.as_str(); 8])).await;
    }
    let mut e = server.exports("acme").await;
    let req = pb::ExportSubjectRequest { subject_id: "quinn".into() };
    let mut stream = e.export_subject(req).await.unwrap().into_inner();
    let mut doc = stream.message().await.unwrap().unwrap().data;
    // ~10 MB to send, a few MB of buffers between: the server blocks, then gives up.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let status = loop {
        match stream.message().await {
            Ok(Some(chunk)) => doc.extend(chunk.data),
            Ok(None) => panic!("the stalled export ended as if whole"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(serde_json::from_slice::<Value>(&doc).is_err(), "a cut-off export parsed as JSON");
    let (whole, _) = export_subject(&mut e, "quinn").await.expect("a reader that keeps up");
    assert_eq!(whole["transcript_count"], 20);
}
