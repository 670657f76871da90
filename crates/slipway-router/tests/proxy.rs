use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use slipway_router::{Route, RouterConfig, Upstream};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::util::{
    closed_port, empty, eventually, full, Client, Loopback, Req, TestBody, TestRouter, TestUpstream,
};

#[tokio::test]
async fn forwards_get_and_post_with_bodies() {
    let router = TestRouter::start_default().await;
    let upstream = TestUpstream::echo().await;
    router.set("app.test", upstream.route());
    let client = Client::new(router.addr);

    let get = client.get("app.test", "/path/x?q=1&r=%20").await;
    assert_eq!(get.status, StatusCode::OK);
    let seen = get.echoed();
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["uri"], "/path/x?q=1&r=%20");
    assert_eq!(get.body.len(), 0);

    let body = "x".repeat(100_000);
    let post = client
        .send(Req::new(Method::POST, "app.test", "/submit").body(body.clone()))
        .await;
    assert_eq!(post.status, StatusCode::OK);
    assert_eq!(post.echoed()["method"], "POST");
    assert_eq!(post.text(), body);
}

#[tokio::test]
async fn forwards_headers_and_adds_x_forwarded() {
    let router = TestRouter::start_default().await;
    let upstream = TestUpstream::echo().await;
    router.set("app.test", upstream.route());
    let client = Client::new(router.addr);

    let reply = client
        .send(
            Req::get("App.Test:8443", "/")
                .header("x-custom", "kept")
                .header("authorization", "Bearer t")
                .header("x-forwarded-for", "203.0.113.7")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "evil.test"),
        )
        .await;
    let headers = &reply.echoed()["headers"];
    assert_eq!(headers["x-custom"][0], "kept");
    assert_eq!(headers["authorization"][0], "Bearer t");
    assert_eq!(
        headers["host"][0], "App.Test:8443",
        "the app sees the Host the client sent"
    );
    assert_eq!(headers["x-forwarded-for"][0], "203.0.113.7, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"][0], "http");
    assert_eq!(headers["x-forwarded-host"][0], "App.Test:8443");

    let plain = client.get("app.test", "/").await;
    assert_eq!(plain.echoed()["headers"]["x-forwarded-for"][0], "127.0.0.1");
}

#[tokio::test]
async fn strips_hop_by_hop_headers_both_ways() {
    let router = TestRouter::start_default().await;
    let upstream = TestUpstream::start(|req: Request<Incoming>| async move {
        let names: Vec<String> = req
            .headers()
            .keys()
            .map(|n| n.as_str().to_owned())
            .collect();
        Response::builder()
            .header("connection", "x-upstream-private")
            .header("x-upstream-private", "secret")
            .header("keep-alive", "timeout=99")
            .header("proxy-authenticate", "Basic")
            .header("x-upstream-public", "yes")
            .body(full(names.join(",")))
            .unwrap()
    })
    .await;
    router.set("app.test", upstream.route());
    let reply = Client::new(router.addr)
        .send(
            Req::get("app.test", "/")
                .header("connection", "x-private")
                .header("x-private", "1")
                .header("keep-alive", "timeout=5")
                .header("proxy-authorization", "Basic eA==")
                .header("te", "trailers")
                .header("upgrade", "h2c")
                .header("x-public", "1"),
        )
        .await;
    let seen = reply.text();
    let seen: Vec<&str> = seen.split(',').collect();
    for stripped in [
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(
            !seen.contains(&stripped),
            "{stripped} reached the app: {seen:?}"
        );
    }
    assert!(seen.contains(&"x-public"), "{seen:?}");
    assert_eq!(reply.header("x-upstream-public"), Some("yes"));
    for stripped in ["x-upstream-private", "keep-alive", "proxy-authenticate"] {
        assert_eq!(
            reply.header(stripped),
            None,
            "{stripped} reached the client"
        );
    }
}

#[tokio::test]
async fn reuses_upstream_connections() {
    let router = TestRouter::start_default().await;
    let upstream = TestUpstream::named("app").await;
    router.set("app.test", upstream.route());
    let client = Client::new(router.addr);
    for _ in 0..30 {
        assert_eq!(client.get("app.test", "/").await.text(), "app");
    }
    let connections = upstream.connections.load(Ordering::SeqCst);
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 30);
    assert!(
        connections < 30,
        "no keep-alive reuse: {connections} connections for 30 requests"
    );
    assert!(
        connections <= 2,
        "{connections} connections for sequential requests"
    );
}

