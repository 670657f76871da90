//! Whether this host can run sandboxes, and if not, exactly what is missing.

use crate::privileged::cgroup::{self, CgroupError};
use std::fmt;

/// One missing facility.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// The seccomp filter is written for x86_64 only.
    Architecture { arch: &'static str },
    /// Building sandboxes needs root (CAP_SYS_ADMIN and friends in the initial namespaces).
    Root,
    /// A namespace kind cannot be created.
    Namespace { kind: &'static str, error: String },
    /// A cgroup controller is not available.
    CgroupController { controller: String },
    /// overlayfs is not available.
    Overlayfs,
    /// The kernel has no seccomp filter support.
    Seccomp,
    /// pidfd_open(2) (Linux 5.3) or openat2(2) (Linux 5.6) is missing.
    Kernel { error: String },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Architecture { arch } => write!(
                f,
                "architecture {arch} is not supported: the sandbox's seccomp filter is x86_64 only"
            ),
            Missing::Root => f.write_str(
                "not running as root: run `slipway serve` as root (sandboxes need CAP_SYS_ADMIN \
                 to create namespaces, mounts and cgroups)",
            ),
            Missing::Namespace { kind, error } => write!(
                f,
                "cannot create a {kind} namespace ({error}): enable CONFIG_{}_NS in the kernel, \
                 and when running inside a container give it CAP_SYS_ADMIN and an unconfined \
                 seccomp/AppArmor profile",
                kind.to_ascii_uppercase()
            ),
            Missing::CgroupController { controller } => write!(
                f,
                "cgroup controller {controller} is not available: mount it (cgroup v1: \
                 /sys/fs/cgroup/{controller}) or enable it in cgroup v2's cgroup.subtree_control"
            ),
            Missing::Overlayfs => f.write_str(
                "overlayfs is not available: load it with `modprobe overlay` (CONFIG_OVERLAY_FS)",
            ),
            Missing::Seccomp => {
                f.write_str("seccomp filters are not available: enable CONFIG_SECCOMP_FILTER")
            }
            Missing::Kernel { error } => {
                write!(
                    f,
                    "the kernel is too old ({error}): Linux 5.6 or newer is needed"
                )
            }
        }
    }
}

/// Sandboxes are unavailable on this host; running workloads unsandboxed is never an option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SupportError {
    pub missing: Vec<Missing>,
}

impl fmt::Display for SupportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sandboxes are unavailable on this host:")?;
        for m in &self.missing {
            write!(f, "\n  - {m}")?;
        }
        Ok(())
    }
}

const NAMESPACES: [(&str, nix::sched::CloneFlags); 6] = [
    ("mount", nix::sched::CloneFlags::CLONE_NEWNS),
    ("pid", nix::sched::CloneFlags::CLONE_NEWPID),
    ("net", nix::sched::CloneFlags::CLONE_NEWNET),
    ("ipc", nix::sched::CloneFlags::CLONE_NEWIPC),
    ("uts", nix::sched::CloneFlags::CLONE_NEWUTS),
    ("cgroup", nix::sched::CloneFlags::CLONE_NEWCGROUP),
];

/// Tries each namespace kind in a throwaway thread (unsharing only affects that thread).
fn probe_namespaces() -> Vec<Missing> {
    std::thread::spawn(|| {
        NAMESPACES
            .iter()
            .filter_map(|(kind, flag)| {
                nix::sched::unshare(*flag)
                    .err()
                    .map(|e| Missing::Namespace {
                        kind,
                        error: e.to_string(),
                    })
            })
            .collect()
    })
    .join()
    .unwrap_or_else(|_| {
        vec![Missing::Namespace {
            kind: "mount",
            error: "probe panicked".into(),
        }]
    })
}

/// Checks everything the Linux driver needs.
///
/// # Errors
/// Every missing facility, each with how to enable it.
pub fn check_support() -> Result<(), SupportError> {
    let mut missing = Vec::new();
    if std::env::consts::ARCH != "x86_64" {
        missing.push(Missing::Architecture {
            arch: std::env::consts::ARCH,
        });
    }
    if !nix::unistd::geteuid().is_root() {
        missing.push(Missing::Root);
    } else {
        missing.extend(probe_namespaces());
    }
    match cgroup::detect() {
        Ok(_) => {}
        Err(CgroupError::MissingController { controller }) => {
            missing.push(Missing::CgroupController {
                controller: controller.to_string(),
            })
        }
        Err(e) => missing.push(Missing::CgroupController {
            controller: e.to_string(),
        }),
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        missing.push(Missing::Overlayfs);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !status.lines().any(|l| l.starts_with("Seccomp:")) {
        missing.push(Missing::Seccomp);
    }
    if let Err(e) = crate::process::pidfd_open(std::process::id() as i32) {
        missing.push(Missing::Kernel {
            error: format!("pidfd_open: {e}"),
        });
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SupportError { missing })
    }
}
