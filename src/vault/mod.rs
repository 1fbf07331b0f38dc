//! The vault: transcripts encrypted under per-transcript keys, wrapped by per-subject
//! data keys, wrapped by key-store keys, wrapped by the root key. It knows nothing of
//! gRPC; `grpc` translates to and from it.

mod backup;
mod bulk;
#[cfg(test)]
mod engine_suite;
mod erasure;
mod error;
mod holds;
mod layout;
mod layout_check;
mod locks;
mod messages;
mod model;
mod purge;
mod receipts;
mod reclaim;
mod records;
mod requests;
mod rotation;
mod seal;
mod subjects;
mod tenants;
#[cfg(test)]
pub(crate) mod testing;
mod times;
mod transcript_keys;
mod transcripts;
mod validate;
mod values;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

pub use backup::{MANIFEST as BACKUP_MANIFEST, Manifest as BackupManifest};
pub use bulk::{Scope, Visit, Walked};
pub use erasure::ErasureOverview;
pub use error::VaultError;
pub use holds::{HoldCheck, HoldScope, covers as hold_covers};
pub use layout::{Blind, TimeIndex};
pub use messages::Packing;
pub use model::{
    AuthorRole, ErasureState, ErasureStatus, Message, MessageRef, RotationHealth, RotationReport, ShredReceipt,
    SignedReceipt, SubjectInfo, SubjectStatus, TenantId, Timestamp, Touched, Transcript, TranscriptPage,
};
pub use purge::Swept;
pub use receipts::{RECEIPT_FORMAT, ReceiptError, ReceiptPayload, verify_receipt};
pub use reclaim::Backlog;
pub use tenants::TenantErasure;
pub use times::Due;
pub use validate::Limits;

use crate::clock::{Clock, SystemClock};
use crate::crypto::{self, Aad, Algorithm, RecordKind, SecretKey};
use crate::keys::{FileKeyDir, KeyCache, KeyRef, KeyStore, Ledger, OpenReport, ReceiptSigner, RootKeySource};
use crate::store::{Batch, Durability, GroupCommit, KvStore, LoggedStore, SledStore, SyncTarget, ValueLog};
use records::{BodyRecord, KeyRecord, SubjectRecord};
use seal::{crypto_err, seal_err};

/// Everything needed to open a vault.
#[derive(Debug, Clone)]
pub struct VaultOptions {
    /// The region this vault is the shard of: named in the AAD of everything it seals.
    pub region: String,
    pub data_dir: PathBuf,
    pub key_dir: PathBuf,
    pub root_key: RootKeySource,
    pub algorithm: Algorithm,
    pub durability: Durability,
    pub limits: Limits,
    /// Entries of each in-memory cache: unwrapped subject and tenant keys, and per
    /// transcript its message count, body record and subject hint.
    pub key_cache_entries: usize,
    /// sled's page cache.
    pub store_cache_bytes: u64,
    /// Dead ciphertext younger than this is not reclaimed yet, so reads in flight finish.
    pub reclaim_min_age_ms: u64,
    /// Size at which a value-log segment is closed and a new one started.
    pub value_segment_bytes: u64,
    /// Sealed messages smaller than this stay inline in the tree instead of the value log.
    pub inline_values_below: usize,
    /// How often the tree is checkpointed against its write-ahead log (`store::wal`).
    pub checkpoint_every: std::time::Duration,
    /// Bring a data directory the erasure ledger says was rolled back forward instead of
    /// refusing it (`--replay-erasures`, `chatvault restore`).
    pub replay_erasures: bool,
    /// Open a value log whose acknowledged part is damaged, cutting it there (see
    /// `ValueLog::open_checked`); refused otherwise.
    pub accept_damage: bool,
    /// Where the region's tree lives.
    pub engine: Engine,
}

