//! Shared test helpers: the skip rule, a per-test driver and lower dir, and running commands.

use slipway_sandbox::{
    check_support, DriverConfig, ExecRequest, ExitStatus, LinuxDriver, OutputLine, OutputStream,
    Sandbox, SandboxSpec, DEFAULT_WORKLOAD_ID,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// cgroup parent shared by the tests (the cleanup test uses its own).
pub const TEST_CGROUP_PARENT: &str = "slipway-test";

/// Whether sandboxes can run here. When they cannot: skip loudly, or fail when CI is set.
pub fn sandboxes_available() -> bool {
    static SUPPORT: OnceLock<Result<(), String>> = OnceLock::new();
    match SUPPORT.get_or_init(|| check_support().map_err(|e| e.to_string())) {
        Ok(()) => true,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but sandboxes are unavailable: {e}");
            }
            eprintln!("SKIPPED (needs root, namespaces, cgroups and overlayfs): {e}");
            false
        }
    }
}

#[macro_export]
macro_rules! require_sandboxes {
    () => {
        if !$crate::util::sandboxes_available() {
            return;
        }
    };
}

/// A sandbox id unique to this test process and call.
pub fn unique_id(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test's driver, state dir and lower dirs.
pub struct Fixture {
    pub driver: LinuxDriver,
    pub dir: TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        Self::with_cgroup_parent(TEST_CGROUP_PARENT)
    }

    pub fn with_cgroup_parent(parent: &str) -> Self {
        Self::with_config(|config| config.cgroup_parent = parent.to_string())
    }

    pub fn with_config(adjust: impl FnOnce(&mut DriverConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = DriverConfig::new(
            env!("CARGO_BIN_EXE_slipway-sandbox-helper"),
            dir.path().join("state"),
        );
        adjust(&mut config);
        let driver = LinuxDriver::new(config).expect("driver");
        Self { driver, dir }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A lower dir holding `files`, owned by the workload uid like a real cached extraction.
    pub fn lower(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let lower = self.dir.path().join("lower").join(name);
        std::fs::create_dir_all(&lower).unwrap();
        for (path, content) in files {
            let path = lower.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, content).unwrap();
        }
        chown_tree(&lower, DEFAULT_WORKLOAD_ID);
        lower
    }

    pub fn spec(&self, lower: &Path) -> SandboxSpec {
        SandboxSpec::new(unique_id("t"), lower)
    }

    /// A sandbox over a small default lower dir.
    pub async fn sandbox(&self) -> Sandbox {
        let lower = self.lower(
            &unique_id("l"),
            &[("hello.txt", "hello from the snapshot\n")],
        );
        self.driver
            .create(self.spec(&lower))
            .await
            .expect("create sandbox")
    }
}

pub fn chown_tree(path: &Path, id: u32) {
    std::os::unix::fs::lchown(path, Some(id), Some(id)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), id);
        }
    }
}

/// What a command printed, and how it ended.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub lines: Vec<OutputLine>,
}

impl Ran {
    /// Panics with everything useful unless the command succeeded.
    pub fn ok(self) -> Self {
        assert!(self.status.success(), "command failed: {self:#?}");
        self
    }
}

/// Runs `req` in `sb`, collecting its output.
pub async fn run_req(sb: &Sandbox, req: ExecRequest) -> Ran {
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let collect = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(line) = rx.recv().await {
            lines.push(line);
        }
        lines
    });
    let status = sb.exec(req, Some(tx)).await.expect("exec");
    let lines = collect.await.unwrap();
    let text = |stream| {
        lines
            .iter()
            .filter(|l: &&OutputLine| l.stream == stream)
            .map(|l| format!("{}\n", l.text))
            .collect::<String>()
    };
    Ran {
        status,
        stdout: text(OutputStream::Stdout),
        stderr: text(OutputStream::Stderr),
        lines,
    }
}

/// Runs `command` with a generous timeout.
pub async fn run(sb: &Sandbox, command: &str) -> Ran {
    run_req(
        sb,
        ExecRequest::new(command).timeout(Duration::from_secs(60)),
    )
    .await
}

/// Polls `cond` until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every cgroup directory (any hierarchy) that belongs to sandbox `id` under `parent`.
pub fn cgroup_dirs(parent: &str, id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let v2 = Path::new("/sys/fs/cgroup").join(parent).join(id);
    if v2.exists() {
        found.push(v2);
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for entry in entries.flatten() {
            let dir = entry.path().join(parent).join(id);
            if dir.exists() {
                found.push(dir);
            }
        }
    }
    found
}

/// Processes (any namespace) whose mount table mentions `needle`.
pub fn processes_with_mount(needle: &str) -> Vec<String> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(mounts) = std::fs::read_to_string(entry.path().join("mountinfo")) {
            if mounts.contains(needle) {
                pids.push(name);
            }
        }
    }
    pids
}

/// Processes (any pid namespace) in the mount namespace `ns` (a `/proc/<pid>/ns/mnt` link).
pub fn processes_in_mount_ns(ns: &Path) -> Vec<String> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if std::fs::read_link(entry.path().join("ns/mnt")).is_ok_and(|l| l == ns) {
            pids.push(name);
        }
    }
    pids
}
