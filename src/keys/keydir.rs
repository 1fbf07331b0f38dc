//! Key-store keys (KSKs): the middle of the hierarchy. They wrap every data key kept in
//! the data directory and live apart from it, in a key directory, so that a copy of the
//! data directory alone — or with a *later* key directory — cannot open shredded data.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::root::{self, PassphraseSalt, RootKey, RootKeySource};
use super::{KeyError, files};
use crate::crypto::{self, Aad, Algorithm, Binding, RecordKind, SecretKey};

/// Where key-store keys are kept. The file implementation is below; an external KMS
/// can implement this later without the vault noticing.
pub trait KeyStore: Send + Sync {
    /// Random id shared with the data directory this key store belongs to.
    fn store_id(&self) -> [u8; 16];
    /// The epoch new keys are wrapped under.
    fn current_epoch(&self) -> u64;
    /// Every epoch still held, oldest first.
    fn epochs(&self) -> Vec<u64>;
    /// Seals `secret` (a key, or a key already wrapped under a data key) under the
    /// current epoch; `aad` says what it is for. The epoch leads the result.
    fn seal(&self, aad: Aad, secret: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// Opens what [`KeyStore::seal`] made, under any epoch still held.
    fn open(&self, sealed: &[u8], aad: Aad) -> Result<Zeroizing<Vec<u8>>, KeyError>;
    /// Wraps `key` under the current epoch; `aad` says what the key is for.
    fn wrap(&self, aad: Aad, key: &SecretKey) -> Result<Vec<u8>, KeyError> {
        self.seal(aad, key.expose())
    }
    /// Unwraps a key made by [`KeyStore::wrap`] under any epoch still held.
    fn unwrap(&self, wrapped: &[u8], aad: Aad) -> Result<SecretKey, KeyError> {
        Ok(SecretKey::from_slice(&self.open(wrapped, aad)?)?)
    }
    /// Creates a new epoch and makes it current. Durable before it returns.
    fn add_epoch(&self) -> Result<u64, KeyError>;
    /// Destroys every epoch older than `keep_from`. Durable before it returns.
    fn destroy_epochs_before(&self, keep_from: u64) -> Result<Vec<u64>, KeyError>;
    /// A key for one control-plane purpose, fixed for the life of the root key.
    fn control_key(&self, purpose: &[u8]) -> SecretKey;
    /// The region this key store belongs to: every envelope sealed with its keys names it.
    fn binding(&self) -> &Binding;
}

/// The epoch a wrapped key was made under (its first 8 bytes).
pub fn wrapped_epoch(wrapped: &[u8]) -> Result<u64, KeyError> {
    let head: [u8; 8] = wrapped
        .get(..8)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| KeyError::Corrupt("wrapped key too short".into()))?;
    Ok(u64::from_be_bytes(head))
}

const META_FILE: &str = "keydir.meta";
const META_MAGIC: [u8; 4] = *b"CVKD";
const META_VERSION: u16 = 1;
const REGION_FILE: &str = "keydir.region";
const REGION_MAGIC: [u8; 4] = *b"CVKR";
const KSK_MAGIC: [u8; 4] = *b"CVKK";
const KSK_VERSION: u16 = 1;

/// The key directory's description of itself. Holds no secret.
#[derive(Serialize, Deserialize)]
struct KeyDirMeta {
    magic: [u8; 4],
    version: u16,
    store_id: [u8; 16],
    root_check: [u8; 16],
    passphrase: Option<PassphraseSalt>,
}

/// Which region a key directory belongs to, and whether it was made by a release from
/// before regions (then its older envelopes, v1, name no region and are still read).
#[derive(Serialize, Deserialize)]
struct RegionStamp {
    magic: [u8; 4],
    region: String,
    legacy: bool,
}

/// One key-store key file: the KSK sealed under the root key.
#[derive(Serialize, Deserialize)]
struct KskFile {
    magic: [u8; 4],
    version: u16,
    epoch: u64,
    sealed: Vec<u8>,
}

/// What opening the key directory did, for the start-up log.
#[derive(Debug, Default)]
pub struct OpenReport {
    pub created: bool,
    pub generated_dev_key: Option<PathBuf>,
}

/// Key-store keys in files of a local directory.
pub struct FileKeyDir {
    dir: PathBuf,
    root: RootKey,
    binding: Binding,
    /// The region stamp to write once the whole open succeeded (a new or migrated key
    /// directory): [`FileKeyDir::commit_region_stamp`].
    unstamped: std::sync::Mutex<Option<RegionStamp>>,
    store_id: [u8; 16],
    ksks: RwLock<BTreeMap<u64, Arc<SecretKey>>>,
}

