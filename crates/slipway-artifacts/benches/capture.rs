//! Snapshot capture benchmark (a benchmark, not a test): `cargo bench -p slipway-artifacts
//! --bench capture`. Results and how to read them: docs/bench-snapshots.md.
//!
//! Generates deterministic trees, then prints, from one run on one machine:
//! - capture time of slipway (the store's flushed capture, and the CLI's upload capture, not
//!   flushed) vs the reference pipeline `tar -cf - DIR | zstd -1 -T0 | sha256sum`;
//! - re-capture time of an unchanged 10,000-file tree with the stat cache;
//! - peak memory (VmHWM) of a capture, measured in a child process per tree.
//!
//! Knobs (environment): `BENCH_RUNS` (timed runs per measurement, default 5), `BENCH_DIR`
//! (where trees are generated; default a temporary directory, removed afterwards),
//! `BENCH_ONLY` (comma-separated subset of `node,small,recapture,memory`).
//!
//! For profiling or A/B runs of two builds, the binary also has child modes:
//! `--child repeat-capture DIR OUT LEVEL N` and `--child repeat-hash DIR CACHE_DIR|- N`
//! (`BENCH_THREADS` sets `CaptureOptions::threads` for both), e.g. under `perf record`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use slipway_artifacts::{capture_to_file, hash_tree, CaptureOptions, LocalArtifactStore};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        return child(&args[i + 1..]);
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |what: &str| only.is_empty() || only.split(',').any(|o| o.trim() == what);
    let _tmp;
    let base = match std::env::var_os("BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            _tmp = tempfile::Builder::new()
                .prefix("slipway-bench-")
                .tempdir()
                .expect("temp dir");
            _tmp.path().to_path_buf()
        }
    };
    fs::create_dir_all(&base).unwrap();
    let reference = reference_available();
    if !reference {
        eprintln!("!!! the reference pipeline needs tar, zstd and sha256sum (see scripts/install-deps); its column stays empty");
    }
    println!("machine: {} CPUs ({}), {}", cpus(), cpu_model(), kernel());
    println!("zstd CLI: {}", tool_version("zstd", "--version"));
    println!("load average at start: {}", loadavg());
    println!("timed runs per figure: {runs} (median; min-max in brackets), after one warm-up run (page cache warm)\n");

    let mut capture_rows = Vec::new();
    let mut trees: Vec<(&str, PathBuf)> = Vec::new();
    if want("node") || want("memory") {
        let dir = base.join("node");
        let t = Instant::now();
        let (files, bytes) = gen_node_tree(&dir);
        eprintln!(
            "generated node-like tree: {files} files, {:.1} MB in {:.1?}",
            mb(bytes),
            t.elapsed()
        );
        trees.push(("node-like", dir.clone()));
        if want("node") {
            capture_rows.push(measure_capture(
                "node-like (≈3,000 files)",
                &dir,
                files,
                bytes,
                runs,
                reference,
                &base,
            ));
        }
    }
    if want("small") || want("memory") {
        let dir = base.join("small");
        let t = Instant::now();
        let (files, bytes) = gen_small_tree(&dir, 100_000, 64, 2048, 1000, 0x5EED_0002);
        eprintln!(
            "generated small-files tree: {files} files, {:.1} MB in {:.1?}",
            mb(bytes),
            t.elapsed()
        );
        trees.push(("100k small files", dir.clone()));
        if want("small") {
            let small_runs = runs.min(3);
            capture_rows.push(measure_capture(
                "100,000 small files",
                &dir,
                files,
                bytes,
                small_runs,
                reference,
                &base,
            ));
        }
    }
    if !capture_rows.is_empty() {
        println!("## Capture (cold: no stat cache; archive written to a new file)\n");
        println!("Wall time, median (min-max). \"Store\" captures are flushed to disk (`fsync`) before they are published, as the server's artifact store does; the CLI's upload path writes a temporary archive it uploads and deletes, not flushed (`CaptureOptions::durable = false`). The reference pipeline writes no file.\n");
        println!("| tree | files | MB | reference `tar \\| zstd -1 -T0 \\| sha256sum` | slipway level 1 (default), store | slipway level 3, store | ratio level 1, store | ratio level 3, store | slipway level 1, CLI upload path | ratio, CLI path | slipway hash only |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &capture_rows {
            println!("{}", r.wall());
        }
        println!("\nRatios are medians of per-round ratios (each round runs every variant once, in turn).");
        println!(
            "\nCPU time (user + sys, all threads and child processes), median; archive sizes:\n"
        );
        println!("| tree | reference | slipway level 1 | slipway level 3 | CPU ratio level 1 | slipway hash only | archive MB (reference / level 1 / level 3) |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for r in &capture_rows {
            println!("{}", r.cpu());
        }
        println!();
    }

    if want("recapture") {
        let dir = base.join("tenk");
        let (files, bytes) = gen_small_tree(&dir, 10_000, 64, 16_384, 200, 0x5EED_0003);
        eprintln!("generated 10k tree: {files} files, {:.1} MB", mb(bytes));
        println!("## Re-capture of an unchanged tree with the stat cache\n");
        println!("| tree | operation | median | min-max | CPU (median) | target |");
        println!("|---|---|---:|---:|---:|---:|");
        recapture("10,000 files", &dir, runs.max(11), &base);
        if let Some((_, small)) = trees.iter().find(|(n, _)| *n == "100k small files") {
            recapture("100,000 files", small, runs.max(5), &base);
        }
        println!();
    }

    if want("memory") {
        let tenk = base.join("tenk");
        if !tenk.exists() {
            gen_small_tree(&tenk, 10_000, 64, 16_384, 200, 0x5EED_0003);
        }
        trees.push(("10k files", tenk));
        // Few, big files: what streaming is for. Peak memory must not follow the bytes.
        let big = base.join("big");
        if !big.exists() {
            let mut rng = Rng(0x5EED_0004);
            let mut d = vec![0u8; 64 << 20];
            for i in 0..8 {
                rng.fill(&mut d);
                write(&big.join(format!("blob{i}.bin")), &d);
            }
        }
        trees.push(("8 files of 64 MiB", big));
        println!("## Peak memory of one capture (VmHWM of a child process)\n");
        println!("| tree | files | MB | level | peak RSS | baseline (same binary, no capture) |");
        println!("|---|---:|---:|---:|---:|---:|");
        let baseline = run_child(&["baseline"]);
        for (name, dir) in &trees {
            let (files, bytes) = tree_size(dir);
            for level in [1, 3] {
                let out = base.join(format!("mem-{level}.tar.zst"));
                let _ = fs::remove_file(&out);
                let hwm = run_child(&[
                    "capture",
                    dir.to_str().unwrap(),
                    out.to_str().unwrap(),
                    &level.to_string(),
                ]);
                let _ = fs::remove_file(&out);
                println!(
                    "| {name} | {files} | {:.1} | {level} | {:.1} MB | {:.1} MB |",
                    mb(bytes),
                    hwm as f64 / 1024.0,
                    baseline as f64 / 1024.0
                );
            }
        }
        println!();
    }
    println!("load average at end: {}", loadavg());
}

