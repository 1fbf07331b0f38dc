//! In-process benchmarks of the vault, each next to its baseline in the same run:
//! raw sled with the same bytes and no encryption, and serde_json alone.
//! `scripts/bench.sh` turns the results into BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

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
    let root = RootKeySource::Hex(zeroize::Zeroizing::new("42".repeat(32)));
    let mut opts = VaultOptions::new(dir.join("data"), dir.join("keys"), root);
    // The baseline is sled without a flush per write; compare like with like.
    opts.durability = Durability::None;
    // Measured here is cost, not limits: criterion appends ~100k messages to one transcript.
    opts.limits.max_messages_per_transcript = u32::MAX;
    Vault::open(opts).unwrap().0
}

fn raw_sled(dir: &std::path::Path) -> sled::Tree {
    sled::Config::new().path(dir.join("raw")).cache_capacity(256 << 20).open().unwrap().open_tree("raw").unwrap()
}

/// Store path: one 1 KiB message appended to a live transcript, vs a raw 1 KiB sled insert.
fn store(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let tenant = TenantId::parse("bench").unwrap();
    let raw = raw_sled(dir.path());
    let mut g = c.benchmark_group("store_1KiB");
    g.throughput(Throughput::Bytes(KIB as u64));
    let mut i = 0u64;
    g.bench_function("baseline_raw_sled_insert", |b| {
        let value = vec![7u8; KIB];
        b.iter(|| {
            i += 1;
            raw.insert(i.to_be_bytes(), value.as_slice()).unwrap();
        })
    });
    // Many transcripts, so the tree grows like the baseline's does.
    for t in 0..100 {
        rt.block_on(v.put_transcript(&tenant, Transcript::new(format!("t{t}"), format!("s{}", t % 10), vec![])))
            .unwrap();
    }
    let mut n = 0usize;
    g.bench_function("chatvault_append_encrypted", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(v.append_messages(&tenant, &format!("t{}", n % 100), vec![message(n, KIB)], None))
                .unwrap()
                .value
        })
    });
    g.finish();
}

/// Read path: a 1 KiB message read and decrypted, vs a raw sled get of the same size.
fn get(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let tenant = TenantId::parse("bench").unwrap();
    let raw = raw_sled(dir.path());
    for i in 0..1000u64 {
        raw.insert(i.to_be_bytes(), vec![7u8; KIB]).unwrap();
        rt.block_on(v.put_transcript(&tenant, Transcript::new(format!("t{i}"), "s", vec![message(0, KIB)]))).unwrap();
    }
    let mut g = c.benchmark_group("get_1KiB");
    g.throughput(Throughput::Bytes(KIB as u64));
    let mut i = 0u64;
    g.bench_function("baseline_raw_sled_get", |b| {
        b.iter(|| {
            i = (i + 1) % 1000;
            black_box(raw.get(i.to_be_bytes()).unwrap())
        })
    });
    g.bench_function("chatvault_get_transcript_decrypted", |b| {
        b.iter(|| {
            i = (i + 1) % 1000;
            black_box(v.get_transcript(&tenant, &format!("t{i}")).unwrap())
        })
    });
    g.finish();
}

/// Appending costs the message, not the transcript: 10 vs 10,000 messages already there.
fn append_scaling(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let tenant = TenantId::parse("bench").unwrap();
    let mut g = c.benchmark_group("append_256B");
    for existing in [10usize, 10_000] {
        let id = format!("len{existing}");
        let msgs: Vec<Message> = (0..existing).map(|i| message(i, 256)).collect();
        for chunk in msgs.chunks(1000).enumerate() {
            if chunk.0 == 0 {
                rt.block_on(v.put_transcript(&tenant, Transcript::new(id.as_str(), "s", chunk.1.to_vec()))).unwrap();
            } else {
                rt.block_on(v.append_messages(&tenant, &id, chunk.1.to_vec(), None)).unwrap();
            }
        }
        let mut n = existing;
        g.bench_function(format!("to_transcript_of_{existing}"), |b| {
            b.iter(|| {
                n += 1;
                rt.block_on(v.append_messages(&tenant, &id, vec![message(n, 256)], None)).unwrap()
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
    let mut g = c.benchmark_group("crypto_1KiB");
    g.throughput(Throughput::Bytes(KIB as u64));
    for alg in [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305] {
        g.bench_function(format!("seal_{alg:?}"), |b| {
            b.iter(|| {
                let aad = Aad::new(RecordKind::Message).bytes(b"tenant").bytes(&[0; 32]).u64(1);
                black_box(crypto::seal(alg, &key, aad.as_slice(), &plain).unwrap())
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
