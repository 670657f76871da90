use std::sync::Arc;
use std::time::Duration;

use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use slipway_router::{Router, RouterConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::util::{eventually, full, Client, TestRouter, TestUpstream, DEADLINE};

#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    let config = RouterConfig {
        header_read_timeout: Duration::from_millis(200),
        ..RouterConfig::default()
    };
    let router = TestRouter::start(config).await;
    let mut stream = TcpStream::connect(router.addr).await.unwrap();
    // Half a request head, then silence.
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("the router closes a connection whose head never completes")
        .ok();
}

/// Idle connections are what a flood of clients would hold to use up `max_connections`. One
/// that never sends a byte, one that stops inside the bytes the router reads to tell HTTP/1
/// from HTTP/2, and a keep-alive connection after its last answer are all closed once the
/// head-read timeout has passed.
#[tokio::test]
async fn idle_client_connections_are_closed() {
    let config = RouterConfig {
        header_read_timeout: Duration::from_millis(200),
        ..RouterConfig::default()
    };
    let router = TestRouter::start(config).await;

    for (sent, what) in [
        (&b""[..], "never sends a byte"),
        (
            &b"PRI * HTTP/2.0\r\n"[..],
            "stops inside the HTTP/2 preface",
        ),
    ] {
        let mut stream = TcpStream::connect(router.addr).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("the router closes a connection that {what}"))
            .ok();
        assert!(
            rest.is_empty(),
            "{what}: nothing was asked, nothing answered: {rest:?}"
        );
    }

    let mut kept = TcpStream::connect(router.addr).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, kept.read_to_end(&mut answer))
        .await
        .expect("the router closes a keep-alive connection left idle after its answer")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 404 "), "answer: {answer:.200}");
}

/// An HTTP/2 connection has no request head to time out: once it has gone a whole idle
/// period without starting a request, the router ends it with a GOAWAY.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let config = RouterConfig {
        header_read_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(300),
        ..RouterConfig::default()
    };
    let router = TestRouter::start(config).await;
    let upstream = TestUpstream::named("app").await;
    router.set("app.test", upstream.route());

    let stream = TcpStream::connect(router.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get("http://app.test/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);

    tokio::time::timeout(DEADLINE, connection)
        .await
        .expect("the router ends an HTTP/2 connection that asks nothing more")
        .unwrap()
        .expect("ended cleanly, with a GOAWAY");
}

/// One client address holds at most `max_connections_per_client` connections: one more gets a
/// 429 and is closed, and a slot given back is usable again.
#[tokio::test]
async fn one_client_cannot_take_every_connection() {
    let router = TestRouter::start(RouterConfig {
        max_connections_per_client: 2,
        io_threads: 1,
        ..RouterConfig::default()
    })
    .await;
    async fn ask(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
    let mut first = TcpStream::connect(router.addr).await.unwrap();
    let mut second = TcpStream::connect(router.addr).await.unwrap();
    assert!(ask(&mut first).await.starts_with("HTTP/1.1 404 "));
    assert!(ask(&mut second).await.starts_with("HTTP/1.1 404 "));

    let mut third = TcpStream::connect(router.addr).await.unwrap();
    let mut refused = Vec::new();
    tokio::time::timeout(DEADLINE, third.read_to_end(&mut refused))
        .await
        .expect("closed at once")
        .ok();
    let refused = String::from_utf8_lossy(&refused);
    assert!(refused.starts_with("HTTP/1.1 429 "), "{refused}");
    assert!(refused.contains("too_many_connections"), "{refused}");

    drop(first);
    let mut served = false;
    for _ in 0..100 {
        let mut again = TcpStream::connect(router.addr).await.unwrap();
        if ask(&mut again).await.starts_with("HTTP/1.1 404 ") {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        served,
        "a connection given back frees a slot for the client"
    );
    drop(second);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_stops_accepting() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Arc::new(Router::new(RouterConfig::default()));
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release_rx = Arc::new(std::sync::Mutex::new(Some(release_rx)));
    let upstream = TestUpstream::start(move |_req| {
        let release = release_rx.lock().unwrap().take();
        async move {
            if let Some(release) = release {
                let _ = release.await;
            }
            Response::new(full("finished"))
        }
    })
    .await;
    router.set("app.test", upstream.route()).unwrap();
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(slipway_router::serve(
        listener,
        Arc::clone(&router),
        async {
            let _ = shutdown_rx.await;
        },
    ));

    let client = Client::new(addr);
    let in_flight = tokio::spawn(async move { client.get("app.test", "/").await });
    eventually("request in flight", || {
        router.in_flight("app.test") == Some(1)
    })
    .await;

    shutdown_tx.send(()).unwrap();
    eventually("listener closed", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    assert!(
        !server.is_finished(),
        "serve waits for the in-flight request"
    );

    release_tx.send(()).unwrap();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "finished");
    tokio::time::timeout(DEADLINE, server)
        .await
        .expect("serve returns once drained")
        .unwrap();
}

#[tokio::test]
async fn serves_on_the_callers_runtime_without_io_threads() {
    let router = TestRouter::start(RouterConfig {
        io_threads: 0,
        ..RouterConfig::default()
    })
    .await;
    let upstream = TestUpstream::echo().await;
    router.set("app.test", upstream.route());
    let client = Client::new(router.addr);
    for i in 0..10 {
        let reply = client
            .send(crate::util::Req::new(hyper::Method::POST, "app.test", "/").body(format!("n{i}")))
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), format!("n{i}"));
    }
    router.stop().await;
}

#[tokio::test]
async fn io_threads_share_one_table() {
    let router = TestRouter::start(RouterConfig {
        io_threads: 3,
        ..RouterConfig::default()
    })
    .await;
    let upstream = TestUpstream::named("app").await;
    router.set("app.test", upstream.route());
    // Separate connections land on different I/O threads; all see the same routes.
    for _ in 0..12 {
        assert_eq!(
            Client::new(router.addr).get("app.test", "/").await.text(),
            "app"
        );
    }
    router.router.remove("app.test");
    assert_eq!(
        Client::new(router.addr)
            .get("app.test", "/")
            .await
            .error_code(),
        Some("unknown_host")
    );
    router.stop().await;
}
