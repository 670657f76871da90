//! Router benchmark against nginx, in one run, on loopback.
//!
//! Measures with `wrk`: a tiny hyper app hit directly, through the slipway router and through
//! nginx as a keep-alive reverse proxy; then the same small file served by slipway's static
//! server and by nginx. Prints requests/s, p50/p99 latency and ratios.
//!
//! Run: `cargo bench -p slipway-router --bench router`
//! Knobs (environment): `BENCH_DURATION` (wrk -d, default 5s), `BENCH_CONNECTIONS` (-c, 32),
//! `BENCH_THREADS` (wrk -t, 2), `BENCH_WORKERS` (router I/O threads = nginx workers, default 2),
//! `BENCH_ONLY` (run only scenarios whose name contains it).

mod common;
use common::Loopback;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slipway_router::{Route, Router, RouterConfig, StaticSite};
use tokio::net::TcpListener;

const HELLO: &str = "hello from the app\n";
const APP_HOST: &str = "app.bench";
const STATIC_HOST: &str = "static.bench";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn main() {
    // `cargo bench` passes `--bench`; a filter or `--list` from the harness protocol is ignored.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    ensure_tools();
    let duration = env_or("BENCH_DURATION", "5s");
    let connections = env_or("BENCH_CONNECTIONS", "32");
    let threads = env_or("BENCH_THREADS", "2");
    let workers: usize = env_or("BENCH_WORKERS", "2")
        .parse()
        .expect("BENCH_WORKERS is a number");

    let dir = tempfile::tempdir().expect("temp dir");
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    let page: String = (0..40)
        .map(|i| format!("<p>paragraph {i} of a small static page</p>\n"))
        .collect();
    let page = format!("<!doctype html><title>bench</title>\n{page}");
    std::fs::write(site.join("index.html"), &page).unwrap();
    // Over the memory cache's per-file limit: streamed from disk on every request.
    let large: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(site.join("large.bin"), &large).unwrap();

    // The app gets its own runtime so its threads are the same in every scenario.
    let app_rt = runtime(1, "bench-app");
    let app_addr = app_rt.block_on(start_app());

    // The router as shipped (one single-threaded runtime per I/O thread), and the same router
    // on a shared work-stealing runtime (`io_threads: 0`) for comparison.
    let router_rt = runtime(workers, "slipway-shared");
    let start_router = |io_threads: usize| {
        router_rt.block_on(async {
            let router = Arc::new(Router::new(RouterConfig {
                io_threads,
                ..RouterConfig::default()
            }));
            router
                .set(APP_HOST, Route::Upstream(Arc::new(Loopback(app_addr))))
                .unwrap();
            router
                .set(STATIC_HOST, Route::Static(StaticSite::new(&site).unwrap()))
                .unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(slipway_router::serve(
                listener,
                router,
                std::future::pending(),
            ));
            addr
        })
    };
    let router_addr = start_router(workers);
    let shared_addr = start_router(0);

    let nginx_proxy_port = free_port();
    let nginx_static_port = free_port();
    let mut nginx = Nginx::start(
        dir.path(),
        workers,
        app_addr,
        nginx_proxy_port,
        nginx_static_port,
        &site,
    );

    let wrk = Wrk {
        threads: threads.clone(),
    };
    let started = Instant::now();
    let scenarios = [
        ("direct app", format!("http://{app_addr}/"), APP_HOST),
        ("slipway proxy", format!("http://{router_addr}/"), APP_HOST),
        (
            "slipway proxy, shared runtime",
            format!("http://{shared_addr}/"),
            APP_HOST,
        ),
        (
            "nginx proxy",
            format!("http://127.0.0.1:{nginx_proxy_port}/"),
            APP_HOST,
        ),
        (
            "slipway static",
            format!("http://{router_addr}/index.html"),
            STATIC_HOST,
        ),
        (
            "nginx static",
            format!("http://127.0.0.1:{nginx_static_port}/index.html"),
            STATIC_HOST,
        ),
        (
            "slipway static 1 MiB",
            format!("http://{router_addr}/large.bin"),
            STATIC_HOST,
        ),
        (
            "nginx static 1 MiB",
            format!("http://127.0.0.1:{nginx_static_port}/large.bin"),
            STATIC_HOST,
        ),
    ];
    // Whose CPU time a scenario is charged: the proxy's threads or processes (CPU time per
    // request is far less noisy than requests/s on a shared machine).
    let nginx_pid = nginx.id();
    let cpu_of = |name: &str| -> [f64; 2] {
        if name.starts_with("nginx") {
            nginx_workers_cpu(nginx_pid)
        } else if name.contains("shared") {
            threads_cpu("slipway-shared")
        } else if name.starts_with("slipway") {
            threads_cpu("slipway-router")
        } else {
            threads_cpu("bench-app")
        }
    };
    let only = std::env::var("BENCH_ONLY").ok();
    let mut results = Vec::new();
    for (name, url, host) in &scenarios {
        if only.as_deref().is_some_and(|only| !name.contains(only)) {
            continue;
        }
        check_responds(url, host);
        wrk.run(url, host, "1s", &connections); // warm-up: connections, pools, page cache
        let cpu_before = cpu_of(name);
        let mut result = wrk.run(url, host, &duration, &connections);
        let cpu_after = cpu_of(name);
        let per_request =
            |i: usize| (cpu_after[i] - cpu_before[i]) * 1e6 / result.requests.max(1.0);
        result.sys_us = per_request(1);
        result.cpu_us = per_request(0) + result.sys_us;
        eprintln!(
            "{name:>30}: {:>8.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  {:>6.1} us CPU/req ({:.1} system)",
            result.rps, result.p50_ms, result.p99_ms, result.cpu_us, result.sys_us
        );
        results.push((*name, result));
    }
    // Latency below saturation: a few connections, so queueing does not hide the proxy's cost.
    let mut light = Vec::new();
    for (name, url, host) in scenarios
        .iter()
        .filter(|(name, ..)| name.ends_with("proxy") || *name == "direct app")
    {
        if only.as_deref().is_some_and(|only| !name.contains(only)) {
            continue;
        }
        let result = wrk.run(url, host, &light_duration(&duration), LIGHT_CONNECTIONS);
        eprintln!(
            "{name:>30}: {:>8.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  (-c{LIGHT_CONNECTIONS})",
            result.rps, result.p50_ms, result.p99_ms
        );
        light.push((*name, result));
    }
    nginx.stop();
    if only.is_some() {
        return;
    }

    let get = |list: &[(&str, WrkResult)], name: &str| {
        list.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r.clone())
            .unwrap()
    };
    let (proxy, nginx_proxy) = (get(&results, "slipway proxy"), get(&results, "nginx proxy"));
    let shared = get(&results, "slipway proxy, shared runtime");
    let (static_slipway, static_nginx) = (
        get(&results, "slipway static"),
        get(&results, "nginx static"),
    );
    let (light_direct, light_proxy, light_nginx) = (
        get(&light, "direct app"),
        get(&light, "slipway proxy"),
        get(&light, "nginx proxy"),
    );

    let mut table = String::new();
    writeln!(table, "| scenario (wrk -t{threads} -c{connections} -d{duration}) | req/s | p50 ms | p99 ms | vs nginx | CPU us/req |").unwrap();
    writeln!(table, "|---|---:|---:|---:|---:|---:|").unwrap();
    for (name, result) in &results {
        let ratio = match *name {
            "slipway proxy" => format!("{:.2}x", proxy.rps / nginx_proxy.rps),
            "slipway proxy, shared runtime" => format!("{:.2}x", shared.rps / nginx_proxy.rps),
            "slipway static" => format!("{:.2}x", static_slipway.rps / static_nginx.rps),
            "slipway static 1 MiB" => format!(
                "{:.2}x",
                result.rps / get(&results, "nginx static 1 MiB").rps
            ),
            _ => String::new(),
        };
        writeln!(
            table,
            "| {name} | {:.0} | {:.3} | {:.3} | {ratio} | {:.1} |",
            result.rps, result.p50_ms, result.p99_ms, result.cpu_us
        )
        .unwrap();
    }
    writeln!(
        table,
        "\n| latency, -c{LIGHT_CONNECTIONS} | req/s | p50 ms | p99 ms | p99 over direct |"
    )
    .unwrap();
    writeln!(table, "|---|---:|---:|---:|---:|").unwrap();
    for (name, result) in &light {
        let added = result.p99_ms - light_direct.p99_ms;
        let added = if *name == "direct app" {
            String::new()
        } else {
            format!("{added:+.3} ms")
        };
        writeln!(
            table,
            "| {name} | {:.0} | {:.3} | {:.3} | {added} |",
            result.rps, result.p50_ms, result.p99_ms
        )
        .unwrap();
    }
    println!("\n{table}");
    println!(
        "proxy throughput vs nginx: {:.2}x (target >= 1.0)\n\
         added p99 over direct at -c{LIGHT_CONNECTIONS}: slipway {:+.3} ms, nginx {:+.3} ms (target <= 1 ms)\n\
         static throughput vs nginx: {:.2}x (target >= 0.9)\n\
         {workers} router I/O threads = nginx workers, app on 1 thread, {} cores, {:.0} s total",
        proxy.rps / nginx_proxy.rps,
        light_proxy.p99_ms - light_direct.p99_ms,
        light_nginx.p99_ms - light_direct.p99_ms,
        static_slipway.rps / static_nginx.rps,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64(),
    );
    drop(router_rt);
    drop(app_rt);
}