// ---------------------------------------------------------------------------------------------
// Measurements

struct CaptureRow {
    name: String,
    files: u64,
    bytes: u64,
    reference: Option<Stats>,
    l1: Stats,
    l3: Stats,
    /// Level 1 as the CLI captures for an upload: a temporary archive, not flushed to disk.
    l1_cli: Stats,
    hash_only: Stats,
    /// Medians of the per-round ratios slipway / reference (level 1, level 3, CLI path).
    ratios: Option<(f64, f64, f64)>,
    /// Archive sizes: reference, level 1, level 3.
    sizes: [u64; 3],
}

impl CaptureRow {
    fn wall(&self) -> String {
        let opt = |s: &Option<Stats>| s.as_ref().map_or("—".to_string(), |s| s.to_string());
        let (r1, r3, rc) = self.ratios.map_or(
            ("—".to_string(), "—".to_string(), "—".to_string()),
            |(a, b, c)| {
                (
                    format!("**{a:.2}×**"),
                    format!("{b:.2}×"),
                    format!("**{c:.2}×**"),
                )
            },
        );
        format!(
            "| {} | {} | {:.1} | {} | {} | {} | {r1} | {r3} | {} | {rc} | {} |",
            self.name,
            self.files,
            mb(self.bytes),
            opt(&self.reference),
            self.l1,
            self.l3,
            self.l1_cli,
            self.hash_only,
        )
    }
    fn cpu(&self) -> String {
        let c = |s: &Stats| format!("{:.2} s", s.cpu.as_secs_f64());
        let ratio = self.reference.as_ref().map_or("—".to_string(), |r| {
            format!("{:.2}×", self.l1.cpu.as_secs_f64() / r.cpu.as_secs_f64())
        });
        format!(
            "| {} | {} | {} | {} | {ratio} | {} | {:.1} / {:.1} / {:.1} |",
            self.name,
            self.reference.as_ref().map_or("—".to_string(), c),
            c(&self.l1),
            c(&self.l3),
            c(&self.hash_only),
            mb(self.sizes[0]),
            mb(self.sizes[1]),
            mb(self.sizes[2]),
        )
    }
}

