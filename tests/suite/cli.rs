//! The README's commands work against a running server: the operator's `admin` commands,
//! then the client commands with the key they issued.

use std::process::Command;

use super::common::*;

/// Runs `chatvault ARGS` with `env`; returns (success, stdout, stderr).
fn run(env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatvault"));
    cmd.args(args).env_remove("CHATVAULT_API_KEY").env_remove("CHATVAULT_OPERATOR_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run chatvault");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn an_operator_creates_a_tenant_and_its_backend_stores_reads_and_shreds() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let op = [("CHATVAULT_ADMIN_SERVER", server.admin_url.as_str()), ("CHATVAULT_OPERATOR_TOKEN", OPERATOR_TOKEN)];
    let (ok, out, err) = run(
        &op,
        &["admin", "tenant", "create", "--region", "eu", "demo", "--name", "Demo Ltd", "--allow", "127.0.0.1"],
    );
    assert!(ok && out.contains("127.0.0.1/32"), "{out}{err}");
    let (ok, out, err) = run(&op, &["admin", "key", "issue", "demo"]);
    assert!(ok, "{err}");
    let key = json(&out)["api_key"].as_str().unwrap().to_owned();
    let (_, out, _) = run(&op, &["admin", "key", "list", "demo"]);
    assert!(!out.contains(&key[21..]), "a key listing shows the secret");

    let c = [("CHATVAULT_SERVER", server.url.as_str()), ("CHATVAULT_API_KEY", key.as_str())];
    let (ok, _, err) = run(
        &c,
        &[
            "put",
            "--subject",
            "alice@example.com",
            "--transcript",
            "chat-1",
            "-m",
            "visitor:Alice:Where is my order?",
            "-m",
            "agent:Bob:On its way",
        ],
    );
    assert!(ok, "{err}");
    let (ok, out, err) = run(&c, &["append", "--transcript", "chat-1", "-m", "visitor:Alice:Thanks!"]);
    assert!(ok && out.contains("\"message_count\": 3"), "{out}{err}");
    let (ok, out, _) = run(&c, &["get", "--transcript", "chat-1"]);
    assert!(ok && out.contains("Where is my order?") && out.contains("AUTHOR_ROLE_AGENT"), "{out}");
    let (ok, out, _) = run(&c, &["list", "--subject", "alice@example.com"]);
    assert!(ok && out.contains("chat-1"), "{out}");
    let (ok, out, err) = run(&c, &["export", "--subject", "alice@example.com"]);
    assert!(ok && json(&out)["transcripts"][0]["messages"][2]["text"] == "Thanks!", "{out}{err}");
    let (ok, out, _) = run(&c, &["shred", "--subject", "alice@example.com"]);
    assert!(ok && out.contains("\"transcripts_shredded\": 1"), "{out}");
    let (ok, _, err) = run(&c, &["get", "--transcript", "chat-1"]);
    assert!(!ok && err.contains("NotFound") && err.contains("erased"), "{err}");
    let (ok, _, err) = run(&c, &["put", "--subject", "x", "--transcript", "y", "-m", "nobody:x"]);
    assert!(!ok && err.contains("ROLE:NAME:TEXT"), "{err}");
    let (ok, _, err) = run(&[("CHATVAULT_SERVER", server.url.as_str())], &["get", "--transcript", "chat-1"]);
    assert!(!ok && err.contains("CHATVAULT_API_KEY"), "{err}");

    // Who touched alice, from the audit trail; and the chain holds.
    let (ok, out, err) = run(&op, &["admin", "audit", "query", "--tenant", "demo", "--subject", "alice@example.com"]);
    assert!(ok, "{err}");
    let ops: Vec<String> =
        json(&out)["records"].as_array().unwrap().iter().map(|r| r["operation"].as_str().unwrap().into()).collect();
    // The get after the shred touched nothing: it is recorded, but with no subject.
    assert_eq!(
        ops,
        ["transcript.put", "transcript.append", "transcript.get", "transcript.list", "subject.export", "subject.shred"]
    );
    assert!(!out.contains("alice"), "the audit trail shows a raw subject id");
    let (ok, out, err) = run(&op, &["admin", "audit", "verify"]);
    assert!(ok && json(&out)["intact"] == true, "{out}{err}");
    let (ok, _, err) = run(&op, &["admin", "tenant", "delete", "demo"]);
    assert!(!ok && err.contains("--yes"), "{err}");
    let (ok, _, err) = run(&[("CHATVAULT_ADMIN_SERVER", server.admin_url.as_str())], &["admin", "tenant", "list"]);
    assert!(!ok && err.contains("CHATVAULT_OPERATOR_TOKEN"), "{err}");
}

