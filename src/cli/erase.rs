//! `chatvault erase --subjects FILE`: an erasure job. Shreds every subject id in FILE
//! (one per line, or NDJSON `{"subject_id": …, "request_id": …}`) through ShredSubjects
//! in bounded, rate-limited batches, and writes one receipt per id to an NDJSON file.
//!
//! It can be stopped at any point (Ctrl-C, a crash, kill -9) and run again: a journal
//! beside the receipts says which batches were sent and which are written down. A batch
//! that was sent but not written down is sent again with the same request id, and the
//! server answers it from what it kept without shredding again; the receipts file is
//! first cut back to what the journal vouches for. So every id ends with exactly one
//! receipt, and none is shredded twice.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::client::{Conn, subjects};
use crate::grpc::pb;

#[derive(Args, Debug)]
pub struct EraseArgs {
    #[command(flatten)]
    conn: Conn,
    /// Subject ids, one per line, or NDJSON objects with `subject_id` (and an optional
    /// `request_id` of the caller's, echoed in its receipt).
    #[arg(long)]
    subjects: PathBuf,
    /// Where receipts go (NDJSON); the journal is this path with `.journal` added.
    /// [default: FILE.receipts.ndjson]
    #[arg(long)]
    receipts: Option<PathBuf>,
    /// Subjects per ShredSubjects call (at most 1000).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Subjects per second at most, so the job never starves live traffic.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
}

/// One id to shred, with where it came from.
#[derive(Clone, Debug)]
struct Item {
    line: usize,
    subject_id: String,
    request_id: Option<String>,
}

/// A journal line.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Entry {
    /// The first line: which input this journal is for, cut into batches of `batch`.
    Start { input_sha256: String, items: usize, batch: usize },
    /// Batch `batch` is about to be sent.
    Sent { batch: usize },
    /// Batch `batch`'s receipts are written; the receipts file is `receipts_len` bytes.
    Done { batch: usize, receipts_len: u64 },
}

/// What a journal says, read back.
#[derive(Default)]
struct Progress {
    started: Option<(String, usize, usize)>,
    done: usize,
    receipts_len: u64,
    /// Bytes of whole, readable lines: a line a crash cut short is cut off before more
    /// are appended.
    valid_len: u64,
}

/// Reads the input: the ids to shred, each once, and what was wrong with the rest.
fn read_items(path: &Path) -> Result<(Vec<Item>, Vec<String>, String), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("--subjects {}: {e}", path.display()))?;
    let digest = hex::encode(Sha256::digest(&bytes));
    let text = String::from_utf8_lossy(&bytes);
    let (mut items, mut problems) = (Vec::new(), Vec::new());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        let parsed = if raw.starts_with('{') {
            match serde_json::from_str::<serde_json::Value>(raw) {
                Ok(v) => match v.get("subject_id").and_then(|s| s.as_str()) {
                    Some(s) => Ok((s.to_owned(), v.get("request_id").and_then(|r| r.as_str()).map(str::to_owned))),
                    None => Err("no \"subject_id\" string".to_owned()),
                },
                Err(e) => Err(format!("not valid JSON: {e}")),
            }
        } else {
            Ok((raw.to_owned(), None))
        };
        let (subject_id, request_id) = match parsed {
            Ok(p) => p,
            Err(why) => {
                problems.push(format!("line {line}: {why}; skipped"));
                continue;
            }
        };
        // The server's default limit (limits.max_id_bytes): one it would refuse anyway.
        let max = crate::vault::Limits::default().max_id_bytes;
        if subject_id.is_empty() || subject_id.len() > max || subject_id.chars().any(char::is_control) {
            problems.push(format!("line {line}: subject_id must be 1 to {max} bytes, no control characters; skipped"));
            continue;
        }
        if let Some(first) = seen.get(&subject_id) {
            problems.push(format!("line {line}: the same subject as line {first}; shredded once"));
            continue;
        }
        seen.insert(subject_id.clone(), line);
        items.push(Item { line, subject_id, request_id });
    }
    Ok((items, problems, digest))
}