/// One measured variant: called once per round, returns the wall time it measured.
type Variant<'a> = Box<dyn FnMut() -> Duration + 'a>;

/// One warm-up round, then `runs` rounds; each round calls every variant once, in turn, so a
/// change in the machine's load hits all of them alike. Returns per-variant stats and the
/// per-round wall times (for paired ratios).
fn rounds(runs: usize, variants: &mut [Variant<'_>]) -> (Vec<Stats>, Vec<Vec<Duration>>) {
    for v in variants.iter_mut() {
        v();
    }
    let mut wall = vec![Vec::with_capacity(runs); variants.len()];
    let mut cpu = vec![Vec::with_capacity(runs); variants.len()];
    for _ in 0..runs {
        for (i, v) in variants.iter_mut().enumerate() {
            let c0 = cpu_time();
            wall[i].push(v());
            cpu[i].push(cpu_time().saturating_sub(c0));
        }
    }
    let stats = wall
        .iter()
        .zip(&cpu)
        .map(|(w, c)| Stats::of(w.clone(), c.clone()))
        .collect();
    (stats, wall)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn measure_capture(
    name: &str,
    dir: &Path,
    files: u64,
    bytes: u64,
    runs: usize,
    reference: bool,
    base: &Path,
) -> CaptureRow {
    let sizes = std::cell::Cell::new([0u64; 3]);
    let slipway = |level: i32, durable: bool, out: PathBuf, slot: Option<usize>| -> Variant<'_> {
        let o = CaptureOptions {
            zstd_level: level,
            durable,
            ..CaptureOptions::default()
        };
        let sizes = &sizes;
        Box::new(move || {
            let _ = fs::remove_file(&out);
            let t = Instant::now();
            let c = capture_to_file(dir, &out, &o).expect("capture");
            let d = t.elapsed();
            let _ = fs::remove_file(&out);
            if let Some(i) = slot {
                let mut s = sizes.get();
                s[i] = c.size_bytes;
                sizes.set(s);
            }
            d
        })
    };
    if reference {
        let size_cmd = format!(
            "tar -cf - -C '{}' . | zstd -1 -T0 -q | wc -c",
            dir.display()
        );
        let o = Command::new("sh")
            .arg("-c")
            .arg(&size_cmd)
            .output()
            .unwrap();
        let mut s = sizes.get();
        s[0] = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        sizes.set(s);
    }
    let cmd = format!(
        "tar -cf - -C '{}' . | zstd -1 -T0 -q | sha256sum >/dev/null",
        dir.display()
    );
    let mut variants: Vec<Variant<'_>> = vec![
        slipway(1, true, base.join("bench-out.tar.zst"), Some(1)),
        slipway(3, true, base.join("bench-out.tar.zst"), Some(2)),
        slipway(1, false, base.join("bench-out.tar.zst"), None),
        Box::new(|| {
            let t = Instant::now();
            hash_tree(dir, &CaptureOptions::default()).expect("hash");
            t.elapsed()
        }),
    ];
    if reference {
        variants.push(Box::new(|| {
            let t = Instant::now();
            let st = Command::new("sh").arg("-c").arg(&cmd).status().unwrap();
            let d = t.elapsed();
            assert!(st.success(), "{cmd}");
            d
        }));
    }
    let (mut stats, wall) = rounds(runs, &mut variants);
    drop(variants);
    let (reference, ratios) = if reference {
        let r = wall.last().unwrap();
        let paired = |w: &Vec<Duration>| {
            median(
                w.iter()
                    .zip(r)
                    .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64())
                    .collect(),
            )
        };
        let ratios = (paired(&wall[0]), paired(&wall[1]), paired(&wall[2]));
        (stats.pop(), Some(ratios))
    } else {
        (None, None)
    };
    let hash_only = stats.pop().unwrap();
    let l1_cli = stats.pop().unwrap();
    let l3 = stats.pop().unwrap();
    let l1 = stats.pop().unwrap();
    CaptureRow {
        name: name.to_string(),
        files,
        bytes,
        reference,
        l1,
        l3,
        l1_cli,
        hash_only,
        ratios,
        sizes: sizes.get(),
    }
}