#[tokio::test]
async fn refused_connection_is_502() {
    let router = TestRouter::start_default().await;
    router.set(
        "down.test",
        Route::Upstream(Arc::new(Loopback(closed_port().await))),
    );
    let client = Client::new(router.addr);
    let reply = client.get("down.test", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_code(), Some("upstream_unreachable"));
    let text = reply.text();
    assert!(
        !text.contains("127.0.0.1") && !text.to_lowercase().contains("refused"),
        "leaks detail: {text}"
    );
}

#[tokio::test]
async fn upstream_closing_without_answer_is_502() {
    let router = TestRouter::start_default().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tokio::spawn(async move {
        loop {
            // Accept and immediately hang up: the app "crashed" mid-request.
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            drop(stream);
        }
    });
    router.set("crash.test", Route::Upstream(Arc::new(Loopback(addr))));
    let reply = Client::new(router.addr).get("crash.test", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_code(), Some("upstream_error"));
    app.abort();
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let config = RouterConfig {
        response_header_timeout: Duration::from_millis(200),
        ..RouterConfig::default()
    };
    let router = TestRouter::start(config).await;
    let upstream = TestUpstream::start(|_req| async move {
        std::future::pending::<()>().await;
        Response::new(empty())
    })
    .await;
    router.set("slow.test", upstream.route());
    let reply = Client::new(router.addr).get("slow.test", "/").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.error_code(), Some("upstream_timeout"));
}

/// An upstream whose connect never completes (a sandbox that stopped answering SYNs).
struct BlackHole;

impl Upstream for BlackHole {
    fn connect(&self) -> BoxFuture<'static, std::io::Result<TcpStream>> {
        Box::pin(std::future::pending())
    }

    fn name(&self) -> String {
        "black hole".into()
    }
}

#[tokio::test]
async fn connect_timeout_is_504() {
    let config = RouterConfig {
        connect_timeout: Duration::from_millis(100),
        ..RouterConfig::default()
    };
    let router = TestRouter::start(config).await;
    router.set("hole.test", Route::Upstream(Arc::new(BlackHole)));
    let reply = Client::new(router.addr).get("hole.test", "/").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.error_code(), Some("upstream_timeout"));
}

#[tokio::test]
async fn declared_body_over_limit_is_413_without_reaching_the_app() {
    let config = RouterConfig {
        max_request_body: 1024,
        ..RouterConfig::default()
    };
    let router = TestRouter::start(config).await;
    let upstream = TestUpstream::echo().await;
    router.set("app.test", upstream.route());
    let client = Client::new(router.addr);

    let reply = client
        .send(Req::new(Method::POST, "app.test", "/").body(vec![b'x'; 2048]))
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.error_code(), Some("body_too_large"));
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 0);

    let at_limit = client
        .send(Req::new(Method::POST, "app.test", "/").body(vec![b'x'; 1024]))
        .await;
    assert_eq!(at_limit.status, StatusCode::OK);
    assert_eq!(at_limit.body.len(), 1024);
}

#[tokio::test]
async fn streamed_body_over_limit_is_cut_off_with_413() {
    let config = RouterConfig {
        max_request_body: 64 * 1024,
        ..RouterConfig::default()
    };
    let router = TestRouter::start(config).await;
    let upstream = TestUpstream::echo().await;
    router.set("app.test", upstream.route());
    // No Content-Length: chunked, 512 chunks of 8 KiB (4 MiB, 64 times the limit). The router
    // drains what the client still sends after its 413, so the client gets the answer rather
    // than a reset.
    let chunks = futures_util::stream::iter(
        (0..512)
            .map(|_| Ok::<_, crate::util::BoxError>(Frame::data(Bytes::from(vec![b'y'; 8192])))),
    );
    let body: TestBody = StreamBody::new(chunks).boxed();
    let reply = Client::new(router.addr)
        .send(Req::new(Method::POST, "app.test", "/").stream_body(body))
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.error_code(), Some("body_too_large"));
}

