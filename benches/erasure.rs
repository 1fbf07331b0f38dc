//! What making erasures final costs, in process, each beside its floor in the same run:
//! a key-store rotation over a store of N transcripts (every transcript key is a record
//! the rotation re-seals) against a raw sled pass that reads and rewrites the same number
//! of records of the same size; reads during the rotation against reads while idle; and a
//! DeleteTranscript and a ShredSubject (each one ledger sync and one data sync) against
//! one `fdatasync` of a small file.
//!
//! `cargo bench --bench erasure -- [--transcripts N] [--out FILE]` (N defaults to
//! 1,000,000); `cargo test --benches` runs it with 1,000 as a smoke test.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chatvault::keys::RootKeySource;
use chatvault::store::Durability;
use chatvault::vault::{AuthorRole, Message, TenantId, Transcript, Vault, VaultOptions};

struct Args {
    transcripts: usize,
    out: String,
}

fn args() -> Args {
    let bench = std::env::args().any(|a| a == "--bench");
    let mut a = Args { transcripts: if bench { 1_000_000 } else { 1_000 }, out: "target/bench-erasure.md".into() };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--transcripts" => a.transcripts = it.next().and_then(|n| n.parse().ok()).expect("--transcripts N"),
            "--out" => a.out = it.next().expect("--out FILE"),
            _ => {}
        }
    }
    a
}

fn open(dir: &std::path::Path, durability: Durability) -> Vault {
    let root = RootKeySource::Hex(zeroize::Zeroizing::new("42".repeat(32)));
    let mut opts = VaultOptions::new(dir.join("data"), dir.join("keys"), root);
    opts.durability = durability;
    Vault::open(opts).expect("vault").0
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or_default()
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// N transcripts, each a new subject with one short message: the realistic chat workload,
/// and the worst case for a rotation (two key records per chat).
fn populate(rt: &tokio::runtime::Runtime, v: &Vault, tenant: &TenantId, n: usize) {
    let started = Instant::now();
    for i in 0..n {
        let m = Message::new("m0", AuthorRole::Visitor, "Visitor", "where is my order?");
        rt.block_on(v.put_transcript(tenant, Transcript::new(format!("t{i}"), format!("s{i}"), vec![m]))).unwrap();
        if i > 0 && i % 100_000 == 0 {
            eprintln!("{i} transcripts stored ({:.0} s)", started.elapsed().as_secs_f64());
        }
    }
    rt.block_on(v.wait_durable()).unwrap();
    v.sync().unwrap();
}

/// The floor: read and rewrite `n` records of `len` bytes in one sled tree, in key order,
/// with compare-and-swap, as a rotation does, then one fsync.
fn raw_rewrite(dir: &std::path::Path, n: usize, len: usize) -> Duration {
    let db = sled::Config::new().path(dir.join("raw")).cache_capacity(256 << 20).open().unwrap();
    let tree = db.open_tree("raw").unwrap();
    for i in 0..n as u64 {
        tree.insert(i.to_be_bytes(), vec![1u8; len]).unwrap();
    }
    db.flush().unwrap();
    let started = Instant::now();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let iter = match &after {
            Some(k) => tree.range::<Vec<u8>, _>((std::ops::Bound::Excluded(k.clone()), std::ops::Bound::Unbounded)),
            None => tree.iter(),
        };
        let page: Vec<_> = iter.take(512).map(|kv| kv.unwrap()).collect();
        let Some((last, _)) = page.last() else { break };
        after = Some(last.to_vec());
        for (k, v) in &page {
            let fresh = vec![2u8; v.len()];
            tree.compare_and_swap(k, Some(v), Some(fresh)).unwrap().unwrap();
        }
    }
    db.flush().unwrap();
    started.elapsed()
}

/// GetTranscript latencies of random transcripts while `busy` is set (or for `for_` when
/// idle), one reader thread.
fn reads(v: &Vault, tenant: &TenantId, n: usize, busy: Option<&AtomicBool>, for_: Duration) -> Vec<Duration> {
    let mut lat = Vec::new();
    let started = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    loop {
        match busy {
            Some(b) if !b.load(Ordering::SeqCst) => break,
            None if started.elapsed() >= for_ => break,
            _ => {}
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = format!("t{}", x as usize % n);
        let t = Instant::now();
        v.get_transcript(tenant, &id).unwrap();
        lat.push(t.elapsed());
    }
    lat
}

/// Read latencies while something ran, beside idle ones.
fn beside_idle(during: &mut [Duration], idle: &mut [Duration]) -> String {
    format!(
        "p50 {:.1} µs, p99 {:.1} µs ({} reads); idle before it: p50 {:.1} µs, p99 {:.1} µs (p99 {:.2}x idle).",
        us(percentile(during, 0.5)),
        us(percentile(during, 0.99)),
        during.len(),
        us(percentile(idle, 0.5)),
        us(percentile(idle, 0.99)),
        percentile(during, 0.99).as_secs_f64() / percentile(idle, 0.99).as_secs_f64().max(1e-9),
    )
}

/// One `fdatasync` of a small append: the floor under any durable erasure.
fn fdatasync_floor(dir: &std::path::Path, rounds: usize) -> Duration {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("floor")).unwrap();
    let mut lat = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        f.write_all(&[7u8; 128]).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed());
    }
    percentile(&mut lat, 0.5)
}

