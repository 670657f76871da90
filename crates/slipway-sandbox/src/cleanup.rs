//! Start-up cleanup of sandboxes left behind by a slipway process that died.
//!
//! When slipway dies its helpers die with it (parent-death signal), and with init the whole
//! pid namespace and every mount of the sandbox. What can remain is host-side bookkeeping: the
//! cgroup directories and the per-sandbox state directory, plus, if something went very wrong,
//! processes in the cgroup. This removes all three.

use crate::driver::{
    remove_state_dir, LinuxDriver, ETC_TEMPLATE_PREFIX, FREE_DIR_PREFIX, INIT_RECORD, SPARE_PREFIX,
};
use crate::privileged::cgroup::{self, Cgroup};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

/// What `cleanup_leftovers` found and removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Ids of the sandboxes whose leftovers were removed.
    pub sandboxes: Vec<String>,
    /// Processes killed (surviving inits and anything left in the cgroups).
    pub killed_processes: usize,
    /// Leftovers that could not be removed, with the reason.
    pub errors: Vec<String>,
}

fn looks_like_id(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub(crate) fn cleanup_leftovers(driver: &LinuxDriver) -> CleanupReport {
    let config = driver.config();
    let mut ids = cgroup::list(driver.layout(), &config.cgroup_parent);
    if let Ok(entries) = fs::read_dir(&config.state_dir) {
        ids.extend(
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok()),
        );
    }
    ids.sort();
    ids.dedup();

    let mut report = CleanupReport::default();
    // /etc templates of earlier drivers: plain directories, bound only into their sandboxes.
    // Their free state directories too.
    if let Ok(entries) = fs::read_dir(&config.state_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_template =
                name.starts_with(ETC_TEMPLATE_PREFIX) && !name.starts_with(driver.etc_prefix());
            // Free state directories kept by an earlier driver: empty, so `rmdir` is enough.
            if name.starts_with(FREE_DIR_PREFIX) && !name.starts_with(driver.free_dir_prefix()) {
                if let Err(e) = fs::remove_dir(entry.path()) {
                    report.errors.push(format!("removing {name}: {e}"));
                }
                continue;
            }
            if stale_template {
                if let Err(e) = fs::remove_dir_all(entry.path()) {
                    report.errors.push(format!("removing {name}: {e}"));
                }
            }
        }
    }
    // Spares (pre-built sandboxes not handed out yet) of drivers whose process is gone: their
    // cgroup and state directory, under a `.spare-<pid>-…` name. A live process's spares are
    // its own business (they die with it).
    for name in ids.iter().filter(|n| is_dead_spare(driver, n)) {
        let cg = Cgroup::at(driver.layout(), &config.cgroup_parent, name);
        report.killed_processes += cg.pids().len();
        let timeout = Duration::from_secs(5);
        if let Err(e) = cg.kill_all(timeout).and_then(|()| cg.remove(timeout)) {
            report.errors.push(format!("spare {name}: {e}"));
            continue;
        }
        if let Err((path, e)) = remove_state_dir(&config.state_dir.join(name)) {
            report
                .errors
                .push(format!("spare {name}: removing {}: {e}", path.display()));
        }
    }
    for id in ids.into_iter().filter(|id| looks_like_id(id)) {
        let state_dir = config.state_dir.join(&id);
        // An init that somehow survived its helper: kill it, but only if the pid still names
        // that sandbox's init (same mount namespace as recorded).
        if let Ok(record) = fs::read_to_string(state_dir.join(INIT_RECORD)) {
            let fields: Vec<u64> = record
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            if let [pid, dev, ino] = fields[..] {
                if let Ok(meta) = fs::metadata(format!("/proc/{pid}/ns/mnt")) {
                    if (meta.dev(), meta.ino()) == (dev, ino) {
                        // SAFETY: kill(2) on a pid just verified to be the sandbox's init.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        report.killed_processes += 1;
                    }
                }
            }
        }
        let cg = Cgroup::at(driver.layout(), &config.cgroup_parent, &id);
        report.killed_processes += cg.pids().len();
        let timeout = Duration::from_secs(5);
        if let Err(e) = cg.kill_all(timeout).and_then(|()| cg.remove(timeout)) {
            report.errors.push(format!("sandbox {id}: {e}"));
            continue;
        }
        if let Err((path, e)) = remove_state_dir(&state_dir) {
            report
                .errors
                .push(format!("sandbox {id}: removing {}: {e}", path.display()));
            continue;
        }
        tracing::info!(sandbox = %id, "removed leftovers of a dead sandbox");
        report.sandboxes.push(id);
    }
    report
}

/// A spare's name (`.spare-<pid>-<random>-<n>`) from another driver whose process is gone.
fn is_dead_spare(driver: &LinuxDriver, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(SPARE_PREFIX) else {
        return false;
    };
    if name.starts_with(driver.spare_prefix()) {
        return false;
    }
    match rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) {
        // SAFETY: kill(2) with signal 0 only checks whether the process exists.
        Some(pid) if pid > 0 => unsafe { libc::kill(pid, 0) != 0 },
        _ => true,
    }
}
