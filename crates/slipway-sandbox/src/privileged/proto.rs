//! What the driver tells the helper process. Sent as JSON on the helper's stdin so that nothing
//! (environment values included) shows up in the host's process list.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything `__sandbox-init` needs to build one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InitConfig {
    /// The pid the helper must see as its parent; if it differs, the driver is already gone.
    pub parent_pid: i32,
    /// `cgroup.procs` files the helper writes its own pid into before unsharing anything.
    pub cgroup_procs: Vec<PathBuf>,
    /// Empty host directory that becomes the sandbox root (a tmpfs is mounted on it in the
    /// sandbox's private mount namespace only).
    pub root_dir: PathBuf,
    /// Cached read-only extraction of the snapshot: the overlay's lower layer.
    pub lower_dir: PathBuf,
    /// The driver's ready-made /etc for this uid, gid and hostname, bound read-only.
    pub etc_dir: PathBuf,
    /// Extra host directories bound read-only at the same path.
    pub toolchain_paths: Vec<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    pub workspace_bytes: u64,
    pub tmp_bytes: u64,
    pub home_bytes: u64,
    pub shm_bytes: u64,
}

/// Everything `__sandbox-exec` needs to start one command inside a running sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ExecConfig {
    pub parent_pid: i32,
    /// Host pid of the sandbox's init; its `/proc/<pid>/ns/*` are the namespaces to join.
    pub init_pid: i32,
    /// Device and inode of init's mount namespace when the sandbox was created; guards against
    /// the pid having been reused by an unrelated process.
    pub mnt_ns: (u64, u64),
    pub cgroup_procs: Vec<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    pub cwd: PathBuf,
    pub argv: Vec<String>,
    /// `KEY=value` strings, exactly the workload's environment.
    pub env: Vec<String>,
}

/// Lines the helpers write on their status channel.
pub(crate) const STATUS_PID: &str = "pid ";
pub(crate) const STATUS_READY: &str = "ready";
pub(crate) const STATUS_ERROR: &str = "error ";

/// The exec helper's status channel is always this descriptor.
pub(crate) const EXEC_STATUS_FD: i32 = 3;

/// Parsed status output of a helper.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Status {
    pub pid: Option<i32>,
    pub ready: bool,
    pub error: Option<String>,
}

pub(crate) fn parse_status(text: &str) -> Status {
    let mut status = Status::default();
    for line in text.lines() {
        if let Some(pid) = line.strip_prefix(STATUS_PID) {
            status.pid = pid.trim().parse().ok();
        } else if line == STATUS_READY {
            status.ready = true;
        } else if let Some(msg) = line.strip_prefix(STATUS_ERROR) {
            // Keep the first error: later ones are usually consequences.
            status.error.get_or_insert_with(|| msg.to_string());
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse_in_any_order() {
        let s = parse_status("ready\npid 42\n");
        assert_eq!(
            s,
            Status {
                pid: Some(42),
                ready: true,
                error: None
            }
        );
        let s = parse_status("pid 7\nerror mount /proc: EPERM\nerror later\n");
        assert_eq!(s.pid, Some(7));
        assert!(!s.ready);
        assert_eq!(s.error.as_deref(), Some("mount /proc: EPERM"));
        assert_eq!(parse_status(""), Status::default());
    }
}
