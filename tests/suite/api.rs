//! The TranscriptService and SubjectService contract, over real gRPC.

use chatvault::grpc::pb::{self, AuthorRole};
use tonic::Code;

use super::common::*;

#[tokio::test]
async fn put_then_get_round_trips_every_field() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    let mut t = transcript("chat-1", "alice@example.com", 1_700_000_000, &[]);
    t.channel = "whatsapp".into();
    t.ended_at = Some(prost_types::Timestamp { seconds: 1_700_000_600, nanos: 5_000 });
    t.metadata.insert("order".into(), "A-42".into());
    t.messages = vec![
        msg("m1", AuthorRole::Visitor, "Alice", "Hi, my parcel is late"),
        msg("m2", AuthorRole::Agent, "Bob (agent)", "Let me check 🚚"),
        msg("m3", AuthorRole::Bot, "", ""),
        msg("m4", AuthorRole::System, "system", "transferred"),
    ];
    assert!(!put(&mut c, t.clone()).await.replaced);
    let got = get(&mut c, "chat-1").await.unwrap();
    let mut expected = t;
    expected.message_count = 4;
    assert_eq!(got, expected);
}

#[tokio::test]
async fn append_adds_in_order_and_a_closed_transcript_takes_no_more() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("live", "bob", 1_700_000_000, &["one"])).await;
    for (i, text) in ["two", "three"].iter().enumerate() {
        let r = c
            .append_messages(pb::AppendMessagesRequest {
                transcript_id: "live".into(),
                messages: vec![msg(&format!("a{i}"), AuthorRole::Agent, "Agent", text)],
                expected_message_count: None,
            })
            .await
            .unwrap();
        assert_eq!(r.into_inner().message_count, i as u32 + 2);
    }
    let texts: Vec<String> = get(&mut c, "live").await.unwrap().messages.into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["one", "two", "three"]);

    let closed = c
        .close_transcript(pb::CloseTranscriptRequest { transcript_id: "live".into(), ended_at: None })
        .await
        .unwrap()
        .into_inner();
    assert!(closed.ended_at.is_some());
    let again = c.close_transcript(pb::CloseTranscriptRequest { transcript_id: "live".into(), ended_at: None }).await;
    assert_eq!(again.unwrap_err().code(), Code::FailedPrecondition);
    let late = c
        .append_messages(pb::AppendMessagesRequest {
            transcript_id: "live".into(),
            messages: vec![msg("late", AuthorRole::Visitor, "V", "too late")],
            expected_message_count: None,
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert!(late.message().contains("closed"), "{}", late.message());
    assert_eq!(get(&mut c, "live").await.unwrap().message_count, 3);
}

#[tokio::test]
async fn append_with_a_stale_expected_count_is_aborted_and_writes_nothing() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t", "s", 1_700_000_000, &["a", "b"])).await;
    let append = |expected| pb::AppendMessagesRequest {
        transcript_id: "t".into(),
        messages: vec![msg("x", AuthorRole::Visitor, "V", "retry")],
        expected_message_count: Some(expected),
    };
    assert_eq!(c.append_messages(append(2)).await.unwrap().into_inner().message_count, 3);
    let retry = c.append_messages(append(2)).await.unwrap_err();
    assert_eq!(retry.code(), Code::Aborted);
    assert_eq!(get(&mut c, "t").await.unwrap().message_count, 3);
}

#[tokio::test]
async fn put_with_an_existing_id_replaces_the_transcript() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("t", "s", 1_700_000_000, &["old", "older"])).await;
    assert!(put(&mut c, transcript("t", "s", 1_700_000_100, &["new"])).await.replaced);
    let got = get(&mut c, "t").await.unwrap();
    assert_eq!(got.messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["new"]);
    let list = c
        .list_transcripts(pb::ListTranscriptsRequest { subject_id: "s".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.transcripts.len(), 1);
    let mut s = server.subjects("acme").await;
    let info = s.get_subject(pb::GetSubjectRequest { subject_id: "s".into() }).await.unwrap().into_inner();
    assert_eq!(info.transcript_count, 1);

    // Moving a transcript to another subject moves its count too.
    put(&mut c, transcript("t", "s2", 1_700_000_100, &["moved"])).await;
    let count = |id: &str| pb::GetSubjectRequest { subject_id: id.into() };
    assert_eq!(s.get_subject(count("s")).await.unwrap().into_inner().transcript_count, 0);
    assert_eq!(s.get_subject(count("s2")).await.unwrap().into_inner().transcript_count, 1);
}

