//! Tenancy: API keys, isolation, allowlists, lockout, the admin API and its audit trail.

use std::time::Duration;

use chatvault::grpc::Bearer;
use chatvault::grpc::pb;
use chatvault::grpc::pb::transcript_service_client::TranscriptServiceClient;
use tonic::Code;
use tonic::metadata::MetadataValue;

use super::common::*;

/// A GetTranscript with exactly these headers, from `local`.
async fn get_with(server: &Server, local: &str, headers: &[(&'static str, &str)]) -> Result<(), tonic::Status> {
    let mut c = TranscriptServiceClient::new(server.channel_from(local).await);
    let mut req = tonic::Request::new(pb::GetTranscriptRequest { transcript_id: "nothing-here".into() });
    for (k, v) in headers {
        req.metadata_mut().insert(*k, MetadataValue::try_from(*v).unwrap());
    }
    match c.get_transcript(req).await {
        Ok(_) => Ok(()),
        // Authenticated and admitted: the transcript simply does not exist.
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(s),
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

async fn create_tenant(admin: &mut AdminClient, id: &str, allow: &[&str]) -> String {
    let req = pb::CreateTenantRequest {
        region: "eu".into(),
        tenant_id: id.into(),
        allowlist: allow.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    admin.create_tenant(req).await.expect("create tenant");
    admin.issue_api_key(pb::IssueApiKeyRequest { tenant_id: id.into() }).await.unwrap().into_inner().api_key
}

async fn audit(admin: &mut AdminClient, q: pb::QueryAuditRequest) -> Vec<pb::AuditRecord> {
    admin.query_audit(q).await.expect("query audit").into_inner().records
}

#[tokio::test]
async fn tenants_never_see_each_others_data_whatever_the_request_claims() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut a = server.transcripts("tenant-a").await;
    let mut b = server.transcripts("tenant-b").await;
    put(&mut a, transcript("shared-id", "same-subject", 1_700_000_000, &["a's secret"])).await;
    let missing = get(&mut b, "never-written").await.unwrap_err();
    let foreign = get(&mut b, "shared-id").await.unwrap_err();
    assert_eq!((foreign.code(), foreign.message()), (missing.code(), missing.message()));
    // The header that named the tenant before API keys carries no weight now.
    let mut req = tonic::Request::new(pb::GetTranscriptRequest { transcript_id: "shared-id".into() });
    req.metadata_mut().insert("x-tenant-id", MetadataValue::from_static("tenant-a"));
    assert_eq!(b.get_transcript(req).await.unwrap_err().code(), Code::NotFound);
    for r in [
        b.append_messages(pb::AppendMessagesRequest {
            transcript_id: "shared-id".into(),
            messages: vec![msg("x", pb::AuthorRole::Agent, "B", "hi")],
            expected_message_count: None,
        })
        .await
        .map(|_| ()),
        b.close_transcript(pb::CloseTranscriptRequest { transcript_id: "shared-id".into(), ended_at: None })
            .await
            .map(|_| ()),
        b.delete_transcript(pb::DeleteTranscriptRequest { transcript_id: "shared-id".into() }).await.map(|_| ()),
    ] {
        let e = r.unwrap_err();
        assert_eq!((e.code(), e.message()), (missing.code(), missing.message()));
    }
    let list = b
        .list_transcripts(pb::ListTranscriptsRequest { subject_id: "same-subject".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(list.transcripts.is_empty());
    let mut sb = server.subjects("tenant-b").await;
    let info = sb.get_subject(pb::GetSubjectRequest { subject_id: "same-subject".into() }).await.unwrap();
    assert_eq!(info.into_inner().status(), pb::SubjectStatus::Unknown);
    let receipt = sb.shred_subject(pb::ShredSubjectRequest { subject_id: "same-subject".into() }).await.unwrap();
    assert_eq!(receipt.into_inner().receipt.unwrap().transcripts_shredded, 0);
    assert_eq!(get(&mut a, "shared-id").await.unwrap().messages[0].text, "a's secret");
    // The same id under B is B's own transcript, independent of A's.
    put(&mut b, transcript("shared-id", "same-subject", 1_700_000_000, &["b's own"])).await;
    assert_eq!(get(&mut a, "shared-id").await.unwrap().messages[0].text, "a's secret");
    assert_eq!(get(&mut b, "shared-id").await.unwrap().messages[0].text, "b's own");
}

#[tokio::test]
async fn each_bad_credential_gets_its_own_error_without_revealing_other_keys() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let key = server.api_key("acme").await;
    let ip = "127.0.0.1";
    let err = |r: Result<(), tonic::Status>| {
        let s = r.unwrap_err();
        (s.code(), s.message().to_owned())
    };
    let (code, m) = err(get_with(&server, ip, &[]).await);
    assert_eq!(code, Code::Unauthenticated);
    assert!(m.contains("missing credentials"), "{m}");
    for bad in ["Basic dXNlcjpwdw==", "Bearer", "Bearer not-a-key", "Bearer cvk_XYZ_123"] {
        let (code, m) = err(get_with(&server, ip, &[("authorization", bad)]).await);
        assert_eq!(code, Code::Unauthenticated, "{bad}");
        assert!(m.contains("malformed"), "{bad}: {m}");
    }
    // A real key id with a wrong secret looks exactly like a key id nobody has.
    let (_, secret) = key.rsplit_once('_').unwrap();
    let wrong_secret = key.replace(secret, &"0".repeat(64));
    let unknown_id = format!("cvk_0000000000000000_{secret}");
    let a = err(get_with(&server, ip, &[("authorization", &bearer(&wrong_secret))]).await);
    let b = err(get_with(&server, ip, &[("authorization", &bearer(&unknown_id))]).await);
    assert_eq!(a, b);
    assert_eq!(a, (Code::Unauthenticated, "API key not recognised".to_string()));
    get_with(&server, ip, &[("authorization", &bearer(&key))]).await.expect("the real key works");
    // No secret in the log, ever.
    assert!(!server.log_text().contains(secret));
}

#[tokio::test]
async fn revocation_and_suspension_apply_to_the_next_request_and_keys_rotate_without_downtime() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut admin = server.admin().await;
    let old = create_tenant(&mut admin, "acme", &["127.0.0.0/8"]).await;
    let new = admin.issue_api_key(pb::IssueApiKeyRequest { tenant_id: "acme".into() }).await.unwrap().into_inner();
    let ip = "127.0.0.1";
    // Both keys live at once: backends switch over one by one.
    get_with(&server, ip, &[("authorization", &bearer(&old))]).await.unwrap();
    get_with(&server, ip, &[("authorization", &bearer(&new.api_key))]).await.unwrap();
    let keys = admin.list_api_keys(pb::ListApiKeysRequest { tenant_id: "acme".into() }).await.unwrap().into_inner();
    assert_eq!(keys.keys.len(), 2);
    assert!(keys.keys.iter().all(|k| k.key_id.len() == 16 && k.revoked_at.is_none()));
    let old_id = old.split('_').nth(2).unwrap();
    admin.revoke_api_key(pb::RevokeApiKeyRequest { tenant_id: "acme".into(), key_id: old_id.into() }).await.unwrap();
    // The old key was verified (and cached) a moment ago; it is refused all the same.
    let s = get_with(&server, ip, &[("authorization", &bearer(&old))]).await.unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::Unauthenticated, "API key has been revoked"));
    get_with(&server, ip, &[("authorization", &bearer(&new.api_key))]).await.unwrap();

    admin.suspend_tenant(pb::SuspendTenantRequest { tenant_id: "acme".into() }).await.unwrap();
    let s = get_with(&server, ip, &[("authorization", &bearer(&new.api_key))]).await.unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::PermissionDenied, "tenant is suspended"));
    admin.resume_tenant(pb::ResumeTenantRequest { tenant_id: "acme".into() }).await.unwrap();
    get_with(&server, ip, &[("authorization", &bearer(&new.api_key))]).await.unwrap();

    // Keys, revocations and settings survive a restart.
    server.stop().await;
    let server = Server::start(&dirs);
    get_with(&server, ip, &[("authorization", &bearer(&new.api_key))]).await.unwrap();
    let s = get_with(&server, ip, &[("authorization", &bearer(&old))]).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn the_allowlist_is_checked_against_the_real_peer_address() {
    let dirs = Dirs::new();
    let cfg = dirs.config("[auth]\ntrusted_proxies = [\"127.0.0.4/32\"]\n");
    let server = Server::start_with(&dirs, Opts { args: vec!["--config", cfg.to_str().unwrap()], ..Opts::default() });
    let mut admin = server.admin().await;
    let key = create_tenant(&mut admin, "acme", &["127.0.0.2/32", "2001:db8::/32"]).await;
    let auth = bearer(&key);
    get_with(&server, "127.0.0.2", &[("authorization", &auth)]).await.expect("allowed address");
    let s = get_with(&server, "127.0.0.3", &[("authorization", &auth)]).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("127.0.0.3 is not on this tenant's allowlist"), "{}", s.message());
    // A forged x-forwarded-for from a peer that is not a trusted proxy is ignored, and said so.
    let s = get_with(&server, "127.0.0.3", &[("authorization", &auth), ("x-forwarded-for", "127.0.0.2")])
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("x-forwarded-for ignored"), "{}", s.message());
    // From the trusted proxy, the forwarded address is the one checked.
    get_with(&server, "127.0.0.4", &[("authorization", &auth), ("x-forwarded-for", "127.0.0.2")])
        .await
        .expect("forwarded from an allowed client");
    let s = get_with(&server, "127.0.0.4", &[("authorization", &auth), ("x-forwarded-for", "127.0.0.9")])
        .await
        .unwrap_err();
    assert!(s.message().contains("127.0.0.9"), "{}", s.message());
    let s = get_with(&server, "127.0.0.4", &[("authorization", &auth), ("x-forwarded-for", "not-an-ip")])
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);

    // An empty allowlist denies everyone (the default policy).
    admin.set_allowlist(pb::SetAllowlistRequest { tenant_id: "acme".into(), allowlist: vec![] }).await.unwrap();
    let s = get_with(&server, "127.0.0.2", &[("authorization", &auth)]).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    // Malformed networks are refused, naming the entry, and change nothing.
    let bad = admin
        .set_allowlist(pb::SetAllowlistRequest {
            tenant_id: "acme".into(),
            allowlist: vec!["127.0.0.2/32".into(), "10.0.0.1/8".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("allowlist") && bad.message().contains("10.0.0.0/8"), "{}", bad.message());
    let t = admin.get_tenant(pb::GetTenantRequest { tenant_id: "acme".into() }).await.unwrap().into_inner();
    assert!(t.allowlist.is_empty());
}

#[tokio::test]
async fn repeated_failures_lock_out_the_address_but_not_verified_clients() {
    let dirs = Dirs::new();
    let cfg = dirs.config("[auth.lockout]\nmax_failures = 3\nwindow_secs = 60\nbackoff_secs = 30\n");
    let server = Server::start_with(&dirs, Opts { args: vec!["--config", cfg.to_str().unwrap()], ..Opts::default() });
    let mut admin = server.admin().await;
    let key = create_tenant(&mut admin, "acme", &["127.0.0.0/8"]).await;
    let other = admin.issue_api_key(pb::IssueApiKeyRequest { tenant_id: "acme".into() }).await.unwrap();
    let other = other.into_inner().api_key;
    let attacker = "127.0.0.5";
    // A client that verified its key before the attack keeps working from that address.
    get_with(&server, attacker, &[("authorization", &bearer(&key))]).await.unwrap();
    let guess = format!("cvk_0123456789abcdef_{}", "f".repeat(64));
    for _ in 0..3 {
        let s = get_with(&server, attacker, &[("authorization", &bearer(&guess))]).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
    }
    let s = get_with(&server, attacker, &[("authorization", &bearer(&guess))]).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("retry in"), "{}", s.message());
    use tonic_types::StatusExt;
    let retry = s.get_details_retry_info().expect("retry info");
    assert!(retry.retry_delay.is_some_and(|d| d > Duration::from_secs(20)));
    // Even a valid key not yet verified is refused from the locked address...
    let s = get_with(&server, attacker, &[("authorization", &bearer(&other))]).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    // Junk from the locked address is refused before anything else, and only counted.
    for _ in 0..5 {
        let s = get_with(&server, attacker, &[("authorization", "Bearer junk")]).await.unwrap_err();
        assert_eq!(s.code(), Code::ResourceExhausted);
    }
    // ...but not the one verified before, and not from another address.
    get_with(&server, attacker, &[("authorization", &bearer(&key))]).await.unwrap();
    get_with(&server, "127.0.0.6", &[("authorization", &bearer(&other))]).await.unwrap();

    let lockouts =
        audit(&mut admin, pb::QueryAuditRequest { operations: vec!["auth.lockout".into()], ..Default::default() })
            .await;
    // Both the guessed key id and the address were locked.
    let locked: Vec<(&str, &str)> = lockouts.iter().map(|r| (r.key_id.as_str(), r.source_address.as_str())).collect();
    assert_eq!(locked, [("0123456789abcdef", attacker), ("", attacker)]);
    // One record per source and outcome as it starts; the rest counted for later.
    let failures =
        audit(&mut admin, pb::QueryAuditRequest { operations: vec!["auth.failed".into()], ..Default::default() }).await;
    let seen: Vec<(&str, &str, u32)> =
        failures.iter().map(|r| (r.outcome.as_str(), r.source_address.as_str(), r.count)).collect();
    assert_eq!(seen, [("unauthenticated", attacker, 1), ("locked_out", attacker, 1)]);
    // The counts are written when the window closes, or at shutdown at the latest.
    server.stop().await;
    let server = Server::start(&dirs);
    let mut admin = server.admin().await;
    let repeated = audit(
        &mut admin,
        pb::QueryAuditRequest { operations: vec!["auth.failed.repeated".into()], ..Default::default() },
    )
    .await;
    let mut seen: Vec<(&str, &str, u32)> =
        repeated.iter().map(|r| (r.outcome.as_str(), r.source_address.as_str(), r.count)).collect();
    seen.sort();
    assert_eq!(seen, [("locked_out", attacker, 6), ("unauthenticated", attacker, 2)]);
}

