//! A region's tree in PostgreSQL (or an engine speaking its protocol: YugabyteDB,
//! CockroachDB), for a region that outgrows one node: any number of chatvault nodes
//! share one database, which replicates itself.
//!
//! One table of byte keys and values per region. `bytea` compares bytewise whatever the
//! collation, so scans see the order the vault's layout relies on. A batch is one
//! statement (deletes and upserts in one data-modifying CTE; a transaction on CockroachDB,
//! which refuses two changes of one table in a statement), so it is atomic and, on
//! PostgreSQL, one round trip. A commit is as durable as the database makes it
//! (`synchronous_commit`; `synchronous_standby_names` for a standby to have it too).
//! Values are always inline: there is no value log beside a database. Keys stay short
//! (a B-tree entry holds at most about 2.7 KB; the vault's are under 120 B).
//!
//! The client is the synchronous `postgres` crate behind an r2d2 pool. It drives a small
//! runtime of its own, so every call (and the pool's drop) leaves tokio's worker first
//! ([`off_runtime`]).

use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::{ToSql, Type};
use postgres::{NoTls, Row};
use r2d2_postgres::PostgresConnectionManager;

use super::{Batch, Durability, Entry, KvStore, Op, StoreError};

/// The schema this build writes. A database with a newer one is refused.
pub const SCHEMA_VERSION: i64 = 1;

/// Attempts of one operation the database aborted for a serialization failure or a
/// deadlock (SQLSTATE 40001, 40P01): what CockroachDB and YugabyteDB ask of clients.
const ATTEMPTS: u32 = 10;

/// PostgreSQL cuts identifiers at 63 bytes: `chatvault_<region>_kv_meta` must fit.
const MAX_REGION_LEN: usize = 45;

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;
type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

