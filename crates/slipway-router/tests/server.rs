use std::sync::Arc;
use std::time::Duration;

use hyper::{Response, StatusCode};
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
