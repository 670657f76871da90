//! Provision-to-exec benchmark: create a fresh sandbox over a cached lower dir, run `true` in
//! it, destroy it. Compared in the same run with the namespace floor (`unshare ... --fork true`)
//! and with bubblewrap when installed. References are only measured here, never used by the
//! product.
//!
//! Run as root: `cargo bench -p slipway-sandbox --bench provision`
//! In the interleaved rounds each slipway life starts with a ready spare (the bench waits,
//! untimed, for the driver's next spare after each life); the back-to-back block after them
//! does not wait, so each create there also pays for (part of) building its spare.
//! Iterations: `SLIPWAY_BENCH_ITERS` (default 100). `SLIPWAY_BENCH_QUICK=1` measures only
//! slipway over the 10-file lower dir (for profiling, e.g. under `strace -f`).

use slipway_sandbox::{check_support, DriverConfig, ExecRequest, LinuxDriver, SandboxSpec};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Stats {
    median: Duration,
    p90: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Stats {
        median: at(0.5),
        p90: at(0.9),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn make_lower(dir: &Path, files: usize) -> PathBuf {
    let lower = dir.join(format!("lower-{files}"));
    for i in 0..files {
        let sub = lower.join(format!("d{}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&sub).unwrap();
        }
        std::fs::write(sub.join(format!("f{i}.txt")), "x").unwrap();
    }
    std::fs::create_dir_all(&lower).unwrap();
    let status = Command::new("chown")
        .args(["-R", "60000:60000"])
        .arg(&lower)
        .status()
        .unwrap();
    assert!(status.success());
    lower
}

const UNSHARE: [&str; 7] = [
    "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "true",
];

const BWRAP: [&str; 21] = [
    "--unshare-all",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/bin",
    "/bin",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--tmpfs",
    "/tmp",
    "--die-with-parent",
    "/bin/true",
];

/// CPU time (user + system) of this process and of every descendant it has reaped: the
/// helpers, and through them the sandboxes' inits and commands.
fn cpu_time() -> Duration {
    let get = |who| {
        // SAFETY: getrusage fills the struct we own.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut r) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(r.ru_utime) + tv(r.ru_stime)
    };
    get(libc::RUSAGE_SELF) + get(libc::RUSAGE_CHILDREN)
}

/// One run of a reference command, or `None` if it is unavailable or fails.
fn time_command(program: &str, args: &[&str]) -> Option<Duration> {
    let start = Instant::now();
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    status.success().then(|| start.elapsed())
}

#[derive(Default)]
struct Phases {
    total: Vec<Duration>,
    create: Vec<Duration>,
    exec: Vec<Duration>,
    destroy: Vec<Duration>,
}

async fn time_slipway(driver: &LinuxDriver, lower: &Path, iters: usize, tag: &str) -> Phases {
    let mut phases = Phases::default();
    for i in 0..iters {
        one_slipway(driver, lower, &format!("{tag}-{i}"), &mut phases).await;
    }
    phases
}

/// Waits (untimed) until the driver's next spare is ready, so that building it overlaps
/// neither the next row nor the next life: rows measure a sandbox made from a ready spare.
fn wait_for_spare(driver: &LinuxDriver) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while driver.spare_stats().ready_init_pid.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// One sandbox life: create, exec `true`, destroy.
async fn one_slipway(driver: &LinuxDriver, lower: &Path, tag: &str, phases: &mut Phases) {
    let spec = SandboxSpec::new(format!("bench-{tag}-{}", std::process::id()), lower);
    let t0 = Instant::now();
    let sb = driver.create(spec).await.expect("create");
    let t1 = Instant::now();
    let status = sb.exec(ExecRequest::new("true"), None).await.expect("exec");
    assert!(status.success(), "{status}");
    let t2 = Instant::now();
    sb.destroy().await.expect("destroy");
    let t3 = Instant::now();
    phases.total.push(t3 - t0);
    phases.create.push(t1 - t0);
    phases.exec.push(t2 - t1);
    phases.destroy.push(t3 - t2);
}

fn main() {
    if let Err(e) = check_support() {
        eprintln!("SKIPPED (needs root and namespaces): {e}");
        return;
    }
    let iters: usize = std::env::var("SLIPWAY_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let quick = std::env::var_os("SLIPWAY_BENCH_QUICK").is_some();
    let dir = tempfile::tempdir().unwrap();
    eprintln!("preparing lower dirs (10 and 100,000 files)…");
    let small = make_lower(dir.path(), 10);
    let large = if quick {
        small.clone()
    } else {
        make_lower(dir.path(), 100_000)
    };
    let mut config = DriverConfig::new(
        env!("CARGO_BIN_EXE_slipway-sandbox-helper"),
        dir.path().join("state"),
    );
    config.cgroup_parent = "slipway-bench".into();
    let driver = LinuxDriver::new(config).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Warm-up: page cache, cgroup parents, the spawner thread, the /etc template.
    rt.block_on(time_slipway(&driver, &small, 5, "warm"));
    wait_for_spare(&driver);
    if quick {
        let p = rt.block_on(time_slipway(&driver, &small, iters, "q"));
        for (name, v) in [
            ("total", p.total),
            ("create", p.create),
            ("exec", p.exec),
            ("destroy", p.destroy),
        ] {
            let st = stats(v);
            println!("{name:8} median {} p90 {}", ms(st.median), ms(st.p90));
        }
        return;
    }
    for _ in 0..5 {
        let _ = time_command("unshare", &UNSHARE);
    }

    // Rounds: each runs every row once, so that load from anything else on the machine hits
    // every row alike (the machine is shared; sequential blocks would compare different loads).
    let mut unshare_s = Vec::with_capacity(iters);
    let mut bwrap_s = Vec::with_capacity(iters);
    let mut bwrap_ok = true;
    let mut slip_small = Phases::default();
    let mut slip_large = Phases::default();
    // The order is shuffled every round: what ran just before matters (a network namespace is
    // torn down asynchronously by the kernel after its last process exits).
    let mut seed: u64 = 0x5eed_1234_abcd_0001;
    for i in 0..iters {
        let mut order = [0usize, 1, 2, 3];
        for k in (1..order.len()).rev() {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            order.swap(k, (seed >> 33) as usize % (k + 1));
        }
        for row in order {
            match row {
                0 => {
                    if let Some(d) = time_command("unshare", &UNSHARE) {
                        unshare_s.push(d);
                    }
                }
                1 => {
                    if bwrap_ok {
                        match time_command("bwrap", &BWRAP) {
                            Some(d) => bwrap_s.push(d),
                            None => bwrap_ok = false,
                        }
                    }
                }
                2 => {
                    rt.block_on(one_slipway(
                        &driver,
                        &small,
                        &format!("s-{i}"),
                        &mut slip_small,
                    ));
                    wait_for_spare(&driver);
                }
                _ => {
                    rt.block_on(one_slipway(
                        &driver,
                        &large,
                        &format!("l-{i}"),
                        &mut slip_large,
                    ));
                    wait_for_spare(&driver);
                }
            }
        }
    }
    let rounds_spares = driver.spare_stats();
    wait_for_spare(&driver);

    // Back to back: sandbox lives with nothing in between, so each create finds the spare
    // started by the previous one still being built (and waits for it). CPU per life from
    // getrusage, next to the floor's (kernel work done asynchronously, e.g. network namespace
    // teardown in a kworker, is in neither).
    let before = driver.spare_stats();
    let cpu0 = cpu_time();
    let mut b2b = Phases::default();
    for i in 0..iters {
        rt.block_on(one_slipway(&driver, &small, &format!("b-{i}"), &mut b2b));
    }
    let slip_cpu = (cpu_time() - cpu0) / iters as u32;
    let b2b_spares = driver.spare_stats();
    let cpu0 = cpu_time();
    let mut floor_b2b = Vec::with_capacity(iters);
    for _ in 0..iters {
        if let Some(d) = time_command("unshare", &UNSHARE) {
            floor_b2b.push(d);
        }
    }
    let floor_cpu = (cpu_time() - cpu0) / iters as u32;

    let unshare = (unshare_s.len() == iters).then(|| stats(unshare_s));
    let bwrap = (bwrap_ok && bwrap_s.len() == iters).then(|| stats(bwrap_s));

    let floor = unshare.as_ref().map(|s| s.median);
    let ratio = |d: Duration| match floor {
        Some(f) => format!("{:.2}×", d.as_secs_f64() / f.as_secs_f64()),
        None => "-".into(),
    };
    println!(
        "provision → exec `true` → destroy, {iters} interleaved rounds; load average {}\n",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("| what | median | p90 | median vs unshare floor |");
    println!("|---|---|---|---|");
    match &unshare {
        Some(s) => println!(
            "| `unshare --mount --pid --net --ipc --uts --fork true` (floor) | {} | {} | 1.00× |",
            ms(s.median),
            ms(s.p90)
        ),
        None => println!("| unshare (floor) | unavailable | | |"),
    }
    match &bwrap {
        Some(s) => println!(
            "| `bwrap --unshare-all` (ro /usr, /proc, /dev, /tmp) `true` | {} | {} | {} |",
            ms(s.median),
            ms(s.p90),
            ratio(s.median)
        ),
        None => println!("| bwrap | not installed (apt-get install -y bubblewrap) | | |"),
    }
    for (name, phases) in [("10 files", &slip_small), ("100,000 files", &slip_large)] {
        let total = stats(phases.total.clone());
        println!(
            "| slipway create + exec + destroy, lower dir of {name} | {} | {} | {} |",
            ms(total.median),
            ms(total.p90),
            ratio(total.median)
        );
    }
    println!(
        "\nspares in the rounds: {} used ready, {} built on demand, {} discarded",
        rounds_spares.used, rounds_spares.built_on_demand, rounds_spares.discarded
    );
    let b2b_total = stats(b2b.total.clone());
    let floor_b2b = (floor_b2b.len() == iters).then(|| stats(floor_b2b));
    println!(
        "\nback to back ({iters} lives in a row, then {iters} floor runs in a row):\n  \
         slipway median {} p90 {} (create {} / exec {} / destroy {}); floor median {}\n  \
         spares: {} used (incl. waited for), {} built on demand\n  \
         CPU per life (getrusage, self + reaped descendants): slipway {}, floor {} ({:.2}×)",
        ms(b2b_total.median),
        ms(b2b_total.p90),
        ms(stats(b2b.create.clone()).median),
        ms(stats(b2b.exec.clone()).median),
        ms(stats(b2b.destroy.clone()).median),
        floor_b2b
            .map(|s| ms(s.median))
            .unwrap_or_else(|| "-".into()),
        b2b_spares.used - before.used,
        b2b_spares.built_on_demand - before.built_on_demand,
        ms(slip_cpu),
        ms(floor_cpu),
        slip_cpu.as_secs_f64() / floor_cpu.as_secs_f64().max(1e-9),
    );
    println!("\nslipway phases (median, 10-file lower dir / 100,000-file lower dir):");
    for (name, small, large) in [
        ("create", &slip_small.create, &slip_large.create),
        ("exec `true`", &slip_small.exec, &slip_large.exec),
        ("destroy", &slip_small.destroy, &slip_large.destroy),
    ] {
        println!(
            "  {name:12} {:>10} / {:>10}",
            ms(stats(small.clone()).median),
            ms(stats(large.clone()).median)
        );
    }
    // The driver's spare (a cgroup under the parent) goes with the driver and the runtime.
    drop(driver);
    drop(rt);
    for root in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_dir(root.path().join("slipway-bench"));
    }
}