/// Where a region's tree lives, and how a node reaches it.
#[derive(Clone)]
pub struct PgOptions {
    /// `postgresql://user@host:port/db`, or the key=value form. It may hold a password,
    /// so it is never logged, printed by `Debug` or put in an error.
    pub url: String,
    /// The region: its table is `chatvault_<region>_kv`.
    pub region: String,
    pub pool_size: u32,
    /// How long a call waits for a connection (to make one, or a free one) before it is
    /// answered UNAVAILABLE; also the TCP connect timeout.
    pub connect_timeout: Duration,
    /// The longest one statement may run before the database cancels it.
    pub statement_timeout: Duration,
    /// Hold the region's writer lease: refuse to open while another node holds it. The
    /// vault's locks and caches are per process, so until they are shared through the
    /// database, one node at a time writes a region (a second one is refused, not raced).
    pub exclusive: bool,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("region", &self.region)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

impl PgOptions {
    pub fn new(url: impl Into<String>, region: impl Into<String>) -> Self {
        PgOptions {
            url: url.into(),
            region: region.into(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            exclusive: true,
        }
    }
}

pub struct PgStore {
    /// Always `Some` until dropped (see the `Drop` impl).
    pool: Option<Pool>,
    /// The region's writer lease, watched; None when not exclusive.
    lease: Option<Lease>,
    table: String,
    /// CockroachDB: a batch is a transaction, not one statement.
    cockroach: bool,
    sql: Statements,
}

struct Statements {
    get: String,
    scan_from: String,
    scan_from_to: String,
    scan_after: String,
    scan_after_to: String,
    last: String,
    last_to: String,
    apply: String,
    upsert: String,
    delete: String,
    insert_new: String,
    update_if: String,
    delete_if: String,
    size: String,
}

impl Statements {
    fn new(t: &str) -> Self {
        let scan = |lower: &str, bounded: bool| {
            let (upper, limit) = if bounded { (" AND k < $2", "$3") } else { ("", "$2") };
            format!("SELECT k, v FROM {t} WHERE k {lower} $1{upper} ORDER BY k LIMIT {limit}")
        };
        let upsert = |keys: &str, values: &str| {
            format!(
                "INSERT INTO {t} (k, v) SELECT * FROM unnest({keys}::bytea[], {values}::bytea[]) \
                 ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
            )
        };
        Statements {
            get: format!("SELECT v FROM {t} WHERE k = $1"),
            scan_from: scan(">=", false),
            scan_from_to: scan(">=", true),
            scan_after: scan(">", false),
            scan_after_to: scan(">", true),
            last: format!("SELECT k, v FROM {t} WHERE k >= $1 ORDER BY k DESC LIMIT 1"),
            last_to: format!("SELECT k, v FROM {t} WHERE k >= $1 AND k < $2 ORDER BY k DESC LIMIT 1"),
            // One statement: atomic without a transaction block, one round trip. The keys
            // it deletes and those it upserts are disjoint (the batch is collapsed first).
            apply: format!("WITH gone AS (DELETE FROM {t} WHERE k = ANY($1)) {}", upsert("$2", "$3")),
            upsert: upsert("$1", "$2"),
            delete: format!("DELETE FROM {t} WHERE k = ANY($1)"),
            // RETURNING: the rows a swap changed, counted in the same round trip.
            insert_new: format!("INSERT INTO {t} (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING RETURNING 1"),
            update_if: format!("UPDATE {t} SET v = $3 WHERE k = $1 AND v = $2 RETURNING 1"),
            delete_if: format!("DELETE FROM {t} WHERE k = $1 AND v = $2 RETURNING 1"),
            size: format!("SELECT pg_total_relation_size('{t}')"),
        }
    }
}

impl PgStore {
    /// Connects, creates the region's table if it is new and checks its schema version.
    pub fn open(opts: &PgOptions) -> Result<Self, StoreError> {
        let region_ok = !opts.region.is_empty()
            && opts.region.len() <= MAX_REGION_LEN
            && opts.region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !region_ok {
            return Err(StoreError::Engine(format!(
                "region {:?}: a PostgreSQL table name needs 1 to {MAX_REGION_LEN} of a-z, 0-9 and _",
                opts.region
            )));
        }
        let mut config: postgres::Config =
            opts.url.parse().map_err(|_| StoreError::Engine("the PostgreSQL URL does not parse".into()))?;
        // Acknowledged means committed to disk, whatever the role's or database's default;
        // the URL's own options are kept.
        let options = format!(
            "{} -c statement_timeout={} -c synchronous_commit=on",
            config.get_options().unwrap_or(""),
            opts.statement_timeout.as_millis()
        );
        config
            .connect_timeout(opts.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .options(options.trim());
        // One direct connection first: a wrong password or database name is said (and not
        // retried as if the database were down), never hidden behind the pool's timeout.
        let engine = off_runtime(|| {
            let mut c = config.connect(NoTls)?;
            c.query_one("SELECT version()", &[]).map(|r| r.get::<_, String>(0))
        })
        .map_err(pg_err)?;
        let table = format!("chatvault_{}_kv", opts.region);
        if opts.exclusive && (engine.contains("CockroachDB") || engine.contains("-YB-")) {
            return Err(StoreError::Engine(format!(
                "{table}: this engine has no session advisory locks, so one writer per region cannot be held \
                 there yet: use PostgreSQL"
            )));
        }
        let manager = PostgresConnectionManager::new(config.clone(), NoTls);
        let pool = off_runtime(|| {
            r2d2::Pool::builder()
                .max_size(opts.pool_size.max(1))
                .min_idle(Some(1))
                .connection_timeout(opts.connect_timeout)
                // A broken connection is told by the client itself: no extra round trip.
                .test_on_check_out(false)
                .error_handler(Box::new(r2d2::NopErrorHandler))
                .build(manager)
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
        let lease = if opts.exclusive { Some(Lease::take(&config, &table, opts.connect_timeout)?) } else { None };
        let mut store = PgStore { pool: Some(pool), lease, sql: Statements::new(&table), table, cockroach: false };
        store.cockroach = store.create_schema()?;
        Ok(store)
    }

    /// Creates the tables if they are new; returns whether the engine is CockroachDB.
    fn create_schema(&self) -> Result<bool, StoreError> {
        let t = &self.table;
        let meta = format!("{t}_meta");
        let (version, cockroach) = self.with_client(|c| {
            let engine: String = c.query_one("SELECT version()", &[])?.get(0);
            // YugabyteDB hash-shards a primary key unless told otherwise; the vault scans ranges.
            let yugabyte = engine.contains("-YB-");
            let asc = if yugabyte { " ASC" } else { "" };
            let mut tx = c.transaction()?;
            // Nodes starting together: one creates, the others wait and find it made.
            tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&meta])?;
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {meta} (name TEXT NOT NULL, value BIGINT NOT NULL, PRIMARY KEY (name{asc}));
                 CREATE TABLE IF NOT EXISTS {t} (k BYTEA NOT NULL, v BYTEA NOT NULL, PRIMARY KEY (k{asc}));
                 INSERT INTO {meta} (name, value) VALUES ('schema_version', {SCHEMA_VERSION})
                   ON CONFLICT (name) DO NOTHING;"
            ))?;
            let version: i64 =
                tx.query_one(&format!("SELECT value FROM {meta} WHERE name = 'schema_version'"), &[])?.get(0);
            tx.commit()?;
            Ok((version, engine.contains("CockroachDB")))
        })?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Engine(format!(
                "table {t}: schema version {version} is newer than this build's {SCHEMA_VERSION}; \
                 run the chatvault release that wrote it"
            )));
        }
        Ok(cockroach)
    }

    fn pool(&self) -> Result<&Pool, StoreError> {
        self.pool.as_ref().ok_or(StoreError::Failed)
    }

    /// Writes stop for good once the lease is lost: another node may hold it by now.
    fn check_lease(&self) -> Result<(), StoreError> {
        match &self.lease {
            Some(l) if l.lost.load(std::sync::atomic::Ordering::SeqCst) => Err(StoreError::Failed),
            _ => Ok(()),
        }
    }

    /// Runs `f` on a pooled connection; again after a serialization failure or deadlock
    /// (the database rolled it back whole), with a growing, jittered pause.
    fn with_client<R: Send>(
        &self,
        f: impl Fn(&mut postgres::Client) -> Result<R, postgres::Error> + Sync,
    ) -> Result<R, StoreError> {
        off_runtime(|| {
            let mut attempt = 0;
            loop {
                let result = {
                    let mut client = self
                        .pool()?
                        .get()
                        .map_err(|e| StoreError::Unavailable(format!("no connection to PostgreSQL: {e}")))?;
                    f(&mut client)
                };
                match result {
                    Ok(r) => return Ok(r),
                    // A pooled connection the database closed meanwhile (a restart, a
                    // failover): once more on a fresh one (the pool drops the broken one).
                    Err(e) if e.as_db_error().is_none() && e.is_closed() && attempt == 0 => attempt += 1,
                    Err(e) if retryable(&e) && attempt + 1 < ATTEMPTS => {
                        attempt += 1;
                        let jitter = crate::crypto::random_bytes::<1>().map(|b| u64::from(b[0])).unwrap_or(0);
                        std::thread::sleep(Duration::from_millis((2u64 << attempt.min(8)) + jitter % 8));
                    }
                    Err(e) => return Err(pg_err(e)),
                }
            }
        })
    }

    fn rows(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, StoreError> {
        self.with_client(|c| c.query_typed(sql, params))
    }
}

