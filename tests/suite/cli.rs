//! The README's client commands work against a running server.

use std::process::Command;

use super::common::*;

fn cli(server: &Server, key: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chatvault"))
        .args(args)
        .env("CHATVAULT_SERVER", &server.url)
        .env("CHATVAULT_API_KEY", key)
        .output()
        .expect("run chatvault");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test]
async fn client_commands_put_get_list_and_shred() {
    let dirs = Dirs::new();
    let server = Server::start(&dirs);
    let key = server.api_key("demo").await;
    let (ok, _, err) = cli(
        &server,
        &key,
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
    let (ok, out, err) = cli(&server, &key, &["append", "--transcript", "chat-1", "-m", "visitor:Alice:Thanks!"]);
    assert!(ok && out.contains("\"message_count\": 3"), "{out}{err}");
    let (ok, out, _) = cli(&server, &key, &["get", "--transcript", "chat-1"]);
    assert!(ok && out.contains("Where is my order?") && out.contains("AUTHOR_ROLE_AGENT"), "{out}");
    let (ok, out, _) = cli(&server, &key, &["list", "--subject", "alice@example.com"]);
    assert!(ok && out.contains("chat-1"), "{out}");
    let (ok, out, _) = cli(&server, &key, &["shred", "--subject", "alice@example.com"]);
    assert!(ok && out.contains("\"transcripts_shredded\": 1"), "{out}");
    let (ok, _, err) = cli(&server, &key, &["get", "--transcript", "chat-1"]);
    assert!(!ok && err.contains("NotFound") && err.contains("erased"), "{err}");
    let (ok, _, err) = cli(&server, &key, &["put", "--subject", "x", "--transcript", "y", "-m", "nobody:x"]);
    assert!(!ok && err.contains("ROLE:NAME:TEXT"), "{err}");
}
