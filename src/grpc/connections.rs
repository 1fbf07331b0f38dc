//! Connections of one listener, bounded: a cap on how many are open at once (and per
//! source), a deadline for a new connection's first call, an idle timeout for one with no
//! call in flight, and a deadline for each unary response to be taken. tonic and hyper
//! offer HTTP/2 keepalive, a stream cap and a maximum connection age (set in `grpc`), but
//! none of these; without them sockets that never make a call pile up until the process
//! runs out of file descriptors.
//!
//! Each accepted socket is wrapped in a [`Conn`] that shares a [`ConnState`] with a
//! watchdog task and with the observing layer, which counts the calls in flight on it
//! (a streamed response counts until its body ends). A connection given up on reads as
//! closed by its peer and fails every write, so hyper ends it even when the peer has
//! stopped reading.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::Metrics;

/// Limits on one listener's connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Connections open at once (also bounded by the process's file-descriptor limit,
    /// less a reserve for the server's own files). Past it, a new connection first takes
    /// the place of one that has sent nothing yet; failing that it is closed at once.
    pub max_connections: usize,
    /// Connections open at once from one address (an IPv6 /64).
    pub max_connections_per_source: usize,
    /// A new connection must make its first call within this (TLS and the HTTP/2
    /// preface included); clients reconnect transparently when they need one again.
    pub handshake_timeout_ms: u64,
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout_secs: u64,
    /// HTTP/2 pings to a silent peer, and how long it may take to answer one before its
    /// connection is dropped.
    pub keepalive_interval_secs: u64,
    pub keepalive_timeout_secs: u64,
    /// Calls open at once on one connection (HTTP/2 streams).
    pub max_concurrent_streams: u32,
    /// A connection is asked to go away after this long (a stream held open for ever,
    /// health Watch say, does not keep it), and closed `max_connection_age_grace_secs` later.
    pub max_connection_age_secs: u64,
    pub max_connection_age_grace_secs: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            max_connections_per_source: 512,
            handshake_timeout_ms: 10_000,
            idle_timeout_secs: 300,
            keepalive_interval_secs: 60,
            keepalive_timeout_secs: 20,
            max_concurrent_streams: 200,
            max_connection_age_secs: 3_600,
            max_connection_age_grace_secs: 300,
        }
    }
}

/// File descriptors kept for the server's own files (sled, segments, the ledger, logs).
const FD_RESERVE: u64 = 64;
/// Connections of the admin listener, at most, and what the metrics endpoint may hold:
/// both are kept out of the data listener's share of the fd limit.
const ADMIN_MAX: usize = 64;
pub const METRICS_MAX: usize = 16;

impl ConnectionLimits {
    /// The connection cap of `listener` that fits this process's file-descriptor limit
    /// together with the other listeners'.
    pub fn effective_max(&self, listener: &str) -> usize {
        let cap = self.max_connections.max(1);
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
        let room = usize::try_from(soft.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
        // Under a low limit the admin listener and the metrics endpoint get a share of
        // what is left rather than all of it.
        let admin = ADMIN_MAX.min(room / 4).max(1);
        if listener == "admin" {
            return cap.min(admin);
        }
        let others = admin + METRICS_MAX.min(room / 8);
        cap.min(room.saturating_sub(others).max(1))
    }
}

/// What the watchdog and the activity layer know of one connection.
pub struct ConnState {
    opened: Instant,
    source: IpAddr,
    /// Set once the peer made its first call.
    served: AtomicBool,
    /// Calls in flight (a streamed response until its body ends).
    active: AtomicUsize,
    /// Milliseconds after `opened` when the last call ended.
    last_ms: AtomicU64,
    closed: AtomicBool,
    /// Set once a new connection waits for this one's place (so two never wait for one).
    claimed: AtomicBool,
    waker: Mutex<Option<Waker>>,
    /// Responses not yet out, with the time they must be by: a flag set when sent, dead
    /// when the response was dropped.
    sends: Mutex<VecDeque<(Instant, Weak<AtomicBool>)>>,
}

impl ConnState {
    fn since_open(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
    }

    /// Registers a response that must be out by `deadline`, or the connection goes.
    pub fn expect_sent(&self, deadline: Instant, sent: &Arc<AtomicBool>) {
        if let Ok(mut q) = self.sends.lock() {
            while q.front().is_some_and(|(_, s)| is_settled(s)) {
                q.pop_front();
            }
            if q.len() >= 4096 {
                q.retain(|(_, s)| !is_settled(s));
            }
            q.push_back((deadline, Arc::downgrade(sent)));
        }
    }

