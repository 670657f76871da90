//! Its own test binary, with a single test: it measures this process's resident memory, which
//! tests running beside it in one process would disturb (they allocate too).

#[allow(dead_code)]
mod util;

use slipway_sandbox::{ExecRequest, OutputLine};
use std::time::Duration;
use util::*;

#[tokio::test]
async fn a_gigabyte_of_output_does_not_grow_slipways_memory() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let rss_before = vm_rss();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<OutputLine>(16);
    let consumer = tokio::spawn(async move {
        let (mut lines, mut longest, mut truncated) = (0u64, 0usize, 0u64);
        while let Some(line) = rx.recv().await {
            lines += 1;
            longest = longest.max(line.text.len());
            truncated += line.truncated as u64;
        }
        (lines, longest, truncated)
    });
    let req = ExecRequest::new("head -c 1G /dev/zero | tr '\\0' a; echo; echo end")
        .timeout(Duration::from_secs(120));
    let status = sb.exec(req, Some(tx)).await.unwrap();
    let (lines, longest, truncated) = consumer.await.unwrap();
    let growth = vm_rss().saturating_sub(rss_before);
    assert!(status.success(), "{status:?}");
    assert_eq!((lines, truncated), (2, 1));
    assert!(
        longest < 17 * 1024,
        "a line is capped at max_line_bytes plus a marker: {longest}"
    );
    // Alone in its process the growth is tens of KiB; buffering the output would be a GiB.
    assert!(growth < 16 << 20, "RSS grew by {growth} bytes");
    sb.destroy().await.unwrap();
}

/// This process's resident set size in bytes.
pub fn vm_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}