/// Retention purging N expired transcripts (each its own subject, closed a year ago) in
/// one run, against DeleteTranscript one at a time; GetTranscript of live transcripts
/// while it runs against idle.
fn retention(rt: &tokio::runtime::Runtime, n: usize, tenant: &TenantId, fdatasync: Duration) -> String {
    use chatvault::audit::AuditLog;
    use chatvault::retention::Purger;
    use chatvault::tenancy::{Registry, RetentionPolicy};
    let dir = tempfile::tempdir().unwrap();
    let v = Arc::new(open(dir.path(), Durability::Fsync));
    let store = v.shared_store();
    let registry = Arc::new(
        Registry::open(store.clone(), v.clone(), v.control_key(b"bench-registry"), v.algorithm(), v.binding().clone())
            .unwrap(),
    );
    let audit = Arc::new(
        AuditLog::open(
            &dir.path().join("audit"),
            store.as_ref(),
            v.control_key(b"bench-audit"),
            Arc::new(chatvault::clock::SystemClock),
        )
        .unwrap(),
    );
    v.attach_durable(audit.clone());
    v.attach_holds(registry.clone());
    let now = v.now();
    let policy = RetentionPolicy { purge_after_close_secs: 86_400, ..RetentionPolicy::default() };
    registry.create(tenant.clone(), String::new(), Vec::new(), policy, now).unwrap();
    let year = 365 * 86_400_000_000i64;
    let started = Instant::now();
    // Expired ones, then 1,000 live ones the readers read.
    let concurrent = 64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(concurrent) {
        rt.block_on(async {
            let puts = chunk.iter().map(|&i| {
                let m = Message::new("m0", AuthorRole::Visitor, "Visitor", "where is my order?");
                let mut t = Transcript::new(format!("old{i}"), format!("s{i}"), vec![m]);
                t.started_at = chatvault::vault::Timestamp::from_micros(now.micros() - year - 3_600_000_000);
                t.ended_at = chatvault::vault::Timestamp::from_micros(now.micros() - year);
                let v = v.clone();
                let tenant = tenant.clone();
                async move { v.put_transcript(&tenant, t).await.unwrap() }
            });
            futures_join(puts).await;
        });
        if chunk[0] > 0 && chunk[0] % 100_000 == 0 {
            eprintln!("{} expired transcripts stored ({:.0} s)", chunk[0], started.elapsed().as_secs_f64());
        }
    }
    let live = 1000;
    for i in 0..live {
        let m = Message::new("m0", AuthorRole::Visitor, "Visitor", "still here");
        rt.block_on(v.put_transcript(tenant, Transcript::new(format!("t{i}"), format!("live{i}"), vec![m]))).unwrap();
    }
    let mut idle = reads(&v, tenant, live, None, Duration::from_secs(3));
    let purger = Arc::new(Purger::new(v.clone(), registry.clone(), audit.clone()).unwrap());
    let busy = Arc::new(AtomicBool::new(true));
    let reader = {
        let (v, tenant, busy) = (v.clone(), tenant.clone(), busy.clone());
        std::thread::spawn(move || reads(&v, &tenant, live, Some(&busy), Duration::ZERO))
    };
    let t = Instant::now();
    let mut purged = 0;
    // A run purges at most MAX_PER_RUN per tenant; runs follow one another until done.
    loop {
        let r = rt.block_on(purger.run()).unwrap();
        purged += r.purged;
        if r.purged == 0 {
            break;
        }
    }
    let took = t.elapsed();
    busy.store(false, Ordering::SeqCst);
    let mut during = reader.join().unwrap();
    assert_eq!(purged as usize, n, "every expired transcript purged");
    // The baseline: DeleteTranscript one at a time (what a client purging by itself does).
    let rounds = 300.min(live);
    let t = Instant::now();
    for i in 0..rounds {
        rt.block_on(v.delete_transcript(tenant, &format!("t{i}"))).unwrap();
    }
    let one_by_one = t.elapsed().as_secs_f64() / rounds as f64;
    let rate = purged as f64 / took.as_secs_f64();
    format!(
        "\n#### retention purging {n} expired transcripts (each its own subject), durability fsync\n\n\
         | what | transcripts/s |\n|---|---|\n\
         | retention run (time index, batches of {batch} under one ledger entry) | {rate:.0} |\n\
         | baseline: DeleteTranscript one at a time ({rounds}) | {:.0} |\n\n\
         Retention {:.1}x the one-at-a-time rate ({:.1} s in all; one fdatasync {:.0} µs). GetTranscript of live \
         transcripts while it ran, one reader: {}\n",
        1.0 / one_by_one,
        rate * one_by_one,
        took.as_secs_f64(),
        us(fdatasync),
        beside_idle(&mut during, &mut idle),
        batch = chatvault::retention::BATCH,
    )
}