const LIGHT_CONNECTIONS: &str = "4";

/// The light-load pass runs for half the main duration (at least a second).
fn light_duration(duration: &str) -> String {
    let seconds: u64 = duration.trim_end_matches('s').parse().unwrap_or(5);
    format!("{}s", (seconds / 2).max(1))
}

fn runtime(threads: usize, name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Installs wrk and nginx from the distribution when missing.
fn ensure_tools() {
    let missing = |tool: &str| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !missing("wrk") && !missing("nginx") {
        return;
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "wrk", "nginx"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").arg("update").status();
        assert!(install(), "could not install wrk and nginx with apt-get");
    }
}

/// The app: a minimal hyper HTTP/1.1 server answering every request with a short text.
async fn start_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(common::serve_app(listener, HELLO.as_bytes()));
    addr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One GET through curl-less plain TCP, so a misconfigured scenario fails loudly instead of
/// benchmarking error pages.
fn check_responds(url: &str, host: &str) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(addr) {
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut response = Vec::new();
            let _ = stream.read_to_end(&mut response);
            let response = String::from_utf8_lossy(&response[..response.len().min(200)]);
            assert!(
                response.starts_with("HTTP/1.1 200"),
                "{url} (Host {host}) answered: {response}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never accepted a connection"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Clone, Debug)]
struct WrkResult {
    rps: f64,
    requests: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time (user + system) of the server under test per request, in microseconds.
    cpu_us: f64,
    /// The part of `cpu_us` spent in the kernel.
    sys_us: f64,
}

/// Seconds of CPU time (user + system) used so far by this process's threads named `prefix…`.
fn threads_cpu(prefix: &str) -> [f64; 2] {
    let mut total = [0.0; 2];
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(prefix) {
            let [user, sys] = stat_cpu(&task.path().join("stat"));
            total[0] += user;
            total[1] += sys;
        }
    }
    total
}

