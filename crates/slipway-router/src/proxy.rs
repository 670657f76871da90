//! Reverse proxy to app instances: HTTP/1.1 with pooled keep-alive connections, streaming
//! bodies both ways, and HTTP Upgrade (WebSocket) splicing.

use std::error::Error as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{
    HeaderName, HeaderValue, CONNECTION, EXPECT, HOST, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
};
use hyper::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use crate::body::{BodyTooLarge, LimitedBody, Overflow, RouterBody};
use crate::config::RouterConfig;
use crate::error_page::{error_response, ErrorCode};
use crate::lock;
use crate::shard::{self, Padded, SHARDS};
use crate::table::{InFlightGuard, Upstream};
use crate::timer::CoarseSleep;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// The connection pool of one upstream route. It lives in the route's table entry, so it is
/// dropped (closing its idle connections) once the route has left the table and its last
/// request has finished; the old instance then sees no lingering keep-alive connections.
///
/// Connections are HTTP/1.1 (`hyper::client::conn::http1`), one request at a time each. A
/// connection goes back to the idle list when its response body has been read to the end;
/// a response abandoned half-way closes its connection.
pub(crate) struct UpstreamPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    upstream: Arc<dyn Upstream>,
    name: String,
    /// One idle list per thread (see [`crate::shard`]), each oldest first, so checkout takes
    /// the warmest connection and expiry looks at the front. Each thread takes connections
    /// from and returns them to its own list, so with [`crate::RouterConfig::io_threads`] a
    /// connection is used by the thread whose runtime drives it, without waking another
    /// thread per request.
    idle: Box<[Padded<Mutex<Vec<IdleConnection>>>]>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

struct IdleConnection {
    sender: SendRequest<LimitedBody>,
    since: Instant,
}

/// What keeps a client connection's slot taken (its `max_connections` permit, its I/O
/// thread's load count): held by the connection and by any upgraded connection spliced from
/// it, so that a WebSocket counts against the limit until it closes.
pub(crate) type Slot = Arc<dyn std::any::Any + Send + Sync>;

/// What one client connection keeps between its requests.
pub(crate) struct Local {
    /// The response-header deadline, re-armed per request instead of made anew (a new one
    /// costs two allocations and a registration with the ticker).
    sleep: Mutex<Option<CoarseSleep>>,
    slot: Slot,
}

impl Local {
    pub(crate) fn new(slot: Slot) -> Self {
        Self {
            sleep: Mutex::new(None),
            slot,
        }
    }
}

impl UpstreamPool {
    pub(crate) fn new(upstream: Arc<dyn Upstream>, config: &RouterConfig) -> Self {
        let inner = PoolInner {
            name: upstream.name(),
            upstream,
            idle: (0..SHARDS)
                .map(|_| Padded(Mutex::new(Vec::new())))
                .collect(),
            max_idle: config.pool_max_idle_per_upstream,
            idle_timeout: config.pool_idle_timeout,
            connect_timeout: config.connect_timeout,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Sends `request` on an idle connection, or a new one. A request that never left because
    /// the reused connection turned out to be closed (the app hung up while it sat idle) is
    /// retried once on a fresh connection.
    ///
    /// Only the common case (an idle connection at hand) is inline; opening a connection is
    /// boxed, so the future of every request stays small (hyper moves it into place, copying
    /// all of it).
    async fn send(
        &self,
        request: Request<LimitedBody>,
    ) -> Result<(Response<Incoming>, Checkin), UpstreamError> {
        let shard = shard::current();
        let Some(mut sender) = self.inner.take_idle(shard) else {
            return Box::pin(self.send_fresh(request, shard)).await;
        };
        match sender.try_send_request(request).await {
            Ok(response) => Ok((response, self.checkin(sender, shard))),
            Err(mut err) => match err.take_message() {
                Some(request) => Box::pin(self.send_fresh(request, shard)).await,
                None => Err(UpstreamError::Http(err.into_error())),
            },
        }
    }

    async fn send_fresh(
        &self,
        request: Request<LimitedBody>,
        shard: usize,
    ) -> Result<(Response<Incoming>, Checkin), UpstreamError> {
        let mut sender = self.inner.connect().await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(UpstreamError::Http)?;
        Ok((response, self.checkin(sender, shard)))
    }

    fn checkin(&self, sender: SendRequest<LimitedBody>, shard: usize) -> Checkin {
        Checkin { sender, shard }
    }
}

impl PoolInner {
    fn lock_idle(&self, shard: usize) -> std::sync::MutexGuard<'_, Vec<IdleConnection>> {
        lock(&self.idle[shard % SHARDS])
    }

    fn take_idle(&self, shard: usize) -> Option<SendRequest<LimitedBody>> {
        let mut idle = self.lock_idle(shard);
        while let Some(connection) = idle.pop() {
            if connection.sender.is_ready() && connection.since.elapsed() < self.idle_timeout {
                return Some(connection.sender);
            }
        }
        None
    }

    /// Opens a connection. Boxed: the connect and handshake futures are large and rarely
    /// needed, and every request's future would otherwise carry (and copy) their space.
    fn connect(&self) -> BoxFuture<'_, Result<SendRequest<LimitedBody>, UpstreamError>> {
        Box::pin(self.open())
    }