fn recapture(name: &str, dir: &Path, runs: usize, base: &Path) {
    let store_dir = base.join(format!(
        "store-{}",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let cache = base.join("statcache");
    let _ = fs::remove_dir_all(&store_dir);
    let _ = fs::remove_dir_all(&cache);
    let store = LocalArtifactStore::new(&store_dir).unwrap();
    let opts = CaptureOptions {
        stat_cache_dir: Some(cache),
        ..CaptureOptions::default()
    };
    let t = Instant::now();
    let first = store
        .capture_dir("bench", dir, &opts)
        .expect("first capture");
    let first_time = t.elapsed();
    assert!(!first.deduplicated);
    let cap = time(runs, || {
        let t = Instant::now();
        let c = store.capture_dir("bench", dir, &opts).expect("re-capture");
        let d = t.elapsed();
        assert!(c.deduplicated && c.content_hash == first.content_hash);
        d
    });
    let hash = time(runs, || {
        let t = Instant::now();
        let h = hash_tree(dir, &opts).expect("hash");
        let d = t.elapsed();
        assert_eq!(h, first.content_hash);
        d
    });
    println!(
        "| {name} | first `capture_dir` (fills store and cache) | {} | | | |",
        fmt_d(first_time)
    );
    println!(
        "| {name} | `capture_dir`, unchanged, cache on (deduplicated) | **{}** | {}-{} | {} | ≤ 50 ms |",
        fmt_d(cap.median),
        fmt_d(cap.min),
        fmt_d(cap.max),
        fmt_d(cap.cpu)
    );
    println!(
        "| {name} | `hash_tree`, unchanged, cache on | {} | {}-{} | {} | |",
        fmt_d(hash.median),
        fmt_d(hash.min),
        fmt_d(hash.max),
        fmt_d(hash.cpu)
    );
}

struct Stats {
    median: Duration,
    min: Duration,
    max: Duration,
    /// Median CPU time (user + sys) of this process and its children.
    cpu: Duration,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}-{})",
            fmt_d(self.median),
            fmt_d(self.min),
            fmt_d(self.max)
        )
    }
}