/// Where a region's tree lives.
#[derive(Debug, Clone, Default)]
pub enum Engine {
    /// sled in `data_dir`, with the value log beside it as its write-ahead log and the
    /// store of message ciphertext.
    #[default]
    Sled,
    /// A PostgreSQL-protocol database the region's nodes share (`store::PgStore`): values
    /// inline, no log beside it, no checkpoints.
    Postgres(crate::store::PgOptions),
}

impl VaultOptions {
    pub fn new(data_dir: PathBuf, key_dir: PathBuf, root_key: RootKeySource) -> Self {
        VaultOptions {
            region: "eu".into(),
            data_dir,
            key_dir,
            root_key,
            algorithm: Algorithm::default(),
            durability: Durability::default(),
            limits: Limits::default(),
            key_cache_entries: 100_000,
            store_cache_bytes: 256 * 1024 * 1024,
            reclaim_min_age_ms: 60_000,
            value_segment_bytes: DEFAULT_VALUE_SEGMENT_BYTES,
            inline_values_below: 0,
            checkpoint_every: crate::store::CHECKPOINT_EVERY,
            replay_erasures: false,
            accept_damage: false,
            engine: Engine::Sled,
        }
    }
}

tokio::task_local! {
    /// Set while a caller has taken over the durable wait (see `deferring_durability`).
    static DEFERRED: ();
}

/// Default size of a value-log segment: what compaction rewrites at a time.
pub const DEFAULT_VALUE_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

pub struct Vault {
    data_dir: PathBuf,
    key_dir: PathBuf,
    store: Arc<dyn KvStore>,
    /// On sled: the same store, as the index behind its write-ahead log (`store` may be a
    /// test's wrapper around it), for checkpoints. None on a shared database.
    wal: Option<Arc<LoggedStore>>,
    /// On sled: message ciphertext beside the tree (see `values.rs`), also the tree's
    /// write-ahead log. None on a shared database, where values are inline.
    values: Option<Arc<ValueLog>>,
    inline_values_below: usize,
    /// Held by the reclaimer and the value-log compaction, which must not interleave.
    maintenance: Mutex<()>,
    commit: GroupCommit,
    keys: Arc<dyn KeyStore>,
    /// The erasure ledger, on the key volume beside the key-store keys.
    ledger: Arc<Ledger>,
    /// Signs erasure receipts.
    receipts: ReceiptSigner,
    /// Held from an erasure's (or a registry record's) ledger entry until the store has
    /// applied it: the store applies them in ledger order, so its counter is exact.
    erasure_order: Mutex<()>,
    /// Taken (shared, asynchronously) by every write call before any lock, and
    /// (exclusively) by a backup: writers then wait as tasks, never blocking an executor
    /// thread on the locks the backup holds.
    write_gate: tokio::sync::RwLock<()>,
    cache: KeyCache,
    locks: locks::LockTable,
    clock: Arc<dyn Clock>,
    alg: Algorithm,
    limits: Limits,
    /// Held (shared) from wrapping a key under the current epoch until it is stored, and
    /// (exclusive) by a rotation switching epochs: no key is ever stored under an epoch
    /// the rotation has already swept.
    epoch_guard: RwLock<()>,
    rotation: Mutex<()>,
    rotation_health: Mutex<RotationHealth>,
    tenant_key_init: Mutex<()>,
    /// Tenants erased in this process: their keys are never made again.
    closed_tenants: RwLock<std::collections::HashSet<String>>,
    reclaim_min_age_micros: i64,
    /// Message counts of recently written transcript incarnations, so an append needs no
    /// reverse seek (slow in sled 0.34). Only read and updated under the subject's stripe
    /// lock; a miss falls back to the store.
    counts: Mutex<lru::LruCache<(String, Blind, u64), u32>>,
    /// The subject a transcript was last seen under: which stripe lock a write takes
    /// before it reads the header under it and checks. A stale entry costs a retry,
    /// never a wrong result; a fresh one saves a header read per append.
    subject_hints: Mutex<lru::LruCache<(String, Blind), Blind>>,
    /// Body records of recent incarnations, their subject-wrapped keys filled in (see
    /// `Vault::body_record`). Ciphertext only: useless once its subject key is shredded.
    bodies: Mutex<lru::LruCache<(String, Blind, u64), Arc<BodyRecord>>>,
    /// Where legal holds are asked about (see `holds.rs`); none until attached.
    holds: RwLock<Option<Arc<dyn holds::HoldCheck>>>,
}

