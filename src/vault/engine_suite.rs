//! The vault's core scenarios, one suite run on every engine: sled always, PostgreSQL
//! when the tests can start one (CI always can). Put, append, get, list, pack, delete,
//! shred and export through the vault, then the same data read by a second vault on the
//! same store and keys: a restart on sled, another node on PostgreSQL.

use std::ops::ControlFlow;
use std::path::Path;

use super::testing::{self, HandClock};
use super::{AuthorRole, Engine, Message, Scope, TenantId, Transcript, Vault, VaultError, Visit};
use crate::clock::Clock;

fn msgs(from: u32, to: u32) -> Vec<Message> {
    (from..to).map(|i| Message::new(format!("m{i}"), AuthorRole::Visitor, "V", format!("text {i}"))).collect()
}

fn texts(v: &Vault, tenant: &TenantId, id: &str) -> Result<Vec<String>, VaultError> {
    Ok(v.get_transcript(tenant, id)?.messages.into_iter().map(|m| m.text).collect())
}

fn expected(from: u32, to: u32) -> Vec<String> {
    (from..to).map(|i| format!("text {i}")).collect()
}

async fn core_scenario(dir: &Path, engine: Engine) {
    let engine_name = match engine {
        Engine::Sled => "sled",
        Engine::Postgres(_) => "postgres",
    };
    let clock = HandClock::new();
    let open = |engine: Engine| testing::open(dir, clock.clone(), move |o| o.engine = engine);
    let v = open(engine.clone());
    let tenant = TenantId::parse("acme").unwrap();
    let mut t1 = Transcript::new("t1", "alice", msgs(0, 3));
    t1.started_at = Some(clock.now());
    v.put_transcript(&tenant, t1).await.unwrap();
    clock.advance_secs(1);
    let mut t2 = Transcript::new("t2", "alice", msgs(0, 100));
    t2.started_at = Some(clock.now());
    v.put_transcript(&tenant, t2).await.unwrap();
    for i in 3..70 {
        v.append_messages(&tenant, "t1", msgs(i, i + 1), Some(i)).await.unwrap();
    }
    assert_eq!(texts(&v, &tenant, "t1").unwrap(), expected(0, 70));
    assert_eq!(texts(&v, &tenant, "t2").unwrap(), expected(0, 100));
    let listed = v.list_transcripts(&tenant, "alice", 10, "").unwrap();
    let ids: Vec<_> = listed.transcripts.iter().map(|t| (t.transcript_id.as_str(), t.message_count)).collect();
    assert_eq!(ids, [("t2", 100), ("t1", 70)]);
    v.close_transcript(&tenant, "t1", None).await.unwrap();
    assert_eq!(v.pack_messages(100).unwrap().packed, 2, "t1's full group and its last");
    assert_eq!(texts(&v, &tenant, "t1").unwrap(), expected(0, 70));

    v.delete_transcript(&tenant, "t2").await.unwrap();
    assert!(matches!(v.get_transcript(&tenant, "t2"), Err(VaultError::NotFound(_))));
    v.put_transcript(&tenant, Transcript::new("t3", "bob", msgs(0, 5))).await.unwrap();
    v.shred_subject(&tenant, "alice").await.unwrap();
    assert!(matches!(v.get_transcript(&tenant, "t1"), Err(VaultError::Erased(_))));
    let mut exported = Vec::new();
    v.walk_transcripts(&tenant, Scope::Tenant, &mut |visit| {
        match visit {
            Visit::Begin(t) => exported.push(t.transcript_id.clone()),
            Visit::Message(m) => exported.push(m.text.to_owned()),
            Visit::End { .. } => {}
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    let want: Vec<String> = std::iter::once("t3".to_owned()).chain(expected(0, 5)).collect();
    assert_eq!(exported, want, "only bob's transcript is left to export");
    v.sync().unwrap();

    // A second vault on the same store and keys (after this one closed, for sled's lock).
    drop(v);
    let w = open(engine);
    assert_eq!(texts(&w, &tenant, "t3").unwrap(), expected(0, 5));
    assert!(matches!(w.get_transcript(&tenant, "t1"), Err(VaultError::Erased(_))));
    assert!(matches!(w.get_transcript(&tenant, "t2"), Err(VaultError::NotFound(_))));
    let on_sled = dir.join("data").join("db").exists();
    assert_eq!(on_sled, matches!(engine_name, "sled"), "the tree is where the engine keeps it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_scenarios_pass_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    core_scenario(dir.path(), Engine::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_scenarios_pass_on_postgres() {
    let Some(url) = crate::store::tests::postgres_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let opts = crate::store::pg::tests::fresh(&url, "core");
    core_scenario(dir.path(), Engine::Postgres(opts)).await;
}
