//! In-process benchmarks of the vault, each next to its baseline in the same run:
//! raw sled with the same bytes and no encryption, and serde_json alone.
//! `scripts/bench.sh` turns the results into BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatvault::crypto::{self, Aad, Algorithm, RecordKind, SecretKey};
use chatvault::export::{DEFAULT_CHUNK_BYTES, Export};
use chatvault::keys::RootKeySource;
use chatvault::store::Durability;
use chatvault::vault::{AuthorRole, Message, Scope, TenantId, Transcript, Vault, VaultOptions};

/// A visitor message of `len` bytes.
fn message(i: usize, len: usize) -> Message {
    Message::new(format!("m{i}"), AuthorRole::Visitor, "Visitor", "x".repeat(len))
}
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;

const KIB: usize = 1024;

fn vault(dir: &std::path::Path) -> Vault {
    vault_with(dir, |_| {})
}

fn vault_with(dir: &std::path::Path, tweak: impl FnOnce(&mut VaultOptions)) -> Vault {
    let root = RootKeySource::Hex(zeroize::Zeroizing::new("42".repeat(32)));
    let mut opts = VaultOptions::new(dir.join("data"), dir.join("keys"), root);
    // The baseline is sled without a flush per write; compare like with like.
    opts.durability = Durability::None;
    // Measured here is cost, not limits: criterion appends ~100k messages to one transcript.
    opts.limits.max_messages_per_transcript = u32::MAX;
    tweak(&mut opts);
    Vault::open(opts).unwrap().0
}

fn raw_sled(dir: &std::path::Path) -> sled::Tree {
    sled::Config::new().path(dir.join("raw")).cache_capacity(256 << 20).open().unwrap().open_tree("raw").unwrap()
}

