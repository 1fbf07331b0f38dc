//! Group commit: writers apply their batch, take a ticket, and wait; one thread syncs
//! for everyone waiting, so N concurrent writes cost one flush, not N.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;

use super::{Durability, KvStore, StoreError, SyncTarget};

/// A position in the write order: durable once the committer has synced past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CommitTicket(u64);

/// State the committer publishes: how far is durable, how far synced with `fsync`
/// whatever the mode, and whether syncing broke.
#[derive(Clone, Copy, Debug)]
struct Progress {
    durable: u64,
    fsynced: u64,
    failed: bool,
}

struct Shared {
    requested: AtomicU64,
    /// The newest ticket a caller needs synced with `fsync` even in a lighter mode.
    forced: AtomicU64,
    /// Set by a sync outside the committer (compaction) that failed.
    poisoned: std::sync::atomic::AtomicBool,
    /// Synced at the same time as the store in every round; their marks go into the
    /// store one round later.
    beside: Mutex<Vec<Arc<dyn SyncTarget>>>,
    /// The thread that syncs them, started with the first one: one round at a time.
    beside_worker: Mutex<Option<BesideWorker>>,
    wake: Mutex<bool>,
    cv: Condvar,
    /// Set when the sync that failed found its volume full: what later refusals say.
    full: Mutex<Option<std::path::PathBuf>>,
}

pub struct GroupCommit {
    mode: Durability,
    shared: Arc<Shared>,
    progress: watch::Receiver<Progress>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl GroupCommit {
    pub fn start(store: Arc<dyn KvStore>, mode: Durability) -> Result<Self, StoreError> {
        let shared = Arc::new(Shared {
            requested: AtomicU64::new(0),
            forced: AtomicU64::new(0),
            poisoned: std::sync::atomic::AtomicBool::new(false),
            beside: Mutex::new(Vec::new()),
            beside_worker: Mutex::new(None),
            wake: Mutex::new(false),
            cv: Condvar::new(),
            full: Mutex::new(None),
        });
        let (tx, rx) = watch::channel(Progress { durable: 0, fsynced: 0, failed: false });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new().name("chatvault-commit".into()).spawn(move || run(store, mode, shared, tx))?
        };
        Ok(GroupCommit { mode, shared, progress: rx, thread: Mutex::new(Some(thread)) })
    }

