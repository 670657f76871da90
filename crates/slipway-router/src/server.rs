//! The app-traffic listener: accepts connections, speaks HTTP/1.1 and HTTP/2 (prior
//! knowledge), and dispatches each request through the routing table.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::service::{service_fn, Service};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::admission::{Admission, Gate};
use crate::body::{BoxError, RouterBody};
use crate::config::RouterConfig;
use crate::error_page::{error_response, error_response_with, wants_json, ErrorCode};
use crate::host::request_host;
use crate::proxy::{Local, Slot};
use crate::table::{Route, Router};
use crate::timer::{self, CoarseTimer};
use crate::{idle, proxy, static_files};

/// Pause after a failed `accept` (typically out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves app traffic on `listener` until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish for up to [`crate::RouterConfig::shutdown_grace`] and returns.
///
/// With [`crate::RouterConfig::io_threads`] = 0 everything runs on the caller's runtime.
/// Otherwise the caller's runtime accepts and hands each connection to the dedicated I/O
/// thread serving the fewest connections; each thread runs a single-threaded runtime that owns
/// its connections from then on, and the upstream connections they use (the model of nginx's
/// workers: no cross-thread hand-off on the request path). Handing connections out, rather
/// than every thread accepting on the shared socket, keeps the threads evenly loaded: with
/// competing `accept`s, 32 connections opened at once were split as unevenly as 26 to 6, and
/// the busier thread capped the throughput.
///
/// Upgraded connections (WebSockets) are not waited for: they belong to their route's
/// [`crate::Drain`], not to the listener.
pub async fn serve(listener: TcpListener, router: Arc<Router>, shutdown: impl Future<Output = ()>) {
    let gate = Gate::new(
        router.config().max_connections,
        router.config().max_connections_per_client,
    );
    let threads = router.config().io_threads;
    if threads == 0 {
        return serve_here(listener, gate, router, shutdown).await;
    }
    let mut workers = Vec::with_capacity(threads);
    let mut stopped = Vec::with_capacity(threads);
    for index in 0..threads {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (handoff_tx, handoff_rx) = tokio::sync::mpsc::unbounded_channel::<Handoff>();
        let router = Arc::clone(&router);
        let spawned = std::thread::Builder::new()
            .name(format!("slipway-router-{index}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        return warn!(error = %err, "cannot start an app-traffic I/O thread")
                    }
                };
                // Ends when the acceptor drops its sender (shutdown).
                let config = router.config().clone();
                runtime.block_on(serve_on(
                    Connections::Handed(handoff_rx),
                    config,
                    move |peer, watch, slot| app_service(&router, peer, watch, slot),
                    std::future::pending(),
                ));
                drop(done_tx);
            });
        match spawned {
            Ok(_thread) => {
                workers.push((handoff_tx, Arc::new(AtomicUsize::new(0))));
                stopped.push(done_rx);
            }
            Err(err) => warn!(error = %err, "cannot start an app-traffic I/O thread"),
        }
    }
    if workers.is_empty() {
        return serve_here(listener, gate, router, shutdown).await;
    }
    accept_and_hand_out(&listener, &gate, &workers, shutdown).await;
    drop(listener);
    drop(workers);
    for done in stopped {
        // Resolves (with an error) when the thread drops its sender, i.e. has finished.
        let _ = done.await;
    }
}

/// Serves app traffic on the calling runtime (no I/O threads).
async fn serve_here(
    listener: TcpListener,
    gate: Gate,
    router: Arc<Router>,
    shutdown: impl Future<Output = ()>,
) {
    let config = router.config().clone();
    let make = move |peer, watch, slot| app_service(&router, peer, watch, slot);
    serve_on(
        Connections::Listener(listener, gate),
        config,
        make,
        shutdown,
    )
    .await;
}

/// One accepted connection on its way to an I/O thread.
struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    admission: Admission,
    load: LoadGuard,
}

/// Counts a connection against its I/O thread until the connection ends.
struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type Worker = (
    tokio::sync::mpsc::UnboundedSender<Handoff>,
    Arc<AtomicUsize>,
);