/// Store path: one 1 KiB message appended to a live transcript, vs a raw 1 KiB sled insert.
/// The baseline of the target writes round-robin to 100 transcripts, as chatvault does,
/// under keys of a message record's shape (a 47-byte transcript prefix and a 4-byte
/// sequence number), so both trees grow at 100 places. Beside it, for reference, the
/// cheapest pattern sled has: 8-byte keys in order, every insert at the tree's right edge.
/// Each baseline's writes are flushed before the next side runs, so its writeback does
/// not land on the other's measurement.
fn store(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let tenant = TenantId::parse("bench").unwrap();
    let raw = raw_sled(dir.path());
    let value = vec![7u8; KIB];
    let mut g = c.benchmark_group("store_1KiB");
    g.throughput(Throughput::Bytes(KIB as u64));
    let mut n = 0u32;
    g.bench_function("baseline_raw_sled_insert", |b| {
        b.iter(|| {
            n += 1;
            let mut key = [0u8; 51];
            key[..47].fill((n % 100) as u8 + 1);
            key[47..].copy_from_slice(&(n / 100).to_be_bytes());
            raw.insert(key, value.as_slice()).unwrap();
        })
    });
    raw.flush().unwrap();
    let sequential = sled::Config::new().path(dir.path().join("raw-seq")).open().unwrap();
    let mut n = 0u64;
    g.bench_function("baseline_raw_sled_insert_sequential_keys", |b| {
        b.iter(|| {
            n += 1;
            sequential.insert(n.to_be_bytes(), value.as_slice()).unwrap();
        })
    });
    sequential.flush().unwrap();
    for t in 0..100 {
        rt.block_on(v.put_transcript(&tenant, Transcript::new(format!("t{t}"), format!("s{}", t % 10), vec![])))
            .unwrap();
    }
    let mut n = 0usize;
    g.bench_function("chatvault_append_encrypted", |b| {
        b.iter_batched(
            || {
                n += 1;
                (format!("t{}", n % 100), vec![message(n, KIB)])
            },
            |(id, msg)| rt.block_on(v.append_messages(&tenant, &id, msg, None)).unwrap().value,
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Read path: a 1 KiB message read and decrypted, vs a raw sled get of the same size.
/// Both read 100,000 records in the same shuffled order, so neither side reads a set
/// small enough to live in the CPU's caches (a store is larger than that). The vault's
/// in-memory caches hold 10,000 entries, a tenth of the transcripts, spread over 100
/// subjects: most reads find neither their body record nor their subject cached.
fn get(c: &mut Criterion) {
    // `cargo test --benches` (CI's smoke run, unoptimised) proves the path with fewer.
    let records: u64 = if std::env::args().any(|a| a == "--bench") { 100_000 } else { 1000 };
    let rt = Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let v = vault_with(dir.path(), |o| o.key_cache_entries = 10_000);
    let tenant = TenantId::parse("bench").unwrap();
    let raw = raw_sled(dir.path());
    for i in 0..records {
        raw.insert(i.to_be_bytes(), vec![7u8; KIB]).unwrap();
        let t = Transcript::new(format!("t{i}"), format!("s{}", i % 100), vec![message(0, KIB)]);
        rt.block_on(v.put_transcript(&tenant, t)).unwrap();
    }
    raw.flush().unwrap();
    v.sync().unwrap();
    // A full-period LCG modulo a power of two, folded into 0..records.
    let shuffled = |state: &mut u64| loop {
        *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) & ((1 << 17) - 1);
        if *state < records {
            return *state;
        }
    };
    let mut g = c.benchmark_group("get_1KiB");
    g.throughput(Throughput::Bytes(KIB as u64));
    let mut i = 0u64;
    g.bench_function("baseline_raw_sled_get", |b| {
        b.iter(|| {
            let k = shuffled(&mut i);
            black_box(raw.get(k.to_be_bytes()).unwrap())
        })
    });
    let mut i = 0u64;
    g.bench_function("chatvault_get_transcript_decrypted", |b| {
        b.iter(|| {
            let k = shuffled(&mut i);
            black_box(v.get_transcript(&tenant, &format!("t{k}")).unwrap())
        })
    });
    g.finish();
}

/// Appending costs the message, not the transcript: 10 vs 10,000 messages already there.
/// Each length has its own store, and both do the same untimed work every 100 appends:
/// a fresh transcript of 10 messages is put (on the short side it becomes the one
/// appended to, or criterion's iterations would grow it to hundreds of thousands) and
/// appended to once, so its first append's cache misses are not timed either.
fn append_scaling(c: &mut Criterion) {
    const ROUND: usize = 100;
    let rt = Runtime::new().unwrap();
    let tenant = TenantId::parse("bench").unwrap();
    let mut g = c.benchmark_group("append_256B");
    for (existing, short) in [(10usize, true), (10_000, false)] {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path());
        let append = |id: &str, msgs: Vec<Message>| rt.block_on(v.append_messages(&tenant, id, msgs, None)).unwrap();
        let put = |id: &str, len: usize| {
            let msgs: Vec<Message> = (0..len).map(|i| message(i, 256)).collect();
            rt.block_on(v.put_transcript(&tenant, Transcript::new(id, "s", msgs[..len.min(1000)].to_vec()))).unwrap();
            for chunk in msgs.get(1000..).unwrap_or_default().chunks(1000) {
                append(id, chunk.to_vec());
            }
        };
        let (mut round, mut appended) = (0usize, ROUND);
        let mut id = format!("len{existing}");
        put(&id, existing);
        g.bench_function(format!("to_transcript_of_{existing}"), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    if appended == ROUND {
                        round += 1;
                        appended = 0;
                        let fresh = format!("fresh-{round}");
                        put(&fresh, 10);
                        if short {
                            id = fresh;
                        }
                        append(&id, vec![message(0, 256)]);
                    }
                    appended += 1;
                    let m = vec![message(existing + appended, 256)];
                    let start = Instant::now();
                    black_box(append(&id, m));
                    timed += start.elapsed();
                }
                timed
            })
        });
    }
    g.finish();
}

