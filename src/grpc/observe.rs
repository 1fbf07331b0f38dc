//! A tower layer around every service of a listener: it counts the calls in flight on
//! each connection (for the idle timeout, see `connections`), and records each call's
//! method, status and latency in the metrics once its response has ended — a streamed
//! export when its last chunk is out, not when its headers are.
//!
//! It also keeps what a handler [`Hold`]s (a read's byte budget) until the response is
//! out, and gives a unary response `send_timeout` to get there: hyper stops pulling a
//! body the peer grants no flow-control window to, so only a deadline outside the body
//! can free what it holds (the connection is closed, which drops the stream).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::connections::{CallGuard, ConnState, ConnTable};

/// Something a handler keeps alive until its response is sent or dropped: put in the
/// response's extensions (which want `Clone`, hence the shared slot).
#[derive(Clone)]
pub struct Hold(Arc<Mutex<Option<Box<dyn Send>>>>);

impl Hold {
    pub fn new<T: Send + 'static>(value: T) -> Self {
        Hold(Arc::new(Mutex::new(Some(Box::new(value)))))
    }

    fn take(&self) -> Option<Box<dyn Send>> {
        self.0.lock().ok()?.take()
    }
}

/// Methods whose responses are streams: they pace themselves (an export gives up on a
/// stalled reader on its own), so the unary send deadline does not apply.
const STREAMING: &[&str] = &["/chatvault.v1.ExportService/", "/grpc.reflection.", "/grpc.health.v1.Health/Watch"];

#[derive(Clone)]
pub struct ObserveLayer {
    table: ConnTable,
    send_timeout: Duration,
}

impl ObserveLayer {
    pub fn new(table: ConnTable, send_timeout: Duration) -> Self {
        ObserveLayer { table, send_timeout }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner, table: self.table.clone(), send_timeout: self.send_timeout }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    table: ConnTable,
    send_timeout: Duration,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let ends = req.extensions().get::<TcpConnectInfo>().map(|i| (i.local_addr, i.remote_addr)).or_else(|| {
            req.extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(|i| (i.get_ref().local_addr, i.get_ref().remote_addr))
        });
        let state = ends.and_then(|(local, remote)| self.table.get(&(local, remote?)));
        let sent = Arc::new(AtomicBool::new(false));
        if let Some(s) = &state {
            // For handlers that must give up on their response (a stalled export).
            req.extensions_mut().insert(Connection { state: s.clone(), sent: sent.clone() });
        }
        let guard = state.map(|s| s.begin());
        let path = req.uri().path();
        let rpc = if super::discovery::is_known_method(path) { path.to_owned() } else { "unknown".to_owned() };
        let started = Instant::now();
        let send_timeout = self.send_timeout;
        let fut = self.inner.call(req);
        Box::pin(async move {
            // A call whose future is dropped (its deadline passed, or its client reset it)
            // is counted all the same.
            let mut unanswered = Unanswered { rpc: Some(rpc), started, deadline: send_timeout };
            let mut resp = fut.await?;
            let rpc = unanswered.rpc.take().unwrap_or_default();
            client_fault_is_invalid_argument(resp.headers_mut());
            let code = grpc_status(resp.headers());
            let hold = resp.extensions_mut().remove::<Hold>().and_then(|h| h.take());
            if let Some(g) = &guard
                && !STREAMING.iter().any(|p| rpc.starts_with(p))
            {
                g.connection().expect_sent(Instant::now() + send_timeout, &sent);
            }
            Ok(resp.map(|inner| {
                tonic::body::Body::new(Tracked { inner, guard, rpc, started, code, hold, sent, done: false })
            }))
        })
    }
}

/// The connection a call came on and whether its response is out, in its request's
/// extensions.
#[derive(Clone)]
pub struct Connection {
    state: Arc<ConnState>,
    sent: Arc<AtomicBool>,
}

impl Connection {
    /// The response must be out by `deadline`, or the whole connection is given up on:
    /// the only way to drop a stream whose peer grants it no window.
    pub fn response_due_by(&self, deadline: Instant) {
        self.state.expect_sent(deadline, &self.sent);
    }
}

/// Records a call that ended before it had a response.
struct Unanswered {
    rpc: Option<String>,
    started: Instant,
    deadline: Duration,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(rpc) = self.rpc.take() {
            let took = self.started.elapsed();
            let code = if took >= self.deadline { tonic::Code::DeadlineExceeded } else { tonic::Code::Cancelled };
            crate::metrics::get().observe_request(&rpc, code, took);
        }
    }
}

/// tonic answers a request whose framing it cannot read (a truncated frame, a bad
/// compression flag) with INTERNAL before any handler or codec runs, and so do its own
/// services (health, reflection) for a message that does not decode; it is the client's
/// fault, so it becomes INVALID_ARGUMENT, with tonic's words. Our services' codec says so
/// itself (`codec`).
fn client_fault_is_invalid_argument(headers: &mut http::HeaderMap) {
    if grpc_status(headers) != Some(tonic::Code::Internal) {
        return;
    }
    let message = headers.get("grpc-message").and_then(|v| v.to_str().ok()).map(percent_decode).unwrap_or_default();
    const CLIENT_FAULTS: [&str; 3] =
        ["Unexpected EOF decoding stream", "protocol error:", "failed to decode Protobuf message"];
    if CLIENT_FAULTS.iter().any(|p| message.starts_with(p)) {
        headers.insert("grpc-status", http::HeaderValue::from(tonic::Code::InvalidArgument as i32));
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(v))
}

/// A response body that ends its call (and records it) when it ends or is dropped.
struct Tracked {
    inner: tonic::body::Body,
    guard: Option<CallGuard>,
    rpc: String,
    started: Instant,
    code: Option<tonic::Code>,
    hold: Option<Box<dyn Send>>,
    sent: Arc<AtomicBool>,
    done: bool,
}

impl Tracked {
    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // No status at all: the client went away before the end.
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        crate::metrics::get().observe_request(&self.rpc, code, self.started.elapsed());
        self.sent.store(true, Ordering::SeqCst);
        self.guard = None;
        self.hold = None;
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish();
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    client_fault_is_invalid_argument(trailers);
                    self.code = grpc_status(trailers).or(self.code);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                self.code = Some(status.code());
                self.finish();
            }
            Poll::Ready(None) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