#[tokio::test]
async fn list_is_newest_first_and_pages_through_everything() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    for i in 0..5 {
        put(&mut c, transcript(&format!("t{i}"), "carol", 1_700_000_000 + i, &["hello"])).await;
    }
    put(&mut c, transcript("other", "dave", 1_800_000_000, &["x"])).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_transcripts(pb::ListTranscriptsRequest {
                subject_id: "carol".into(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.transcripts.len() <= 2);
        for t in &page.transcripts {
            assert!(t.messages.is_empty());
            assert_eq!(t.message_count, 1);
        }
        seen.extend(page.transcripts.into_iter().map(|t| t.transcript_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["t4", "t3", "t2", "t1", "t0"]);
    let bad = c
        .list_transcripts(pb::ListTranscriptsRequest {
            subject_id: "carol".into(),
            page_size: 2,
            page_token: "zz".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("page_token"));
}

#[tokio::test]
async fn delete_removes_the_transcript_and_its_count() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("gone", "erin", 1_700_000_000, &["bye"])).await;
    put(&mut c, transcript("kept", "erin", 1_700_000_001, &["hi"])).await;
    c.delete_transcript(pb::DeleteTranscriptRequest { transcript_id: "gone".into() }).await.unwrap();
    assert_eq!(get(&mut c, "gone").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(&mut c, "kept").await.unwrap().messages[0].text, "hi");
    let again = c.delete_transcript(pb::DeleteTranscriptRequest { transcript_id: "gone".into() }).await;
    assert_eq!(again.unwrap_err().code(), Code::NotFound);
    let mut s = server.subjects("acme").await;
    let info = s.get_subject(pb::GetSubjectRequest { subject_id: "erin".into() }).await.unwrap().into_inner();
    assert_eq!(info.transcript_count, 1);
}

#[tokio::test]
async fn bad_input_names_the_field_and_writes_nothing() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    let base = || transcript("bad", "frank", 1_700_000_000, &["ok"]);
    let mut cases: Vec<(pb::Transcript, &str)> = Vec::new();
    let mut t = base();
    t.transcript_id.clear();
    cases.push((t, "transcript.transcript_id"));
    let mut t = base();
    t.subject_id = "x".repeat(257);
    cases.push((t, "transcript.subject_id"));
    let mut t = base();
    t.messages[0].text = "y".repeat(64 * 1024 + 1);
    cases.push((t, "transcript.messages[0].text"));
    let mut t = base();
    t.messages[0].author_role = 99;
    cases.push((t, "transcript.messages[0].author_role"));
    let mut t = base();
    t.messages[0].author_role = 0;
    cases.push((t, "transcript.messages[0].author_role"));
    let mut t = base();
    t.messages[0].sent_at = Some(prost_types::Timestamp { seconds: 1, nanos: -5 });
    cases.push((t, "transcript.messages[0].sent_at"));
    let mut t = base();
    t.started_at = Some(prost_types::Timestamp { seconds: -10, nanos: 0 });
    cases.push((t, "transcript.started_at"));
    let mut t = base();
    t.ended_at = Some(prost_types::Timestamp { seconds: 1_600_000_000, nanos: 0 });
    cases.push((t, "transcript.ended_at"));
    let mut t = base();
    t.messages[0].message_id.clear();
    cases.push((t, "transcript.messages[0].message_id"));
    for (t, field) in cases {
        let err = c.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {}", err.message());
        assert!(err.message().starts_with(field), "expected {field} in {:?}", err.message());
        assert_eq!(get(&mut c, "bad").await.unwrap_err().code(), Code::NotFound, "{field} wrote something");
    }
    let missing = c.put_transcript(pb::PutTranscriptRequest { transcript: None }).await.unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    let none = c
        .append_messages(pb::AppendMessagesRequest {
            transcript_id: "nope".into(),
            messages: vec![msg("m", AuthorRole::Visitor, "V", "t")],
            expected_message_count: None,
        })
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::NotFound);
    // A half-bad append writes none of its messages.
    put(&mut c, base()).await;
    let half = c
        .append_messages(pb::AppendMessagesRequest {
            transcript_id: "bad".into(),
            messages: vec![msg("ok", AuthorRole::Visitor, "V", "fine"), msg("", AuthorRole::Visitor, "V", "no id")],
            expected_message_count: None,
        })
        .await
        .unwrap_err();
    assert_eq!(half.code(), Code::InvalidArgument);
    assert!(half.message().starts_with("messages[1].message_id"), "{}", half.message());
    assert_eq!(get(&mut c, "bad").await.unwrap().message_count, 1);
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut health = HealthClient::new(server.channel().await);
    let status = health
        .check(HealthCheckRequest { service: "chatvault.v1.TranscriptService".into() })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("no service list") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["chatvault.v1.TranscriptService", "chatvault.v1.SubjectService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
}

#[tokio::test]
async fn oversized_requests_are_refused_by_the_transport_limit() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    // 200 messages of 60 KiB: each within the text limit, 12 MB together over the 8 MiB cap.
    let mut t = transcript("huge", "s", 1_700_000_000, &[]);
    let text = "z".repeat(60 * 1024);
    t.messages = (0..200).map(|i| msg(&format!("m{i}"), AuthorRole::Visitor, "V", &text)).collect();
    let err = c.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());
    assert!(err.message().contains("too large"), "{}", err.message());
    assert_eq!(get(&mut c, "huge").await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn a_transcript_over_the_response_cap_is_refused_with_a_clear_error() {
    let dirs = Dirs::new();
    let config = dirs.tmp.path().join("small.toml");
    std::fs::write(&config, "[limits]\nmax_response_bytes = 2000\n").unwrap();
    let server =
        Server::start_with(&dirs, Opts { args: vec!["--config", config.to_str().unwrap()], ..Opts::default() });
    let mut c = server.transcripts("acme").await;
    let text = "w".repeat(100);
    let texts: Vec<&str> = (0..30).map(|_| text.as_str()).collect();
    put(&mut c, transcript("big", "s", 1_700_000_000, &texts)).await;
    let err = get(&mut c, "big").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("max_response_bytes"), "{}", err.message());
    put(&mut c, transcript("small", "s", 1_700_000_000, &["fits"])).await;
    assert_eq!(get(&mut c, "small").await.unwrap().message_count, 1);
}