/// Seconds of CPU time used so far by the worker processes of the nginx master `pid`.
fn nginx_workers_cpu(pid: u32) -> [f64; 2] {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .map(|child| stat_cpu(Path::new(&format!("/proc/{child}/stat"))))
        .fold([0.0; 2], |[u, s], [cu, cs]| [u + cu, s + cs])
}

/// utime and stime of a `/proc/.../stat` file, in seconds.
fn stat_cpu(path: &Path) -> [f64; 2] {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = libc_sysconf_clk_tck();
    [ticks(11) / hz, ticks(12) / hz]
}

fn libc_sysconf_clk_tck() -> f64 {
    extern "C" {
        fn sysconf(name: i32) -> i64;
    }
    const SC_CLK_TCK: i32 = 2;
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { sysconf(SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

struct Wrk {
    threads: String,
}

impl Wrk {
    fn run(&self, url: &str, host: &str, duration: &str, connections: &str) -> WrkResult {
        // wrk needs at least one connection per thread.
        let threads = self
            .threads
            .parse::<usize>()
            .unwrap_or(1)
            .min(connections.parse().unwrap_or(1))
            .to_string();
        let output = Command::new("wrk")
            .args([
                "-t",
                &threads,
                "-c",
                connections,
                "-d",
                duration,
                "--latency",
            ])
            .args(["-H", &format!("Host: {host}"), url])
            .output()
            .expect("run wrk");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !text.contains("Non-2xx"),
            "non-2xx responses from {url}:\n{text}"
        );
        let field = |prefix: &str| {
            text.lines()
                .map(str::trim)
                .find_map(|l| l.strip_prefix(prefix))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {prefix:?} in wrk output:\n{text}"))
        };
        let requests = text
            .lines()
            .find_map(|l| l.trim().split_once(" requests in "))
            .and_then(|(n, _)| n.trim().parse().ok())
            .unwrap_or(0.0);
        WrkResult {
            rps: field("Requests/sec:").parse().expect("requests/sec"),
            requests,
            p50_ms: latency_ms(&field("50%")),
            p99_ms: latency_ms(&field("99%")),
            cpu_us: 0.0,
            sys_us: 0.0,
        }
    }
}

fn latency_ms(value: &str) -> f64 {
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("latency {value:?}"));
    match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        _ => panic!("latency unit {value:?}"),
    }
}

