//! A `slipway serve` child process per test (killed on drop, its stderr printed when a test
//! fails), and a runner for CLI commands with an isolated login directory.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_slipway");

/// How long a server may take to print its addresses or to stop.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A command for the binary with no slipway configuration inherited from the environment.
pub fn slipway_command() -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SLIPWAY_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd
}

pub struct Server {
    child: Child,
    pub api: String,
    pub app: String,
    pub token_path: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// `slipway serve --data-dir <data_dir> --api-addr 127.0.0.1:0 --app-addr 127.0.0.1:0 <extra>`.
    pub fn start(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = slipway_command();
        cmd.arg("serve").arg("--data-dir").arg(data_dir).args([
            "--api-addr",
            "127.0.0.1:0",
            "--app-addr",
            "127.0.0.1:0",
        ]);
        Self::spawn(cmd, extra, env)
    }

    /// `slipway serve <args>` with only the given flags.
    pub fn spawn(mut cmd: Command, extra: &[&str], env: &[(&str, &str)]) -> Self {
        cmd.args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn slipway serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            api: String::new(),
            app: String::new(),
            token_path: PathBuf::new(),
            stderr,
        };
        let deadline = Instant::now() + DEADLINE;
        let mut lines = Vec::new();
        while lines.len() < 3 {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(line) => lines.push(line),
                Err(_) => panic!(
                    "server did not print its addresses; stdout {lines:?}; stderr:\n{}",
                    server.stderr()
                ),
            }
        }
        let field = |prefix: &str, line: &str| {
            line.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("unexpected line {line:?}, wanted {prefix:?}…"))
                .to_string()
        };
        server.api = field("slipway: api listening on ", &lines[0]);
        server.app = field("slipway: app listening on ", &lines[1]);
        server.token_path = PathBuf::from(field("slipway: admin token in ", &lines[2]));
        server
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(&self.token_path)
            .expect("admin token file")
            .trim()
            .to_string()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// Polls until stderr contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + DEADLINE;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "log never contained {needle:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: nix::sys::signal::Signal) -> ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not stop; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server with SIGTERM, asserting a clean exit.
    pub fn stop(mut self) {
        let status = self.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
        assert!(
            status.success(),
            "exit {status:?}; stderr:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A clean stop (SIGTERM) destroys the server's sandboxes and cgroups, so test runs
        // leave none behind; SIGKILL only if it does not stop within a few seconds.
        if self.child.try_wait().ok().flatten().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- slipway serve stderr ---\n{}", self.stderr());
        }
    }
}

/// The outcome of one CLI command.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        &self.stdout
    }

    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:#?}"))
    }
}

/// Runs `slipway <args>` with the login directory `config_dir`, from `cwd`.
pub fn run_in(cwd: &Path, config_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = slipway_command()
        .args(args)
        .current_dir(cwd)
        .env("SLIPWAY_CONFIG_DIR", config_dir)
        // The CLI's stat cache stays with the test, not in the user's cache directory.
        .env("SLIPWAY_CACHE_DIR", config_dir.join("cache"))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run slipway");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A server in a temp dir plus a login directory for the CLI.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub server: Server,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"), &[], &[]);
        Self { dir, server }
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// `slipway --server <api> <args>` (no token unless given).
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut all = vec!["--server", self.server.api.as_str()];
        all.extend_from_slice(args);
        run_in(self.dir.path(), &self.config_dir(), &all, env)
    }

    /// `slipway --server <api> --token <admin> <args>`.
    pub fn admin(&self, args: &[&str]) -> Run {
        let token = self.server.admin_token();
        let mut all = vec!["--token", token.as_str()];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Creates an agent; returns (id, token).
    pub fn agent(&self, name: &str) -> (String, String) {
        let v = self.admin(&["agents", "create", name, "--json"]).json();
        (
            v["id"].as_str().unwrap().to_string(),
            v["token"].as_str().unwrap().to_string(),
        )
    }
}

/// True when sandboxes can be made here. Otherwise the test is skipped loudly, or fails when
/// `CI` is set (CI must run every sandbox test).
pub fn sandboxes_available() -> bool {
    match slipway_sandbox::check_support() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("sandboxes are required in CI but unavailable: {e}");
            }
            eprintln!("SKIPPED (needs root, namespaces and cgroups): {e}");
            false
        }
    }
}

/// Writes `files` (relative path, content) under `dir`, creating directories.
pub fn write(dir: &Path, files: &[(&str, &str)]) {
    for (name, body) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
}

/// GET through the app listener (`http://host:port`) with a given Host header.
pub fn get(app: &str, host: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = app.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The host name of a URL (`http://a.b:8080/x` → `a.b`).
pub fn host_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap()
        .to_string()
}

/// A tmpfs of `size` mounted at a new directory for the life of the value (needs root).
pub struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// `None` (skipped loudly; a failure under `CI`) without root.
    pub fn mount(at: &std::path::Path, size: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the full-disk test as root"
            );
            eprintln!("SKIPPED (needs root to mount a small tmpfs)");
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs at {}", at.display());
        Some(Self(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Bytes zstd cannot shrink (xorshift64), the same on every run.
pub fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every path under `dir` (none when it does not exist).
pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}
