//! The forensic adversary: every byte of a copy of the data directory, and every key a
//! key directory yields to the root key. Helpers decode with the project's own crypto
//! code, the way someone holding the disks and the root key would.

use std::path::{Path, PathBuf};

use chatvault::crypto::{self, Aad, Binding, RecordKind, SecretKey};
use serde::Deserialize;

use super::common::{ROOT_KEY_HEX, files_below};

/// What the key directory's files hold, decoded the way an attacker with the root key would.
#[derive(Deserialize)]
struct KeyDirMeta {
    _magic: [u8; 4],
    _version: u16,
    store_id: [u8; 16],
    _root_check: [u8; 16],
}

#[derive(Deserialize)]
struct KskFile {
    _magic: [u8; 4],
    _version: u16,
    epoch: u64,
    sealed: Vec<u8>,
}

/// Every key-store key the given key directory yields to the root key.
pub fn key_store_keys(key_dir: &Path) -> Vec<SecretKey> {
    let root = SecretKey::from_slice(&hex::decode(ROOT_KEY_HEX).unwrap()).unwrap();
    let wrap = crypto::derive_key(&root, b"chatvault/root/wrap-key-store-key/v1");
    let meta_bytes = std::fs::read(key_dir.join("keydir.meta")).unwrap();
    let meta: KeyDirMeta = postcard::from_bytes(&meta_bytes).unwrap();
    let mut out = Vec::new();
    for f in files_below(key_dir) {
        let name = f.file_name().unwrap().to_str().unwrap();
        if !(name.starts_with("ksk-") && name.ends_with(".key")) {
            continue;
        }
        let file: KskFile = postcard::from_bytes(&std::fs::read(&f).unwrap()).unwrap();
        let aad = Aad::new(RecordKind::KeyStoreKey).bytes(&meta.store_id).u64(file.epoch);
        let raw = region().open(&wrap, &aad, &file.sealed).expect("ksk opens under the root key");
        out.push(SecretKey::from_slice(&raw).unwrap());
    }
    assert!(!out.is_empty());
    out
}

/// How the tests' servers (region `eu`) seal; it also reads envelopes from before regions.
pub fn region() -> Binding {
    Binding::new("eu", true)
}

/// Length of an AEAD envelope (version, algorithm, nonce, tag) around `plain` bytes.
pub const fn envelope_len(plain: usize) -> usize {
    2 + 12 + plain + 16
}

/// Every window of every file below each of `dirs` that opens under `key` with the AAD
/// `aad` gives it: the plaintexts. With `epoch_prefix`, a window starts with the 8-byte
/// key-store epoch (as key-store seals do), which `aad` is handed; else `aad` gets 0.
pub fn plaintexts_opening(
    dirs: &[&Path],
    plain_len: usize,
    epoch_prefix: bool,
    keys: &[SecretKey],
    aad: &dyn Fn(u64) -> Aad,
) -> Vec<Vec<u8>> {
    let skip = if epoch_prefix { 8 } else { 0 };
    let len = skip + envelope_len(plain_len);
    let mut found = Vec::new();
    for f in dirs.iter().flat_map(|d| files_below(d)) {
        let bytes = std::fs::read(&f).unwrap();
        for w in bytes.windows(len) {
            let epoch = if epoch_prefix { u64::from_be_bytes(w[..8].try_into().unwrap()) } else { 0 };
            let env = &w[skip..];
            if (epoch_prefix && !(1..=64).contains(&epoch))
                || !(env[0] == 1 || env[0] == 2)
                || !(env[1] == 1 || env[1] == 2)
            {
                continue;
            }
            let aad = aad(epoch);
            for k in keys {
                if let Ok(p) = region().open(k, &aad, env) {
                    found.push(p.to_vec());
                }
            }
        }
    }
    found
}