    /// The earliest deadline of a response still unsent, if any; true in `.1` if it passed.
    fn send_deadline(&self, now: Instant) -> Option<(Instant, bool)> {
        let mut q = self.sends.lock().ok()?;
        q.retain(|(_, s)| !is_settled(s));
        q.iter().map(|(d, _)| *d).min().map(|d| (d, d <= now))
    }

    /// A call began on this connection; the guard ends it.
    pub fn begin(self: &Arc<Self>) -> CallGuard {
        self.served.store(true, Ordering::SeqCst);
        self.active.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn remember(&self, cx: &Context<'_>) {
        if let Ok(mut w) = self.waker.lock() {
            *w = Some(cx.waker().clone());
        }
    }
}

fn is_settled(sent: &Weak<AtomicBool>) -> bool {
    sent.upgrade().is_none_or(|s| s.load(Ordering::SeqCst))
}

/// Ends a call on drop.
pub struct CallGuard(Arc<ConnState>);

impl CallGuard {
    /// The connection the call is on.
    pub fn connection(&self) -> Arc<ConnState> {
        self.0.clone()
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.last_ms.store(self.0.since_open(), Ordering::SeqCst);
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Who a connection is: its two ends (one remote address can reach a listener on two
/// local addresses).
pub type ConnKey = (Option<SocketAddr>, SocketAddr);

/// The open connections of a listener.
#[derive(Clone, Default)]
pub struct ConnTable {
    inner: Arc<Mutex<HashMap<ConnKey, Arc<ConnState>>>>,
}

impl ConnTable {
    pub fn get(&self, key: &ConnKey) -> Option<Arc<ConnState>> {
        self.inner.lock().ok()?.get(key).cloned()
    }

    fn per_source(&self, ip: IpAddr) -> usize {
        let key = source_key(ip);
        self.inner.lock().map(|m| m.values().filter(|s| s.source == key).count()).unwrap_or(0)
    }

    /// Makes room for a connection from `ip` in a full table: closes the oldest
    /// connection that has made no call yet, or else the oldest idle one of the source
    /// holding the most connections, if that is not `ip`'s own. Whether a place frees
    /// for it soon (the caller then waits for it).
    fn evict_for(&self, ip: IpAddr) -> bool {
        let Ok(map) = self.inner.lock() else { return false };
        let open = || map.values().filter(|s| !s.is_closed());
        let victim = open().filter(|s| !s.served.load(Ordering::SeqCst)).min_by_key(|s| s.opened).cloned();
        let victim = victim.or_else(|| {
            let mut counts: HashMap<IpAddr, usize> = HashMap::new();
            for s in open() {
                *counts.entry(s.source).or_default() += 1;
            }
            let mine = counts.get(&source_key(ip)).copied().unwrap_or(0);
            let (&hog, &most) = counts.iter().max_by_key(|(_, n)| **n)?;
            if most <= mine + 1 {
                return None; // no one holds more than its share
            }
            open().filter(|s| s.source == hog && s.active.load(Ordering::SeqCst) == 0).min_by_key(|s| s.opened).cloned()
        });
        // A connection closed a moment ago, whose place no one waits for yet, will do too.
        let victim =
            victim.or_else(|| map.values().find(|s| s.is_closed() && !s.claimed.swap(true, Ordering::SeqCst)).cloned());
        drop(map);
        victim.is_some_and(|s| {
            s.claimed.store(true, Ordering::SeqCst);
            s.close();
            true
        })
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn source_key(ip: IpAddr) -> IpAddr {
    match crate::tenancy::canonical_ip(ip) {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// An accepted socket under the listener's limits.
pub struct Conn {
    stream: TcpStream,
    state: Arc<ConnState>,
    info: TcpConnectInfo,
    table: ConnTable,
    _slot: OwnedSemaphorePermit,
    _open: crate::metrics::GaugeGuard,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(peer) = self.info.remote_addr else { return };
        if let Ok(mut map) = self.table.inner.lock() {
            let key = (self.info.local_addr, peer);
            if map.get(&key).is_some_and(|s| Arc::ptr_eq(s, &self.state)) {
                map.remove(&key);
            }
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.state.is_closed() {
            // Read as the peer closing: hyper ends the connection.
            return Poll::Ready(Ok(()));
        }
        self.state.remember(cx);
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

/// Writes to a connection given up on fail: a peer that stopped reading would otherwise
/// keep hyper waiting to flush for ever, and the connection with it.
fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "connection closed by the server")
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.state.is_closed() {
            return Poll::Ready(Err(gone()));
        }
        self.state.remember(cx);
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state.is_closed() {
            return Poll::Ready(Err(gone()));
        }
        self.state.remember(cx);
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state.is_closed() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.state.is_closed() {
            return Poll::Ready(Err(gone()));
        }
        self.state.remember(cx);
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts on `listener` under `limits`: the stream tonic serves from, and the table of
/// open connections the observing layer consults.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    listener_name: &'static str,
) -> (ReceiverStream<io::Result<Conn>>, ConnTable) {
    let table = ConnTable::default();
    let (tx, rx) = mpsc::channel(64);
    let admission = Admission {
        slots: Arc::new(Semaphore::new(limits.effective_max(listener_name))),
        limits,
        table: table.clone(),
        metrics,
        listener: listener_name,
    };
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most often: wait for some to be freed.
                    tracing::warn!(error = %e, listener = listener_name, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return; // the server stopped
            }
            if let Some(conn) = admission.admit(stream, peer, &tx) {
                let _ = tx.send(Ok(conn)).await;
            }
        }
    });
    (ReceiverStream::new(rx), table)
}

/// What deciding on a new connection needs.
#[derive(Clone)]
struct Admission {
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    table: ConnTable,
    metrics: Arc<Metrics>,
    listener: &'static str,
}

impl Admission {
    /// The connection if it may start now; None if refused or if it waits for the place
    /// of one just evicted (off the accept loop, which must not wait).
    fn admit(&self, stream: TcpStream, peer: SocketAddr, tx: &mpsc::Sender<io::Result<Conn>>) -> Option<Conn> {
        if self.table.per_source(peer.ip()) >= self.limits.max_connections_per_source {
            self.metrics.connection_refused(self.listener, "per_source");
            return None;
        }
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Some(self.open(stream, peer, slot)),
            // Full: the place of an evicted connection frees as soon as hyper sees it closed.
            Err(_) if self.table.evict_for(peer.ip()) => {
                let (this, tx) = (self.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(1), this.slots.clone().acquire_owned()).await {
                        Ok(Ok(slot)) => {
                            let _ = tx.send(Ok(this.open(stream, peer, slot))).await;
                        }
                        _ => this.metrics.connection_refused(this.listener, "max_connections"),
                    }
                });
                None
            }
            Err(_) => {
                self.metrics.connection_refused(self.listener, "max_connections");
                None
            }
        }
    }

    fn open(&self, stream: TcpStream, peer: SocketAddr, slot: OwnedSemaphorePermit) -> Conn {
        let _ = stream.set_nodelay(true);
        let state = Arc::new(ConnState {
            opened: Instant::now(),
            source: source_key(peer.ip()),
            served: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            claimed: AtomicBool::new(false),
            waker: Mutex::new(None),
            sends: Mutex::default(),
        });
        let info = TcpConnectInfo { local_addr: stream.local_addr().ok(), remote_addr: Some(peer) };
        if let Ok(mut map) = self.table.inner.lock() {
            map.insert((info.local_addr, peer), state.clone());
        }
        tokio::spawn(watchdog(Arc::downgrade(&state), self.limits.clone()));
        let open = crate::metrics::GaugeGuard::inc(&self.metrics.connections(self.listener));
        Conn { stream, state, info, table: self.table.clone(), _slot: slot, _open: open }
    }
}

/// Closes the connection when it stays silent past the handshake deadline, idle past the
/// idle timeout, or leaves a unary response untaken past its deadline; ends with the
/// connection.
async fn watchdog(state: Weak<ConnState>, limits: ConnectionLimits) {
    let handshake = Duration::from_millis(limits.handshake_timeout_ms.max(1));
    let idle = Duration::from_secs(limits.idle_timeout_secs.max(1));
    tokio::time::sleep(handshake).await;
    loop {
        let Some(s) = state.upgrade() else { return };
        if !s.served.load(Ordering::SeqCst) {
            s.close();
            return;
        }
        let now = Instant::now();
        let send = s.send_deadline(now);
        if send.is_some_and(|(_, passed)| passed) {
            tracing::info!("closing a connection whose peer did not take a response in time");
            crate::metrics::get().limit_hit("send_timeout");
            s.close();
            return;
        }
        let mut wait = if s.active.load(Ordering::SeqCst) > 0 {
            idle
        } else {
            let quiet = Duration::from_millis(s.since_open().saturating_sub(s.last_ms.load(Ordering::SeqCst)));
            if quiet >= idle {
                s.close();
                return;
            }
            idle - quiet
        };
        // Pending sends are looked at again by their deadline, and at least every second
        // (one registered later may be due sooner than the idle check).
        if let Some((deadline, _)) = send {
            wait = wait.min(deadline - now).min(Duration::from_secs(1));
        } else if s.active.load(Ordering::SeqCst) > 0 {
            wait = wait.min(Duration::from_secs(1));
        }
        drop(s);
        tokio::time::sleep(wait).await;
    }
}
