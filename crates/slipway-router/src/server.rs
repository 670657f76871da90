//! The app-traffic listener: accepts connections, speaks HTTP/1.1 and HTTP/2 (prior
//! knowledge), and dispatches each request through the routing table.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::body::RouterBody;
use crate::error_page::{error_response, error_response_with, wants_json, ErrorCode};
use crate::host::request_host;
use crate::table::{Route, Router};
use crate::{proxy, static_files};

/// Pause after a failed `accept` (typically out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves app traffic on `listener` until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish for up to [`crate::RouterConfig::shutdown_grace`] and returns.
///
/// With [`crate::RouterConfig::io_threads`] = 0 everything runs on the caller's runtime.
/// Otherwise the listener is served by that many dedicated threads, each running a
/// single-threaded runtime that owns its connections from accept to close (the model of
/// nginx's workers: no cross-thread hand-off on the request path).
///
/// Upgraded connections (WebSockets) are not waited for: they belong to their route's
/// [`crate::Drain`], not to the listener.
pub async fn serve(listener: TcpListener, router: Arc<Router>, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(router.config().max_connections.max(1)));
    let threads = router.config().io_threads;
    if threads == 0 {
        return serve_on(listener, router, permits, shutdown).await;
    }
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(err) => {
            warn!(error = %err, "cannot hand the app-traffic listener to I/O threads");
            return;
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stopped = Vec::with_capacity(threads);
    for index in 0..threads {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = listener.try_clone().and_then(|listener| {
            let (router, permits, mut stop) = (Arc::clone(&router), Arc::clone(&permits), stop_rx.clone());
            std::thread::Builder::new().name(format!("slipway-router-{index}")).spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(err) => return warn!(error = %err, "cannot start an app-traffic I/O thread"),
                };
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(err) => return warn!(error = %err, "cannot register the app-traffic listener"),
                    };
                    let shutdown = async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    };
                    serve_on(listener, router, permits, shutdown).await;
                });
                drop(done_tx);
            })
        });
        match spawned {
            Ok(_thread) => stopped.push(done_rx),
            Err(err) => warn!(error = %err, "cannot start an app-traffic I/O thread"),
        }
    }
    drop(listener);
    shutdown.await;
    let _ = stop_tx.send(true);
    for done in stopped {
        // Resolves (with an error) when the thread drops its sender, i.e. has finished.
        let _ = done.await;
    }
}

/// The accept loop of one runtime.
async fn serve_on(
    listener: TcpListener,
    router: Arc<Router>,
    permits: Arc<Semaphore>,
    shutdown: impl Future<Output = ()>,
) {
    let config = router.config().clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));

    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "accepting an app-traffic connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let router = Arc::clone(&router);
        // Formatted once per connection, not per request.
        let client_ip = client_ip_header(peer);
        let service = service_fn(move |req: Request<Incoming>| {
            let router = Arc::clone(&router);
            let client_ip = client_ip.clone();
            async move { Ok::<_, Infallible>(handle(&router, req, &client_ip).await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(err) = connection.await {
                debug!(%peer, error = %err, "app-traffic connection ended with an error");
            }
        });
    }
    drop(listener);
    info!(
        connections = graceful.count(),
        "app-traffic listener stopping"
    );
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(config.shutdown_grace) => {
            warn!("app-traffic connections still open after the shutdown grace period");
        }
    }
}

fn client_ip_header(peer: SocketAddr) -> HeaderValue {
    let ip = peer.ip().to_canonical().to_string();
    // An IP address in text form is always a valid header value.
    HeaderValue::from_str(&ip).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Routes one request: host → table entry → proxy, file server or error page.
pub(crate) async fn handle(
    router: &Router,
    req: Request<Incoming>,
    client_ip: &HeaderValue,
) -> Response<RouterBody> {
    let json = wants_json(req.headers());
    let Some(host) = request_host(&req) else {
        return error_response(ErrorCode::BadHost, json);
    };
    let Some(entry) = router.lookup(&host) else {
        return error_response(ErrorCode::UnknownHost, json);
    };
    let guard = entry.in_flight.enter();
    match (&entry.route, &entry.pool) {
        (Route::Upstream(_), Some(pool)) => {
            proxy::forward(pool, router.config(), req, client_ip, guard, json).await
        }
        (Route::Static(site), _) => static_files::serve(site, &req, json),
        (Route::Unavailable(page), _) => error_response_with(
            page.kind.code(),
            json,
            page.title.as_deref(),
            page.detail.as_deref(),
        ),
        // Upstream entries are always built with a pool.
        (Route::Upstream(_), None) => error_response(ErrorCode::UpstreamUnreachable, json),
    }
}