/// Sends `head` and then `body_len` bytes of body (framed by `chunked` or not) on a fresh
/// connection while reading the answer, like a client that does not wait for the server.
/// Returns the answer and whether the whole body could be written.
async fn send_large_body(
    addr: std::net::SocketAddr,
    head: String,
    body_len: usize,
    chunked: bool,
) -> (String, std::io::Result<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        let piece = vec![b'z'; 64 * 1024];
        let mut sent = 0;
        while sent < body_len {
            let n = piece.len().min(body_len - sent);
            if chunked {
                write.write_all(format!("{n:x}\r\n").as_bytes()).await?;
            }
            write.write_all(&piece[..n]).await?;
            if chunked {
                write.write_all(b"\r\n").await?;
            }
            sent += n;
        }
        if chunked {
            write.write_all(b"0\r\n\r\n").await?;
        }
        write.flush().await
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(crate::util::DEADLINE, read.read_to_end(&mut answer))
        .await
        .expect("the router closes the connection in time");
    let written = tokio::time::timeout(crate::util::DEADLINE, writer)
        .await
        .expect("the writer finishes in time")
        .unwrap();
    (String::from_utf8_lossy(&answer).into_owned(), written)
}

#[tokio::test]
async fn client_still_sending_a_refused_body_receives_the_413() {
    let config = RouterConfig {
        max_request_body: 64 * 1024,
        ..RouterConfig::default()
    };
    let router = TestRouter::start(config).await;
    let upstream = TestUpstream::echo().await;
    router.set("app.test", upstream.route());
    const LEN: usize = 8 * 1024 * 1024;

    // Declared too large: refused before any byte is read, then drained.
    let head = format!("POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: {LEN}\r\n\r\n");
    let (answer, written) = send_large_body(router.addr, head, LEN, false).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "answer: {answer:.200}");
    assert!(answer.contains("body_too_large"), "answer: {answer:.400}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "answer: {answer:.400}"
    );
    written.expect("the whole body was read (drained), not reset");

    // Streamed (chunked): cut off at the limit, then drained.
    let head = "POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned();
    let (answer, written) = send_large_body(router.addr, head, LEN, true).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "answer: {answer:.200}");
    written.expect("the whole body was read (drained), not reset");
    assert_eq!(
        upstream.requests.load(Ordering::SeqCst),
        1,
        "only the chunked one started"
    );
}

#[tokio::test]
async fn draining_a_refused_body_is_bounded() {
    let config = RouterConfig {
        max_request_body: 1024,
        rejected_body_drain: 256 * 1024,
        ..RouterConfig::default()
    };
    let router = TestRouter::start(config).await;
    let upstream = TestUpstream::echo().await;
    router.set("app.test", upstream.route());
    // Far more than the drain cap and the socket buffers: the router gives up draining and
    // closes, so the writer fails instead of the connection staying open.
    const LEN: usize = 256 * 1024 * 1024;
    let head = format!("POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: {LEN}\r\n\r\n");
    let (answer, written) = send_large_body(router.addr, head, LEN, false).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "answer: {answer:.200}");
    assert!(written.is_err(), "the router stopped reading after the cap");
}

#[tokio::test]
async fn drain_waits_for_in_flight_responses_of_a_replaced_route() {
    let router = TestRouter::start_default().await;
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release_rx = Arc::new(std::sync::Mutex::new(Some(release_rx)));
    let old = TestUpstream::start(move |_req| {
        let release = release_rx.lock().unwrap().take();
        async move {
            if let Some(release) = release {
                let _ = release.await;
            }
            Response::new(full("old"))
        }
    })
    .await;
    let new = TestUpstream::named("new").await;
    router.set("app.test", old.route());
    let client = Client::new(router.addr);
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.get("app.test", "/").await }
    });
    eventually("request in flight on the old route", || {
        router.router.in_flight("app.test") == Some(1)
    })
    .await;

    let drain = router
        .router
        .set("app.test", new.route())
        .unwrap()
        .expect("old route drained");
    assert_eq!(drain.in_flight(), 1);
    assert_eq!(
        client.get("app.test", "/").await.text(),
        "new",
        "new requests go to the new route"
    );
    assert_eq!(drain.in_flight(), 1);

    let waiter = tokio::spawn(async move { drain.wait().await });
    release_tx.send(()).unwrap();
    assert_eq!(
        slow.await.unwrap().text(),
        "old",
        "the in-flight request finishes on the old route"
    );
    tokio::time::timeout(crate::util::DEADLINE, waiter)
        .await
        .expect("drain completes")
        .unwrap();
}