fn fmt_d(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// One warm-up call, then `runs` timed calls; `f` returns the wall time it measured. CPU
/// time is taken around the whole call, for this process and its waited-for children.
fn time(runs: usize, mut f: impl FnMut() -> Duration) -> Stats {
    f();
    let mut wall = Vec::with_capacity(runs);
    let mut cpu = Vec::with_capacity(runs);
    for _ in 0..runs {
        let c0 = cpu_time();
        wall.push(f());
        cpu.push(cpu_time().saturating_sub(c0));
    }
    Stats::of(wall, cpu)
}

impl Stats {
    fn of(mut wall: Vec<Duration>, mut cpu: Vec<Duration>) -> Stats {
        wall.sort();
        cpu.sort();
        let n = wall.len();
        Stats {
            median: wall[n / 2],
            min: wall[0],
            max: wall[n - 1],
            cpu: cpu[n / 2],
        }
    }
}

/// user + sys of this process (all threads) plus its terminated, waited-for children.
fn cpu_time() -> Duration {
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let mut total = Duration::ZERO;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: `ru` is a valid out-pointer for getrusage.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: see above; RUSAGE_SELF/CHILDREN are valid selectors.
        unsafe { libc::getrusage(who, &mut ru) };
        total += tv(ru.ru_utime) + tv(ru.ru_stime);
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Peak memory, in a child process so each capture starts from a clean high-water mark.

fn child(args: &[String]) {
    match args.first().map(String::as_str) {
        Some("baseline") => {}
        Some("repeat-hash") => {
            let threads = std::env::var("BENCH_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let opts = CaptureOptions {
                threads,
                // "-": no stat cache (every file read and hashed).
                stat_cache_dir: (args[2] != "-").then(|| PathBuf::from(&args[2])),
                ..CaptureOptions::default()
            };
            for _ in 0..args[3].parse::<usize>().unwrap() {
                hash_tree(Path::new(&args[1]), &opts).expect("hash");
            }
        }
        Some("repeat-capture") => {
            let opts = CaptureOptions {
                threads: std::env::var("BENCH_THREADS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                zstd_level: args[3].parse().unwrap(),
                ..CaptureOptions::default()
            };
            for _ in 0..args[4].parse::<usize>().unwrap() {
                let _ = fs::remove_file(&args[2]);
                let (t, c) = (Instant::now(), cpu_time());
                capture_to_file(Path::new(&args[1]), Path::new(&args[2]), &opts).expect("capture");
                if std::env::var_os("BENCH_PRINT").is_some() {
                    eprintln!(
                        "capture {:.1} ms cpu {:.1} ms",
                        t.elapsed().as_secs_f64() * 1e3,
                        cpu_time().saturating_sub(c).as_secs_f64() * 1e3
                    );
                }
            }
        }
        Some("capture") => {
            let opts = CaptureOptions {
                zstd_level: args[3].parse().unwrap(),
                ..CaptureOptions::default()
            };
            capture_to_file(Path::new(&args[1]), Path::new(&args[2]), &opts).expect("capture");
        }
        other => panic!("unknown child mode {other:?}"),
    }
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    println!("{}", hwm.trim().trim_end_matches(" kB"));
}

/// Runs this binary in child mode and returns its VmHWM in KiB.
fn run_child(args: &[&str]) -> u64 {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "child {args:?} failed");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("VmHWM in kB")
}

// ---------------------------------------------------------------------------------------------
// Deterministic trees

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Log-uniform in [lo, hi): many small values, a few large ones, like real file sizes.
    fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((lo as f64).ln() + u * ((hi as f64).ln() - (lo as f64).ln())).exp() as u64
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "const",
    "let",
    "function",
    "return",
    "import",
    "export",
    "from",
    "default",
    "async",
    "await",
    "if",
    "else",
    "for",
    "of",
    "in",
    "new",
    "this",
    "props",
    "state",
    "useState",
    "useEffect",
    "React",
    "children",
    "className",
    "onClick",
    "value",
    "error",
    "result",
    "data",
    "items",
    "map",
    "filter",
    "reduce",
    "length",
    "push",
    "JSON",
    "stringify",
    "parse",
    "fetch",
    "response",
    "headers",
    "config",
    "options",
    "null",
    "undefined",
    "true",
    "false",
    "string",
    "number",
    "boolean",
    "interface",
    "type",
    "extends",
    "implements",
    "class",
    "constructor",
    "super",
    "private",
    "public",
    "readonly",
    "Promise",
    "resolve",
    "reject",
    "then",
    "catch",
    "finally",
    "throw",
    "Error",
    "console",
    "log",
    "warn",
    "id",
    "name",
    "title",
    "description",
    "user",
    "session",
    "token",
    "router",
    "query",
    "params",
    "=",
    "=>",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ";",
    ",",
    ".",
    ":",
    "?",
    "===",
    "!==",
    "&&",
    "||",
    "+",
    "-",
    "0",
    "1",
];

/// Text that compresses like source code (zstd -1: roughly 4-6×).
fn text(rng: &mut Rng, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 128);
    while out.len() < size {
        let indent = rng.below(4) as usize * 2;
        out.extend(std::iter::repeat_n(b' ', indent));
        let n = 3 + rng.below(10);
        for i in 0..n {
            if i > 0 {
                out.push(b' ');
            }
            let w = WORDS[rng.below(WORDS.len() as u64) as usize];
            out.extend_from_slice(w.as_bytes());
            if rng.below(9) == 0 {
                // identifiers with numbers, so not everything repeats verbatim
                write!(out, "{}", rng.below(1000)).unwrap();
            }
        }
        out.push(b'\n');
    }
    out.truncate(size);
    out
}