    async fn open(&self) -> Result<SendRequest<LimitedBody>, UpstreamError> {
        let stream = tokio::time::timeout(self.connect_timeout, self.upstream.connect())
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(self.connect_timeout))?
            .map_err(UpstreamError::Connect)?;
        // Small request/response exchanges must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            // One `send` of a flattened buffer, not a `writev` of head and body: see
            // `server.rs`.
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Http)?;
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                debug!(upstream = %name, error = %err, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn put_idle(&self, shard: usize, sender: SendRequest<LimitedBody>) {
        let now = Instant::now();
        let mut idle = self.lock_idle(shard);
        // Expire from the front (oldest) on the way; no timer task needed.
        while idle
            .first()
            .is_some_and(|c| now.duration_since(c.since) >= self.idle_timeout)
        {
            idle.remove(0);
        }
        if idle.len() < self.max_idle {
            idle.push(IdleConnection { sender, since: now });
        }
    }
}

/// A connection lent to one response; handed back to its pool when the response body has
/// been read to the end, dropped (closing the connection) otherwise. The pool is the one of
/// the response's route entry, which the response's [`InFlightGuard`] holds.
pub(crate) struct Checkin {
    sender: SendRequest<LimitedBody>,
    /// The shard of the thread that checked the connection out, which is where its
    /// connection task runs when it was opened there.
    shard: usize,
}

impl Checkin {
    pub(crate) fn finish(self, pool: Option<&UpstreamPool>, body_complete: bool) {
        if !body_complete || self.sender.is_closed() {
            return;
        }
        let Some(pool) = pool.map(|p| &p.inner) else {
            return;
        };
        if self.sender.is_ready() {
            pool.put_idle(self.shard, self.sender);
            return;
        }
        // The connection task has not yet noticed the end of the response; let it, then pool.
        // Outside a runtime (a body dropped during shutdown) the connection is just closed.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (mut sender, shard) = (self.sender, self.shard);
        let pool = Arc::downgrade(pool);
        runtime.spawn(async move {
            if sender.ready().await.is_ok() {
                if let Some(pool) = pool.upgrade() {
                    pool.put_idle(shard, sender);
                }
            }
        });
    }
}

