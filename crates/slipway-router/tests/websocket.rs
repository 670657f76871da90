use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use slipway_router::Route;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::util::{eventually, Loopback, TestRouter};

/// A loopback WebSocket app echoing every data message.
async fn echo_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn websocket_echo_through_the_router() {
    let router = TestRouter::start_default().await;
    let (app, app_task) = echo_server().await;
    router.set("ws.test", Route::Upstream(Arc::new(Loopback(app))));

    let stream = TcpStream::connect(router.addr).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("ws://ws.test/socket", stream)
        .await
        .expect("websocket handshake through the router");
    assert_eq!(response.status(), 101);

    for i in 0..20 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = ws.next().await.expect("echo").expect("frame");
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    let binary = vec![7u8; 200_000];
    ws.send(Message::binary(binary.clone())).await.unwrap();
    let echoed = ws.next().await.expect("echo").expect("frame");
    assert_eq!(echoed.into_data().as_ref(), &binary[..]);

    // The open socket counts as in flight until it closes, so draining waits for it.
    assert_eq!(router.router.in_flight("ws.test"), Some(1));
    ws.close(None).await.unwrap();
    drop(ws);
    eventually("upgraded connection no longer in flight", || {
        router.router.in_flight("ws.test") == Some(0)
    })
    .await;
    app_task.abort();
}

/// An app on raw sockets: a request asking for `Upgrade: echo` gets a 101 and then its bytes
/// echoed; any other request gets `ok`, on a keep-alive connection. Reports each plain
/// connection that the router closes.
async fn plain_and_upgrade_app() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    tokio::task::JoinHandle<()>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut upgrade = false;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            let _ = closed_tx.send(());
                            return;
                        }
                        upgrade |= line.to_ascii_lowercase().starts_with("upgrade: echo");
                        if line == "\r\n" {
                            break;
                        }
                    }
                    if upgrade {
                        let head = "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n";
                        stream.get_mut().write_all(head.as_bytes()).await.unwrap();
                        let (mut read, mut write) = stream.into_inner().into_split();
                        let _ = tokio::io::copy(&mut read, &mut write).await;
                        return;
                    }
                    let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, closed_rx, task)
}

#[tokio::test]
async fn an_open_upgraded_connection_does_not_keep_a_replaced_routes_pool() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let router = TestRouter::start_default().await;
    let (app, mut closed, app_task) = plain_and_upgrade_app().await;
    router.set("app.test", Route::Upstream(Arc::new(Loopback(app))));

    // An upgraded connection through the same route, echoing.
    let mut upgraded = TcpStream::connect(router.addr).await.unwrap();
    upgraded
        .write_all(
            b"GET /echo HTTP/1.1\r\nHost: app.test\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        upgraded.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    upgraded.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    upgraded.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");

    // Then a plain request: it cannot use the upgraded connection, so it opens another, which
    // stays in the route's pool as an idle keep-alive connection.
    let mut plain = TcpStream::connect(router.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    plain.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");

    // Replacing the route closes the old pool's idle connection although the upgraded one,
    // counted in flight on the old route, stays open and working.
    let drain = router
        .router
        .set(
            "app.test",
            Route::Unavailable(slipway_router::Unavailable::new(
                slipway_router::UnavailableKind::Stopped,
            )),
        )
        .unwrap()
        .expect("the old route's drain");
    tokio::time::timeout(crate::util::DEADLINE, closed.recv())
        .await
        .expect("the replaced route's idle connection is closed while a socket is open");
    assert_eq!(drain.in_flight(), 1);
    upgraded.write_all(b"pong").await.unwrap();
    upgraded.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"pong");
    drop(upgraded);
    eventually("upgraded connection no longer in flight", || {
        drain.in_flight() == 0
    })
    .await;
    app_task.abort();
}

/// An upgraded connection keeps its connection slot until it closes: otherwise a client could
/// open WebSockets without end, past `max_connections`, and run the server out of sockets.
#[tokio::test]
async fn upgraded_connections_count_against_the_connection_limit() {
    let router = TestRouter::start(slipway_router::RouterConfig {
        max_connections: 2,
        io_threads: 1,
        ..slipway_router::RouterConfig::default()
    })
    .await;
    let (app, app_task) = echo_server().await;
    router.set("ws.test", Route::Upstream(Arc::new(Loopback(app))));
    let plain = crate::util::TestUpstream::named("plain").await;
    router.set("plain.test", plain.route());
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let stream = TcpStream::connect(router.addr).await.unwrap();
        let (ws, response) = tokio_tungstenite::client_async("ws://ws.test/socket", stream)
            .await
            .expect("websocket handshake through the router");
        assert_eq!(response.status(), 101);
        sockets.push(ws);
    }

    // A third client waits in the listen backlog while both sockets are open...
    let client = crate::util::Client::new(router.addr);
    let mut third = tokio::spawn(async move { client.get("plain.test", "/").await });
    let early = tokio::time::timeout(std::time::Duration::from_millis(500), &mut third).await;
    assert!(early.is_err(), "served past the connection limit");

    // ...and is served once one of them closes.
    let mut first = sockets.remove(0);
    first.close(None).await.unwrap();
    drop(first);
    let reply = tokio::time::timeout(crate::util::DEADLINE, third)
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(reply.text(), "plain");
    app_task.abort();
}