impl FileKeyDir {
    /// Writes the region stamp of a new or migrated key directory: called once whatever
    /// opens it has accepted it, so a refused start stamps nothing.
    pub fn commit_region_stamp(&self) -> Result<(), KeyError> {
        let pending = self.unstamped.lock().map_err(|_| KeyError::Poisoned)?.take();
        match pending {
            Some(stamp) => stamp.write(&self.dir),
            None => Ok(()),
        }
    }

    /// Checks, reading only, that `dir` can be opened as `region` under `source`: the
    /// region stamp, and the root key's check value (returned, so that callers can
    /// refuse one root key for two regions). `None` when there is nothing to check yet
    /// (a directory not made, a development key not generated).
    pub fn preflight(dir: &Path, source: &RootKeySource, region: &str) -> Result<Option<[u8; 16]>, KeyError> {
        if let RootKeySource::Development(path) = source
            && !path.exists()
        {
            return Ok(None);
        }
        let meta = read_meta(&dir.join(META_FILE))?;
        region_stamp(dir, region, false)?;
        let loaded = root::load(source, meta.as_ref().and_then(|m| m.passphrase), &mut None)?;
        let check = loaded.key.check_value();
        if meta.is_some_and(|m| m.root_check != check) {
            return Err(KeyError::WrongRootKey);
        }
        Ok(Some(check))
    }

    /// The key that signs erasure receipts, from this directory (made on first use).
    pub fn receipt_signer(&self) -> Result<super::ReceiptSigner, KeyError> {
        super::receipts::ReceiptSigner::open(&self.dir, &self.root, &self.store_id, &self.binding)
    }
}

impl FileKeyDir {
    /// Opens (or, when empty, initialises) a key directory of `region`. Refuses a root
    /// key whose check value differs from the one recorded, or a directory of another
    /// region, before touching anything.
    pub fn open(dir: &Path, source: &RootKeySource, region: &str) -> Result<(Self, OpenReport), KeyError> {
        files::ensure_private_dir(dir).map_err(|e| KeyError::io(dir, e))?;
        let meta_path = dir.join(META_FILE);
        let meta = read_meta(&meta_path)?;
        let mut new_salt = None;
        let loaded = root::load(source, meta.as_ref().and_then(|m| m.passphrase), &mut new_salt)?;
        let root = loaded.key;
        let mut report = OpenReport { created: false, generated_dev_key: loaded.generated_dev_key };
        let store_id = match &meta {
            Some(m) => {
                if m.root_check != root.check_value() {
                    return Err(KeyError::WrongRootKey);
                }
                m.store_id
            }
            None => {
                if has_ksk_files(dir)? {
                    return Err(KeyError::Corrupt(format!("{META_FILE} is missing")));
                }
                let meta = KeyDirMeta {
                    magic: META_MAGIC,
                    version: META_VERSION,
                    store_id: crypto::random_bytes()?,
                    root_check: root.check_value(),
                    passphrase: new_salt,
                };
                let bytes = postcard::to_allocvec(&meta).map_err(|e| KeyError::Corrupt(e.to_string()))?;
                files::write_atomic(&meta_path, &bytes).map_err(|e| KeyError::io(&meta_path, e))?;
                report.created = true;
                meta.store_id
            }
        };
        let (binding, unstamped) = region_stamp(dir, region, !report.created && has_v1_ksk(dir)?)?;
        let keydir = FileKeyDir {
            dir: dir.to_path_buf(),
            root,
            binding,
            unstamped: std::sync::Mutex::new(unstamped),
            store_id,
            ksks: RwLock::new(BTreeMap::new()),
        };
        keydir.load_ksks()?;
        if keydir.epochs().is_empty() {
            keydir.add_epoch()?;
        }
        Ok((keydir, report))
    }

    fn ksk_path(&self, epoch: u64) -> PathBuf {
        self.dir.join(format!("ksk-{epoch:020}.key"))
    }

    fn ksk_aad(&self, epoch: u64) -> Aad {
        Aad::new(RecordKind::KeyStoreKey).bytes(&self.store_id).u64(epoch)
    }