/// Why forwarding to an upstream failed; only ever logged.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("connecting to upstream timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("connecting to upstream failed")]
    Connect(#[source] std::io::Error),
    #[error("upstream exchange failed")]
    Http(#[source] hyper::Error),
}

/// Forwards `req` to the app behind the pool of `guard`'s entry and turns its answer (or
/// failure) into the response sent to the client. `guard` is held until the response body (or
/// upgraded connection) ends.
pub(crate) async fn forward(
    config: &RouterConfig,
    mut req: Request<Incoming>,
    client_ip: &HeaderValue,
    local: &Local,
    guard: InFlightGuard,
    json: bool,
) -> Response<RouterBody> {
    // Upstream entries are always built with a pool.
    let Some(pool) = guard.pool() else {
        return error_response(ErrorCode::UpstreamUnreachable, json);
    };
    if req.body().size_hint().lower() > config.max_request_body {
        let version = req.version();
        // A client that waits for `100 Continue` has not sent its body and will not.
        let waits = req.headers().contains_key(EXPECT);
        if !waits {
            drain_rejected(req.into_body(), config);
        }
        return body_too_large(version, json);
    }
    let upgrade = upgrade_protocol(&req);
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let mut host_from_uri = false;
    let original_host = parts.headers.get(HOST).cloned().or_else(|| {
        host_from_uri = true;
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(EXPECT);
    add_forwarded(&mut parts.headers, client_ip, original_host, host_from_uri);
    if let Some(protocol) = &upgrade {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, protocol.clone());
    }
    let version = parts.version;
    parts.uri = upstream_uri(&parts.uri);
    parts.version = Version::HTTP_11;

    let overflow = (!body.is_end_stream()).then(|| Arc::new(Overflow::default()));
    let body = LimitedBody::new(body, config.max_request_body, overflow.clone());
    let request = Request::from_parts(parts, body);

    // The coarse timer: this deadline is armed on every request (see `timer.rs`).
    let deadline = Instant::now() + config.response_header_timeout;
    let kept = lock(&local.sleep).take();
    let mut sleep = match kept {
        Some(sleep) => {
            sleep.reset(deadline);
            sleep
        }
        None => CoarseSleep::until(deadline),
    };
    let result = {
        let send = std::pin::pin!(pool.send(request));
        crate::timer::timeout(&mut sleep, send).await
    };
    sleep.disarm();
    *lock(&local.sleep) = Some(sleep);
    let (mut response, checkin) = match result {
        Err(_) => {
            warn!(upstream = %pool.inner.name, "upstream response headers timed out");
            return error_response(ErrorCode::UpstreamTimeout, json);
        }
        Ok(Err(err)) => {
            let code = classify(&err, overflow.as_ref().is_some_and(|o| o.exceeded()));
            if code == ErrorCode::BodyTooLarge {
                if let Some(rest) = overflow.as_ref().and_then(|o| o.take_rest()) {
                    drain_rejected(rest, config);
                }
                return body_too_large(version, json);
            }
            warn!(upstream = %pool.inner.name, error = %error_chain(&err), "proxying to upstream failed");
            return error_response(code, json);
        }
        Ok(Ok(exchange)) => exchange,
    };

    if let Some(entry) = guard.entry() {
        scope_cookies(response.headers_mut(), &entry.host, &pool.inner.name);
    }
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            warn!(upstream = %pool.inner.name, "upstream switched protocols without being asked");
            return error_response(ErrorCode::UpstreamError, json);
        };
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        splice(
            pool.inner.name.clone(),
            client_upgrade,
            upstream_upgrade,
            guard.upgraded(),
            Arc::clone(&local.slot),
        );
        let (mut parts, _empty) = response.into_parts();
        let protocol = parts.headers.get(UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(protocol) = protocol {
            parts.headers.insert(UPGRADE, protocol);
        }
        return Response::from_parts(parts, RouterBody::empty());
    }

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, RouterBody::proxied(body, checkin, guard))
}

