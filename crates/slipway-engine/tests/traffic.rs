//! Real traffic through the router into apps running in sandboxes: a dependency installed through
//! the build proxy and a WebSocket echo (100 MiB each way is in stream_memory.rs).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use slipway_core::DeploymentStatus;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_dependency_is_installed_through_the_build_proxy() {
    let Some(h) = harness().await else { return };
    if slipway_sandbox::RegistryConfig::derive()
        .egress_config(&[])
        .allow_hosts
        .is_empty()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to reach the npm registry through the build proxy"
        );
        eprintln!("SKIPPED (no package registry configured on this host)");
        return;
    }
    h.write(&[
        ("package.json", r#"{"name":"dep-app","version":"1.0.0","private":true,"dependencies":{"is-number":"7.0.0"}}"#),
        (
            "server.js",
            r#"const isNumber = require('is-number');
require('http').createServer((req, res) => res.end('is 42 a number? ' + isNumber(42)))
  .listen(Number(process.env.PORT), '127.0.0.1');"#,
        ),
    ]);
    h.set_spec(
        "npm install --no-audit --no-fund --loglevel=error",
        "node -e \"require('is-number')\"",
        "node server.js",
        3000,
    );
    let run = h.start().await;
    let ready = h
        .wait_for(&run.id, DeploymentStatus::Ready, Duration::from_secs(240))
        .await;
    let (status, body) = h.get(&h.preview_host(&ready.id), "/").await;
    assert_eq!(status, 200);
    assert_eq!(body, "is 42 a number? true");
    h.engine.stop(&h.agent, &run.id).await.unwrap();
}

/// A WebSocket echo server in plain Python (no packages): answers HTTP for readiness and
/// upgrades requests that carry a WebSocket key.
const WS_ECHO: &str = r#"
import base64, hashlib, os, socketserver, struct
GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'
class H(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        headers = {}
        while True:
            line = self.rfile.readline().decode().strip()
            if not line:
                break
            k, v = line.split(':', 1)
            headers[k.strip().lower()] = v.strip()
        key = headers.get('sec-websocket-key')
        if key is None:
            body = b'plain http'
            self.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' % (len(body), body))
            return
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.wfile.write(('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
                          'Sec-WebSocket-Accept: %s\r\n\r\n' % accept).encode())
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            op, n = head[0] & 0x0f, head[1] & 0x7f
            if n == 126:
                n = struct.unpack('>H', self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack('>Q', self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b'\0\0\0\0'
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            if op == 8:
                self.wfile.write(b'\x88\x00')
                return
            if op == 9:
                op = 10
            data = b'echo: ' + data if op == 1 else data
            size = bytes([len(data)]) if len(data) < 126 else b'\x7e' + struct.pack('>H', len(data))
            self.wfile.write(bytes([0x80 | op]) + size + data)
            self.wfile.flush()
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
S(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_router_into_a_sandbox() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let Some(h) = harness().await else { return };
    h.write(&[("ws.py", WS_ECHO)]);
    h.set_spec("", "true", "python3 ws.py", 3000);
    let run = h.start().await;
    h.wait_for(&run.id, DeploymentStatus::Ready, Duration::from_secs(60))
        .await;
    let url = format!(
        "ws://{}:{}/socket",
        h.preview_host(&run.id),
        h.app_addr.port()
    );
    let request = url.into_client_request().unwrap();
    let tcp = tokio::net::TcpStream::connect(h.app_addr).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("upgrade through the router");
    assert_eq!(response.status(), 101);
    for text in ["hello", "second message", &"x".repeat(2000)] {
        ws.send(Message::text(text)).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("echo in time")
            .unwrap()
            .unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), format!("echo: {text}"));
    }
    ws.close(None).await.unwrap();
    h.engine.stop(&h.agent, &run.id).await.unwrap();
}
