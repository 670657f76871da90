//! Real traffic through the router into apps running in sandboxes: a dependency installed through
//! the build proxy, a WebSocket echo, and 100 MiB each way without buffering.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use slipway_core::DeploymentStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Streams 100 MiB out on `GET /big` and counts what `POST /count` receives, in 64 KiB pieces.
const STREAMER: &str = r#"
import http.server, os
CHUNK = b'x' * 65536
TOTAL = 100 * 1024 * 1024
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def log_message(self, *args):
        pass
    def reply(self, body):
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path != '/big':
            return self.reply(b'ok')
        self.send_response(200)
        self.send_header('Content-Length', str(TOTAL))
        self.end_headers()
        for _ in range(TOTAL // len(CHUNK)):
            self.wfile.write(CHUNK)
    def do_POST(self):
        left = int(self.headers['Content-Length'])
        seen = 0
        while left:
            got = self.rfile.read(min(left, 65536))
            if not got:
                break
            seen += len(got)
            left -= len(got)
        self.reply(str(seen).encode())
class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
S(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()
"#;

const HUNDRED_MIB: u64 = 100 * 1024 * 1024;

/// Peak resident memory of this process so far.
fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_streams_each_way_through_the_router_without_buffering() {
    let Some(h) = harness().await else { return };
    h.write(&[("stream.py", STREAMER)]);
    h.set_spec("", "true", "python3 stream.py", 3000);
    let run = h.start().await;
    h.wait_for(&run.id, DeploymentStatus::Ready, Duration::from_secs(60))
        .await;
    let host = h.preview_host(&run.id);
    let before = vm_hwm_kib();

    // Download: count the body as it arrives.
    let mut s = tokio::net::TcpStream::connect(h.app_addr).await.unwrap();
    s.write_all(
        format!("GET /big HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let mut body = 0u64;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf))
            .await
            .expect("download stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        if body == 0 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            head.extend_from_slice(&buf[..n]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                body = (head.len() - i - 4) as u64;
            }
        } else {
            body += n as u64;
        }
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..head.len().min(200)])
    );
    assert_eq!(body, HUNDRED_MIB);

    // Upload: the app reports how much it received.
    let mut s = tokio::net::TcpStream::connect(h.app_addr).await.unwrap();
    let req = format!("POST /count HTTP/1.1\r\nHost: {host}\r\nContent-Length: {HUNDRED_MIB}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let chunk = vec![b'y'; 64 * 1024];
    for _ in 0..(HUNDRED_MIB / chunk.len() as u64) {
        tokio::time::timeout(Duration::from_secs(60), s.write_all(&chunk))
            .await
            .expect("upload stalled")
            .unwrap();
    }
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.ends_with(&format!("\r\n\r\n{HUNDRED_MIB}")),
        "{reply}"
    );

    // 200 MiB went through; the process grew by far less than one body.
    let grown_mib = vm_hwm_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 48,
        "peak memory grew by {grown_mib} MiB while streaming"
    );
    h.engine.stop(&h.agent, &run.id).await.unwrap();
}