/// The acceptor of the I/O-thread mode: every connection goes to the least loaded thread.
async fn accept_and_hand_out(
    listener: &TcpListener,
    gate: &Gate,
    workers: &[Worker],
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let Some((stream, peer, admission)) = accept(listener, gate, &mut shutdown).await else {
            return;
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                debug!(%peer, error = %err, "cannot hand over an app-traffic connection");
                continue;
            }
        };
        let mut handoff = Some(Handoff {
            stream,
            peer,
            admission,
            load: LoadGuard(Arc::new(AtomicUsize::new(0))),
        });
        // Least loaded first; a thread that has died (its receiver gone) is skipped.
        let mut order: Vec<&Worker> = workers.iter().collect();
        order.sort_by_key(|(_, load)| load.load(Ordering::Relaxed));
        for (sender, load) in order {
            let Some(mut next) = handoff.take() else {
                break;
            };
            load.fetch_add(1, Ordering::Relaxed);
            next.load = LoadGuard(Arc::clone(load));
            if let Err(returned) = sender.send(next) {
                handoff = Some(returned.0);
            }
        }
        if handoff.is_some() {
            warn!(%peer, "no app-traffic I/O thread is left to serve a connection");
        }
    }
}

/// Waits for a connection slot and a connection its client may open; `None` once `shutdown`
/// resolved. A client at its limit gets a `429` and its connection is closed.
async fn accept(
    listener: &TcpListener,
    gate: &Gate,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Option<(TcpStream, SocketAddr, Admission)> {
    let mut permit = None;
    loop {
        let slot = match permit.take() {
            Some(slot) => slot,
            None => tokio::select! {
                permit = Arc::clone(&gate.permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    // The semaphore is never closed.
                    Err(_) => return None,
                },
                () = shutdown.as_mut() => return None,
            },
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.as_mut() => return None,
        };
        match accepted {
            Ok((stream, peer)) => match gate.admit(slot, peer.ip()) {
                Ok(admission) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer, admission));
                }
                Err(slot) => {
                    if gate.should_warn() {
                        warn!(
                            %peer,
                            "a client reached max_connections_per_client: its new connections are refused (behind a proxy or load balancer, raise the limit or set it to 0)"
                        );
                    }
                    // Best effort: the socket buffer takes it at once or not at all.
                    let _ = stream.try_write(TOO_MANY_CONNECTIONS);
                    permit = Some(slot);
                }
            },
            Err(err) => {
                permit = Some(slot);
                warn!(error = %err, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// What a client over its connection limit reads before its connection closes.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: 44\r\nConnection: close\r\nX-Slipway-Error: too_many_connections\r\n\r\ntoo many open connections from this address\n";

/// Where one runtime's connections come from.
enum Connections {
    /// It accepts them itself (`io_threads` = 0).
    Listener(TcpListener, Gate),
    /// The acceptor hands them over (an I/O thread).
    Handed(tokio::sync::mpsc::UnboundedReceiver<Handoff>),
}

/// Serves the connections of one runtime: the app listener with [`app_service`], or any
/// service ([`serve_service`]). `make` builds the service of one connection; it is handed the
/// connection's [`idle::Watch`], on which it must count each request, and its [`Slot`], which
/// it must keep (and hand to anything outliving the connection that should count as it).
async fn serve_on<M, S, B>(
    mut connections: Connections,
    config: RouterConfig,
    make: M,
    shutdown: impl Future<Output = ()>,
) where
    M: Fn(SocketAddr, Arc<idle::Watch>, Slot) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The coarse timer: hyper re-arms the header read deadline on every request, which with
    // tokio's timer cost an eventfd write per request (see `timer.rs`).
    let (ticker_stop, ticker_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(timer::run_ticker(async {
        let _ = ticker_stopped.await;
    }));
    builder
        .http1()
        .timer(CoarseTimer)
        .header_read_timeout(config.header_read_timeout)
        // hyper's default gathers head and body into a `writev`; copying a small body behind
        // the head and sending once costs less: 24.3 against 26.9 µs of CPU per proxied
        // request, 15.5 against 17.4 of it in the kernel (`docs/bench-router.md`). Big bodies
        // are copied too, within `max_buf_size`.
        .writev(false)
        .keep_alive(true);
    builder
        .http2()
        .timer(CoarseTimer)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));

    let sweeper = Arc::new(idle::Sweeper::new(
        config.header_read_timeout,
        config.idle_timeout,
    ));
    let sweeping = tokio::spawn({
        let sweeper = Arc::clone(&sweeper);
        async move { sweeper.run().await }
    });
    // Every connection task holds a receiver (never read): `closed` resolves once the last
    // task has ended.
    let (open, _) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer, admission, load) = match &mut connections {
            Connections::Listener(listener, gate) => {
                match accept(listener, gate, &mut shutdown).await {
                    Some((stream, peer, admission)) => (stream, peer, admission, None),
                    None => break,
                }
            }
            Connections::Handed(handed) => {
                let handoff = tokio::select! {
                    handoff = handed.recv() => handoff,
                    () = &mut shutdown => None,
                };
                let Some(handoff) = handoff else {
                    break;
                };
                match TcpStream::from_std(handoff.stream) {
                    Ok(stream) => (stream, handoff.peer, handoff.admission, Some(handoff.load)),
                    Err(err) => {
                        debug!(peer = %handoff.peer, error = %err, "cannot register an app-traffic connection");
                        continue;
                    }
                }
            }
        };
        let watch = sweeper.watch();
        let service = make(peer, Arc::clone(&watch), Arc::new((admission, load)));
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let open = open.subscribe();
        tokio::spawn(async move {
            let _open = open;
            let graceful = |c: Pin<&mut _>| auto::UpgradeableConnection::graceful_shutdown(c);
            if let Err(err) = idle::drive(connection, graceful, &watch).await {
                debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(connections);
    info!(connections = open.receiver_count(), "listener stopping");
    sweeper.close_all();
    tokio::select! {
        () = open.closed() => {}
        () = tokio::time::sleep(config.shutdown_grace) => {
            warn!("connections still open after the shutdown grace period");
        }
    }
    sweeping.abort();
    drop(ticker_stop);
}

/// The service of one app-traffic connection.
fn app_service(
    router: &Arc<Router>,
    peer: SocketAddr,
    watch: Arc<idle::Watch>,
    slot: Slot,
) -> impl Service<
    Request<Incoming>,
    Response = Response<RouterBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<RouterBody>, Infallible>> + Send,
> + Send {
    let client = Arc::new(ClientConnection {
        router: Arc::clone(router),
        // Formatted once per connection, not per request.
        client_ip: client_ip_header(peer),
        local: Local::new(slot),
        watch,
    });
    service_fn(move |req: Request<Incoming>| {
        let client = Arc::clone(&client);
        client.watch.request_started();
        async move {
            Ok::<_, Infallible>(handle(&client.router, req, &client.client_ip, &client.local).await)
        }
    })
}

/// Serves `service` (for example an API) on `listener` with the app listener's connection
/// guards, all from `config`: at most `max_connections` at once, `header_read_timeout` for
/// every HTTP/1 request head and for a connection's first one, `idle_timeout` for a connection
/// that asks nothing, and `shutdown_grace` for the requests in flight once `shutdown`
/// resolves. HTTP/1.1 and HTTP/2, with upgrades (WebSocket). Connections are served on the
/// calling runtime (`io_threads` does not apply).
pub async fn serve_service<S, B>(
    listener: TcpListener,
    config: RouterConfig,
    service: S,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let gate = Gate::new(config.max_connections, config.max_connections_per_client);
    let make = move |_peer: SocketAddr, watch: Arc<idle::Watch>, slot: Slot| Counted {
        inner: service.clone(),
        watch,
        slot,
    };
    serve_on(
        Connections::Listener(listener, gate),
        config,
        make,
        shutdown,
    )
    .await;
}

/// A service that counts its requests on its connection's [`idle::Watch`], keeps its
/// connection's [`Slot`] and hands it to each request as a [`ConnectionSlot`] extension.
struct Counted<S> {
    inner: S,
    watch: Arc<idle::Watch>,
    slot: Slot,
}

impl<S: Service<Request<Incoming>>> Service<Request<Incoming>> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.watch.request_started();
        req.extensions_mut().insert(ConnectionSlot {
            _held: Arc::clone(&self.slot),
        });
        self.inner.call(req)
    }
}

/// A request extension of [`serve_service`]: the connection's place under `max_connections`.
/// A handler that upgrades the connection (a WebSocket) keeps a clone for as long as the
/// upgraded connection lives, so that it keeps counting against the limit.
#[derive(Clone)]
pub struct ConnectionSlot {
    _held: Slot,
}

impl std::fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionSlot")
    }
}

/// What every request of one client connection shares.
struct ClientConnection {
    router: Arc<Router>,
    client_ip: HeaderValue,
    local: Local,
    /// What the I/O thread's [`idle::Sweeper`] looks at.
    watch: Arc<idle::Watch>,
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
    local: &Local,
) -> Response<RouterBody> {
    let json = wants_json(req.headers());
    let Some(host) = request_host(&req) else {
        return error_response(ErrorCode::BadHost, json);
    };
    let Some(guard) = router.enter(&host) else {
        return error_response(ErrorCode::UnknownHost, json);
    };
    let route = &guard
        .entry()
        .expect("a guard holds its entry until upgraded")
        .route;
    match route {
        Route::Upstream(_) => {
            proxy::forward(router.config(), req, client_ip, local, guard, json).await
        }
        Route::Static(site) => static_files::serve(site, &req, json),
        Route::Unavailable(page) => error_response_with(
            page.kind.code(),
            json,
            page.title.as_deref(),
            page.detail.as_deref(),
        ),
    }
}
