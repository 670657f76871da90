//! 100 MiB each way through the router into an app in a sandbox, without buffering.
//!
//! Its own test binary, with a single test: it reads this process's peak resident memory, which
//! tests running beside it in one process would raise.

#[allow(dead_code)]
mod util;

use std::time::Duration;

use slipway_core::DeploymentStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use util::*;

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