fn read_journal(path: &Path) -> Result<Progress, String> {
    let mut p = Progress::default();
    let Ok(f) = File::open(path) else { return Ok(p) };
    let mut reader = BufReader::new(f);
    let mut line = String::new();
    for i in 0.. {
        line.clear();
        let n = reader.read_line(&mut line).map_err(|e| format!("journal {}: {e}", path.display()))?;
        // A line cut short by a crash is the last one (no newline, or unreadable): what
        // it said never happened.
        let Some(text) = line.strip_suffix('\n') else { break };
        let Ok(entry) = serde_json::from_str::<Entry>(text) else { break };
        p.valid_len += n as u64;
        match entry {
            Entry::Start { input_sha256, items, batch } if i == 0 => p.started = Some((input_sha256, items, batch)),
            Entry::Sent { .. } => {}
            Entry::Done { batch, receipts_len } if batch == p.done => {
                p.done = batch + 1;
                p.receipts_len = receipts_len;
            }
            other => return Err(format!("journal {} line {}: unexpected {other:?}", path.display(), i + 1)),
        }
    }
    Ok(p)
}

/// One write of the whole line, then a sync: a crash leaves it whole or cut short, and a
/// line cut short is dropped at the next start.
fn append_durably(f: &mut File, line: &str) -> Result<(), String> {
    f.write_all(format!("{line}\n").as_bytes()).and_then(|()| f.sync_data()).map_err(|e| e.to_string())
}

fn journal_line(e: &Entry) -> String {
    serde_json::to_string(e).unwrap_or_default()
}

/// The request id of one batch: the same on every run over the same input, and naming
/// exactly which lines it holds.
fn batch_request_id(input_sha256: &str, batch: &[Item]) -> String {
    let (first, last) = (batch.first().map(|i| i.line).unwrap_or(0), batch.last().map(|i| i.line).unwrap_or(0));
    format!("erase-{}-{first}-{last}-{}", &input_sha256[..32], batch.len())
}

fn outcome_name(o: pb::ShredOutcome) -> &'static str {
    match o {
        pb::ShredOutcome::Shredded => "shredded",
        pb::ShredOutcome::Unknown => "unknown",
        pb::ShredOutcome::Held => "held",
        pb::ShredOutcome::Failed | pb::ShredOutcome::Unspecified => "failed",
    }
}