    fn load_ksks(&self) -> Result<(), KeyError> {
        let finished = files::finish_destroying(&self.dir).map_err(|e| KeyError::io(&self.dir, e))?;
        if finished > 0 {
            tracing::warn!(files = finished, "key directory: finished destroying key files a crash interrupted");
        }
        let mut map = BTreeMap::new();
        let mut zeroed = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| KeyError::io(&self.dir, e))? {
            let path = entry.map_err(|e| KeyError::io(&self.dir, e))?.path();
            if !is_ksk_file(&path) {
                continue;
            }
            let bytes = fs::read(&path).map_err(|e| KeyError::io(&path, e))?;
            if !bytes.is_empty() && bytes.iter().all(|&b| b == 0) {
                // What an older version's destruction left when a crash hit between its
                // overwrite and its unlink: the key is gone already.
                zeroed.push(path);
                continue;
            }
            let file: KskFile = postcard::from_bytes(&bytes)
                .map_err(|_| KeyError::Corrupt(format!("{} is not a key file", path.display())))?;
            if file.magic != KSK_MAGIC || file.version != KSK_VERSION {
                return Err(KeyError::Corrupt(format!("{}: unknown format", path.display())));
            }
            if ksk_epoch_of(&path) != Some(file.epoch) {
                return Err(KeyError::Corrupt(format!("{}: holds the key of epoch {}", path.display(), file.epoch)));
            }
            let raw = self
                .binding
                .open(self.root.wrapping_key(), &self.ksk_aad(file.epoch), &file.sealed)
                .map_err(|_| {
                    KeyError::Corrupt(format!(
                        "{} does not open under this root key as region {:?} (another root key, another region's key, or damage)",
                        path.display(),
                        self.binding.region()
                    ))
                })?;
            map.insert(file.epoch, Arc::new(SecretKey::from_slice(&raw)?));
        }
        let newest = map.keys().last().copied();
        for path in zeroed {
            // Only an epoch older than a live one can be a destruction cut short; a zeroed
            // newest key is damage, and the data wrapped under it is lost.
            match (ksk_epoch_of(&path), newest) {
                (Some(epoch), Some(newest)) if epoch < newest => {
                    tracing::warn!(epoch, "key directory: removing a key file a crash left zeroed mid-destruction");
                    files::destroy(&path).map_err(|e| KeyError::io(&path, e))?;
                }
                _ => return Err(KeyError::Corrupt(format!("{} is zero-filled", path.display()))),
            }
        }
        *self.ksks.write().map_err(|_| KeyError::Poisoned)? = map;
        Ok(())
    }

    fn ksk(&self, epoch: u64) -> Result<Arc<SecretKey>, KeyError> {
        let map = self.ksks.read().map_err(|_| KeyError::Poisoned)?;
        map.get(&epoch).cloned().ok_or(KeyError::EpochDestroyed(epoch))
    }
}

impl KeyStore for FileKeyDir {
    fn store_id(&self) -> [u8; 16] {
        self.store_id
    }

    fn current_epoch(&self) -> u64 {
        self.epochs().last().copied().unwrap_or(0)
    }

    fn epochs(&self) -> Vec<u64> {
        self.ksks.read().map(|m| m.keys().copied().collect()).unwrap_or_default()
    }

    fn seal(&self, aad: Aad, secret: &[u8]) -> Result<Vec<u8>, KeyError> {
        let epoch = self.current_epoch();
        let ksk = self.ksk(epoch)?;
        let sealed = self.binding.seal(Algorithm::Aes256Gcm, &ksk, &aad.u64(epoch), secret)?;
        let mut out = Vec::with_capacity(8 + sealed.len());
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn open(&self, sealed: &[u8], aad: Aad) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let epoch = wrapped_epoch(sealed)?;
        let ksk = self.ksk(epoch)?;
        Ok(self.binding.open(&ksk, &aad.u64(epoch), &sealed[8..])?)
    }

    fn add_epoch(&self) -> Result<u64, KeyError> {
        let mut map = self.ksks.write().map_err(|_| KeyError::Poisoned)?;
        let epoch = map.keys().last().copied().unwrap_or(0) + 1;
        let ksk = SecretKey::generate()?;
        let sealed =
            self.binding.seal(Algorithm::Aes256Gcm, self.root.wrapping_key(), &self.ksk_aad(epoch), ksk.expose())?;
        let file = KskFile { magic: KSK_MAGIC, version: KSK_VERSION, epoch, sealed };
        let bytes = postcard::to_allocvec(&file).map_err(|e| KeyError::Corrupt(e.to_string()))?;
        let path = self.ksk_path(epoch);
        files::write_atomic(&path, &bytes).map_err(|e| KeyError::io(&path, e))?;
        map.insert(epoch, Arc::new(ksk));
        Ok(epoch)
    }