const SUBJECT_DOMAIN: &[u8] = b"subject";
const TRANSCRIPT_DOMAIN: &[u8] = b"transcript";
const META_STORE_ID: &str = "store_id";
/// The newest key-store epoch under which key material was discarded (a shred, a delete,
/// a replace): a rotation is due while it is the current one.
const META_SHRED_EPOCH: &str = "shred_epoch";
/// Which way transcript keys are kept (see `transcript_keys.rs`).
const META_KEY_FORMAT: &str = "key_format";

impl Vault {
    /// Opens the key directory and the data directory, checks they belong together, and
    /// finishes a key rotation a crash interrupted.
    pub fn open(opts: VaultOptions) -> Result<(Self, OpenReport), VaultError> {
        Self::open_with_clock(opts, Arc::new(SystemClock))
    }

    pub fn open_with_clock(opts: VaultOptions, clock: Arc<dyn Clock>) -> Result<(Self, OpenReport), VaultError> {
        Self::open_with_wrappers(opts, clock, |keys| keys, |store| store)
    }

    /// Opens with the key store and the store passed through `keys` and `store` first: how
    /// tests put fault-injecting wrappers around the real key directory and sled.
    pub(crate) fn open_with_wrappers(
        opts: VaultOptions,
        clock: Arc<dyn Clock>,
        keys: impl FnOnce(Arc<dyn KeyStore>) -> Arc<dyn KeyStore>,
        store: impl FnOnce(Arc<dyn KvStore>) -> Arc<dyn KvStore>,
    ) -> Result<(Self, OpenReport), VaultError> {
        layout_check::refuse_overlap(&opts.data_dir, &opts.key_dir)?;
        let (keydir, report) = FileKeyDir::open(&opts.key_dir, &opts.root_key, &opts.region)?;
        let receipts = keydir.receipt_signer()?;
        let file_keys = Arc::new(keydir);
        let keydir = keys(file_keys.clone());
        let (store, wal, values) = match &opts.engine {
            Engine::Sled => {
                let index: Arc<dyn KvStore> = Arc::new(SledStore::open(&opts.data_dir, opts.store_cache_bytes)?);
                let values_dir = opts.data_dir.join("values");
                // A data directory of another key directory is refused before its log is
                // touched (an index that lost its store id is caught again after the replay).
                if index.get(&layout::meta(META_STORE_ID))?.is_some() {
                    bind_store_to_keys(index.as_ref(), keydir.as_ref())?;
                }
                // Up to the log's open only reads: a start refused for damage changes nothing.
                let values = Arc::new(crate::store::open_log(
                    index.as_ref(),
                    &values_dir,
                    opts.value_segment_bytes,
                    opts.durability,
                    opts.accept_damage,
                )?);
                // The index catches up with its log (see `store::wal`) before anything reads it.
                let wal = LoggedStore::open(index, values.clone())?;
                (store(wal.clone()), Some(wal), Some(values))
            }
            Engine::Postgres(pg) => {
                let shared: Arc<dyn KvStore> = Arc::new(crate::store::PgStore::open(pg)?);
                (store(shared), None, None)
            }
        };
        let fresh = bind_store_to_keys(store.as_ref(), keydir.as_ref())?;
        let applied = erasure::data_counter(store.as_ref())?;
        let ledger = Arc::new(erasure::open_ledger(&opts.key_dir, keydir.as_ref(), applied)?);
        let wrapped_from = erasure::wrapped_from(store.as_ref(), keydir.as_ref(), fresh)?;
        let verdict = erasure::verdict(
            &erasure::Found { applied, fresh, wrapped_from },
            &ledger,
            keydir.as_ref(),
            opts.replay_erasures,
        )?;
        if fresh {
            init_store(store.as_ref(), keydir.as_ref())?;
        }
        erasure::note_wrapped_from(store.as_ref(), wrapped_from)?;
        ledger.repair_tail()?;
        layout_check::warn_if_same_volume(&opts.data_dir, &opts.key_dir);
        let commit = GroupCommit::start(store.clone(), opts.durability)?;
        let cache_entries =
            std::num::NonZeroUsize::new(opts.key_cache_entries.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        let vault = Vault {
            data_dir: opts.data_dir.clone(),
            key_dir: opts.key_dir.clone(),
            commit,
            store,
            wal,
            values,
            inline_values_below: opts.inline_values_below,
            maintenance: Mutex::new(()),
            keys: keydir,
            ledger,
            receipts,
            erasure_order: Mutex::new(()),
            write_gate: tokio::sync::RwLock::new(()),
            cache: KeyCache::new(opts.key_cache_entries),
            locks: locks::LockTable::new(),
            clock,
            alg: opts.algorithm,
            limits: opts.limits,
            epoch_guard: RwLock::new(()),
            rotation: Mutex::new(()),
            rotation_health: Mutex::new(RotationHealth::default()),
            tenant_key_init: Mutex::new(()),
            closed_tenants: RwLock::new(Default::default()),
            counts: Mutex::new(lru::LruCache::new(cache_entries)),
            subject_hints: Mutex::new(lru::LruCache::new(cache_entries)),
            bodies: Mutex::new(lru::LruCache::new(cache_entries)),
            holds: RwLock::new(None),
            reclaim_min_age_micros: i64::try_from(opts.reclaim_min_age_ms.saturating_mul(1000)).unwrap_or(i64::MAX),
        };
        vault.drop_torn_pointers()?;
        vault.migrate_transcript_keys()?;
        vault.migrate_time_indexes()?;
        vault.replay_ledger(verdict)?;
        vault.note_unrecorded_destructions()?;
        vault.resume_rotation();
        // The start is sure: the index's checkpoints begin.
        if let Some(wal) = &vault.wal {
            wal.start(opts.checkpoint_every)?;
        }
        // Every check passed: the key directory may now say which region it is.
        file_keys.commit_region_stamp()?;
        Ok((vault, report))
    }

    /// Applies a write batch, unless an earlier sync failed: then nothing more is
    /// written, so no request that is refused leaves data behind.
    fn apply(&self, batch: Batch) -> Result<(), VaultError> {
        if self.commit.is_failed() {
            return Err(self.commit.failure().into());
        }
        match self.store.apply(batch) {
            // The engine itself found no space: it takes no more writes until reopened.
            Err(crate::store::StoreError::Full { volume }) if volume == self.data_dir => {
                self.commit.poison_full(volume);
                Err(self.commit.failure().into())
            }
            other => Ok(other?),
        }
    }

    fn epoch_shared(&self) -> Result<std::sync::RwLockReadGuard<'_, ()>, VaultError> {
        self.epoch_guard.read().map_err(|_| VaultError::Internal("epoch lock poisoned".into()))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The key-store epoch new keys are wrapped under.
    pub fn key_epoch(&self) -> u64 {
        self.keys.current_epoch()
    }

    /// Bytes the data directory's store and value log occupy.
    pub fn size_on_disk(&self) -> Result<u64, VaultError> {
        let values = match &self.values {
            Some(v) => v.size_on_disk()?,
            None => 0,
        };
        Ok(self.store.size_on_disk()? + values)
    }

    /// The store, shared with the control plane (tenant registry, audit trail) so that
    /// one sync covers everything.
    pub fn shared_store(&self) -> Arc<dyn KvStore> {
        self.store.clone()
    }

    /// A key for one control-plane purpose, derived from the root key.
    pub fn control_key(&self, purpose: &[u8]) -> SecretKey {
        self.keys.control_key(purpose)
    }

    /// The vault's clock: what writes stamp as "now".
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Whether a durable sync failed (a full or failing data volume): writes are refused
    /// from then on, and only a restart, which recovers from what is on disk, serves
    /// again.
    pub fn storage_failed(&self) -> bool {
        self.commit.is_failed()
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The region this vault is the shard of, and how its envelopes name it.
    pub fn binding(&self) -> &crypto::Binding {
        self.keys.binding()
    }

    /// The AEAD new records are sealed with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Waits until every write applied so far (by anyone) is durable to the configured level.
    pub async fn wait_durable(&self) -> Result<(), VaultError> {
        let ticket = self.commit.ticket();
        Ok(self.commit.wait(ticket).await?)
    }

    /// Runs `f` with the vault's writes returning once applied instead of once durable.
    /// The caller takes the wait over: it must call [`Vault::wait_durable`] before it
    /// acknowledges anything. One wait then covers the change and what the caller wrote
    /// after it (the gRPC gate: its audit record), instead of one group commit each.
    pub async fn deferring_durability<F: std::future::Future>(f: F) -> F::Output {
        DEFERRED.scope((), f).await
    }

    /// The end of every write: wait for its ticket, unless the caller deferred that.
    async fn durable(&self, ticket: crate::store::CommitTicket) -> Result<(), VaultError> {
        if DEFERRED.try_with(|_| ()).is_ok() {
            return Ok(());
        }
        Ok(self.commit.wait(ticket).await?)
    }

    /// Makes everything written so far durable, and the index too, so the next start
    /// replays nothing (used at shutdown).
    pub fn sync(&self) -> Result<(), VaultError> {
        self.commit.sync_all(self.store.as_ref(), Durability::Fsync)?;
        match &self.wal {
            Some(wal) => Ok(wal.checkpoint()?),
            None => Ok(()),
        }
    }

    /// Files kept beside the store (the audit trail) that every durable wait must cover.
    pub fn attach_durable(&self, target: Arc<dyn SyncTarget>) {
        // Synced at the same time as the store's log, which records in the next round
        // how far it was durable.
        self.commit.attach_beside(target);
    }

    /// The tenant's blind-index key; created on first write if `create`, in which case
    /// the caller must hold `epoch_guard` (shared) — taking it here again could deadlock
    /// behind a waiting rotation.
    fn tenant_key(&self, tenant: &TenantId, create: bool) -> Result<Option<Arc<SecretKey>>, VaultError> {
        // Checked before the cache: a reader racing an erasure may re-insert the key.
        self.check_open(tenant)?;
        let cache_ref = KeyRef::Tenant(tenant.as_str().to_owned());
        if let Some(k) = self.cache.get(&cache_ref) {
            return Ok(Some(k));
        }
        let slot = layout::tenant_key(tenant.as_str());
        let aad = || Aad::new(RecordKind::TenantKey).bytes(tenant.as_str().as_bytes());
        let open = |bytes: &[u8]| -> Result<SecretKey, VaultError> {
            let rec: KeyRecord = records::decode(bytes, "tenant key")?;
            self.keys.unwrap(&rec.wrapped, aad()).map_err(key_err("tenant key"))
        };
        if let Some(bytes) = self.store.get(&slot)? {
            let key = Arc::new(open(&bytes)?);
            self.cache.insert(cache_ref, key.clone());
            return Ok(Some(key));
        }
        if !create {
            return Ok(None);
        }
        // Creation is serialised, and the store re-read under the lock, so two first
        // writers can never each make a key: one tenant has exactly one blind-index key.
        let _init = self.tenant_key_init.lock().map_err(|_| VaultError::Internal("tenant key lock".into()))?;
        let key = match self.store.get(&slot)? {
            Some(bytes) => open(&bytes)?,
            None => {
                let key = SecretKey::generate().map_err(seal_err)?;
                let rec = KeyRecord { generation: 0, wrapped: self.keys.wrap(aad(), &key)? };
                if !self.store.compare_and_swap(&slot, None, Some(records::encode(&rec)?))? {
                    return Err(VaultError::Internal("tenant key created concurrently".into()));
                }
                key
            }
        };
        let key = Arc::new(key);
        self.cache.insert(cache_ref, key.clone());
        Ok(Some(key))
    }

    /// Hex blind indexes of a subject and a transcript id as the audit trail records them;
    /// `None` where the tenant has never written (nothing of it can have been touched).
    pub fn blind_ids(
        &self,
        tenant: &TenantId,
        subject_id: Option<&str>,
        transcript_id: Option<&str>,
    ) -> Result<(Option<String>, Option<String>), VaultError> {
        let Some(tkey) = self.tenant_key(tenant, false)? else { return Ok((None, None)) };
        let (s, t) = self.blinds(&tkey, subject_id, transcript_id);
        Ok((subject_id.map(|_| hex::encode(s)), transcript_id.map(|_| hex::encode(t))))
    }

    /// Refuses a tenant erased in this process.
    fn check_open(&self, tenant: &TenantId) -> Result<(), VaultError> {
        let closed = self.closed_tenants.read().map_err(|_| VaultError::Internal("closed tenants lock".into()))?;
        if closed.contains(tenant.as_str()) { Err(VaultError::NotFound("tenant")) } else { Ok(()) }
    }

    fn blinds(&self, tkey: &SecretKey, subject_id: Option<&str>, transcript_id: Option<&str>) -> (Blind, Blind) {
        let b = |domain, v: Option<&str>| v.map(|v| crypto::blind_index(tkey, domain, v.as_bytes())).unwrap_or([0; 32]);
        (b(SUBJECT_DOMAIN, subject_id), b(TRANSCRIPT_DOMAIN, transcript_id))
    }

    fn read_subject(&self, tenant: &TenantId, subject: &Blind) -> Result<Option<SubjectRecord>, VaultError> {
        match self.store.get(&layout::subject(tenant.as_str(), subject))? {
            Some(b) => Ok(Some(records::decode(&b, "subject")?)),
            None => Ok(None),
        }
    }

    fn subject_key_aad(tenant: &str, subject: &Blind, generation: u32) -> Aad {
        Aad::new(RecordKind::SubjectKey).bytes(tenant.as_bytes()).bytes(subject).u64(u64::from(generation))
    }

    /// The live data key of a subject generation, from cache or unwrapped from the store.
    fn subject_key(&self, tenant: &TenantId, subject: &Blind, generation: u32) -> Result<Arc<SecretKey>, VaultError> {
        let cache_ref = KeyRef::Subject { tenant: tenant.as_str().to_owned(), subject: *subject, generation };
        if let Some(k) = self.cache.get(&cache_ref) {
            return Ok(k);
        }
        let bytes = self
            .store
            .get(&layout::subject_key(tenant.as_str(), subject))?
            .ok_or(VaultError::Erased("transcript not found"))?;
        let rec: KeyRecord = records::decode(&bytes, "subject key")?;
        if rec.generation != generation {
            return Err(VaultError::Erased("transcript not found"));
        }
        let aad = || Self::subject_key_aad(tenant.as_str(), subject, generation);
        let key = match self.keys.unwrap(&rec.wrapped, aad()) {
            Ok(k) => k,
            // A rotation re-wrapped and destroyed the epoch we read under: read again.
            Err(crate::keys::KeyError::EpochDestroyed(_)) => {
                let bytes = self
                    .store
                    .get(&layout::subject_key(tenant.as_str(), subject))?
                    .ok_or(VaultError::Erased("transcript not found"))?;
                let rec: KeyRecord = records::decode(&bytes, "subject key")?;
                self.keys.unwrap(&rec.wrapped, aad()).map_err(key_err("subject key"))?
            }
            Err(e) => return Err(key_err("subject key")(e)),
        };
        let key = Arc::new(key);
        self.cache.insert(cache_ref.clone(), key.clone());
        // A shred (and maybe a new generation) between our read and the insert must not
        // leave the shredded key in the cache.
        let still = self.store.get(&layout::subject_key(tenant.as_str(), subject))?;
        let same = match still {
            Some(b) => records::decode::<KeyRecord>(&b, "subject key")?.generation == generation,
            None => false,
        };
        if !same {
            self.cache.remove(&cache_ref);
            return Err(VaultError::Erased("transcript not found"));
        }
        Ok(key)
    }

    /// Drops a subject generation's unwrapped key and every cached body (whose inner
    /// wrappings it opened): after the subject was given a new data key.
    fn forget_cached_keys(&self, tenant: &TenantId, subject: &Blind, generation: u32) {
        self.cache.remove(&KeyRef::Subject { tenant: tenant.as_str().to_owned(), subject: *subject, generation });
        if let Ok(mut c) = self.bodies.lock() {
            c.clear();
        }
    }

    /// A fresh data key for a new subject generation, wrapped and queued in `batch`.
    /// The caller must hold `epoch_guard` (shared) until the batch is applied.
    fn new_subject_key(
        &self,
        tenant: &TenantId,
        subject: &Blind,
        generation: u32,
        batch: &mut Batch,
    ) -> Result<Arc<SecretKey>, VaultError> {
        let key = SecretKey::generate().map_err(seal_err)?;
        let aad = Self::subject_key_aad(tenant.as_str(), subject, generation);
        let rec = KeyRecord { generation, wrapped: self.keys.wrap(aad, &key)? };
        batch.put(layout::subject_key(tenant.as_str(), subject), records::encode(&rec)?);
        let key = Arc::new(key);
        self.cache
            .insert(KeyRef::Subject { tenant: tenant.as_str().to_owned(), subject: *subject, generation }, key.clone());
        Ok(key)
    }
}

/// A data directory remembers the key directory it was created with; opening it with
/// another (a restored backup of one but not the other, a typo in a path) is refused.
fn bind_store_to_keys(store: &dyn KvStore, keydir: &dyn KeyStore) -> Result<bool, VaultError> {
    match store.get(&layout::meta(META_STORE_ID))? {
        Some(id) if id == keydir.store_id() => Ok(false),
        Some(_) => Err(VaultError::Mismatch(
            "the data directory belongs to a different key directory; refusing to start".into(),
        )),
        None if crate::store::holds_records(store)? => {
            Err(VaultError::Mismatch("the data directory holds data but no store id; refusing to start".into()))
        }
        None => Ok(true),
    }
}

/// Makes an empty data directory this key directory's, in today's formats.
fn init_store(store: &dyn KvStore, keydir: &dyn KeyStore) -> Result<(), VaultError> {
    let mut b = Batch::default();
    b.put(layout::meta(META_STORE_ID), keydir.store_id().to_vec());
    b.put(layout::meta(META_KEY_FORMAT), transcript_keys::KEY_FORMAT_SEALED.to_vec());
    store.apply(b)?;
    store.sync(Durability::Fsync)?;
    Ok(())
}

/// Maps a key failure on stored data to the vault error that names the record.
fn key_err(what: &'static str) -> impl Fn(crate::keys::KeyError) -> VaultError {
    move |e| match e {
        crate::keys::KeyError::Crypto(c) => crypto_err(what)(c),
        crate::keys::KeyError::EpochDestroyed(_) => VaultError::Integrity(what),
        crate::keys::KeyError::Corrupt(_) => VaultError::Corrupt(what),
        other => VaultError::Key(other),
    }
}