    /// Takes a ticket for every batch applied before this call.
    pub fn ticket(&self) -> CommitTicket {
        CommitTicket(self.shared.requested.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Waits until `ticket` is durable to the configured level.
    pub async fn wait(&self, ticket: CommitTicket) -> Result<(), StoreError> {
        if self.mode == Durability::None {
            return Ok(());
        }
        if self.is_failed() {
            return Err(self.failure());
        }
        {
            let mut wake = self.shared.wake.lock().map_err(|_| StoreError::Failed)?;
            *wake = true;
            self.shared.cv.notify_one();
        }
        let mut rx = self.progress.clone();
        let p = rx.wait_for(|p| p.failed || p.durable >= ticket.0).await.map_err(|_| StoreError::Failed)?;
        if p.failed { Err(self.failure()) } else { Ok(()) }
    }

    /// Waits until `ticket` is synced with `fsync`, whatever the configured level: for
    /// writes that must never be lost (erasures), also under `flush` or `none`.
    pub async fn wait_synced(&self, ticket: CommitTicket) -> Result<(), StoreError> {
        if self.mode == Durability::Fsync {
            return self.wait(ticket).await;
        }
        if self.is_failed() {
            return Err(self.failure());
        }
        self.shared.forced.fetch_max(ticket.0, Ordering::SeqCst);
        {
            let mut wake = self.shared.wake.lock().map_err(|_| StoreError::Failed)?;
            *wake = true;
            self.shared.cv.notify_one();
        }
        let mut rx = self.progress.clone();
        let p = rx.wait_for(|p| p.failed || p.fsynced >= ticket.0).await.map_err(|_| StoreError::Failed)?;
        if p.failed { Err(self.failure()) } else { Ok(()) }
    }

    /// Makes `target` durable in every round from now on, synced while the store is (one
    /// wait for both): for files the store's records never point into. The mark it
    /// reports after a round's sync goes into the store in the next round, so what the
    /// store says of it lags by one round at most, and never claims more than is durable.
    pub fn attach_beside(&self, target: Arc<dyn SyncTarget>) {
        if let Ok(mut worker) = self.shared.beside_worker.lock()
            && worker.is_none()
        {
            match BesideWorker::start() {
                Ok(w) => *worker = Some(w),
                // Synced on the committer's own thread instead, one after the other.
                Err(e) => tracing::warn!(error = %e, "no thread for syncing beside the store"),
            }
        }
        if let Ok(mut a) = self.shared.beside.lock() {
            a.push(target);
        }
    }

    /// Syncs everything attached and the store, now, on the caller's thread (at shutdown).
    /// A failure there is as final as one of the committer's own: nothing more is written.
    pub fn sync_all(&self, store: &dyn KvStore, mode: Durability) -> Result<(), StoreError> {
        sync_round(&self.shared, store, mode).inspect_err(|e| {
            tracing::error!(error = %e, "durable sync failed; refusing further writes");
            if let (StoreError::Full { volume }, Ok(mut full)) = (e, self.shared.full.lock()) {
                *full = Some(volume.clone());
            }
            self.shared.poisoned.store(true, Ordering::SeqCst);
        })
    }

    /// Refuses every later write and durable wait, as a failed sync does: for a store that
    /// can no longer be vouched for until a restart has repaired it.
    pub fn poison(&self) {
        self.shared.poisoned.store(true, Ordering::SeqCst);
    }

    /// As [`Self::poison`], for a store that stopped on a full volume (sled does, for
    /// good, at the first write that finds no space): later refusals name the volume.
    pub fn poison_full(&self, volume: std::path::PathBuf) {
        if let Ok(mut full) = self.shared.full.lock() {
            full.get_or_insert(volume);
        }
        self.poison();
    }

    /// Why writes are refused once a sync failed: the volume that filled, if that was it.
    pub fn failure(&self) -> StoreError {
        match self.shared.full.lock().ok().and_then(|f| f.clone()) {
            Some(volume) => StoreError::FullAfterSync { volume },
            None => StoreError::Failed,
        }
    }

    /// True once a sync has failed: from then on nothing may be written.
    pub fn is_failed(&self) -> bool {
        self.progress.borrow().failed || self.shared.poisoned.load(Ordering::SeqCst)
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        // A requested value of u64::MAX tells the thread to stop after a last sync.
        self.shared.requested.store(u64::MAX, Ordering::SeqCst);
        if let Ok(mut wake) = self.shared.wake.lock() {
            *wake = true;
            self.shared.cv.notify_one();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

fn run(store: Arc<dyn KvStore>, mode: Durability, shared: Arc<Shared>, tx: watch::Sender<Progress>) {
    let mut durable = 0u64;
    let mut fsynced = 0u64;
    loop {
        {
            let Ok(mut wake) = shared.wake.lock() else { return };
            while !*wake {
                wake = match shared.cv.wait(wake) {
                    Ok(w) => w,
                    Err(_) => return,
                };
            }
            *wake = false;
        }
        let target = shared.requested.load(Ordering::SeqCst);
        let stopping = target == u64::MAX;
        let round_mode = if shared.forced.load(Ordering::SeqCst) > fsynced { Durability::Fsync } else { mode };
        if target > durable || stopping || round_mode != mode {
            let started = std::time::Instant::now();
            let outcome = if shared.poisoned.load(Ordering::SeqCst) {
                Err(StoreError::Failed)
            } else {
                sync_round(&shared, store.as_ref(), round_mode)
            };
            if !stopping {
                crate::metrics::get().commit_round(target.saturating_sub(durable), started.elapsed());
            }
            if let Err(e) = outcome {
                tracing::error!(error = %e, "durable sync failed; refusing further writes");
                if let (StoreError::Full { volume }, Ok(mut full)) = (&e, shared.full.lock()) {
                    *full = Some(volume.clone());
                }
                let _ = tx.send(Progress { durable, fsynced, failed: true });
                return;
            }
            durable = durable.max(target);
            if round_mode == Durability::Fsync {
                fsynced = target;
            }
            let _ = tx.send(Progress { durable, fsynced, failed: false });
        }
        if stopping {
            return;
        }
    }
}

type BesideRound = (Durability, Vec<Arc<dyn SyncTarget>>);

/// A thread that syncs the targets beside the store while the committer syncs the store.
struct BesideWorker {
    tx: std::sync::mpsc::Sender<BesideRound>,
    rx: std::sync::mpsc::Receiver<Result<(), StoreError>>,
}

impl BesideWorker {
    fn start() -> std::io::Result<Self> {
        let (tx, jobs) = std::sync::mpsc::channel::<BesideRound>();
        let (done, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("chatvault-commit-beside".into()).spawn(move || {
            // Ends when the group commit (the sender) is gone.
            while let Ok((mode, targets)) = jobs.recv() {
                if done.send(targets.iter().try_for_each(|t| t.sync(mode))).is_err() {
                    return;
                }
            }
        })?;
        Ok(BesideWorker { tx, rx })
    }
}

/// A mark only moves forward (marks are big-endian, so bytes order as positions), even
/// when two rounds write at once, and is written only when it moved.
fn write_mark(store: &dyn KvStore, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
    loop {
        let old = store.get(k)?;
        if old.as_deref().is_some_and(|o| o >= v) {
            return Ok(());
        }
        if store.compare_and_swap(k, old.as_deref(), Some(v.to_vec()))? {
            return Ok(());
        }
    }
}

/// One durable round: the store (its write-ahead log) together with what is synced beside
/// it, after recording how far those were durable at the last round.
fn sync_round(shared: &Shared, store: &dyn KvStore, mode: Durability) -> Result<(), StoreError> {
    let beside = shared.beside.lock().map_err(|_| StoreError::Failed)?.clone();
    if mode == Durability::Fsync {
        for t in &beside {
            let Some((k, v)) = t.synced_mark() else { continue };
            match write_mark(store, &k, &v) {
                // A shared database that blinked: the mark lags a round (it never claims
                // more than is durable); the sync itself still decides the round.
                Err(StoreError::Unavailable(why)) => {
                    tracing::warn!(error = %why, "durable mark not recorded this round; the next one records it")
                }
                other => other?,
            }
        }
    }
    crate::failpoint::hit("commit.before_store_sync");
    if beside.is_empty() {
        store.sync(mode)?;
    } else {
        let worker = shared.beside_worker.lock().map_err(|_| StoreError::Failed)?;
        match worker.as_ref() {
            Some(w) => {
                w.tx.send((mode, beside.clone())).map_err(|_| StoreError::Failed)?;
                let ours = store.sync(mode);
                let others = w.rx.recv().unwrap_or(Err(StoreError::Failed));
                ours.and(others)?;
            }
            None => {
                store.sync(mode)?;
                beside.iter().try_for_each(|t| t.sync(mode))?;
            }
        }
    }
    crate::failpoint::hit("commit.after_store_sync");
    Ok(())
}