/// Shred of a subject with 10 transcripts (durable flush excluded here: see the load bench).
fn shred(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let tenant = TenantId::parse("bench").unwrap();
    let mut g = c.benchmark_group("shred");
    let mut s = 0u64;
    g.bench_function("subject_with_10_transcripts", |b| {
        b.iter_batched(
            || {
                s += 1;
                let subject = format!("subject-{s}");
                for t in 0..10 {
                    rt.block_on(
                        v.put_transcript(&tenant, Transcript::new(format!("{subject}-{t}"), subject.as_str(), vec![])),
                    )
                    .unwrap();
                }
                subject
            },
            |subject| rt.block_on(v.shred_subject(&tenant, &subject)).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

#[derive(serde::Serialize)]
struct JsonMessage<'a> {
    message_id: &'a str,
    author_role: &'static str,
    author_name: &'a str,
    sent_at_micros: i64,
    text: &'a str,
}

fn to_json(t: &Transcript, out: &mut Vec<u8>) {
    let msgs: Vec<JsonMessage<'_>> = t
        .messages
        .iter()
        .map(|m| JsonMessage {
            message_id: &m.message_id,
            author_role: "visitor",
            author_name: &m.author_name,
            sent_at_micros: m.sent_at.map(|s| s.micros()).unwrap_or(0),
            text: &m.text,
        })
        .collect();
    serde_json::to_writer(out, &msgs).unwrap();
}

/// The export path (`chatvault::export`, what ExportService streams): every transcript of
/// a tenant decrypted and written as the JSON document, from a store opened afresh for each
/// run, vs serde_json alone on the same, already decrypted, data. Throughput is JSON bytes.
fn export(c: &mut Criterion) {
    // 1 KiB chat lines, and the 16 KiB messages the gRPC export run of benches/load.rs uses.
    for (size, per_transcript) in [(KIB, 40), (16 * KIB, 4)] {
        export_of(c, size, per_transcript);
    }
}

fn export_of(c: &mut Criterion, size: usize, per_transcript: usize) {
    let rt = Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tenant = TenantId::parse("bench").unwrap();
    let decrypted: Vec<Transcript> = {
        let v = vault(dir.path());
        for t in 0..100 {
            let msgs = (0..per_transcript).map(|i| message(i, size)).collect();
            let tr = Transcript::new(format!("t{t}"), format!("s{}", t % 10), msgs);
            rt.block_on(v.put_transcript(&tenant, tr)).unwrap();
        }
        v.sync().unwrap();
        (0..100).map(|t| v.get_transcript(&tenant, &format!("t{t}")).unwrap()).collect()
    };
    let run = |v: &Vault| {
        let mut bytes = 0usize;
        let export = Export::start(v, &tenant, Scope::Tenant).unwrap();
        export
            .write(v, DEFAULT_CHUNK_BYTES, &mut |chunk| {
                bytes += black_box(chunk).len();
                true
            })
            .unwrap();
        bytes
    };
    let json_bytes = run(&vault(dir.path()));
    let mut g = c.benchmark_group(format!("export_tenant_json_{}KiB_messages", size / KIB));
    g.throughput(Throughput::Bytes(json_bytes as u64));
    g.bench_function("baseline_serde_json_only", |b| {
        let mut out = Vec::with_capacity(json_bytes);
        b.iter(|| {
            out.clear();
            for t in &decrypted {
                to_json(t, &mut out);
            }
            black_box(out.len())
        })
    });
    g.bench_function("chatvault_export_fresh_store", |b| {
        // Opening is not timed; the first reads of the fresh store are.
        b.iter_batched(
            || vault(dir.path()),
            |v| {
                black_box(run(&v));
                v
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// Per-request key handling: what a request pays beyond storage.
fn key_handling(c: &mut Criterion) {
    let key = Arc::new(SecretKey::generate().unwrap());
    let plain = vec![1u8; KIB];
    let region = chatvault::crypto::Binding::new("eu", false);
    let mut g = c.benchmark_group("crypto_1KiB");
    g.throughput(Throughput::Bytes(KIB as u64));
    for alg in [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305] {
        g.bench_function(format!("seal_{alg:?}"), |b| {
            b.iter(|| {
                let aad = Aad::new(RecordKind::Message).bytes(b"tenant").bytes(&[0; 32]).u64(1);
                black_box(region.seal(alg, &key, &aad, &plain).unwrap())
            })
        });
    }
    g.bench_function("blind_index_hmac", |b| {
        b.iter(|| black_box(crypto::blind_index(&key, b"subject", b"alice@example.com")))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = store, get, append_scaling, shred, export, key_handling
}
criterion_main!(benches);