#[tokio::test]
async fn the_admin_api_needs_the_operator_token_and_refusals_are_audited() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let ch = tonic::transport::Channel::from_shared(server.admin_url.clone()).unwrap().connect().await.unwrap();
    let mut bare = pb::admin_service_client::AdminServiceClient::new(ch.clone());
    let s = bare.list_tenants(pb::ListTenantsRequest::default()).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let mut wrong = pb::admin_service_client::AdminServiceClient::with_interceptor(
        ch,
        Bearer::new("not-the-operator-token-0123456789abcdef").unwrap(),
    );
    assert_eq!(wrong.list_tenants(pb::ListTenantsRequest::default()).await.unwrap_err().code(), Code::Unauthenticated);
    // A tenant's API key is no operator token.
    let key = server.api_key("acme").await;
    let mut tenant_as_admin = pb::admin_service_client::AdminServiceClient::with_interceptor(
        tonic::transport::Channel::from_shared(server.admin_url.clone()).unwrap().connect().await.unwrap(),
        Bearer::new(&key).unwrap(),
    );
    assert_eq!(
        tenant_as_admin.list_tenants(pb::ListTenantsRequest::default()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // The data listener does not serve the admin API at all.
    let mut on_data = pb::admin_service_client::AdminServiceClient::with_interceptor(
        server.channel().await,
        Bearer::new(OPERATOR_TOKEN).unwrap(),
    );
    assert_eq!(on_data.list_tenants(pb::ListTenantsRequest::default()).await.unwrap_err().code(), Code::Unimplemented);

    let mut admin = server.admin().await;
    // Three refusals from one address: one record, and a count of the other two.
    let denied =
        audit(&mut admin, pb::QueryAuditRequest { operations: vec!["admin.denied".into()], ..Default::default() })
            .await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    // Bad admin input: named fields, no change.
    let e = admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "has space".into(),
            region: "eu".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("tenant_id"), "{}", e.message());
    let e = admin
        .create_tenant(pb::CreateTenantRequest { tenant_id: "acme".into(), region: "eu".into(), ..Default::default() })
        .await;
    assert_eq!(e.unwrap_err().code(), Code::AlreadyExists);
    let e = admin
        .revoke_api_key(pb::RevokeApiKeyRequest { tenant_id: "acme".into(), key_id: "zz".into() })
        .await
        .unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("key_id"), "{e:?}");
    let e = admin.get_tenant(pb::GetTenantRequest { tenant_id: "nobody".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = admin
        .query_audit(pb::QueryAuditRequest { operations: vec!["transcript.steal".into()], ..Default::default() })
        .await
        .unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("operations"), "{e:?}");
    server.stop().await;
    let server = Server::start(&dirs);
    let mut admin = server.admin().await;
    let repeated = audit(
        &mut admin,
        pb::QueryAuditRequest { operations: vec!["admin.denied.repeated".into()], ..Default::default() },
    )
    .await;
    let counts: Vec<(&str, u32)> = repeated.iter().map(|r| (r.outcome.as_str(), r.count)).collect();
    assert_eq!(counts, [("unauthenticated", 2)]);
}