/// Runs futures to completion together, on the runtime's threads.
async fn futures_join<F>(fs: impl Iterator<Item = F>)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    for h in handles {
        h.await.unwrap();
    }
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tenant = TenantId::parse("bench").unwrap();
    let mut out = String::new();

    // Rotation over N transcripts.
    let dir = tempfile::tempdir().unwrap();
    let v = Arc::new(open(dir.path(), Durability::None));
    populate(&rt, &v, &tenant, a.transcripts);
    let idle = reads(&v, &tenant, a.transcripts, None, Duration::from_secs(3));
    let busy = Arc::new(AtomicBool::new(true));
    let reader = {
        let (v, tenant, busy, n) = (v.clone(), tenant.clone(), busy.clone(), a.transcripts);
        std::thread::spawn(move || reads(&v, &tenant, n, Some(&busy), Duration::ZERO))
    };
    let started = Instant::now();
    let report = v.rotate_key_store().unwrap();
    let rotation = started.elapsed();
    busy.store(false, Ordering::SeqCst);
    let (mut idle, mut during) = (idle, reader.join().unwrap());
    let keys = report.keys_rewrapped;
    drop(v);
    let floor_dir = tempfile::tempdir().unwrap();
    // A sealed transcript key record is ~110 bytes, a subject key record ~80: 95 on average.
    let floor = raw_rewrite(floor_dir.path(), keys as usize, 95);
    out += &format!(
        "#### key-store rotation over {n} transcripts (each its own subject: {keys} key records re-sealed)\n\n\
         | what | seconds | records/s |\n|---|---|---|\n\
         | chatvault rotation (open, re-seal, compare-and-swap, fsync, destroy) | {:.1} | {:.0} |\n\
         | baseline: raw sled read + compare-and-swap of as many ~95 B records, then flush | {:.1} | {:.0} |\n\n\
         Rotation throughput {:.2}x the raw rewrite. GetTranscript while the rotation ran, one reader: {}\n",
        rotation.as_secs_f64(),
        keys as f64 / rotation.as_secs_f64(),
        floor.as_secs_f64(),
        keys as f64 / floor.as_secs_f64(),
        floor.as_secs_f64() / rotation.as_secs_f64(),
        beside_idle(&mut during, &mut idle),
        n = a.transcripts,
    );
    eprintln!("rotation done");

    // Durable erasures, one at a time.
    let dir = tempfile::tempdir().unwrap();
    let v = open(dir.path(), Durability::Fsync);
    let rounds = if a.transcripts >= 100_000 { 300 } else { 20 };
    for i in 0..rounds {
        let m = || vec![Message::new("m0", AuthorRole::Visitor, "V", "x")];
        rt.block_on(v.put_transcript(&tenant, Transcript::new(format!("d{i}"), "keeper", m()))).unwrap();
        rt.block_on(v.put_transcript(&tenant, Transcript::new(format!("s{i}"), format!("gone{i}"), m()))).unwrap();
    }
    let (mut deletes, mut shreds, mut puts) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let t = Instant::now();
        rt.block_on(v.delete_transcript(&tenant, &format!("d{i}"))).unwrap();
        deletes.push(t.elapsed());
        let t = Instant::now();
        rt.block_on(v.shred_subject(&tenant, &format!("gone{i}"))).unwrap();
        shreds.push(t.elapsed());
        let t = Instant::now();
        let m = vec![Message::new("m0", AuthorRole::Visitor, "V", "x")];
        rt.block_on(v.put_transcript(&tenant, Transcript::new(format!("p{i}"), "keeper", m))).unwrap();
        puts.push(t.elapsed());
    }
    let sync = fdatasync_floor(dir.path(), rounds);
    let row = |name: &str, v: &mut Vec<Duration>| {
        let p50 = percentile(v, 0.5);
        format!("| {name} | {:.0} | {:.0} | {:.2}x |\n", us(p50), us(percentile(v, 0.99)), us(p50) / us(sync))
    };
    out += &format!(
        "\n#### durable erasures, in process, one at a time ({rounds} each)\n\n\
         | what | p50 µs | p99 µs | p50 / one fdatasync |\n|---|---|---|---|\n{}{}{}\
         | baseline: one 128 B append + fdatasync | {:.0} | | 1.00x |\n\n\
         An erasure syncs twice on purpose: the tombstone in the erasure ledger (key volume) before \
         the data directory may apply it, then the data directory's group commit.\n",
        row("DeleteTranscript (ledger sync, then data sync)", &mut deletes),
        row("ShredSubject (ledger sync, then data sync)", &mut shreds),
        row("PutTranscript, for comparison (data sync only)", &mut puts),
        us(sync),
    );
    out += &retention(&rt, a.transcripts, &tenant, sync);
    println!("{out}");
    if let Some(parent) = std::path::Path::new(&a.out).parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&a.out, &out).expect("write report");
}
