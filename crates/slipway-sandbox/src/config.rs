//! What the engine asks for: driver settings, one sandbox's spec, one command.

use crate::privileged::path_is_mount_safe;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Default workload uid and gid: unprivileged, not 0 and not the shared `nobody` (65534).
pub const DEFAULT_WORKLOAD_ID: u32 = 60_000;
/// Port of the build egress proxy on the sandbox's loopback.
pub const DEFAULT_PROXY_PORT: u16 = 3128;
/// The writable workspace inside every sandbox.
pub const WORKSPACE_PATH: &str = "/workspace/app";
/// The workload user's home inside every sandbox.
pub const HOME_PATH: &str = "/home/app";

/// Settings shared by every sandbox of one driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Executable that implements the hidden helper subcommands: the `slipway` binary itself
    /// (`std::env::current_exe()`), or this crate's `slipway-sandbox-helper` in its own tests.
    pub helper_exe: PathBuf,
    /// Host directory for per-sandbox state (`<state_dir>/<id>/`). Only root may read it.
    pub state_dir: PathBuf,
    /// Name of the cgroup directory that holds every sandbox's cgroup (`<parent>/<id>`).
    pub cgroup_parent: String,
    /// Remove the `cgroup_parent` directories when the last clone of the driver is dropped
    /// (if they are empty by then). Only for a parent no other driver uses: one removed while
    /// another driver is about to create a sandbox in it would fail that create. `slipway
    /// serve` sets it (its parent is named after its data directory).
    pub remove_cgroup_parent_on_drop: bool,
    /// Output lines longer than this many bytes are truncated (and marked).
    pub max_line_bytes: usize,
    /// How long building a sandbox or starting a command may take before it is abandoned.
    pub setup_timeout: Duration,
}

impl DriverConfig {
    pub fn new(helper_exe: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            helper_exe: helper_exe.into(),
            state_dir: state_dir.into(),
            cgroup_parent: "slipway".to_string(),
            remove_cgroup_parent_on_drop: false,
            max_line_bytes: 16 * 1024,
            setup_timeout: Duration::from_secs(10),
        }
    }
}

/// Resource limits of one sandbox. Files written to the tmpfs-backed workspace, /tmp and home
/// are memory, so they count against `memory_bytes` too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit of the whole sandbox (cgroup); exceeding it OOM-kills a workload process.
    pub memory_bytes: u64,
    /// Maximum number of processes (cgroup `pids.max`), including init and the helpers.
    pub pids_max: u64,
    /// CPU bandwidth in thousandths of a core (1000 = one core); `None` for no limit.
    pub cpu_millis: Option<u64>,
    /// Size of the workspace's writable layer: the workspace disk quota.
    pub workspace_bytes: u64,
    /// Size of the private /tmp.
    pub tmp_bytes: u64,
    /// Size of the private home directory (package caches live there).
    pub home_bytes: u64,
    /// Size of /dev/shm.
    pub shm_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 2 * GIB,
            pids_max: 512,
            cpu_millis: Some(1000),
            workspace_bytes: 2 * GIB,
            tmp_bytes: 512 * MIB,
            home_bytes: GIB,
            shm_bytes: 64 * MIB,
        }
    }
}

/// Outbound network access through the egress proxy. Without it a sandbox has no way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    /// Host names the proxy may connect to (exact match, ports 80 and 443 only).
    pub allow_hosts: Vec<String>,
    /// Port the proxy listens on inside the sandbox's loopback.
    pub proxy_port: u16,
    /// Extra environment for every command, e.g. the registry URL and CA bundle the host's
    /// package managers use (see `RegistryConfig::sandbox_env`).
    pub env: Vec<(String, String)>,
}

impl EgressConfig {
    pub fn new(allow_hosts: Vec<String>) -> Self {
        Self {
            allow_hosts,
            proxy_port: DEFAULT_PROXY_PORT,
            env: Vec::new(),
        }
    }
}

/// One sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// Unique among live sandboxes: lower-case letters, digits and `-`, at most 48 bytes.
    pub id: String,
    /// Cached read-only extraction of the snapshot or release, owned by the workload uid. It
    /// becomes the lower layer of `/workspace/app` and is never written.
    pub lower_dir: PathBuf,
    /// Extra host directories (or files) bound read-only at the same path, e.g. a Node install.
    pub toolchain_paths: Vec<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    pub limits: Limits,
    pub egress: Option<EgressConfig>,
}

impl SandboxSpec {
    pub fn new(id: impl Into<String>, lower_dir: impl Into<PathBuf>) -> Self {
        Self {
            id: id.into(),
            lower_dir: lower_dir.into(),
            toolchain_paths: Vec::new(),
            uid: DEFAULT_WORKLOAD_ID,
            gid: DEFAULT_WORKLOAD_ID,
            hostname: "sandbox".to_string(),
            limits: Limits::default(),
            egress: None,
        }
    }

