//! A full volume, for real: the data directory on a small tmpfs that fills up.

use std::path::{Path, PathBuf};
use std::process::Command;

use chatvault::grpc::pb;
use tonic::Code;

use super::common::*;

/// A tmpfs of `mib` MiB mounted for the test, unmounted on drop; None (with a message)
/// where mounting is not permitted.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u32) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root, or no mount permission)");
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the volume at `dir` with a file, leaving about `leave` bytes.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let stat = rustix::fs::statvfs(dir).unwrap();
    let free = stat.f_bavail * stat.f_frsize;
    let path = dir.join("filler");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(0).unwrap();
    use std::io::Write;
    let mut w = std::io::BufWriter::new(f);
    let chunk = vec![7u8; 1 << 20];
    let mut left = free.saturating_sub(leave);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if w.write_all(&chunk[..n]).is_err() {
            break;
        }
        left -= n as u64;
    }
    let _ = w.flush();
    path
}

/// Puts transcripts of `msgs` messages of `size` bytes until one is refused; the ids
/// acknowledged, and the refusal.
async fn put_until_refused(c: &mut Transcripts, tag: &str, size: usize, msgs: usize) -> (Vec<String>, tonic::Status) {
    let text = "x".repeat(size);
    let mut acked = Vec::new();
    for i in 0..50_000 {
        let id = format!("{tag}{i}");
        let t = transcript(&id, "s", 1_700_000_000, &vec![text.as_str(); msgs]);
        match c.put_transcript(pb::PutTranscriptRequest { transcript: Some(t) }).await {
            Ok(_) => acked.push(id),
            Err(e) => return (acked, e),
        }
    }
    panic!("the volume never filled");
}

async fn assert_all_readable(c: &mut Transcripts, ids: &[String]) {
    for id in ids {
        get(c, id).await.unwrap_or_else(|e| panic!("acknowledged {id} lost: {e:?}"));
    }
}

/// The value log is what fills (large messages): the write is refused with
/// RESOURCE_EXHAUSTED naming the volume, nothing acknowledged is lost, and writes resume
/// by themselves once space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_value_log_volume_answers_resource_exhausted_and_writes_resume_once_space_is_freed() {
    let dirs = Dirs::new();
    let Some(_tmpfs) = Tmpfs::mount(&dirs.data(), 64) else { return };
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    put(&mut c, transcript("before", "s", 1_700_000_000, &["acknowledged before the disk filled"])).await;
    let filler = fill(&dirs.data(), 2 << 20);
    let (mut acked, e) = put_until_refused(&mut c, "big", 60_000, 4).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains(&dirs.data().display().to_string()) && e.message().contains("no space"), "{e:?}");
    acked.push("before".into());
    assert_all_readable(&mut c, &acked).await;

    std::fs::remove_file(&filler).unwrap();
    put(&mut c, transcript("after", "s", 1_700_000_000, &["space is back"])).await;
    acked.push("after".into());
    server.stop().await;
    let server = Server::start(&dirs);
    assert_all_readable(&mut server.transcripts("acme").await, &acked).await;
}

/// Small messages: whichever fills first, the value log or sled's own files, the write
/// is refused with RESOURCE_EXHAUSTED naming the volume. Once space is freed, either
/// writes resume at once (the value log) or, since sled stops for good after a write
/// that found no space, they are refused saying to restart, the server's health is
/// NOT_SERVING, and it exits (`storage_failure_exit_secs`) for its supervisor to restart
/// it. After the restart everything acknowledged is there and writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_under_small_writes_is_reported_and_after_a_restart_nothing_acknowledged_is_lost() {
    let dirs = Dirs::new();
    let Some(_tmpfs) = Tmpfs::mount(&dirs.data(), 64) else { return };
    let cfg = dirs.config("storage_failure_exit_secs = 2\n");
    let mut server =
        Server::start_with(&dirs, Opts { args: vec!["--config", cfg.to_str().unwrap()], ..Opts::default() });
    let mut c = server.transcripts("acme").await;
    let filler = fill(&dirs.data(), 3 << 20);
    let (mut acked, e) = put_until_refused(&mut c, "small", 900, 1).await;
    assert!(acked.len() > 10, "the volume filled at once: {e:?}");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains(&dirs.data().display().to_string()), "{e:?}");
    std::fs::remove_file(&filler).unwrap();

    let next = transcript("after-free", "s", 1_700_000_000, &["space is back"]);
    match c.put_transcript(pb::PutTranscriptRequest { transcript: Some(next) }).await {
        Ok(_) => acked.push("after-free".into()),
        Err(e) => {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            assert!(e.message().contains("restart"), "{e:?}");
            // The liveness probe's view: NOT_SERVING.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let out = Command::new(env!("CARGO_BIN_EXE_chatvault"))
                    .args(["health", "--server", &server.admin_url])
                    .output()
                    .unwrap();
                if !out.status.success() {
                    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT_SERVING"), "{out:?}");
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "health stayed SERVING after the store stopped");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            // Then it exits by itself, for its supervisor to restart it.
            assert!(server.exited(std::time::Duration::from_secs(30)).await, "the server stayed up");
            assert!(server.log_text().contains("exiting so that the supervisor restarts the server"));
        }
    }
    server.kill9();
    let server = Server::start(&dirs);
    let mut c = server.transcripts("acme").await;
    assert_all_readable(&mut c, &acked).await;
    put(&mut c, transcript("after", "s", 1_700_000_000, &["space is back"])).await;
}