#[test]
fn a_receipt_from_the_cli_verifies_offline_with_the_public_key_alone_and_a_tampered_one_does_not() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let key = tokio::runtime::Runtime::new().unwrap().block_on(server.api_key("acme"));
    let c = [("CHATVAULT_SERVER", server.url.as_str()), ("CHATVAULT_API_KEY", key.as_str())];
    let (ok, _, err) = run(&c, &["put", "--subject", "bob", "--transcript", "b1", "-m", "visitor:Bob:hi"]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&c, &["shred", "--subject", "bob"]);
    assert!(ok && out.contains("ERASURE_STATE_PENDING"), "{out}{err}");
    let receipt = dirs.tmp.path().join("receipt.json");
    std::fs::write(&receipt, &out).unwrap();
    let public = dirs.tmp.path().join("receipt.pub");
    let (ok, _, err) = run(&c, &["receipt", "key", "--out", public.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&public).unwrap(), std::fs::read(dirs.keys().join("receipt-signing.pub")).unwrap());
    let erasure_id = json(&out)["erasure_id"].as_str().unwrap().to_owned();
    let (ok, status, err) = run(&c, &["erasure", "--id", &erasure_id]);
    assert!(ok && status.contains("ERASURE_STATE_PENDING"), "{status}{err}");

    // Offline: the server is gone, only the receipt and the public key are left.
    drop(server);
    let verify = |file: &std::path::Path| {
        run(&[], &["receipt", "verify", "--public-key", public.to_str().unwrap(), file.to_str().unwrap()])
    };
    let (ok, out, err) = verify(&receipt);
    assert!(ok, "{err}");
    let said = json(&out);
    assert_eq!((said["verified"].clone(), said["receipt"]["transcripts_erased"].clone()), (true.into(), 1.into()));
    assert_eq!(said["receipt"]["tenant"], "acme");

    let tampered = dirs.tmp.path().join("tampered.json");
    std::fs::write(&tampered, std::fs::read_to_string(&receipt).unwrap().replace("erased\\\":1", "erased\\\":7"))
        .unwrap();
    assert_ne!(std::fs::read(&tampered).unwrap(), std::fs::read(&receipt).unwrap(), "the test must change the payload");
    let (ok, _, err) = verify(&tampered);
    assert!(!ok && err.contains("does not match the receipt"), "{err}");

    let other_key = dirs.tmp.path().join("other.pub");
    std::fs::write(&other_key, format!("{}\n", "ab".repeat(32))).unwrap();
    let (ok, _, err) =
        run(&[], &["receipt", "verify", "--public-key", other_key.to_str().unwrap(), receipt.to_str().unwrap()]);
    assert!(!ok && err.contains("not by the key given"), "{err}");
    let (ok, _, err) =
        run(&[], &["receipt", "verify", "--public-key", public.to_str().unwrap(), public.to_str().unwrap()]);
    assert!(!ok && err.contains("not JSON"), "{err}");
}

#[test]
fn an_operator_sets_retention_and_holds_and_reads_what_retention_did_from_the_shell() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let op = [("CHATVAULT_ADMIN_SERVER", server.admin_url.as_str()), ("CHATVAULT_OPERATOR_TOKEN", OPERATOR_TOKEN)];
    let (ok, _, err) = run(&op, &["admin", "tenant", "create", "--region", "eu", "demo", "--allow", "127.0.0.1"]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&op, &["admin", "retention", "demo", "--max-age-secs", "86400", "--purge-on-close"]);
    assert!(ok && json(&out)["retention"]["max_age_secs"] == 86400, "{out}{err}");
    let (ok, _, err) = run(&op, &["admin", "retention", "demo", "--max-age-secs", "99999999999999"]);
    assert!(!ok && err.contains("retention.max_age_seconds"), "{err}");
    let (ok, out, err) = run(&op, &["admin", "hold", "set", "demo", "--subject", "alice", "--reason", "case 7"]);
    assert!(ok, "{err}");
    let hold = json(&out)["hold_id"].as_str().unwrap().to_owned();
    let (_, out, _) = run(&op, &["admin", "hold", "list", "demo"]);
    assert_eq!(json(&out)[0]["reason"], "case 7", "{out}");
    let (ok, out, err) = run(&op, &["admin", "retention-status", "demo", "--run"]);
    assert!(ok && json(&out)["last_run_at"].is_string(), "{out}{err}");
    let (ok, _, err) = run(&op, &["admin", "hold", "release", "demo", &hold, "--reason", "closed"]);
    assert!(ok, "{err}");
    let (_, out, _) = run(&op, &["admin", "hold", "list", "demo"]);
    assert_eq!(json(&out), serde_json::json!([]));
}