impl Drop for PgStore {
    /// Closing a connection blocks on the client's own runtime: not on tokio's worker.
    fn drop(&mut self) {
        let (pool, lease) = (self.pool.take(), self.lease.take());
        off_runtime(move || drop((pool, lease)));
    }
}

/// The region's writer lease: a session advisory lock, held by a session of its own and
/// given up with it (a node that dies gives it up with its connection). A watcher checks
/// the session every second: if it is gone (a database restart or failover, a cut), the
/// lock may be another node's by now, so this store takes no more writes.
struct Lease {
    /// The lease session's server process (what a test terminates).
    #[cfg_attr(not(test), allow(dead_code))]
    backend: i32,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::mpsc::Sender<()>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    fn take(config: &postgres::Config, table: &str, patience: Duration) -> Result<Lease, StoreError> {
        let mut session = take_lease(config, table, patience)?;
        let backend: i32 = off_runtime(|| session.query_one("SELECT pg_backend_pid()", &[])).map_err(pg_err)?.get(0);
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let flag = lost.clone();
        let table = table.to_owned();
        let watcher = std::thread::Builder::new()
            .name("chatvault-pg-lease".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(Duration::from_secs(1))
                {
                    if session.is_valid(Duration::from_secs(5)).is_err() {
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        tracing::error!(table, "the writer lease's session to PostgreSQL is gone; writes are refused");
                        return;
                    }
                }
            })
            .map_err(StoreError::Io)?;
        Ok(Lease { backend, lost, stop, watcher: Some(watcher) })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

/// Takes the region's writer lease on a session of its own, waiting up to `patience` for
/// a node that is stopping (or whose connection the database has not seen die yet).
fn take_lease(config: &postgres::Config, table: &str, patience: Duration) -> Result<postgres::Client, StoreError> {
    off_runtime(|| {
        let mut c = config.connect(NoTls).map_err(pg_err)?;
        // The server notices a node that vanished (power off) within seconds, not hours.
        c.batch_execute("SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3")
            .map_err(pg_err)?;
        let name = format!("{table} writer");
        let deadline = std::time::Instant::now() + patience;
        let got = loop {
            let got: bool = c.query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&name]).map_err(pg_err)?.get(0);
            if got || std::time::Instant::now() >= deadline {
                break got;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !got {
            return Err(StoreError::Engine(format!(
                "another chatvault node holds the writer lease of {table}: one node per region on PostgreSQL \
                 for now (stop the other, or point this one at another region)"
            )));
        }
        Ok(c)
    })
}

/// A serialization failure or deadlock: the database rolled the statement back whole.
fn retryable(e: &postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// What a client may retry is UNAVAILABLE: a lost or refused connection, a server
/// shutting down or full of connections, a read-only (old) primary after a failover, a
/// conflict that outlasted the retries. Nothing of a statement that failed was kept
/// unless the database committed it, and applying the same batch again changes nothing
/// more. The message names the SQLSTATE and the server's message, never its DETAIL (which
/// quotes rows) and never the URL.
fn pg_err(e: postgres::Error) -> StoreError {
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    let Some(db) = e.as_db_error() else {
        return if e.is_closed() || io {
            StoreError::Unavailable(format!("the connection to PostgreSQL failed: {e}"))
        } else {
            StoreError::Engine(format!("PostgreSQL client: {e}"))
        };
    };
    let code = db.code().code();
    if *db.code() == SqlState::DISK_FULL {
        return StoreError::Full { volume: "the PostgreSQL database".into() };
    }
    let transient = code.starts_with("08")
        || code.starts_with("57P")
        || code.starts_with("53")
        || retryable(&e)
        || *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION
        || *db.code() == SqlState::QUERY_CANCELED
        || *db.code() == SqlState::LOCK_NOT_AVAILABLE;
    let what = format!("PostgreSQL (SQLSTATE {code}): {}", db.message());
    if transient { StoreError::Unavailable(what) } else { StoreError::Engine(what) }
}

/// The smallest key above every key that starts with `prefix`, if one exists.
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xff {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

fn entry(row: &Row) -> Entry {
    (row.get::<_, Vec<u8>>(0), row.get::<_, Vec<u8>>(1))
}

impl KvStore for PgStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self.rows(&self.sql.get, &[(&key, Type::BYTEA)])?;
        Ok(rows.first().map(|r| r.get::<_, Vec<u8>>(0)))
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.check_lease()?;
        // The last op on a key decides it.
        let mut last: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> = std::collections::BTreeMap::new();
        for op in batch.ops {
            match op {
                Op::Put(k, v) | Op::PutLogged(k, v) => last.insert(k, Some(v)),
                Op::Delete(k) => last.insert(k, None),
            };
        }
        let (mut gone, mut keys, mut values) = (Vec::<&[u8]>::new(), Vec::<&[u8]>::new(), Vec::<&[u8]>::new());
        for (k, v) in &last {
            match v {
                Some(v) => {
                    keys.push(k);
                    values.push(v);
                }
                None => gone.push(k),
            }
        }
        let (k, v, g) = (Type::BYTEA_ARRAY, Type::BYTEA_ARRAY, Type::BYTEA_ARRAY);
        match (gone.is_empty(), keys.is_empty()) {
            (true, true) => Ok(()),
            (true, false) => self.rows(&self.sql.upsert, &[(&keys, k), (&values, v)]).map(drop),
            (false, true) => self.rows(&self.sql.delete, &[(&gone, g)]).map(drop),
            (false, false) if self.cockroach => self.with_client(|c| {
                let mut tx = c.transaction()?;
                tx.query_typed(&self.sql.delete, &[(&gone, Type::BYTEA_ARRAY)])?;
                tx.query_typed(&self.sql.upsert, &[(&keys, Type::BYTEA_ARRAY), (&values, Type::BYTEA_ARRAY)])?;
                tx.commit()
            }),
            (false, false) => self.rows(&self.sql.apply, &[(&gone, g), (&keys, k), (&values, v)]).map(drop),
        }
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let upper = successor(prefix);
        let after = after.filter(|a| *a >= prefix);
        if after.is_some_and(|a| upper.as_deref().is_some_and(|u| a >= u)) {
            return Ok(Vec::new());
        }
        let (sql, lower) = match (after, upper.is_some()) {
            (Some(a), true) => (&self.sql.scan_after_to, a),
            (Some(a), false) => (&self.sql.scan_after, a),
            (None, true) => (&self.sql.scan_from_to, prefix),
            (None, false) => (&self.sql.scan_from, prefix),
        };
        let rows = match &upper {
            Some(u) => self.rows(sql, &[(&lower, Type::BYTEA), (u, Type::BYTEA), (&limit, Type::INT8)])?,
            None => self.rows(sql, &[(&lower, Type::BYTEA), (&limit, Type::INT8)])?,
        };
        Ok(rows.iter().map(entry).collect())
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Entry>, StoreError> {
        let rows = match successor(prefix) {
            Some(u) => self.rows(&self.sql.last_to, &[(&prefix, Type::BYTEA), (&u, Type::BYTEA)])?,
            None => self.rows(&self.sql.last, &[(&prefix, Type::BYTEA)])?,
        };
        Ok(rows.first().map(entry))
    }

    fn compare_and_swap(&self, key: &[u8], old: Option<&[u8]>, new: Option<Vec<u8>>) -> Result<bool, StoreError> {
        self.check_lease()?;
        let changed = match (old, new.as_deref()) {
            (None, Some(new)) => self.rows(&self.sql.insert_new, &[(&key, Type::BYTEA), (&new, Type::BYTEA)])?,
            (Some(old), Some(new)) => {
                self.rows(&self.sql.update_if, &[(&key, Type::BYTEA), (&old, Type::BYTEA), (&new, Type::BYTEA)])?
            }
            (Some(old), None) => self.rows(&self.sql.delete_if, &[(&key, Type::BYTEA), (&old, Type::BYTEA)])?,
            (None, None) => return Ok(self.get(key)?.is_none()),
        };
        Ok(changed.len() == 1)
    }

    /// Every applied batch was committed, and a commit is as durable as the database is
    /// set to make it: there is nothing left to push.
    fn sync(&self, _mode: Durability) -> Result<(), StoreError> {
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        let rows = self.rows(&self.sql.size, &[])?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0).max(0) as u64)
    }
}