#[tokio::test]
async fn the_audit_trail_answers_which_subjects_a_key_touched_without_holding_their_ids() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut admin = server.admin().await;
    let mut a = server.transcripts("acme").await;
    let before = prost_types::Timestamp::from(std::time::SystemTime::now());
    put(&mut a, transcript("chat-1", "alice@example.com", 1_700_000_000, &["hello"])).await;
    put(&mut a, transcript("chat-2", "bob@example.com", 1_700_000_000, &["hi"])).await;
    get(&mut a, "chat-1").await.unwrap();
    assert!(get(&mut a, "chat-404").await.is_err());
    let key = server.api_key("acme").await;
    let key_id = key.split('_').nth(2).unwrap().to_owned();

    let touched = audit(
        &mut admin,
        pb::QueryAuditRequest {
            tenant_id: "acme".into(),
            key_id: key_id.clone(),
            start_time: Some(before),
            ..Default::default()
        },
    )
    .await;
    let ops: Vec<(&str, &str)> = touched.iter().map(|r| (r.operation.as_str(), r.outcome.as_str())).collect();
    assert_eq!(
        ops,
        [("transcript.put", "ok"), ("transcript.put", "ok"), ("transcript.get", "ok"), ("transcript.get", "not_found")]
    );
    let subjects: std::collections::BTreeSet<&str> =
        touched.iter().map(|r| r.subject_blind_id.as_str()).filter(|s| !s.is_empty()).collect();
    assert_eq!(subjects.len(), 2);
    assert!(touched.iter().all(|r| r.source_address == "127.0.0.1" && r.key_id == key_id));
    // Who touched alice: the operator asks with her raw id; the server blinds it.
    let alice = audit(
        &mut admin,
        pb::QueryAuditRequest {
            tenant_id: "acme".into(),
            subject_id: "alice@example.com".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(alice.len(), 2, "put and get of chat-1");
    assert_eq!(alice[0].transcript_blind_id, alice[1].transcript_blind_id);
    // A time range that ends before the calls finds none of them.
    let none = audit(
        &mut admin,
        pb::QueryAuditRequest { tenant_id: "acme".into(), end_time: Some(before), ..Default::default() },
    )
    .await;
    assert!(none.iter().all(|r| r.operation.starts_with("admin.")), "{none:?}");
    // Paging hands out every record once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .query_audit(pb::QueryAuditRequest { page_size: 2, page_token: token.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.records.iter().map(|r| r.sequence));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, (1..=seen.len() as u64).collect::<Vec<_>>());
    let v = admin.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
    // The last page's query is itself recorded, after what it read.
    assert!(v.intact && v.records_checked == seen.len() as u64 + 1, "{v:?}");
}

#[tokio::test]
async fn a_tampered_audit_record_is_found_by_verify() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut a = server.transcripts("acme").await;
    put(&mut a, transcript("chat-1", "alice", 1_700_000_000, &["hello"])).await;
    get(&mut a, "chat-1").await.unwrap();
    server.stop().await;
    {
        // Rewrite the outcome of record 3 (the get) by hand, as an insider with disk access
        // could, fixing the frame's CRC too: only the MAC can tell.
        let segment = std::fs::read_dir(dirs.data().join("audit")).unwrap().next().unwrap().unwrap().path();
        let mut bytes = std::fs::read(&segment).unwrap();
        let mut at = 48; // magic, first sequence number, previous MAC
        let frame_len = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        for _ in 1..3 {
            at += 8 + frame_len(&bytes, at);
        }
        let len = frame_len(&bytes, at);
        let payload = &mut bytes[at + 8..at + 8 + len];
        let outcome = payload.len() - 32 - 30;
        payload[outcome] ^= 0x01;
        let crc = crc32fast::hash(payload).to_le_bytes();
        bytes[at + 4..at + 8].copy_from_slice(&crc);
        std::fs::write(&segment, bytes).unwrap();
    }
    let server = Server::start(&dirs);
    let v = server.admin().await.verify_audit(pb::VerifyAuditRequest::default()).await.unwrap().into_inner();
    assert!(!v.intact);
    assert_eq!(v.first_bad_sequence, 3, "{v:?}");
}

