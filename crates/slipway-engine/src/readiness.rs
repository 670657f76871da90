//! Readiness: a run is ready only when its app accepts a TCP connection on its port *and*
//! answers an HTTP request on the readiness path with a status below 500.

use std::future::Future;
use std::io;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why one probe attempt did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connection refused or failed: {0}")]
    Connect(io::Error),
    #[error("no HTTP answer: {0}")]
    Http(String),
    #[error("answered HTTP {0}")]
    ServerError(u16),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One HTTP `GET path` over an already-connected stream. Returns the status when it is below 500.
///
/// # Errors
/// [`ProbeError`] when the app does not speak HTTP, answers 5xx, or takes longer than `timeout`.
pub async fn http_probe(
    stream: TcpStream,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<u16, ProbeError> {
    let attempt = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProbeError::Http(e.to_string()))?;
        // The connection task ends when the response is read or the stream closes.
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "slipway-readiness")
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ProbeError::Http(e.to_string()))?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| ProbeError::Http(e.to_string()));
        driver.abort();
        let status = res?.status().as_u16();
        if status >= 500 {
            Err(ProbeError::ServerError(status))
        } else {
            Ok(status)
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

/// Connects (with `connect`) and probes until one attempt succeeds or `deadline` passes.
/// Returns the last error on timeout so the run's error can say what the app did.
///
/// # Errors
/// The last [`ProbeError`] seen when the deadline passes.
pub async fn wait_ready<C, F>(
    mut connect: C,
    host: &str,
    path: &str,
    deadline: tokio::time::Instant,
) -> Result<u16, ProbeError>
where
    C: FnMut() -> F,
    F: Future<Output = io::Result<TcpStream>>,
{
    // A refused connect inside the sandbox's namespace costs microseconds; poll often early so
    // a fast app is seen ready within a few milliseconds, and back off to at most 50 ms.
    let mut delay = Duration::from_millis(5);
    let mut last = ProbeError::Timeout(Duration::ZERO);
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Err(last);
        }
        let per_try = remaining.min(Duration::from_secs(5));
        match tokio::time::timeout(per_try, connect()).await {
            Ok(Ok(stream)) => match http_probe(stream, host, path, per_try).await {
                Ok(status) => return Ok(status),
                Err(e) => last = e,
            },
            Ok(Err(e)) => last = ProbeError::Connect(e),
            Err(_) => last = ProbeError::Timeout(per_try),
        }
        tokio::time::sleep(
            delay.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        )
        .await;
        delay = (delay * 3 / 2).min(Duration::from_millis(50));
    }
}
