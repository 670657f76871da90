//! What one proxied request costs the router in user space: instructions (under valgrind's
//! callgrind, so the figure does not move with the machine's load) and heap allocations.
//!
//! Run: `cargo bench -p slipway-router --bench proxy_cost` (needs `valgrind` and `wrk`).
//! The app (a minimal hyper server) runs in a child process; the router (one I/O thread, as
//! shipped otherwise) runs in another child under `valgrind --tool=callgrind`. After a
//! warm-up, the counters are zeroed, `wrk -t1 -c8` runs for `BENCH_DURATION` (default 10s,
//! about 5-10 k requests under valgrind), and the instructions and allocations counted
//! during it are divided by the requests wrk saw. Kernel work is not counted (the system calls
//! per request are the same four either way; see `docs/bench-router.md`). Knobs:
//! `BENCH_DURATION`, `BENCH_CONNECTIONS` (8), `BENCH_ROUNDS` (1), `BENCH_KEEP` (keep the
//! callgrind dumps and print where, for `callgrind_annotate`).

mod common;
use common::Loopback;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use slipway_router::{Route, Router, RouterConfig};
use tokio::net::TcpListener;

/// Counts heap allocations (all threads).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const HOST: &str = "app.bench";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("app") => return app(),
        Some("router") => return router(args[2].parse().expect("app address")),
        _ => {}
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let duration = std::env::var("BENCH_DURATION").unwrap_or_else(|_| "10s".into());
    let connections = std::env::var("BENCH_CONNECTIONS").unwrap_or_else(|_| "8".into());
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let me = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let mut app = Command::new(&me)
        .arg("app")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the app");
    let mut app_out = BufReader::new(app.stdout.take().unwrap());
    let app_addr = read_line(&mut app_out);

    for round in 1..=rounds {
        let out_file = dir.path().join(format!("callgrind.out.{round}"));
        let mut router = Command::new("valgrind")
            .args(["--tool=callgrind", "--quiet"])
            .arg(format!("--callgrind-out-file={}", out_file.display()))
            .arg(&me)
            .args(["router", app_addr.trim()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("valgrind (apt-get install valgrind)");
        let mut router_in = router.stdin.take().unwrap();
        let mut router_out = BufReader::new(router.stdout.take().unwrap());
        let router_addr = read_line(&mut router_out);
        let url = format!("http://{}/", router_addr.trim());
        let host = format!("Host: {HOST}");

        wrk(&url, &host, "2s", &connections);
        // Zero the instruction counters and the allocation count.
        let pid = router.id().to_string();
        run("callgrind_control", &["-z", &pid]);
        writeln!(router_in, "zero").unwrap();
        read_line(&mut router_out);
        let requests = wrk(&url, &host, &duration, &connections);
        writeln!(router_in, "report").unwrap();
        let allocations: u64 = read_line(&mut router_out).trim().parse().unwrap();
        run("callgrind_control", &["-d", &pid]);
        drop(router_in);
        let _ = router.wait();

        // The dump after zeroing is the file with the highest part number.
        let mut dumps: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("callgrind.out.{round}."))
            })
            .collect();
        dumps.sort();
        let dump = dumps.first().expect("a callgrind dump");
        let text = std::fs::read_to_string(dump).unwrap();
        let instructions: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("summary: ").or(l.strip_prefix("totals: ")))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("callgrind totals");
        println!(
            "round {round}: {requests} requests, {:.0} instructions/request, {:.1} allocations/request",
            instructions as f64 / requests as f64,
            allocations as f64 / requests as f64
        );
    }
    let _ = app.kill();
    let _ = app.wait();
    if std::env::var_os("BENCH_KEEP").is_some() {
        println!("callgrind dumps kept in {}", dir.keep().display());
    }
}

fn read_line(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

/// Runs wrk and returns the requests it completed.
fn wrk(url: &str, host: &str, duration: &str, connections: &str) -> u64 {
    let out = Command::new("wrk")
        .args(["-t1", "-c", connections, "-d", duration, "-H", host, url])
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let requests = text
        .lines()
        .find_map(|l| {
            let (count, rest) = l.trim().split_once(' ')?;
            rest.starts_with("requests in")
                .then(|| count.parse().ok())?
        })
        .unwrap_or_else(|| panic!("wrk output: {text}"));
    assert!(
        !text.contains("Non-2xx"),
        "the router answered errors: {text}"
    );
    requests
}

fn app() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        common::serve_app(listener, b"hello from the app\n").await;
    });
}

fn router(app: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let router = Arc::new(Router::new(RouterConfig {
            io_threads: 1,
            ..RouterConfig::default()
        }));
        router
            .set(HOST, Route::Upstream(Arc::new(Loopback(app))))
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        // Commands on stdin; its end stops the router.
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut since = 0;
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let now = ALLOCATIONS.load(Ordering::Relaxed);
                match line.as_str() {
                    "zero" => {
                        since = now;
                        println!("ok");
                    }
                    "report" => println!("{}", now - since),
                    _ => {}
                }
            }
            let _ = stop_tx.send(());
        });
        let served = tokio::spawn(slipway_router::serve(listener, router, async {
            let _ = stop_rx.await;
        }));
        let _ = tokio::time::timeout(Duration::from_secs(60), served).await;
    });
}
