//! Route switch time: `Router::set` replacing one host's upstream in a table of many hosts —
//! the production switch of a deploy, promote or rollback. Plain timing, no harness:
//!
//!     cargo bench -p slipway-router --bench switch
//!
//! Prints median, p99 and max over many switches for several table sizes.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use slipway_router::{Route, Router, RouterConfig, Upstream};

struct Fake(u16);

impl Upstream for Fake {
    fn connect(&self) -> BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> {
        let port = self.0;
        Box::pin(async move { tokio::net::TcpStream::connect(("127.0.0.1", port)).await })
    }

    fn name(&self) -> String {
        format!("fake-{}", self.0)
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    println!("| hosts in table | switches | median | p99 | max |\n|---:|---:|---:|---:|---:|");
    for hosts in [10usize, 1_000, 10_000] {
        let router = Router::new(RouterConfig::default());
        for i in 0..hosts {
            router
                .set(
                    &format!("app-{i}.localhost"),
                    Route::Upstream(Arc::new(Fake(1))),
                )
                .unwrap();
        }
        let a: Arc<dyn Upstream> = Arc::new(Fake(2));
        let b: Arc<dyn Upstream> = Arc::new(Fake(3));
        let n = 2_000;
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let up = if i % 2 == 0 { a.clone() } else { b.clone() };
            let t0 = Instant::now();
            let drain = router
                .set("my-shop.localhost", Route::Upstream(up))
                .unwrap();
            times.push(t0.elapsed());
            drop(drain);
        }
        times.sort();
        let us = |d: std::time::Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
        println!(
            "| {hosts} | {n} | {} | {} | {} |",
            us(times[n / 2]),
            us(times[n * 99 / 100]),
            us(times[n - 1])
        );
    }
    println!("\ntarget: switch <= 1 ms");
}