/// The in-flight count is kept per I/O thread and summed; a drain must still see every
/// request, and be woken by whichever thread finishes the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_counts_requests_on_every_io_thread_and_wakes_once_all_finished() {
    const REQUESTS: usize = 48;
    let router = TestRouter::start(RouterConfig {
        io_threads: 2,
        ..RouterConfig::default()
    })
    .await;
    let (release_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let old = TestUpstream::start({
        let release_tx = release_tx.clone();
        move |_req| {
            let mut release = release_tx.subscribe();
            async move {
                let _ = release.recv().await;
                Response::new(full("old"))
            }
        }
    })
    .await;
    router.set("app.test", old.route());
    // Each request on a connection of its own, so the acceptor spreads them over both threads.
    let requests: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let client = Client::new(router.addr);
            tokio::spawn(async move { client.get("app.test", "/").await.text() })
        })
        .collect();
    eventually("every request in flight", || {
        router.router.in_flight("app.test") == Some(REQUESTS)
    })
    .await;

    let new = TestUpstream::named("new").await;
    let drain = router
        .router
        .set("app.test", new.route())
        .unwrap()
        .expect("old route drained");
    assert_eq!(drain.in_flight(), REQUESTS);
    let waiter = tokio::spawn({
        let drain = drain.clone();
        async move { drain.wait().await }
    });
    // Give the waiter time to start watching, then let every response go at once.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "the drain waited");
    release_tx.send(()).unwrap();
    for request in requests {
        assert_eq!(request.await.unwrap(), "old");
    }
    tokio::time::timeout(crate::util::DEADLINE, waiter)
        .await
        .expect("the drain is woken when the last request finishes")
        .unwrap();
    assert_eq!(drain.in_flight(), 0);
}

#[tokio::test]
async fn old_pool_connections_close_after_swap() {
    let router = TestRouter::start_default().await;
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // An app that reports when the router hangs up an idle keep-alive connection.
    let app = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(full("old")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                let _ = closed_tx.send(());
            });
        }
    });
    router.set("app.test", Route::Upstream(Arc::new(Loopback(addr))));
    let client = Client::new(router.addr);
    assert_eq!(client.get("app.test", "/").await.text(), "old");
    let new = TestUpstream::named("new").await;
    router.set("app.test", new.route());
    tokio::time::timeout(crate::util::DEADLINE, closed_rx.recv())
        .await
        .expect("the replaced route's idle connection is closed");
    app.abort();
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_proxied() {
    let router = TestRouter::start_default().await;
    let upstream = TestUpstream::echo().await;
    router.set("app.test", upstream.route());
    let stream = TcpStream::connect(router.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::POST)
        .uri("http://app.test:8080/h2?x=1")
        .body(full("over h2"))
        .unwrap();
    let response = sender.send_request(request).await.expect("h2 response");
    assert_eq!(response.status(), StatusCode::OK);
    let echo: serde_json::Value =
        serde_json::from_str(response.headers()["x-echo"].to_str().unwrap()).unwrap();
    assert_eq!(echo["uri"], "/h2?x=1");
    assert_eq!(echo["headers"]["host"][0], "app.test:8080");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "over h2");
}

/// An app cannot set a cookie for the base domain, which browsers would send to every other
/// app: `Set-Cookie` headers whose `Domain` is not the app's own host are dropped, the others
/// pass unchanged.
#[tokio::test]
async fn cookies_scoped_beyond_the_apps_host_are_dropped() {
    let router = TestRouter::start_default().await;
    let upstream = TestUpstream::start(|_req| async {
        let mut response = Response::new(full("ok"));
        for cookie in [
            "own=1; Path=/",
            "shared=2; Domain=.test; Path=/",
            "exact=3; Domain=App.Test",
            "parent=4; Path=/; domain=test",
        ] {
            response
                .headers_mut()
                .append("set-cookie", cookie.parse().unwrap());
        }
        response
    })
    .await;
    router.set("app.test", upstream.route());
    let reply = Client::new(router.addr).get("app.test", "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    let cookies: Vec<&str> = reply
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["own=1; Path=/", "exact=3; Domain=App.Test"]);
}