#[tokio::test]
async fn deleting_a_tenant_shreds_its_data_and_retires_its_id_and_keys() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let mut doomed = server.transcripts("doomed").await;
    let mut kept = server.transcripts("kept").await;
    for i in 0..5 {
        put(&mut doomed, transcript(&format!("c{i}"), &format!("s{i}"), 1_700_000_000, &["bye"])).await;
    }
    put(&mut kept, transcript("c0", "s0", 1_700_000_000, &["stay"])).await;
    let mut admin = server.admin().await;
    let r = admin.delete_tenant(pb::DeleteTenantRequest { tenant_id: "doomed".into() }).await.unwrap().into_inner();
    assert_eq!(r.subjects_shredded, 5);
    let s = get(&mut doomed, "c0").await.unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::Unauthenticated, "API key not recognised"));
    assert_eq!(get(&mut kept, "c0").await.unwrap().messages[0].text, "stay");
    let again = admin.create_tenant(pb::CreateTenantRequest {
        tenant_id: "doomed".into(),
        region: "eu".into(),
        ..Default::default()
    });
    assert_eq!(again.await.unwrap_err().code(), Code::AlreadyExists);
    let listed = admin.list_tenants(pb::ListTenantsRequest::default()).await.unwrap().into_inner().tenants;
    assert_eq!(listed.iter().map(|t| t.tenant_id.as_str()).collect::<Vec<_>>(), ["kept"]);
    server.stop().await;
    // No key of the tenant is left in the store: its blind-index key and subject keys are gone.
    let (_db, tree) = raw_tree(&dirs);
    let mut tenant_key = vec![0x01, 1, 6];
    tenant_key.extend_from_slice(b"doomed");
    let mut subject_keys = vec![0x01, 2, 6];
    subject_keys.extend_from_slice(b"doomed");
    assert!(tree.get(&tenant_key).unwrap().is_none());
    assert_eq!(tree.scan_prefix(&subject_keys).count(), 0);
    let mut kept_keys = vec![0x01, 2, 4];
    kept_keys.extend_from_slice(b"kept");
    assert_eq!(tree.scan_prefix(&kept_keys).count(), 1);
}