struct Nginx {
    child: Child,
}

impl Nginx {
    fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Nginx {
    fn start(
        dir: &Path,
        workers: usize,
        app: SocketAddr,
        proxy_port: u16,
        static_port: u16,
        site: &Path,
    ) -> Self {
        let run = dir.join("nginx");
        std::fs::create_dir_all(&run).unwrap();
        let r = run.display();
        let conf = format!(
            "user root;\nworker_processes {workers};\npid {r}/nginx.pid;\nerror_log {r}/error.log warn;\n\
events {{ worker_connections 4096; }}\n\
http {{\n  access_log off;\n  default_type application/octet-stream;\n  types {{ text/html html; }}\n\
  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n  keepalive_requests 1000000;\n\
  client_body_temp_path {r}/body;\n  proxy_temp_path {r}/proxy;\n  fastcgi_temp_path {r}/fastcgi;\n\
  uwsgi_temp_path {r}/uwsgi;\n  scgi_temp_path {r}/scgi;\n\
  upstream app {{ server {app}; keepalive 64; keepalive_requests 1000000; }}\n\
  server {{\n    listen 127.0.0.1:{proxy_port};\n    location / {{\n      proxy_pass http://app;\n\
      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      proxy_set_header X-Forwarded-Proto $scheme;\n\
      proxy_set_header X-Forwarded-Host $host;\n    }}\n  }}\n\
  server {{\n    listen 127.0.0.1:{static_port};\n    root {site};\n    etag on;\n  }}\n}}\n",
            site = site.display(),
        );
        let conf_path = run.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .args(["-p", &r.to_string(), "-g", "daemon off;"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start nginx");
        Self { child }
    }

    /// SIGTERM, not SIGKILL: the master must live long enough to stop its workers.
    fn stop(&mut self) {
        if self.child.try_wait().is_ok_and(|status| status.is_none()) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