/// Drops each `Set-Cookie` whose `Domain` attribute names anything but the app's own host.
///
/// Every app is served on a host of its own under one base domain (`<run>.preview.<base>`,
/// `<slug>.<base>`). A cookie an app sets with `Domain=<base>` (or any other parent) would be
/// sent by browsers to every other app, and to the platform, letting one tenant plant or shadow
/// another's cookies (the reason hosting platforms list their app domains as public
/// suffixes). A cookie without `Domain`, or with the app's own host, stays with that host.
fn scope_cookies(headers: &mut HeaderMap, host: &str, upstream: &str) {
    if !headers.contains_key(SET_COOKIE) {
        return;
    }
    if headers
        .get_all(SET_COOKIE)
        .iter()
        .all(|v| cookie_stays_on(v.as_bytes(), host))
    {
        return;
    }
    let cookies: Vec<HeaderValue> = headers.get_all(SET_COOKIE).iter().cloned().collect();
    headers.remove(SET_COOKIE);
    for cookie in cookies {
        if cookie_stays_on(cookie.as_bytes(), host) {
            headers.append(SET_COOKIE, cookie);
        } else {
            let name = cookie
                .as_bytes()
                .split(|&b| b == b'=')
                .next()
                .unwrap_or_default();
            warn!(
                upstream,
                host,
                cookie = %String::from_utf8_lossy(name),
                "dropped a Set-Cookie whose Domain reaches beyond the app's host"
            );
        }
    }
}

/// Whether every `Domain` attribute of a `Set-Cookie` value (RFC 6265 §5.2.3: a leading dot is
/// ignored, an empty value means no attribute) names exactly `host`.
fn cookie_stays_on(value: &[u8], host: &str) -> bool {
    value.split(|&b| b == b';').skip(1).all(|attribute| {
        let attribute = attribute.trim_ascii();
        let Some(eq) = attribute.iter().position(|&b| b == b'=') else {
            return true;
        };
        let (name, domain) = (attribute[..eq].trim_ascii(), &attribute[eq + 1..]);
        if !name.eq_ignore_ascii_case(b"domain") {
            return true;
        }
        let domain = domain.trim_ascii();
        let domain = domain.strip_prefix(b".").unwrap_or(domain);
        domain.is_empty() || domain.eq_ignore_ascii_case(host.as_bytes())
    })
}

/// Splices an upgraded client connection to its upgraded upstream connection, in a task of
/// its own. Not inline in [`forward`]: its future would grow every request's future.
fn splice(
    name: String,
    client_upgrade: hyper::upgrade::OnUpgrade,
    upstream_upgrade: hyper::upgrade::OnUpgrade,
    guard: InFlightGuard,
    slot: Slot,
) {
    tokio::spawn(async move {
        // Counted as in flight, and as a client connection, until either side closes.
        let (_guard, _slot) = (guard, slot);
        match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok((client, upstream)) => {
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    debug!(upstream = %name, error = %err, "upgraded connection ended with an error");
                }
            }
            Err(err) => debug!(upstream = %name, error = %err, "upgrade did not complete"),
        }
    });
}

/// The 413 page; over HTTP/1 it also says the connection closes once the refused body has been
/// drained, so the client does not reuse a connection the router is about to close.
fn body_too_large(version: Version, json: bool) -> Response<RouterBody> {
    let mut response = error_response(ErrorCode::BodyTooLarge, json);
    if version < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads and discards the rest of a refused request body, bounded in bytes
/// ([`RouterConfig::rejected_body_drain`]) and time, while the 413 goes out. Holding the body
/// keeps hyper reading the connection; once it is dropped, hyper closes it. Closing at once
/// would leave the client's bytes unread, and the kernel would answer them with a reset that
/// can reach the client before it has read the 413.
fn drain_rejected(mut body: Incoming, config: &RouterConfig) {
    use http_body_util::BodyExt as _;
    let (cap, timeout) = (
        config.rejected_body_drain,
        config.rejected_body_drain_timeout,
    );
    if cap == 0 || body.is_end_stream() {
        return;
    }
    tokio::spawn(async move {
        let drained = tokio::time::timeout(timeout, async {
            let mut read = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > cap {
                    return read;
                }
            }
            read
        })
        .await;
        debug!(?drained, "drained a refused request body");
    });
}

