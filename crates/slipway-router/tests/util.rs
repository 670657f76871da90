//! Shared test harness: a router on 127.0.0.1:0, loopback upstream apps, an HTTP client.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use slipway_router::{Route, Router, RouterConfig, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

/// The generous deadline of every "eventually" poll.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A router serving on a fresh loopback port until dropped.
pub struct TestRouter {
    pub addr: SocketAddr,
    pub router: Arc<Router>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestRouter {
    pub async fn start(config: RouterConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind router listener");
        let addr = listener.local_addr().expect("router address");
        let router = Arc::new(Router::new(config));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(slipway_router::serve(
            listener,
            Arc::clone(&router),
            async {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            router,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub async fn start_default() -> Self {
        Self::start(RouterConfig::default()).await
    }

    pub fn set(&self, host: &str, route: Route) {
        self.router.set(host, route).expect("valid host");
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("serve returns after shutdown")
                .expect("serve task");
        }
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

type Handler =
    Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, Response<TestBody>> + Send + Sync>;

/// A loopback HTTP/1.1 app counting the TCP connections and requests it receives.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TestUpstream {
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream address");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (conns, reqs) = (Arc::clone(&connections), Arc::clone(&requests));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let handler = Arc::clone(&handler);
                let reqs = Arc::clone(&reqs);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        reqs.fetch_add(1, Ordering::SeqCst);
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self {
            addr,
            connections,
            requests,
            task,
        }
    }

    /// Answers every request with `name` as the body.
    pub async fn named(name: &'static str) -> Self {
        Self::start(move |_req| async move { Response::new(full(name)) }).await
    }

    /// Answers with the request body, describing the request in `x-echo` (JSON: method, uri,
    /// headers).
    pub async fn echo() -> Self {
        Self::start(|req: Request<Incoming>| async move {
            let (parts, body) = req.into_parts();
            let mut headers = serde_json::Map::new();
            for name in parts.headers.keys() {
                let values: Vec<serde_json::Value> = parts
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| serde_json::Value::from(v.to_str().unwrap_or("<binary>")))
                    .collect();
                headers.insert(name.as_str().to_owned(), values.into());
            }
            let description = serde_json::json!({
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "headers": headers,
            });
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => return Response::builder().status(400).body(empty()).unwrap(),
            };
            Response::builder()
                .header("x-echo", description.to_string())
                .body(full(body))
                .unwrap()
        })
        .await
    }

    pub fn route(&self) -> Route {
        Route::Upstream(Arc::new(Loopback(self.addr)))
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An `Upstream` reached with a plain loopback connect (the engine's would enter a sandbox's
/// network namespace).
pub struct Loopback(pub SocketAddr);

impl Upstream for Loopback {
    fn connect(&self) -> BoxFuture<'static, std::io::Result<TcpStream>> {
        let addr = self.0;
        Box::pin(async move { TcpStream::connect(addr).await })
    }

    fn name(&self) -> String {
        format!("loopback {}", self.0)
    }
}

/// A port nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    addr
}

/// A request under construction.
pub struct Req {
    method: Method,
    host: String,
    path: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: TestBody,
}

impl Req {
    pub fn new(method: Method, host: &str, path: &str) -> Self {
        Self {
            method,
            host: host.to_owned(),
            path: path.to_owned(),
            headers: Vec::new(),
            body: empty(),
        }
    }

    pub fn get(host: &str, path: &str) -> Self {
        Self::new(Method::GET, host, path)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        ));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = full(body);
        self
    }

    pub fn stream_body(mut self, body: TestBody) -> Self {
        self.body = body;
        self
    }
}

/// A collected response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header"))
    }

    pub fn error_code(&self) -> Option<&str> {
        self.header(slipway_router::ERROR_HEADER)
    }

    /// The upstream echo's description of the request it saw.
    pub fn echoed(&self) -> serde_json::Value {
        serde_json::from_str(self.header("x-echo").expect("x-echo header")).expect("x-echo is json")
    }
}

/// A keep-alive HTTP/1.1 client talking to one address.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    inner: hyper_util::client::legacy::Client<HttpConnector, TestBody>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
        Self { addr, inner }
    }

    pub async fn send_streaming(
        &self,
        req: Req,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let uri = format!("http://{}{}", self.addr, req.path);
        let mut request = Request::builder()
            .method(req.method)
            .uri(uri)
            .body(req.body)
            .expect("request");
        request
            .headers_mut()
            .insert(HOST, HeaderValue::from_str(&req.host).expect("host value"));
        for (name, value) in req.headers {
            request.headers_mut().append(name, value);
        }
        self.inner.request(request).await
    }

    pub async fn try_send(&self, req: Req) -> Result<Reply, BoxError> {
        let response = self.send_streaming(req).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn send(&self, req: Req) -> Reply {
        tokio::time::timeout(DEADLINE, self.try_send(req))
            .await
            .expect("response in time")
            .expect("request succeeds")
    }

    pub async fn get(&self, host: &str, path: &str) -> Reply {
        self.send(Req::get(host, path)).await
    }
}

/// Sends `request` verbatim on a fresh connection and returns everything the server sent
/// until it closed the connection.
pub async fn raw_request(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out))
        .await
        .expect("server closes in time")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.1 response.
pub fn raw_status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

/// Polls `check` until it holds, panicking with `what` after [`DEADLINE`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Resident set size of this process, in KiB.
pub fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}
