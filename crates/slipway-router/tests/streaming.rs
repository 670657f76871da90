//! 100 MiB each way through the router with bounded memory.
//!
//! Its own test binary, with a single test: it samples this process's resident memory, which
//! tests running beside it in one process would disturb.

mod util;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use slipway_router::RouterConfig;

use util::{full, vm_rss_kib, BoxError, Client, Req, TestBody, TestRouter, TestUpstream, DEADLINE};

const CHUNK_LEN: usize = 64 * 1024;
const CHUNKS: usize = 1600;
const TOTAL: u64 = (CHUNK_LEN * CHUNKS) as u64; // 100 MiB
static CHUNK: [u8; CHUNK_LEN] = [b'z'; CHUNK_LEN];
/// How much the process may grow while 2 × 100 MiB pass through the router.
const MAX_GROWTH_KIB: u64 = 40 * 1024;

/// 100 MiB generated on the fly, from one static chunk: the generator itself holds nothing.
fn generated_body() -> TestBody {
    let chunks = futures_util::stream::iter(
        (0..CHUNKS).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from_static(&CHUNK)))),
    );
    StreamBody::new(chunks).boxed()
}

async fn count_body(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            total += data.len() as u64;
        }
    }
    Ok(total)
}

/// Samples VmRSS until dropped, keeping the peak.
struct RssWatch {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssWatch {
    fn start() -> Self {
        let peak = Arc::new(AtomicU64::new(vm_rss_kib()));
        let task = tokio::spawn({
            let peak = Arc::clone(&peak);
            async move {
                loop {
                    peak.fetch_max(vm_rss_kib(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        Self { peak, task }
    }

    fn peak(&self) -> u64 {
        self.peak
            .fetch_max(vm_rss_kib(), Ordering::Relaxed)
            .max(vm_rss_kib())
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_up_and_down_with_bounded_memory() {
    let config = RouterConfig {
        max_request_body: 2 * TOTAL,
        ..RouterConfig::default()
    };
    let router = TestRouter::start(config).await;
    let upstream = TestUpstream::start(|req: Request<Incoming>| async move {
        if req.method() == Method::POST {
            let received = count_body(req.into_body()).await.map_or(-1, |n| n as i64);
            Response::new(full(received.to_string()))
        } else {
            Response::new(generated_body())
        }
    })
    .await;
    router.set("big.test", upstream.route());
    let client = Client::new(router.addr);
    // Warm up allocator pools and connections so the baseline includes them.
    let _ = client.get("big.test", "/").await;

    let baseline = vm_rss_kib();
    let watch = RssWatch::start();

    let upload = tokio::time::timeout(
        DEADLINE * 3,
        client.send(Req::new(Method::POST, "big.test", "/upload").stream_body(generated_body())),
    )
    .await
    .expect("upload in time");
    assert_eq!(upload.status, StatusCode::OK);
    assert_eq!(
        upload.text(),
        TOTAL.to_string(),
        "the app received every byte"
    );

    let download = client
        .send_streaming(Req::get("big.test", "/download"))
        .await
        .expect("download starts");
    assert_eq!(download.status(), StatusCode::OK);
    let received = tokio::time::timeout(DEADLINE * 3, count_body(download.into_body()))
        .await
        .expect("download in time")
        .expect("download body");
    assert_eq!(received, TOTAL);

    let growth = watch.peak().saturating_sub(baseline);
    assert!(
        growth < MAX_GROWTH_KIB,
        "memory grew by {growth} KiB while streaming 2 x {TOTAL} bytes (limit {MAX_GROWTH_KIB} KiB)"
    );
}
