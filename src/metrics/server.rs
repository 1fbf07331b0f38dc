//! The scrape endpoint: `GET /metrics` over plain HTTP/1.1 (hyper, already under tonic),
//! everything else 404. `refresh` runs before each scrape, off the executor, to read the
//! state the vault holds.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The vault's state, read at most once a second however many scrapes come, one read at
/// a time (each walks part of the store on the blocking pool).
struct Refresh {
    read: Arc<dyn Fn() + Send + Sync>,
    last: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl Refresh {
    async fn run(&self) {
        let mut last = self.last.lock().await;
        if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
            return;
        }
        let read = self.read.clone();
        let _ = tokio::task::spawn_blocking(move || read()).await;
        *last = Some(std::time::Instant::now());
    }
}

/// Serves scrapes on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    refresh: Arc<dyn Fn() + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let refresh = Arc::new(Refresh { read: refresh, last: tokio::sync::Mutex::new(None) });
    // A few scrapers at once; more are closed at accept (the data listener's fd share
    // leaves room for these).
    let slots = Arc::new(tokio::sync::Semaphore::new(crate::grpc::METRICS_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: Request<Incoming>| {
                let refresh = refresh.clone();
                async move { Ok::<_, Infallible>(answer(req, refresh).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            // A scrape that stalls is dropped rather than kept for ever.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

async fn answer(req: Request<Incoming>, refresh: Arc<Refresh>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found: try GET /metrics\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    refresh.run().await;
    let mut r = Response::new(Full::new(Bytes::from(super::get().encode())));
    if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}