fn write(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).unwrap();
    }
    fs::write(path, data).unwrap();
}

/// ≈3,000 files / ≈70 MB: mostly small source-like text files in nested directories, plus
/// already-compressed binaries (images, fonts, media) — what a Node app's directory holds once
/// `node_modules`, `.git` and build output are ignored. None of it is ignored by slipway, so
/// slipway and the reference archive the same files.
fn gen_node_tree(root: &Path) -> (u64, u64) {
    if root.exists() {
        return tree_size(root);
    }
    let mut rng = Rng(0x5EED_0001);
    let areas = [
        "src/components",
        "src/pages",
        "src/lib",
        "src/hooks",
        "src/styles",
        "src/utils",
        "src/api",
        "tests",
        "docs",
    ];
    let exts = ["ts", "tsx", "js", "json", "css", "md"];
    let mut total = 0u64;
    let mut files = 0u64;
    for (name, size) in [
        ("package.json", 3_000usize),
        ("package-lock.json", 600_000),
        ("README.md", 8_000),
        ("tsconfig.json", 900),
    ] {
        let d = text(&mut rng, size);
        write(&root.join(name), &d);
        total += d.len() as u64;
        files += 1;
    }
    for i in 0..2_846u64 {
        let area = areas[rng.below(areas.len() as u64) as usize];
        let sub = rng.below(40);
        let deeper = if rng.below(3) == 0 {
            format!("/part{}", rng.below(6))
        } else {
            String::new()
        };
        let ext = exts[rng.below(exts.len() as u64) as usize];
        let size = rng.log_uniform(200, 64_000) as usize;
        let d = text(&mut rng, size);
        write(
            &root.join(format!("{area}/mod{sub}{deeper}/file{i}.{ext}")),
            &d,
        );
        total += d.len() as u64;
        files += 1;
    }
    let kinds = [
        ("public/images", "png", 8_000, 900_000),
        ("public/fonts", "woff2", 20_000, 160_000),
        ("public/media", "mp4", 400_000, 3_000_000),
    ];
    for i in 0..150u64 {
        // 60 % images, 30 % fonts, 10 % media.
        let (dir, ext, lo, hi) = kinds[match i % 10 {
            0..=5 => 0,
            6..=8 => 1,
            _ => 2,
        }];
        let size = rng.log_uniform(lo, hi) as usize;
        let mut d = vec![0u8; size];
        rng.fill(&mut d);
        write(&root.join(format!("{dir}/asset{i}.{ext}")), &d);
        total += size as u64;
        files += 1;
    }
    (files, total)
}

/// `n` text files of `lo`..`hi` bytes (log-uniform) spread over `dirs` directories.
fn gen_small_tree(root: &Path, n: u64, lo: u64, hi: u64, dirs: u64, seed: u64) -> (u64, u64) {
    if root.exists() {
        return tree_size(root);
    }
    let mut rng = Rng(seed);
    let mut total = 0u64;
    for d in 0..dirs {
        fs::create_dir_all(root.join(format!("pkg{}/dir{d}", d % 17))).unwrap();
    }
    for i in 0..n {
        let d = i % dirs;
        let size = rng.log_uniform(lo, hi) as usize;
        let data = text(&mut rng, size);
        fs::write(root.join(format!("pkg{}/dir{d}/f{i}.js", d % 17)), &data).unwrap();
        total += size as u64;
    }
    (n, total)
}

fn tree_size(root: &Path) -> (u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                bytes += m.len();
            }
        }
    }
    (files, bytes)
}

// ---------------------------------------------------------------------------------------------
// Environment

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn reference_available() -> bool {
    Command::new("sh")
        .arg("-c")
        .arg("command -v tar && command -v zstd && command -v sha256sum")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn tool_version(tool: &str, arg: &str) -> String {
    Command::new(tool)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "missing".into())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn cpu_model() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string());
    let sha = if info.contains(" sha_ni") {
        ", SHA-NI"
    } else {
        ""
    };
    format!("{}{sha}", model.unwrap_or_else(|| "unknown CPU".into()))
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_default()
}