    /// # Errors
    /// The first field that is unusable, and why.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !is_label(&self.id, 48) {
            return Err(SpecError::BadId {
                id: self.id.clone(),
            });
        }
        if !is_label(&self.hostname, 63) {
            return Err(SpecError::BadHostname {
                hostname: self.hostname.clone(),
            });
        }
        if self.uid == 0 || self.gid == 0 {
            return Err(SpecError::RootWorkload);
        }
        if !path_is_mount_safe(&self.lower_dir) || !is_normal(&self.lower_dir) {
            return Err(SpecError::BadPath {
                path: self.lower_dir.clone(),
            });
        }
        if !self.lower_dir.is_dir() {
            return Err(SpecError::MissingLowerDir {
                path: self.lower_dir.clone(),
            });
        }
        for path in &self.toolchain_paths {
            if !path_is_mount_safe(path) || !is_normal(path) || path == Path::new("/") {
                return Err(SpecError::BadPath { path: path.clone() });
            }
            if !path.exists() {
                return Err(SpecError::MissingToolchainPath { path: path.clone() });
            }
        }
        let l = &self.limits;
        if l.memory_bytes < 16 * MIB
            || l.pids_max < 8
            || l.workspace_bytes == 0
            || l.tmp_bytes == 0
            || l.home_bytes == 0
            || l.shm_bytes == 0
            || l.cpu_millis == Some(0)
        {
            return Err(SpecError::BadLimits { limits: *l });
        }
        if let Some(egress) = &self.egress {
            validate_env(&egress.env)?;
        }
        Ok(())
    }
}

/// One command to run in a sandbox, as `/bin/sh -c <command>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub command: String,
    /// Added to (and overriding) the defaults: PATH, HOME, TMPDIR, LANG, USER, and the proxy
    /// variables when the sandbox has egress. Nothing else from the host is passed.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    pub cwd: PathBuf,
    /// Wall-clock limit; when it passes the command is stopped (SIGTERM, then SIGKILL after
    /// `kill_grace`) and the result says `timeout after N s`.
    pub timeout: Option<Duration>,
    /// How long a stopped command gets between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
}

impl ExecRequest {
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            command: command.into(),
            env: Vec::new(),
            cwd: PathBuf::from(WORKSPACE_PATH),
            timeout: None,
            kill_grace: Duration::from_secs(2),
        }
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn cwd(mut self, cwd: impl Into<PathBuf>) -> Self {
        self.cwd = cwd.into();
        self
    }

    /// # Errors
    /// A NUL byte in the command, a bad environment variable name or a relative cwd.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.command.contains('\0') {
            return Err(SpecError::BadCommand);
        }
        if !self.cwd.is_absolute() {
            return Err(SpecError::BadPath {
                path: self.cwd.clone(),
            });
        }
        validate_env(&self.env)
    }
}

fn validate_env(env: &[(String, String)]) -> Result<(), SpecError> {
    for (k, v) in env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(SpecError::BadEnv { key: k.clone() });
        }
    }
    Ok(())
}

fn is_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Absolute, and without `.` or `..` components.
fn is_normal(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Why a spec or request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("sandbox id {id:?} must be 1-48 lower-case letters, digits or '-'")]
    BadId { id: String },
    #[error("hostname {hostname:?} must be 1-63 lower-case letters, digits or '-'")]
    BadHostname { hostname: String },
    #[error("the workload uid and gid must not be 0")]
    RootWorkload,
    #[error("path {path:?} must be absolute, normalised and free of ',', ':' and '\\'")]
    BadPath { path: PathBuf },
    #[error("lower dir {path:?} is not a directory")]
    MissingLowerDir { path: PathBuf },
    #[error("toolchain path {path:?} does not exist")]
    MissingToolchainPath { path: PathBuf },
    #[error("limits are too small to run anything: {limits:?}")]
    BadLimits { limits: Limits },
    #[error("environment variable {key:?} has an invalid name or a NUL byte")]
    BadEnv { key: String },
    #[error("command contains a NUL byte")]
    BadCommand,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_validation_names_the_bad_field() {
        let dir = std::env::temp_dir();
        let ok = SandboxSpec::new("sb-1", &dir);
        assert_eq!(ok.validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut SandboxSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert!(matches!(
            bad(&|s| s.id = "Bad_Id".into()),
            SpecError::BadId { .. }
        ));
        assert!(matches!(
            bad(&|s| s.id = "../x".into()),
            SpecError::BadId { .. }
        ));
        assert!(matches!(bad(&|s| s.uid = 0), SpecError::RootWorkload));
        assert!(matches!(
            bad(&|s| s.lower_dir = "/tmp/a,b".into()),
            SpecError::BadPath { .. }
        ));
        assert!(matches!(
            bad(&|s| s.lower_dir = "/tmp/../etc".into()),
            SpecError::BadPath { .. }
        ));
        assert!(matches!(
            bad(&|s| s.lower_dir = "rel".into()),
            SpecError::BadPath { .. }
        ));
        assert!(matches!(
            bad(&|s| s.toolchain_paths = vec!["/".into()]),
            SpecError::BadPath { .. }
        ));
        assert!(matches!(
            bad(&|s| s.limits.pids_max = 1),
            SpecError::BadLimits { .. }
        ));
    }

    #[test]
    fn request_validation() {
        assert!(ExecRequest::new("true").validate().is_ok());
        assert!(ExecRequest::new("true").env("A=B", "x").validate().is_err());
        assert!(ExecRequest::new("a\0b").validate().is_err());
        assert!(ExecRequest::new("true").cwd("rel").validate().is_err());
    }
}
