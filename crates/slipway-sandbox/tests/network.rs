//! Loopback-only networking: the platform connects in; nothing inside reaches out.

use crate::require_sandboxes;
use crate::util::*;
use slipway_sandbox::{ExecRequest, Sandbox};
use std::io::ErrorKind;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Python that tries to connect to 127.0.0.1:`port` and prints CONNECTED or FAILED <error>.
fn try_connect(port: u16) -> String {
    format!(
        "python3 -c \"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n    \
         print('CONNECTED')\nexcept Exception as e:\n    print('FAILED', type(e).__name__)\""
    )
}

async fn start_http_server(sb: &Sandbox, port: u16) -> slipway_sandbox::Process {
    let process = sb
        .spawn(
            ExecRequest::new(format!(
                "exec python3 -m http.server {port} --bind 127.0.0.1"
            )),
            None,
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if sb.connect(port).await.is_ok() {
            return process;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the app never listened on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn http_get(sb: &Sandbox, port: u16, path: &str) -> String {
    let mut stream = sb.connect(port).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: app\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn an_app_listening_inside_is_reachable_through_connect() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let mut app = start_http_server(&sb, 3000).await;
    let response = http_get(&sb, 3000, "/hello.txt").await;
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert!(
        response.ends_with("hello from the snapshot\n"),
        "{response}"
    );
    // Nothing listens on another port.
    let err = sb.connect(3001).await.unwrap_err().to_string();
    assert!(err.contains("refused"), "{err}");
    app.kill(Duration::from_secs(2)).await.unwrap();
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn a_listener_opened_by_the_platform_inside_is_reachable_from_the_workload() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let listener = sb.listen(4100).await.unwrap();
    let accept = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut got = String::new();
        stream.read_to_string(&mut got).await.unwrap();
        got
    });
    let cmd = "python3 -c \"import socket; s=socket.create_connection(('127.0.0.1', 4100)); \
               s.sendall(b'hello platform'); s.close()\"";
    run(&sb, cmd).await.ok();
    assert_eq!(accept.await.unwrap(), "hello platform");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn the_hosts_loopback_is_unreachable() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    host.set_nonblocking(true).unwrap();
    let port = host.local_addr().unwrap().port();
    let ran = run(&sb, &try_connect(port)).await.ok();
    assert_eq!(ran.stdout, "FAILED ConnectionRefusedError\n");
    assert_eq!(
        host.accept().unwrap_err().kind(),
        ErrorKind::WouldBlock,
        "no connection arrived"
    );
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn another_sandboxs_app_port_is_unreachable() {
    require_sandboxes!();
    let fx = Fixture::new();
    let victim = fx.sandbox().await;
    let attacker = fx.sandbox().await;
    let mut app = start_http_server(&victim, 3000).await;
    let ran = run(&attacker, &try_connect(3000)).await.ok();
    assert_eq!(ran.stdout, "FAILED ConnectionRefusedError\n");
    // The victim's app is up all along.
    assert!(http_get(&victim, 3000, "/")
        .await
        .starts_with("HTTP/1.0 200"));
    app.kill(Duration::from_secs(2)).await.unwrap();
    victim.destroy().await.unwrap();
    attacker.destroy().await.unwrap();
}

#[tokio::test]
async fn loopback_is_the_only_interface_and_there_are_no_routes() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let ran = run(&sb, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo ---; \
                        tail -n +2 /proc/net/route | wc -l; cat /proc/net/if_inet6 | awk '{print $6}'")
        .await
        .ok();
    let (interfaces, rest) = ran.stdout.split_once("---\n").unwrap();
    assert_eq!(interfaces, "lo\n", "{ran:#?}");
    let mut rest = rest.lines();
    assert_eq!(rest.next(), Some("0"), "no IPv4 routes: {ran:#?}");
    assert!(
        rest.all(|ifname| ifname == "lo"),
        "IPv6 only on lo: {ran:#?}"
    );
    sb.destroy().await.unwrap();
}
