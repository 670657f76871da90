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