/// Runs blocking client work off tokio's worker threads: the `postgres` client blocks on
/// a runtime of its own, which tokio refuses inside one of its workers. On a
/// current-thread runtime (tests) the work runs on a scoped thread, blocking that runtime
/// for the call.
fn off_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        Ok(_) => std::thread::scope(|s| match s.spawn(f).join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
        Err(_) => f(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh region's tables on the test database (dropped first: a database kept
    /// between runs may hold them).
    pub(crate) fn fresh(url: &str, name: &str) -> PgOptions {
        let region = format!("{name}_{}", std::process::id());
        off_runtime(|| {
            let mut c = postgres::Client::connect(url, NoTls).unwrap();
            c.batch_execute(&format!(
                "DROP TABLE IF EXISTS chatvault_{region}_kv; DROP TABLE IF EXISTS chatvault_{region}_kv_meta;"
            ))
            .unwrap();
        });
        let mut o = PgOptions::new(url, region);
        o.pool_size = 4;
        o
    }

    #[test]
    fn the_successor_of_a_prefix_bounds_exactly_its_keys() {
        assert_eq!(successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(successor(&[0xff, 0xff]), None);
        assert_eq!(successor(&[]), None);
    }

    #[test]
    fn the_options_debug_output_holds_no_url() {
        let o = PgOptions::new("postgresql://u:secret@h/db", "eu");
        assert!(!format!("{o:?}").contains("secret"));
    }

    #[test]
    fn the_postgres_store_passes_the_conformance_suite() {
        let Some(url) = crate::store::tests::postgres_url() else { return };
        let opts = fresh(&url, "conformance");
        let store = PgStore::open(&opts).unwrap();
        crate::store::tests::conformance(&store);
        // A second writer of the region is refused while the first holds the lease.
        let impatient = PgOptions { connect_timeout: Duration::from_millis(300), ..opts.clone() };
        let e = PgStore::open(&impatient).err().expect("two writers of one region").to_string();
        assert!(e.contains("writer lease"), "{e}");
        // Opened again after it is gone (a restart, or a node taking over): the table and
        // its rows are found.
        drop(store);
        let again = PgStore::open(&opts).unwrap();
        assert_eq!(again.get(&[b'a', 3]).unwrap(), Some(vec![3]));
    }

    /// Dropped (and used) inside tokio, as the server does: the client's own runtime
    /// must not be started on tokio's worker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_postgres_store_works_and_drops_inside_tokio() {
        let Some(url) = crate::store::tests::postgres_url() else { return };
        let store = PgStore::open(&fresh(&url, "in_tokio")).unwrap();
        let mut b = Batch::default();
        b.put(b"k".to_vec(), b"v".to_vec());
        store.apply(b).unwrap();
        assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()));
        // On a worker, as a request's last handle would be.
        tokio::spawn(async move { drop(store) }).await.expect("dropped on a worker without a panic");
    }

    /// The lease's session ended by the database (a restart, a failover, an operator):
    /// another node may take the lease, so this one stops writing.
    #[test]
    fn a_store_whose_lease_session_is_gone_refuses_further_writes() {
        let Some(url) = crate::store::tests::postgres_url() else { return };
        let store = PgStore::open(&fresh(&url, "lease_lost")).unwrap();
        let put = |k: &[u8]| {
            let mut b = Batch::default();
            b.put(k.to_vec(), b"v".to_vec());
            store.apply(b)
        };
        put(b"before").unwrap();
        let backend = store.lease.as_ref().unwrap().backend;
        let mut c = postgres::Client::connect(&url, NoTls).unwrap();
        assert!(c.query_one("SELECT pg_terminate_backend($1)", &[&backend]).unwrap().get::<_, bool>(0));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while put(b"after").is_ok() {
            assert!(std::time::Instant::now() < deadline, "writes went on without the lease");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(matches!(put(b"again"), Err(StoreError::Failed)));
        assert_eq!(store.get(b"before").unwrap(), Some(b"v".to_vec()), "reads still answer");
    }

    #[test]
    fn a_database_with_a_newer_schema_is_refused_naming_the_version() {
        let Some(url) = crate::store::tests::postgres_url() else { return };
        let opts = fresh(&url, "newer");
        drop(PgStore::open(&opts).unwrap());
        let mut c = postgres::Client::connect(&url, NoTls).unwrap();
        let meta = format!("chatvault_{}_kv_meta", opts.region);
        c.execute(&format!("UPDATE {meta} SET value = 7 WHERE name = 'schema_version'"), &[]).unwrap();
        let e = PgStore::open(&opts).err().expect("a newer schema opened").to_string();
        assert!(e.contains("schema version 7") && e.contains("newer"), "{e}");
    }

    #[test]
    fn an_unreachable_database_is_unavailable_and_the_url_is_not_in_the_error() {
        let mut opts = PgOptions::new("postgresql://u:secret@127.0.0.1:1/db", "eu");
        opts.connect_timeout = Duration::from_millis(300);
        let e = PgStore::open(&opts).err().expect("opened without a database");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn a_region_name_too_long_for_a_table_is_refused() {
        let e = PgStore::open(&PgOptions::new("postgresql://127.0.0.1:1/db", "r".repeat(46))).err().unwrap();
        assert!(e.to_string().contains("table name"), "{e}");
    }
}
