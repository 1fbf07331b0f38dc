//! The peer: the same store / get / erase-a-subject workload on SQLCipher (encrypted
//! SQLite), what many teams would pick instead. Both sides durable per operation
//! (chatvault `durability = fsync`; SQLCipher WAL with `synchronous = FULL`), single
//! client, in process. Erasure there is `DELETE` with `secure_delete = ON`; here a shred.
//!
//! `cargo bench --features peer-sqlcipher --bench peer [-- --quick] [--out FILE]`
//! (needs Debian's libsqlcipher-dev).

use std::time::Instant;

use chatvault::keys::RootKeySource;
use chatvault::vault::{AuthorRole, Message, TenantId, Transcript, Vault, VaultOptions};

/// A visitor message of `len` bytes.
fn message(i: usize, len: usize) -> Message {
    Message::new(format!("m{i}"), AuthorRole::Visitor, "Visitor", "x".repeat(len))
}
use rusqlite::{Connection, params};

const OPS: usize = 2000;

/// Runs `op` `n` times; returns (operations per second, p50 latency in µs).
fn timed(n: usize, mut op: impl FnMut(usize)) -> (f64, u32) {
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        op(i);
        lat.push(t.elapsed().as_micros() as u32);
    }
    (n as f64 / t0.elapsed().as_secs_f64(), percentile(&mut lat, 0.5))
}

fn percentile(v: &mut [u32], p: f64) -> u32 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn sqlcipher(path: &std::path::Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.execute_batch(&format!("PRAGMA key = \"x'{}'\";", "42".repeat(32))).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA secure_delete = ON;
         CREATE TABLE IF NOT EXISTS messages(
           tenant TEXT NOT NULL, subject TEXT NOT NULL, transcript TEXT NOT NULL, seq INTEGER NOT NULL,
           author TEXT NOT NULL, text BLOB NOT NULL, PRIMARY KEY (tenant, transcript, seq));
         CREATE INDEX IF NOT EXISTS by_subject ON messages(tenant, subject);",
    )
    .unwrap();
    c
}

struct Row {
    what: String,
    ours_ops: f64,
    peer_ops: f64,
    ours_p50: u32,
    peer_p50: u32,
}

impl Row {
    fn of(what: &str, (ours_ops, ours_p50): (f64, u32), (peer_ops, peer_p50): (f64, u32)) -> Row {
        Row { what: what.into(), ours_ops, peer_ops, ours_p50, peer_p50 }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || !std::env::args().any(|a| a == "--bench");
    let out_path = std::env::args().skip_while(|a| a != "--out").nth(1).unwrap_or("target/bench-peer.md".into());
    let big = if quick { 1_000 } else { 100_000 };
    let ops = if quick { 200 } else { OPS };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = RootKeySource::Hex(zeroize::Zeroizing::new("42".repeat(32)));
    let (v, _) = Vault::open(VaultOptions::new(dir.path().join("data"), dir.path().join("keys"), root)).unwrap();
    let tenant = TenantId::parse("bench").unwrap();
    let db = sqlcipher(&dir.path().join("peer.db"));
    let mut rows = Vec::new();

    // Store: append one 1 KiB message, durable.
    rt.block_on(v.put_transcript(&tenant, Transcript::new("live", "s", vec![]))).unwrap();
    let text = vec![b'x'; 1024];
    let ours = timed(ops, |i| {
        rt.block_on(v.append_messages(&tenant, "live", vec![message(i, 1024)], None)).unwrap();
    });
    let peer = timed(ops, |i| {
        db.execute("INSERT INTO messages VALUES ('bench', 's', 'live', ?1, 'Visitor', ?2)", params![i as i64, text])
            .unwrap();
    });
    rows.push(Row::of("store 1 KiB message (durable)", ours, peer));

    // Get: read a transcript of 10 messages of 1 KiB.
    rt.block_on(v.put_transcript(&tenant, Transcript::new("ten", "s", (0..10).map(|i| message(i, 1024)).collect())))
        .unwrap();
    for i in 0..10i64 {
        db.execute("INSERT INTO messages VALUES ('bench', 's', 'ten', ?1, 'Visitor', ?2)", params![i, text]).unwrap();
    }
    let ours = timed(ops, |_| assert_eq!(v.get_transcript(&tenant, "ten").unwrap().messages.len(), 10));
    let mut stmt = db
        .prepare("SELECT author, text FROM messages WHERE tenant = 'bench' AND transcript = 'ten' ORDER BY seq")
        .unwrap();
    let peer = timed(ops, |_| {
        let n = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))).unwrap().count();
        assert_eq!(n, 10);
    });
    drop(stmt);
    rows.push(Row::of("get transcript of 10 × 1 KiB", ours, peer));

    // Erase a subject with 10 and with `big` transcripts (1 message of 256 B each).
    for (label, per) in [("10", 10usize), (if quick { "1,000" } else { "100,000" }, big)] {
        let subjects = 3;
        for s in 0..subjects {
            let subject = format!("erase-{per}-{s}");
            for t in 0..per {
                rt.block_on(v.put_transcript(
                    &tenant,
                    Transcript::new(format!("{subject}-{t}"), subject.clone(), vec![message(0, 256)]),
                ))
                .unwrap();
            }
            let tx = db.unchecked_transaction().unwrap();
            for t in 0..per {
                tx.execute(
                    "INSERT INTO messages VALUES ('bench', ?1, ?2, 0, 'Visitor', ?3)",
                    params![subject, format!("{subject}-{t}"), &text[..256]],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for s in 0..subjects {
            let subject = format!("erase-{per}-{s}");
            let t = Instant::now();
            rt.block_on(v.shred_subject(&tenant, &subject)).unwrap();
            a.push(t.elapsed().as_micros() as u32);
            let t = Instant::now();
            let n =
                db.execute("DELETE FROM messages WHERE tenant = 'bench' AND subject = ?1", params![subject]).unwrap();
            b.push(t.elapsed().as_micros() as u32);
            assert_eq!(n, per);
        }
        let (ap, bp) = (percentile(&mut a, 0.5), percentile(&mut b, 0.5));
        rows.push(Row {
            what: format!("erase a subject with {label} transcripts (p50 of {subjects})"),
            ours_ops: 1e6 / ap as f64,
            peer_ops: 1e6 / bp as f64,
            ours_p50: ap,
            peer_p50: bp,
        });
    }

    let mut out = String::from(
        "### The peer: SQLCipher (rusqlite, Debian libsqlcipher), same workload, in process, durable per operation\n\n\
         | workload | chatvault ops/s | SQLCipher ops/s | chatvault / SQLCipher | chatvault p50 µs | SQLCipher p50 µs |\n|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        out += &format!(
            "| {} | {:.0} | {:.0} | {:.2}x | {} | {} |\n",
            r.what,
            r.ours_ops,
            r.peer_ops,
            r.ours_ops / r.peer_ops,
            r.ours_p50,
            r.peer_p50
        );
    }
    out += "\nSQLCipher's DELETE with secure_delete overwrites the rows in the database file, but the WAL and\n\
            any backup keep them until checkpointed or rotated; a chatvault shred is final for every copy once\n\
            the key store rotates (SECURITY.md).\n";
    println!("{out}");
    std::fs::write(&out_path, out).unwrap();
}
