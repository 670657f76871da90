//! The sandbox's cgroups: `<parent>/<sandbox id>` in each hierarchy (v1: one directory per
//! controller; v2: one directory), limits, usage, kill and removal.

use crate::Usage;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where this host's cgroup controllers live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Layout {
    /// cgroup v1: each controller mounted separately (possibly co-mounted, e.g. `cpu,cpuacct`).
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
        cpuacct: Option<PathBuf>,
    },
    /// cgroup v2: the unified hierarchy's mount point.
    V2 { root: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup controller {controller} is not available")]
    MissingController { controller: &'static str },
    #[error("cgroup file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cgroup {path} still has processes after {waited_ms} ms")]
    StillPopulated { path: PathBuf, waited_ms: u128 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

const V2_MARKER: &str = "/sys/fs/cgroup/cgroup.controllers";
const REQUIRED: [&str; 3] = ["memory", "pids", "cpu"];
/// The CFS period: the kernel's default for a new cgroup, so it is never written on v1.
const CPU_PERIOD_US: u64 = 100_000;

/// Finds the cgroup layout: v2 when `/sys/fs/cgroup/cgroup.controllers` exists, else the v1
/// controller mounts listed in `/proc/self/mountinfo`.
pub(crate) fn detect() -> Result<Layout, CgroupError> {
    if Path::new(V2_MARKER).exists() {
        let available = fs::read_to_string(V2_MARKER).map_err(io_err(Path::new(V2_MARKER)))?;
        for controller in REQUIRED {
            if !available.split_whitespace().any(|c| c == controller) {
                return Err(CgroupError::MissingController { controller });
            }
        }
        return Ok(Layout::V2 {
            root: PathBuf::from("/sys/fs/cgroup"),
        });
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err(Path::new("/proc/self/mountinfo")))?;
    let find = |controller: &'static str| {
        v1_mount(&mountinfo, controller).ok_or(CgroupError::MissingController { controller })
    };
    Ok(Layout::V1 {
        memory: find("memory")?,
        pids: find("pids")?,
        cpu: find("cpu")?,
        cpuacct: find("cpuacct").ok(),
    })
}

/// Mount point of the v1 hierarchy that carries `controller`.
fn v1_mount(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split(' ');
        if right.next()? != "cgroup" {
            return None;
        }
        let options = right.nth(1)?;
        if !options.split(',').any(|o| o == controller) {
            return None;
        }
        left.split(' ')
            .nth(4)
            .map(|p| PathBuf::from(unescape_mountinfo(p)))
    })
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Limits written to the cgroup.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CgroupLimits {
    pub memory_bytes: u64,
    pub pids_max: u64,
    /// CPU bandwidth in thousandths of a core; `None` leaves CPU unlimited.
    pub cpu_millis: Option<u64>,
}

/// One sandbox's cgroup directories.
#[derive(Debug, Clone)]
pub(crate) struct Cgroup {
    layout: Layout,
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
    cpuacct: Option<PathBuf>,
}

impl Cgroup {
    /// The (possibly not yet existing) cgroup of sandbox `id` under `parent`.
    pub(crate) fn at(layout: &Layout, parent: &str, id: &str) -> Self {
        match layout {
            Layout::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
            } => Self {
                layout: layout.clone(),
                memory: memory.join(parent).join(id),
                pids: pids.join(parent).join(id),
                cpu: cpu.join(parent).join(id),
                cpuacct: cpuacct.as_ref().map(|p| p.join(parent).join(id)),
            },
            Layout::V2 { root } => {
                let dir = root.join(parent).join(id);
                Self {
                    layout: layout.clone(),
                    memory: dir.clone(),
                    pids: dir.clone(),
                    cpu: dir.clone(),
                    cpuacct: Some(dir),
                }
            }
        }
    }

    /// Every distinct directory of this cgroup (one on v2).
    pub(crate) fn dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = vec![&self.memory, &self.pids, &self.cpu];
        if let Some(acct) = &self.cpuacct {
            dirs.push(acct);
        }
        let mut unique: Vec<&Path> = Vec::with_capacity(dirs.len());
        for d in dirs {
            if !unique.contains(&d) {
                unique.push(d);
            }
        }
        unique
    }

    /// The `cgroup.procs` files a process writes its pid into to join this cgroup.
    #[cfg(test)]
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// The parent directories (one per hierarchy), without creating them.
    pub(crate) fn parent_paths(layout: &Layout, parent: &str) -> Vec<PathBuf> {
        Self::at(layout, parent, "x")
            .dirs()
            .into_iter()
            .map(|d| d.parent().expect("cgroup dir has a parent").to_path_buf())
            .collect()
    }

    /// Creates the parent directories (one per hierarchy; on v2 with the controllers enabled
    /// for its children) and returns them. Cheap when they exist.
    pub(crate) fn parent_dirs(layout: &Layout, parent: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let dirs = Self::parent_paths(layout, parent);
        for dir in &dirs {
            if !dir.is_dir() {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
        }
        if let Layout::V2 { root } = layout {
            // Controllers must be enabled on every level above the sandbox's directory.
            for dir in [root.as_path(), dirs[0].as_path()] {
                let file = dir.join("cgroup.subtree_control");
                let current = fs::read_to_string(&file).unwrap_or_default();
                let missing: Vec<String> = REQUIRED
                    .iter()
                    .filter(|c| !current.split_whitespace().any(|x| x == **c))
                    .map(|c| format!("+{c}"))
                    .collect();
                if !missing.is_empty() {
                    fs::write(&file, missing.join(" ")).map_err(io_err(&file))?;
                }
            }
        }
        Ok(dirs)
    }

    /// Creates this cgroup's directories (the parents must exist), without limits: a spare's
    /// cgroup, whose limits are written when it becomes a sandbox's (`write_limits`).
    pub(crate) fn make_dirs(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            fs::create_dir(dir).map_err(io_err(dir))?;
        }
        Ok(())
    }

    /// Renames the cgroup to `name` within its parent, where the kernel allows it (cgroup v1;
    /// its processes stay in it). Returns `false` on v2, which has no rename: the cgroup then
    /// keeps its name. On an error the directories renamed so far keep their new name and this
    /// value says where each one is.
    pub(crate) fn rename(&mut self, name: &str) -> Result<bool, CgroupError> {
        if matches!(self.layout, Layout::V2 { .. }) {
            return Ok(false);
        }
        let olds: Vec<PathBuf> = self.dirs().into_iter().map(Path::to_path_buf).collect();
        for old in olds {
            let new = old.with_file_name(name);
            fs::rename(&old, &new).map_err(io_err(&old))?;
            for field in [&mut self.memory, &mut self.pids, &mut self.cpu] {
                if *field == old {
                    *field = new.clone();
                }
            }
            if let Some(acct) = self.cpuacct.as_mut().filter(|a| **a == old) {
                *acct = new.clone();
            }
        }
        Ok(true)
    }

    fn write(&self, dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = dir.join(file);
        fs::write(&path, value).map_err(io_err(&path))
    }

    /// Writes the memory and process limits (on a spare's cgroup: when it becomes a sandbox's,
    /// before any command).
    pub(crate) fn write_memory_pids(&self, limits: CgroupLimits) -> Result<(), CgroupError> {
        let mem = limits.memory_bytes.to_string();
        match &self.layout {
            Layout::V1 { .. } => {
                self.write(&self.memory, "memory.limit_in_bytes", &mem)?;
                // With swap accounting, also cap memory+swap so the limit cannot be dodged by
                // swapping; the file is absent when swap accounting is off.
                if self.memory.join("memory.memsw.limit_in_bytes").exists() {
                    self.write(&self.memory, "memory.memsw.limit_in_bytes", &mem)?;
                }
            }
            Layout::V2 { .. } => {
                self.write(&self.memory, "memory.max", &mem)?;
                if self.memory.join("memory.swap.max").exists() {
                    self.write(&self.memory, "memory.swap.max", "0")?;
                }
            }
        }
        self.write(&self.pids, "pids.max", &limits.pids_max.to_string())
    }

    /// Writes the CPU bandwidth (`None`: unlimited). A new cgroup's period is the kernel's
    /// default, 100 ms (CPU_PERIOD_US): on v1 only the quota is written (each write recomputes
    /// the bandwidth of the whole task-group tree, so a spare's is written ahead of time).
    pub(crate) fn write_cpu(&self, cpu_millis: Option<u64>) -> Result<(), CgroupError> {
        let quota = cpu_millis.map(|millis| (millis * CPU_PERIOD_US / 1000).max(1000));
        match (&self.layout, quota) {
            (Layout::V1 { .. }, Some(q)) => {
                self.write(&self.cpu, "cpu.cfs_quota_us", &q.to_string())
            }
            (Layout::V1 { .. }, None) => self.write(&self.cpu, "cpu.cfs_quota_us", "-1"),
            (Layout::V2 { .. }, Some(q)) => {
                self.write(&self.cpu, "cpu.max", &format!("{q} {CPU_PERIOD_US}"))
            }
            (Layout::V2 { .. }, None) => {
                self.write(&self.cpu, "cpu.max", &format!("max {CPU_PERIOD_US}"))
            }
        }
    }

    fn read_u64(path: &Path) -> Result<u64, CgroupError> {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        let text = text.trim();
        if text == "max" {
            return Ok(u64::MAX);
        }
        text.parse().map_err(|_| CgroupError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a number: {text:?}"),
            ),
        })
    }

    /// A `key value` counter from a flat-keyed file such as `memory.events`.
    fn read_key(path: &Path, key: &str) -> Option<u64> {
        let text = fs::read_to_string(path).ok()?;
        text.lines().find_map(|line| {
            let (k, v) = line.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// How many times the kernel's OOM killer killed a process of this cgroup.
    pub(crate) fn oom_kills(&self) -> u64 {
        match self.layout {
            Layout::V1 { .. } => {
                Self::read_key(&self.memory.join("memory.oom_control"), "oom_kill")
            }
            Layout::V2 { .. } => Self::read_key(&self.memory.join("memory.events"), "oom_kill"),
        }
        .unwrap_or(0)
    }

    /// How many times a fork failed because of `pids.max`.
    pub(crate) fn pids_limit_hits(&self) -> u64 {
        Self::read_key(&self.pids.join("pids.events"), "max").unwrap_or(0)
    }

    pub(crate) fn usage(&self) -> Result<Usage, CgroupError> {
        let (memory_bytes, memory_peak_bytes, cpu_ns) = match self.layout {
            Layout::V1 { .. } => (
                Self::read_u64(&self.memory.join("memory.usage_in_bytes"))?,
                Self::read_u64(&self.memory.join("memory.max_usage_in_bytes")).ok(),
                self.cpuacct
                    .as_ref()
                    .and_then(|d| Self::read_u64(&d.join("cpuacct.usage")).ok()),
            ),
            Layout::V2 { .. } => (
                Self::read_u64(&self.memory.join("memory.current"))?,
                Self::read_u64(&self.memory.join("memory.peak")).ok(),
                Self::read_key(&self.cpu.join("cpu.stat"), "usage_usec").map(|us| us * 1000),
            ),
        };
        Ok(Usage {
            memory_bytes,
            memory_peak_bytes,
            pids: Self::read_u64(&self.pids.join("pids.current"))?,
            cpu_ns,
            oom_kills: self.oom_kills(),
        })
    }

    /// Pids of every process in the cgroup (empty when the cgroup does not exist).
    pub(crate) fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in self.dirs() {
            if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs every process of the cgroup until it is empty or `timeout` passes.
    pub(crate) fn kill_all(&self, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let kill_file = self.pids.join("cgroup.kill");
        if matches!(self.layout, Layout::V2 { .. }) && kill_file.exists() {
            let _ = fs::write(&kill_file, "1");
        }
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(CgroupError::StillPopulated {
                    path: self.pids.clone(),
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            for pid in pids {
                // SAFETY: kill(2) with a pid from the cgroup; a pid that already exited gives ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Removes the directories, retrying while the kernel still counts exiting processes.
    pub(crate) fn remove(&self, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        for dir in self.dirs() {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < timeout =>
                    {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    Err(source) => {
                        return Err(CgroupError::Io {
                            path: dir.to_path_buf(),
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

/// Names of the sandbox cgroups that exist under `parent`, in any hierarchy.
pub(crate) fn list(layout: &Layout, parent: &str) -> Vec<String> {
    let roots: Vec<PathBuf> = match layout {
        Layout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
        } => {
            let mut v = vec![memory.clone(), pids.clone(), cpu.clone()];
            v.extend(cpuacct.clone());
            v
        }
        Layout::V2 { root } => vec![root.clone()],
    };
    let mut names = Vec::new();
    for root in roots {
        if let Ok(entries) = fs::read_dir(root.join(parent)) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
36 24 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
37 24 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
38 24 0:33 / /sys/fs/cgroup/my\\040pids rw,nosuid - cgroup cgroup rw,pids
";

    #[test]
    fn finds_v1_controller_mounts() {
        assert_eq!(
            v1_mount(MOUNTINFO, "memory"),
            Some("/sys/fs/cgroup/memory".into())
        );
        assert_eq!(
            v1_mount(MOUNTINFO, "cpu"),
            Some("/sys/fs/cgroup/cpu,cpuacct".into())
        );
        assert_eq!(
            v1_mount(MOUNTINFO, "cpuacct"),
            Some("/sys/fs/cgroup/cpu,cpuacct".into())
        );
        assert_eq!(
            v1_mount(MOUNTINFO, "pids"),
            Some("/sys/fs/cgroup/my pids".into())
        );
        assert_eq!(v1_mount(MOUNTINFO, "freezer"), None);
    }

    /// Mount point of a cgroup v2 hierarchy on this host, if any.
    fn v2_mount() -> Option<PathBuf> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        mountinfo.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split(' ').next()? == "cgroup2")
                .then(|| {
                    left.split(' ')
                        .nth(4)
                        .map(|p| PathBuf::from(unescape_mountinfo(p)))
                })
                .flatten()
        })
    }

    /// The v2 paths for real, on whatever v2 hierarchy the host has (on this hybrid CI host,
    /// /sys/fs/cgroup/unified, without controllers: limits and usage cannot be tested there,
    /// membership, kill and removal can).
    #[test]
    fn v2_cgroup_takes_a_process_kills_it_and_is_removed() {
        let Some(root) = v2_mount() else {
            eprintln!("SKIPPED: no cgroup v2 hierarchy mounted");
            return;
        };
        if !nix::unistd::Uid::effective().is_root() {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but this test needs root");
            }
            eprintln!("SKIPPED: needs root");
            return;
        }
        let layout = Layout::V2 { root: root.clone() };
        let parent = format!("slipway-v2test-{}", std::process::id());
        let cg = Cgroup::at(&layout, &parent, "sb1");
        assert_eq!(cg.dirs(), vec![root.join(&parent).join("sb1").as_path()]);
        fs::create_dir_all(cg.dirs()[0]).unwrap();

        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        for file in cg.procs_files() {
            fs::write(file, pid.to_string()).unwrap();
        }
        assert_eq!(cg.pids(), vec![pid]);
        let in_cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            in_cgroup.contains(&format!("0::/{parent}/sb1")),
            "{in_cgroup}"
        );
        assert_eq!(list(&layout, &parent), vec!["sb1".to_string()]);

        // cgroup.kill where the kernel has it (5.14+), per pid otherwise.
        cg.kill_all(Duration::from_secs(5)).unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(cg.pids().is_empty());
        cg.remove(Duration::from_secs(5)).unwrap();
        assert!(!cg.dirs()[0].exists());
        assert!(list(&layout, &parent).is_empty());
        // Removing again is fine (already gone).
        cg.remove(Duration::from_secs(1)).unwrap();
        fs::remove_dir(root.join(&parent)).unwrap();
    }

    #[test]
    fn co_mounted_controllers_share_one_directory() {
        let layout = Layout::V1 {
            memory: "/cg/memory".into(),
            pids: "/cg/pids".into(),
            cpu: "/cg/cpu,cpuacct".into(),
            cpuacct: Some("/cg/cpu,cpuacct".into()),
        };
        let cg = Cgroup::at(&layout, "slipway", "sb1");
        assert_eq!(cg.dirs().len(), 3);
        let cg = Cgroup::at(&Layout::V2 { root: "/cg".into() }, "slipway", "sb1");
        assert_eq!(
            cg.procs_files(),
            vec![PathBuf::from("/cg/slipway/sb1/cgroup.procs")]
        );
    }
}