/// The protocol a client asks to upgrade to, when it does so properly (HTTP/1.1,
/// `Connection: upgrade` and an `Upgrade` header).
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
    asks.then(|| req.headers().get(UPGRADE).cloned()).flatten()
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the headers that describe one hop rather than the message (RFC 9110 §7.6.1),
/// including those the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none, and most app responses only `Connection` and `Keep-Alive`:
    // one pass finds the names present, and only those are removed (each removal is a hash
    // lookup).
    let mut present: Vec<HeaderName> = Vec::new();
    let mut names_others = false;
    for name in headers.keys() {
        if is_hop_by_hop(name) {
            names_others |= name == CONNECTION;
            present.push(name.clone());
        }
    }
    if present.is_empty() {
        return;
    }
    if names_others {
        present.extend(
            connection_tokens(headers).filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()),
        );
    }
    for name in present {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == KEEP_ALIVE
        || name == TE
        || name == TRAILER
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name.as_str().starts_with("proxy-")
}

/// Tells the app who really asked: the client address is appended to `X-Forwarded-For` (the
/// router is the edge, so earlier entries are whatever the client claimed), proto and host are
/// set by the router alone.
fn add_forwarded(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    original_host: Option<HeaderValue>,
    host_from_uri: bool,
) {
    use hyper::header::Entry;
    // One hash of the name, whether or not the client sent the header.
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Vacant(vacant) => {
            vacant.insert(client_ip.clone());
        }
        Entry::Occupied(mut occupied) => {
            let previous: Vec<&str> = occupied.iter().filter_map(|v| v.to_str().ok()).collect();
            let ip = client_ip.to_str().unwrap_or_default();
            let forwarded_for = if previous.is_empty() {
                ip.to_owned()
            } else {
                format!("{}, {ip}", previous.join(", "))
            };
            // Made of header values and an IP address, so it is a valid header value.
            if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
                occupied.insert(value);
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match original_host {
        Some(host) => {
            if host_from_uri {
                headers.insert(HOST, host.clone());
            }
            headers.insert(X_FORWARDED_HOST, host);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

/// The request target sent upstream: origin-form (path and query only), whatever form the
/// client used (HTTP/2 and absolute-form targets carry scheme and authority).
fn upstream_uri(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') => Uri::from(pq.clone()),
        _ => Uri::from_static("/"),
    }
}

fn classify(err: &UpstreamError, body_too_large: bool) -> ErrorCode {
    if body_too_large {
        return ErrorCode::BodyTooLarge;
    }
    match err {
        UpstreamError::ConnectTimeout(_) => ErrorCode::UpstreamTimeout,
        UpstreamError::Connect(_) => ErrorCode::UpstreamUnreachable,
        UpstreamError::Http(err) => {
            let mut source = err.source();
            while let Some(cause) = source {
                if cause.downcast_ref::<BodyTooLarge>().is_some() {
                    return ErrorCode::BodyTooLarge;
                }
                source = cause.source();
            }
            ErrorCode::UpstreamError
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_may_name_only_its_own_host_as_domain() {
        let host = "run-1.preview.example.com";
        for kept in [
            "a=1",
            "a=1; Path=/; HttpOnly",
            "a=1; Domain=run-1.preview.example.com",
            "a=1; domain=.RUN-1.preview.example.com; Secure",
            "a=1; Domain=",
            "a=domain=example.com",
        ] {
            assert!(cookie_stays_on(kept.as_bytes(), host), "{kept}");
        }
        for dropped in [
            "a=1; Domain=preview.example.com",
            "a=1; Domain=.example.com",
            "a=1; Path=/; DOMAIN = example.com",
            "a=1; Domain=com",
            "a=1; Domain=run-1.preview.example.com; Domain=example.com",
            "a=1; Domain=evil.com",
        ] {
            assert!(!cookie_stays_on(dropped.as_bytes(), host), "{dropped}");
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn upstream_uri_keeps_path_and_query_only() {
        let uri: Uri = "http://app.example/a/b?c=d".parse().unwrap();
        assert_eq!(upstream_uri(&uri).to_string(), "/a/b?c=d");
        let uri: Uri = "/x?y".parse().unwrap();
        assert_eq!(upstream_uri(&uri).to_string(), "/x?y");
        let uri: Uri = "*".parse().unwrap();
        assert_eq!(upstream_uri(&uri).to_string(), "/");
    }
}