    fn destroy_epochs_before(&self, keep_from: u64) -> Result<Vec<u64>, KeyError> {
        let mut map = self.ksks.write().map_err(|_| KeyError::Poisoned)?;
        let old: Vec<u64> = map.range(..keep_from).map(|(e, _)| *e).collect();
        for epoch in &old {
            let path = self.ksk_path(*epoch);
            files::destroy(&path).map_err(|e| KeyError::io(&path, e))?;
            map.remove(epoch);
        }
        Ok(old)
    }

    fn control_key(&self, purpose: &[u8]) -> SecretKey {
        self.root.control_key(purpose)
    }

    fn binding(&self) -> &Binding {
        &self.binding
    }
}

impl std::fmt::Debug for FileKeyDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKeyDir").field("dir", &self.dir).field("epochs", &self.epochs()).finish_non_exhaustive()
    }
}

fn read_meta(path: &Path) -> Result<Option<KeyDirMeta>, KeyError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KeyError::io(path, e)),
    };
    let meta: KeyDirMeta =
        postcard::from_bytes(&bytes).map_err(|_| KeyError::Corrupt(format!("{} is unreadable", path.display())))?;
    if meta.magic != META_MAGIC || meta.version != META_VERSION {
        return Err(KeyError::Corrupt(format!("{}: unknown format", path.display())));
    }
    Ok(Some(meta))
}

/// The region a key directory belongs to, from its stamp; a directory without one gets
/// the configured name, and the stamp to write once its keys opened. A directory that
/// was in use before it had a stamp (`existed`) was made by a release without regions: it
/// keeps reading its older envelopes.
fn region_stamp(dir: &Path, region: &str, existed: bool) -> Result<(Binding, Option<RegionStamp>), KeyError> {
    let path = dir.join(REGION_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let stamp: RegionStamp = postcard::from_bytes(&bytes)
                .ok()
                .filter(|s: &RegionStamp| s.magic == REGION_MAGIC)
                .ok_or_else(|| KeyError::Corrupt(format!("{} is unreadable", path.display())))?;
            if stamp.region != region {
                return Err(KeyError::OtherRegion {
                    dir: dir.to_path_buf(),
                    region: stamp.region,
                    wanted: region.into(),
                });
            }
            Ok((Binding::new(region, stamp.legacy), None))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let stamp = RegionStamp { magic: REGION_MAGIC, region: region.into(), legacy: existed };
            Ok((Binding::new(region, existed), Some(stamp)))
        }
        Err(e) => Err(KeyError::io(&path, e)),
    }
}

impl RegionStamp {
    fn write(&self, dir: &Path) -> Result<(), KeyError> {
        let path = dir.join(REGION_FILE);
        let bytes = postcard::to_allocvec(self).map_err(|e| KeyError::Corrupt(e.to_string()))?;
        files::write_atomic(&path, &bytes).map_err(|e| KeyError::io(&path, e))?;
        if self.legacy {
            tracing::info!(region = %self.region, dir = %dir.display(), "key directory from before regions: now this region's");
        }
        Ok(())
    }
}