/// Subject data keys of `blind` (generations 0..3) that `ksks` unwrap from any byte of
/// the files below `dirs`.
pub fn subject_keys_found(dirs: &[&Path], ksks: &[SecretKey], tenant: &str, blind: &[u8]) -> Vec<Vec<u8>> {
    (0..3u64)
        .flat_map(|generation| {
            let aad = |epoch| {
                Aad::new(RecordKind::SubjectKey).bytes(tenant.as_bytes()).bytes(blind).u64(generation).u64(epoch)
            };
            plaintexts_opening(dirs, 32, true, ksks, &aad)
        })
        .collect()
}

/// How many copies of the subject's data key `ksks` unwrap from the files below `data_dir`.
pub fn subject_keys_recoverable(data_dir: &Path, ksks: &[SecretKey], tenant: &str, blind: &[u8]) -> usize {
    subject_keys_found(&[data_dir], ksks, tenant, blind).len()
}

/// A transcript incarnation's key as wrapped under its subject's key (generation 0):
/// what `ksks` open from any byte of `dirs` under the incarnation's key-store seal.
pub fn sealed_transcript_keys_found(
    dirs: &[&Path],
    ksks: &[SecretKey],
    tenant: &str,
    transcript: &[u8; 32],
    incarnation: u64,
) -> Vec<Vec<u8>> {
    let aad = |epoch| {
        Aad::new(RecordKind::TranscriptKeySeal).bytes(tenant.as_bytes()).bytes(transcript).u64(incarnation).u64(epoch)
    };
    plaintexts_opening(dirs, envelope_len(32), true, ksks, &aad)
}

/// Transcript keys of one incarnation that a subject key opens from any byte of `dirs`,
/// where they lie wrapped under that subject key alone (how earlier versions kept them).
pub fn bare_transcript_keys_found(
    dirs: &[&Path],
    subject_key: &SecretKey,
    tenant: &str,
    subject: &[u8],
    transcript: &[u8; 32],
    incarnation: u64,
) -> Vec<Vec<u8>> {
    let aad = |_| transcript_key_aad(tenant, subject, transcript, incarnation);
    plaintexts_opening(dirs, 32, false, std::slice::from_ref(subject_key), &aad)
}

/// The AAD of a transcript key wrapped under its subject's key (generation 0).
pub fn transcript_key_aad(tenant: &str, subject: &[u8], transcript: &[u8; 32], incarnation: u64) -> Aad {
    Aad::new(RecordKind::TranscriptKey)
        .bytes(tenant.as_bytes())
        .bytes(subject)
        .bytes(transcript)
        .u64(incarnation)
        .u64(0)
}

/// Every (transcript blind id, incarnation) that some byte of `dirs` names in a key
/// starting with `prefix` (a record type and tenant): sled keeps whole keys in its log,
/// for live records and stale ones alike.
pub fn incarnations_named(dirs: &[&Path], prefix: &[u8]) -> Vec<([u8; 32], u64)> {
    let mut out: Vec<([u8; 32], u64)> = Vec::new();
    for f in dirs.iter().flat_map(|d| files_below(d)) {
        let bytes = std::fs::read(&f).unwrap();
        for w in bytes.windows(prefix.len() + 40).filter(|w| w.starts_with(prefix)) {
            let tb: [u8; 32] = w[prefix.len()..prefix.len() + 32].try_into().unwrap();
            let inc = u64::from_be_bytes(w[prefix.len() + 32..].try_into().unwrap());
            if !out.contains(&(tb, inc)) {
                out.push((tb, inc));
            }
        }
    }
    out
}

/// The key prefix of `tenant`'s transcript key records (src/vault/layout.rs).
pub fn transcript_keys_prefix(tenant: &str) -> Vec<u8> {
    [&[0x01, 0x03, tenant.len() as u8][..], tenant.as_bytes()].concat()
}

/// A copy of `dir` at `to` (a path below the test's temporary directory).
pub fn snapshot(dir: &Path, to: PathBuf) -> PathBuf {
    super::common::copy_dir(dir, &to);
    to
}