pub async fn run(args: EraseArgs) -> Result<(), String> {
    let mut batch_size = args.batch.clamp(1, crate::grpc::SHRED_BATCH_MAX);
    let (items, problems, digest) = read_items(&args.subjects)?;
    for p in &problems {
        eprintln!("{}: {p}", args.subjects.display());
    }
    let receipts_path = args.receipts.clone().unwrap_or_else(|| {
        let mut p = args.subjects.clone().into_os_string();
        p.push(".receipts.ndjson");
        p.into()
    });
    let journal_path = {
        let mut p = receipts_path.clone().into_os_string();
        p.push(".journal");
        PathBuf::from(p)
    };
    let progress = read_journal(&journal_path)?;
    let mut receipts = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&receipts_path)
        .map_err(|e| format!("receipts {}: {e}", receipts_path.display()))?;
    let have = receipts.metadata().map_err(|e| e.to_string())?.len();
    match &progress.started {
        Some((sha, n, _)) if *sha != digest || *n != items.len() => {
            return Err(format!(
                "{} was written for another input (the subjects file changed since); \
                 finish with the original file or start with a new --receipts",
                journal_path.display()
            ));
        }
        _ if have < progress.receipts_len => {
            return Err(format!(
                "{} holds {have} bytes but its journal vouches for {}: the receipts file does not match \
                 its journal; refusing to resume",
                receipts_path.display(),
                progress.receipts_len
            ));
        }
        None if have > 0 => {
            return Err(format!(
                "{} already holds receipts but has no journal ({}): refusing to mix jobs",
                receipts_path.display(),
                journal_path.display()
            ));
        }
        _ => {}
    }
    // A job resumes in the batches it began with, whatever --batch says now.
    if let Some((_, _, batch)) = progress.started {
        if batch != batch_size {
            eprintln!("resuming in batches of {batch}, as the job began (--batch {batch_size} ignored)");
        }
        batch_size = batch.clamp(1, crate::grpc::SHRED_BATCH_MAX);
    }
    // Receipts past what the journal vouches for belong to a batch that is sent again.
    receipts.set_len(progress.receipts_len).map_err(|e| e.to_string())?;
    receipts.seek(std::io::SeekFrom::End(0)).map_err(|e| e.to_string())?;
    let mut journal = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&journal_path)
        .map_err(|e| format!("journal {}: {e}", journal_path.display()))?;
    journal.set_len(progress.valid_len).map_err(|e| e.to_string())?;
    if progress.started.is_none() {
        journal.set_len(0).map_err(|e| e.to_string())?;
        let start = Entry::Start { input_sha256: digest.clone(), items: items.len(), batch: batch_size };
        append_durably(&mut journal, &journal_line(&start))?;
    }

    let batches: Vec<&[Item]> = items.chunks(batch_size).collect();
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(items.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} subjects  {per_sec}  eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(batches.iter().take(progress.done).map(|b| b.len() as u64).sum());
    let mut client = subjects(&args.conn).await?;
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    let started = Instant::now();
    let mut sent = 0usize;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    for (k, batch) in batches.iter().enumerate().skip(progress.done) {
        // Pace: at most `rate` subjects a second over the whole run.
        let due = Duration::from_secs_f64(sent as f64 / args.rate.max(0.001));
        let wait = due.saturating_sub(started.elapsed());
        tokio::select! {
            biased;
            _ = &mut interrupted => {
                bar.abandon();
                return Err(format!("interrupted before batch {k}; run the same command again to resume"));
            }
            _ = tokio::time::sleep(wait) => {}
        }
        append_durably(&mut journal, &journal_line(&Entry::Sent { batch: k }))?;
        let req = pb::ShredSubjectsRequest {
            subject_ids: batch.iter().map(|i| i.subject_id.clone()).collect(),
            request_id: batch_request_id(&digest, batch),
        };
        // A batch once sent is finished before Ctrl-C is taken: its receipts go down.
        let answer = tokio::select! {
            biased;
            r = client.shred_subjects(req) => r.map_err(|s| format!("batch {k} (lines {}..{}): {}: {}",
                batch[0].line, batch[batch.len() - 1].line, s.code(), s.message()))?.into_inner(),
            _ = &mut interrupted => {
                bar.abandon();
                return Err(format!(
                    "interrupted before batch {k} was answered; run the same command again to resume \
                     (it is sent again, and not shredded twice)"
                ));
            }
        };
        if answer.results.len() != batch.len() {
            return Err(format!("batch {k}: {} results for {} subjects", answer.results.len(), batch.len()));
        }
        let mut lines = String::new();
        for (item, r) in batch.iter().zip(&answer.results) {
            let outcome = outcome_name(r.outcome());
            *counts.entry(outcome).or_default() += 1;
            let receipt = r.receipt.as_ref();
            let line = json!({
                "line": item.line,
                "request_id": item.request_id,
                "subject_blind_id": r.subject_blind_id,
                "time": receipt.and_then(|r| r.shredded_at.as_ref()).map(|t| t.to_string()),
                "outcome": outcome,
                "reason": (!r.reason.is_empty()).then_some(&r.reason),
                "erasure_id": receipt.map(|r| r.erasure_id.clone()).filter(|e| !e.is_empty()),
                "signed_receipt": receipt.and_then(|r| r.signed.as_ref()).map(|s| json!({
                    "payload": s.payload,
                    "signature": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &s.signature),
                    "key_id": s.key_id,
                })),
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        receipts.write_all(lines.as_bytes()).and_then(|()| receipts.sync_data()).map_err(|e| e.to_string())?;
        let len = receipts.stream_position().map_err(|e| e.to_string())?;
        append_durably(&mut journal, &journal_line(&Entry::Done { batch: k, receipts_len: len }))?;
        sent += batch.len();
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    let summary = json!({
        "subjects": items.len(),
        "skipped_lines": problems.len(),
        "shredded": counts.get("shredded").copied().unwrap_or(0),
        "unknown": counts.get("unknown").copied().unwrap_or(0),
        "held": counts.get("held").copied().unwrap_or(0),
        "failed": counts.get("failed").copied().unwrap_or(0),
        "receipts": receipts_path.display().to_string(),
    });
    println!("{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line a crash cut short (no newline) is not taken, and is cut off before the
    /// next entry, so it can never hide the ones after it.
    #[test]
    fn a_journal_line_cut_short_is_dropped_and_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let start = journal_line(&Entry::Start { input_sha256: "ab".repeat(32), items: 3, batch: 1 });
        let done = journal_line(&Entry::Done { batch: 0, receipts_len: 10 });
        std::fs::write(
            &path,
            format!("{start}\n{done}\n{}", journal_line(&Entry::Done { batch: 1, receipts_len: 20 })),
        )
        .unwrap();
        let p = read_journal(&path).unwrap();
        assert_eq!((p.done, p.receipts_len), (1, 10), "the unterminated line did not happen");
        assert_eq!(p.valid_len as usize, start.len() + done.len() + 2);
    }
}