/// Whether a key file sealed before regions (a v1 envelope) is in `dir`: what makes a key
/// directory without a stamp one from a single-region release, rather than a new one
/// whose stamp a crash or a hand kept from being written.
fn has_v1_ksk(dir: &Path) -> Result<bool, KeyError> {
    for entry in fs::read_dir(dir).map_err(|e| KeyError::io(dir, e))? {
        let path = entry.map_err(|e| KeyError::io(dir, e))?.path();
        if !is_ksk_file(&path) {
            continue;
        }
        let bytes = fs::read(&path).map_err(|e| KeyError::io(&path, e))?;
        if let Ok(file) = postcard::from_bytes::<KskFile>(&bytes)
            && file.sealed.first() == Some(&1)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn is_ksk_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.starts_with("ksk-") && name.ends_with(".key")
}

/// The epoch a key file's name says it holds.
fn ksk_epoch_of(path: &Path) -> Option<u64> {
    path.file_name()?.to_str()?.strip_prefix("ksk-")?.strip_suffix(".key")?.parse().ok()
}

fn has_ksk_files(dir: &Path) -> Result<bool, KeyError> {
    let entries = fs::read_dir(dir).map_err(|e| KeyError::io(dir, e))?;
    Ok(entries.filter_map(Result::ok).any(|e| is_ksk_file(&e.path())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_root(byte: u8) -> RootKeySource {
        RootKeySource::Hex(Zeroizing::new(format!("{byte:02x}").repeat(32)))
    }

    fn aad() -> Aad {
        Aad::new(RecordKind::SubjectKey).bytes(b"t").bytes(b"s")
    }

    #[test]
    fn wrapped_keys_survive_reopen_and_rotation_until_destroyed() {
        let dir = tempfile::tempdir().unwrap();
        let (kd, report) = FileKeyDir::open(dir.path(), &hex_root(1), "eu").unwrap();
        assert!(report.created);
        let dek = SecretKey::generate().unwrap();
        let wrapped = kd.wrap(aad(), &dek).unwrap();
        drop(kd);
        let (kd, _) = FileKeyDir::open(dir.path(), &hex_root(1), "eu").unwrap();
        assert_eq!(kd.unwrap(&wrapped, aad()).unwrap().expose(), dek.expose());
        let e2 = kd.add_epoch().unwrap();
        assert_eq!(kd.destroy_epochs_before(e2).unwrap(), vec![1]);
        assert!(matches!(kd.unwrap(&wrapped, aad()), Err(KeyError::EpochDestroyed(1))));
        let (kd, _) = FileKeyDir::open(dir.path(), &hex_root(1), "eu").unwrap();
        assert_eq!(kd.epochs(), vec![e2]);
    }

    #[test]
    fn wrong_root_key_is_refused_with_key_check_value() {
        let dir = tempfile::tempdir().unwrap();
        FileKeyDir::open(dir.path(), &hex_root(1), "eu").unwrap();
        assert!(matches!(FileKeyDir::open(dir.path(), &hex_root(2), "eu"), Err(KeyError::WrongRootKey)));
    }

    #[test]
    fn unwrap_with_other_aad_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (kd, _) = FileKeyDir::open(dir.path(), &hex_root(1), "eu").unwrap();
        let wrapped = kd.wrap(aad(), &SecretKey::generate().unwrap()).unwrap();
        let other = Aad::new(RecordKind::SubjectKey).bytes(b"t").bytes(b"x");
        assert!(kd.unwrap(&wrapped, other).is_err());
    }

    #[test]
    fn destroyed_key_file_is_gone_from_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (kd, _) = FileKeyDir::open(dir.path(), &hex_root(1), "eu").unwrap();
        let first = kd.ksk_path(1);
        assert!(first.exists());
        kd.add_epoch().unwrap();
        kd.destroy_epochs_before(2).unwrap();
        assert!(!first.exists());
    }

    #[test]
    fn a_destruction_cut_short_after_the_rename_is_finished_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let (kd, _) = FileKeyDir::open(dir.path(), &hex_root(1), "eu").unwrap();
        kd.add_epoch().unwrap();
        let first = kd.ksk_path(1);
        drop(kd);
        // The crash: renamed to its doomed name, not yet wiped or unlinked.
        let doomed = files::destroying_name(&first);
        fs::rename(&first, &doomed).unwrap();
        let (kd, _) = FileKeyDir::open(dir.path(), &hex_root(1), "eu").unwrap();
        assert_eq!(kd.epochs(), vec![2]);
        assert!(!doomed.exists() && !first.exists());
    }

    #[test]
    fn a_zeroed_key_file_of_an_old_epoch_is_taken_for_a_destruction_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let (kd, _) = FileKeyDir::open(dir.path(), &hex_root(1), "eu").unwrap();
        kd.add_epoch().unwrap();
        let (first, second) = (kd.ksk_path(1), kd.ksk_path(2));
        drop(kd);
        // What an older release left when a crash hit between its overwrite and unlink.
        let len = fs::metadata(&first).unwrap().len() as usize;
        fs::write(&first, vec![0u8; len]).unwrap();
        let (kd, _) = FileKeyDir::open(dir.path(), &hex_root(1), "eu").unwrap();
        assert_eq!(kd.epochs(), vec![2]);
        assert!(!first.exists());
        drop(kd);
        // The newest key zeroed is damage, not a crash: refused, and left where it is.
        fs::write(&second, vec![0u8; len]).unwrap();
        assert!(matches!(FileKeyDir::open(dir.path(), &hex_root(1), "eu"), Err(KeyError::Corrupt(_))));
        assert!(second.exists());
    }
}
