//! Connections of one listener, bounded: a cap on how many are open at once (and per
//! source), a deadline for a new connection's first bytes, and an idle timeout for one
//! with no call in flight. tonic and hyper offer HTTP/2 keepalive and a maximum
//! connection age but none of these, and without them idle sockets that never send the
//! HTTP/2 preface pile up until the process runs out of file descriptors.
//!
//! Each accepted socket is wrapped in a [`Conn`] that shares a [`ConnState`] with a
//! watchdog task and with [`ActivityLayer`], which counts the calls in flight on it
//! (a streamed response counts until its body ends). A connection the watchdog gives up
//! on reads as closed by its peer, so hyper ends it the ordinary way.

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
    /// A new connection must send its first bytes (TLS hello or HTTP/2 preface) within this.
    pub handshake_timeout_ms: u64,
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout_secs: u64,
    /// HTTP/2 pings to a silent peer, and how long it may take to answer one before its
    /// connection is dropped.
    pub keepalive_interval_secs: u64,
    pub keepalive_timeout_secs: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            max_connections_per_source: 512,
            handshake_timeout_ms: 5_000,
            idle_timeout_secs: 300,
            keepalive_interval_secs: 60,
            keepalive_timeout_secs: 20,
        }
    }
}

/// File descriptors kept for the server's own files (sled, segments, the ledger, logs).
const FD_RESERVE: u64 = 64;

impl ConnectionLimits {
    /// The connection cap that fits this process's file-descriptor limit.
    pub fn effective_max(&self) -> usize {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
        let room = usize::try_from(soft.saturating_sub(FD_RESERVE).max(1)).unwrap_or(usize::MAX);
        self.max_connections.max(1).min(room)
    }
}

/// What the watchdog and the activity layer know of one connection.
pub struct ConnState {
    opened: Instant,
    /// Set once the peer sent its first bytes.
    spoke: AtomicBool,
    /// Calls in flight (a streamed response until its body ends).
    active: AtomicUsize,
    /// Milliseconds after `opened` when the last call ended.
    last_ms: AtomicU64,
    closed: AtomicBool,
    waker: Mutex<Option<Waker>>,
    /// Unary responses not yet out, with the time they must be by: a flag set when sent,
    /// dead when the response was dropped. In deadline order.
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

    /// Registers a unary response that must be out by `deadline`, or the connection goes.
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
        while q.front().is_some_and(|(_, s)| is_settled(s)) {
            q.pop_front();
        }
        q.front().map(|(d, _)| (*d, *d <= now))
    }

    /// A call began on this connection; the guard ends it.
    pub fn begin(self: &Arc<Self>) -> CallGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
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

/// The open connections of a listener, by peer address.
#[derive(Clone, Default)]
pub struct ConnTable {
    inner: Arc<Mutex<HashMap<SocketAddr, Arc<ConnState>>>>,
}

impl ConnTable {
    pub fn get(&self, peer: &SocketAddr) -> Option<Arc<ConnState>> {
        self.inner.lock().ok()?.get(peer).cloned()
    }

    fn per_source(&self, ip: IpAddr) -> usize {
        let key = source_key(ip);
        self.inner.lock().map(|m| m.keys().filter(|a| source_key(a.ip()) == key).count()).unwrap_or(0)
    }

    /// Closes the oldest connection that has sent nothing yet; whether there was one.
    fn evict_silent(&self) -> bool {
        let Ok(map) = self.inner.lock() else { return false };
        let victim = map.values().filter(|s| !s.spoke.load(Ordering::SeqCst)).min_by_key(|s| s.opened).cloned();
        drop(map);
        victim.is_some_and(|s| {
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
        if let (Some(peer), Ok(mut map)) = (self.info.remote_addr, self.table.inner.lock()) {
            map.remove(&peer);
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
        if self.state.closed.load(Ordering::SeqCst) {
            // Read as the peer closing: hyper ends the connection.
            return Poll::Ready(Ok(()));
        }
        if let Ok(mut w) = self.state.waker.lock() {
            *w = Some(cx.waker().clone());
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.spoke.store(true, Ordering::SeqCst);
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts on `listener` under `limits`: the stream tonic serves from, and the table of
/// open connections the activity layer consults.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    listener_name: &'static str,
) -> (ReceiverStream<io::Result<Conn>>, ConnTable) {
    let table = ConnTable::default();
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.effective_max()));
    let t = table.clone();
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
            let Some(conn) = admit(stream, peer, &limits, &slots, &t, &metrics, listener_name).await else { continue };
            if tx.send(Ok(conn)).await.is_err() {
                return; // the server stopped
            }
        }
    });
    (ReceiverStream::new(rx), table)
}

async fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    limits: &ConnectionLimits,
    slots: &Arc<Semaphore>,
    table: &ConnTable,
    metrics: &Metrics,
    listener_name: &'static str,
) -> Option<Conn> {
    if table.per_source(peer.ip()) >= limits.max_connections_per_source {
        metrics.connection_refused(listener_name, "per_source");
        return None;
    }
    let slot = match slots.clone().try_acquire_owned() {
        Ok(s) => s,
        // Full: a connection that has not said a word yet gives up its place to this one
        // (its slot frees as soon as hyper sees it closed); failing that, this one is closed.
        Err(_) if table.evict_silent() => {
            match tokio::time::timeout(Duration::from_secs(1), slots.clone().acquire_owned()).await {
                Ok(Ok(s)) => s,
                _ => {
                    metrics.connection_refused(listener_name, "max_connections");
                    return None;
                }
            }
        }
        Err(_) => {
            metrics.connection_refused(listener_name, "max_connections");
            return None;
        }
    };
    let _ = stream.set_nodelay(true);
    let state = Arc::new(ConnState {
        opened: Instant::now(),
        spoke: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        last_ms: AtomicU64::new(0),
        closed: AtomicBool::new(false),
        waker: Mutex::new(None),
        sends: Mutex::default(),
    });
    if let Ok(mut map) = table.inner.lock() {
        map.insert(peer, state.clone());
    }
    tokio::spawn(watchdog(Arc::downgrade(&state), limits.clone()));
    let info = TcpConnectInfo { local_addr: stream.local_addr().ok(), remote_addr: Some(peer) };
    let open = crate::metrics::GaugeGuard::inc(&metrics.connections(listener_name));
    Some(Conn { stream, state, info, table: table.clone(), _slot: slot, _open: open })
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
        if !s.spoke.load(Ordering::SeqCst) {
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
