//! The sandbox's filesystem view, built by its init before `pivot_root`.

use super::proto::InitConfig;
use super::{Step, StepError};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{self, Gid, Uid};
use std::fs::{self, DirBuilder};
use std::os::unix::fs::{symlink, DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Top-level host directories that hold the toolchain. On merged-/usr systems most are symlinks
/// into /usr and are recreated as the same symlinks.
const TOOLCHAIN_TOP: [&str; 7] = ["usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32"];

/// Files copied from the host's /etc. Nothing secret (no shadow, gshadow, ssh, sudoers, keys,
/// package-manager credentials); passwd, group, hosts and hostname are written fresh.
const ETC_FILES: [&str; 17] = [
    "nsswitch.conf",
    "resolv.conf",
    "host.conf",
    "gai.conf",
    "ld.so.cache",
    "ld.so.conf",
    "localtime",
    "timezone",
    "mime.types",
    "protocols",
    "services",
    "networks",
    "os-release",
    "debian_version",
    "shells",
    "magic",
    "magic.mime",
];

/// Directories of /etc bound read-only. `/etc/ssl` itself is not bound: it holds `private/`.
const ETC_DIRS: [&str; 4] = [
    "ssl/certs",
    "alternatives",
    "ld.so.conf.d",
    "ca-certificates",
];

/// Prefixes of /etc directories bound read-only (Python reads `/etc/python3.X/sitecustomize.py`).
const ETC_DIR_PREFIXES: [&str; 1] = ["python3"];

/// /proc entries hidden behind /dev/null (files) or an empty read-only tmpfs (directories),
/// as container runtimes do.
const PROC_MASKED: [&str; 9] = [
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "acpi",
    "scsi",
    "asound",
];

/// /proc entries made read-only.
const PROC_READ_ONLY: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// Host character devices recreated (same major:minor and mode) in the sandbox's /dev.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Where the workspace's overlay layers live inside the sandbox (mode 0700, root only).
pub(crate) const LAYERS_DIR: &str = "workspace/.layers";
/// The writable workspace.
pub(crate) const WORKSPACE_DIR: &str = "workspace/app";

fn mnt(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), StepError> {
    mount(source, target, fstype, flags, data)
        .step(|| format!("mount {} on {}", fstype.unwrap_or("bind"), target.display()))
}

fn tmpfs(target: &Path, flags: MsFlags, data: &str) -> Result<(), StepError> {
    mnt(
        Some(Path::new("tmpfs")),
        target,
        Some("tmpfs"),
        flags,
        Some(data),
    )
}

/// Bind `src` on `target`, then make that mount read-only, nosuid and nodev.
fn bind_ro(src: &Path, target: &Path) -> Result<(), StepError> {
    mnt(
        Some(src),
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    mnt(
        None,
        target,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None,
    )
}

fn mkdir(path: &Path, mode: u32) -> Result<(), StepError> {
    DirBuilder::new()
        .mode(mode)
        .create(path)
        .step(|| format!("mkdir {}", path.display()))
}

fn mkdir_all(path: &Path) -> Result<(), StepError> {
    DirBuilder::new()
        .mode(0o755)
        .recursive(true)
        .create(path)
        .step(|| format!("mkdir {}", path.display()))
}

fn touch(path: &Path) -> Result<(), StepError> {
    fs::File::create(path)
        .map(drop)
        .step(|| format!("create {}", path.display()))
}

/// `root` joined with an absolute in-sandbox path.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Nothing mounted from here on may propagate back to the host (`mount --make-rprivate /`).
pub(super) fn make_private() -> Result<(), StepError> {
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )
}

pub(super) fn build(cfg: &InitConfig) -> Result<(), StepError> {
    let root = cfg.root_dir.as_path();

    // A fresh, empty root.
    tmpfs(
        root,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755,size=16m,nr_inodes=16384",
    )?;

    // The view.
    toolchain(root, cfg)?;
    etc(root, cfg)?;
    dev(root, cfg)?;
    proc(root)?;
    private_dirs(root, cfg)?;
    workspace_mount_points(root)?;

    // Switch to the new root and drop every reference to the host's mount tree.
    unistd::chdir(root).step(|| format!("chdir {}", root.display()))?;
    nix::unistd::pivot_root(".", ".").step(|| "pivot_root".into())?;
    umount2(".", MntFlags::MNT_DETACH).step(|| "detach old root".into())?;
    unistd::chdir("/").step(|| "chdir /".into())?;

    // The root itself (and so /etc) is read-only from now on.
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None,
    )
}

fn toolchain(root: &Path, cfg: &InitConfig) -> Result<(), StepError> {
    for name in TOOLCHAIN_TOP {
        let host = Path::new("/").join(name);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        let target = root.join(name);
        if meta.file_type().is_symlink() {
            let dest = fs::read_link(&host).step(|| format!("readlink {}", host.display()))?;
            symlink(&dest, &target).step(|| format!("symlink {}", target.display()))?;
        } else if meta.is_dir() {
            mkdir(&target, 0o755)?;
            bind_ro(&host, &target)?;
        }
    }
    for path in &cfg.toolchain_paths {
        let target = inside(root, path);
        let meta = fs::metadata(path).step(|| format!("stat toolchain path {}", path.display()))?;
        if meta.is_dir() {
            mkdir_all(&target)?;
        } else {
            if let Some(parent) = target.parent() {
                mkdir_all(parent)?;
            }
            if !target.exists() {
                touch(&target)?;
            }
        }
        bind_ro(path, &target)?;
    }
    Ok(())
}

fn etc(root: &Path, cfg: &InitConfig) -> Result<(), StepError> {
    let etc = root.join("etc");
    mkdir(&etc, 0o755)?;
    bind_ro(&cfg.etc_dir, &etc)
}

/// Builds the sandbox's /etc in `dir` (which must not exist): fresh passwd, group, hosts and
/// hostname, plus copies of the allow-listed host files and directories. Built once per driver
/// and bound read-only into every sandbox, so provisioning does not copy files.
pub(crate) fn build_etc_template(
    dir: &Path,
    uid: u32,
    gid: u32,
    hostname: &str,
) -> std::io::Result<()> {
    let host_etc = Path::new("/etc");
    DirBuilder::new().mode(0o755).create(dir)?;
    let write = |name: &str, content: String| fs::write(dir.join(name), content);
    write(
        "passwd",
        format!(
            "root:x:0:0:root:/root:/usr/sbin/nologin\n\
             app:x:{uid}:{gid}:slipway workload:/home/app:/bin/sh\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
    )?;
    write(
        "group",
        format!("root:x:0:\ntty:x:5:\napp:x:{gid}:\nnogroup:x:65534:\n"),
    )?;
    write(
        "hosts",
        format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback {hostname}\n"),
    )?;
    write("hostname", format!("{hostname}\n"))?;

    for name in ETC_FILES {
        copy_entry(&host_etc.join(name), &dir.join(name))?;
    }
    let mut dirs: Vec<String> = ETC_DIRS.iter().map(|s| s.to_string()).collect();
    for entry in fs::read_dir(host_etc)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ETC_DIR_PREFIXES.iter().any(|p| name.starts_with(p)) {
            dirs.push(name);
        }
    }
    for name in dirs.iter().map(String::as_str).chain(["ssl/openssl.cnf"]) {
        let host = host_etc.join(name);
        let target = dir.join(name);
        if let Some(parent) = target.parent() {
            DirBuilder::new()
                .mode(0o755)
                .recursive(true)
                .create(parent)?;
        }
        copy_entry(&host, &target)?;
    }
    Ok(())
}

/// Copies a host /etc entry: directories recursively, symlinks into the read-only toolchain as
/// symlinks, any other symlink as the content it points to (so the sandbox never follows a
/// link to a host path it cannot, and must not, see). Missing entries are skipped.
fn copy_entry(host: &Path, target: &Path) -> std::io::Result<()> {
    let Ok(meta) = fs::symlink_metadata(host) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        let link = fs::read_link(host)?;
        if fs::canonicalize(host).is_ok_and(|p| p.starts_with("/usr")) {
            return symlink(&link, target);
        }
    }
    match fs::metadata(host) {
        Ok(m) if m.is_dir() => {
            DirBuilder::new().mode(m.mode() & 0o755).create(target)?;
            for entry in fs::read_dir(host)?.flatten() {
                copy_entry(&entry.path(), &target.join(entry.file_name()))?;
            }
            Ok(())
        }
        Ok(m) if m.is_file() && m.mode() & 0o004 != 0 => {
            // Only world-readable files: anything else is private to the host by intent.
            fs::copy(host, target).map(drop)
        }
        _ => Ok(()),
    }
}

fn dev(root: &Path, cfg: &InitConfig) -> Result<(), StepError> {
    let dev = root.join("dev");
    mkdir(&dev, 0o755)?;
    tmpfs(
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_STRICTATIME,
        "mode=0755,size=64k,nr_inodes=64",
    )?;
    // The same character devices as the host's (major:minor and mode), made with mknod rather
    // than bound one by one: init is root in the initial user namespace, and this tmpfs is the
    // only place in the sandbox that allows device nodes.
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        let Ok(meta) = fs::metadata(&host) else {
            continue;
        };
        if !meta.file_type().is_char_device() {
            continue;
        }
        let target = dev.join(name);
        nix::sys::stat::mknod(
            &target,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(meta.mode() & 0o777),
            meta.rdev(),
        )
        .step(|| format!("mknod {}", target.display()))?;
        // mknod applies the umask; the mode must be the host's.
        fs::set_permissions(&target, fs::Permissions::from_mode(meta.mode() & 0o777))
            .step(|| format!("chmod {}", target.display()))?;
    }
    for (name, dest) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let target = dev.join(name);
        symlink(dest, &target).step(|| format!("symlink {}", target.display()))?;
    }
    let pts = dev.join("pts");
    mkdir(&pts, 0o755)?;
    mnt(
        Some(Path::new("devpts")),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    let shm = dev.join("shm");
    mkdir(&shm, 0o755)?;
    tmpfs(
        &shm,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        &format!("mode=1777,size={}", cfg.shm_bytes),
    )
}

fn proc(root: &Path) -> Result<(), StepError> {
    let proc = root.join("proc");
    mkdir(&proc, 0o555)?;
    // This process is already pid 1 of the new pid namespace, so this /proc shows only it.
    mnt(
        Some(Path::new("proc")),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    for name in PROC_MASKED {
        let target = proc.join(name);
        let Ok(meta) = fs::symlink_metadata(&target) else {
            continue;
        };
        if meta.is_dir() {
            tmpfs(&target, MsFlags::MS_RDONLY, "size=4k,nr_inodes=1,mode=0555")?;
        } else {
            mnt(
                Some(Path::new("/dev/null")),
                &target,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        }
    }
    for name in PROC_READ_ONLY {
        let target = proc.join(name);
        if fs::symlink_metadata(&target).is_err() {
            continue;
        }
        mnt(
            Some(&target),
            &target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        mnt(
            None,
            &target,
            None,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None,
        )?;
    }
    Ok(())
}

fn private_dirs(root: &Path, cfg: &InitConfig) -> Result<(), StepError> {
    let tmp = root.join("tmp");
    mkdir(&tmp, 0o1777)?;
    tmpfs(
        &tmp,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=1777,size={}", cfg.tmp_bytes),
    )?;

    let home = root.join("home");
    mkdir(&home, 0o755)?;
    let app_home = home.join("app");
    mkdir(&app_home, 0o700)?;
    tmpfs(
        &app_home,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!(
            "mode=0700,uid={},gid={},size={}",
            cfg.uid, cfg.gid, cfg.home_bytes
        ),
    )
}

/// The workspace's mount points; the workspace itself is mounted when the sandbox is assigned
/// (`mount_workspace`), after `pivot_root` (mounting on a directory of the read-only root is
/// fine).
fn workspace_mount_points(root: &Path) -> Result<(), StepError> {
    mkdir(&root.join("workspace"), 0o755)?;
    mkdir(&root.join(LAYERS_DIR), 0o700)?;
    mkdir(&root.join(WORKSPACE_DIR), 0o755)
}

/// Mounts `/workspace/app` in the sandbox's (already pivoted) root: a tmpfs of
/// `workspace_bytes` for the upper and work dirs, and the overlay over `lower`, the driver's
/// `O_PATH` descriptor of the cached extraction, named by its `/proc/self/fd/N` link (the
/// kernel resolves it to the descriptor's directory, which lives in the host's mount tree).
pub(super) fn mount_workspace(
    lower: &std::os::fd::OwnedFd,
    workspace_bytes: u64,
    uid: u32,
    gid: u32,
) -> Result<(), StepError> {
    use std::os::fd::AsRawFd;
    let layers = Path::new("/").join(LAYERS_DIR);
    let app = Path::new("/").join(WORKSPACE_DIR);
    let lower_meta = nix::sys::stat::fstat(lower).step(|| "stat lower dir".into())?;
    if lower_meta.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(StepError::new("stat lower dir", "not a directory"));
    }
    let lower_mode = lower_meta.st_mode & 0o7777;
    // The upper layer's tmpfs size is the workspace disk quota; its inode count is bounded too,
    // so empty files cannot pin unbounded kernel memory.
    let inodes = (workspace_bytes / 1024).max(16_384);
    tmpfs(
        &layers,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=0700,size={workspace_bytes},nr_inodes={inodes}"),
    )?;
    let upper = layers.join("upper");
    let work = layers.join("work");
    mkdir(&upper, 0o755)?;
    mkdir(&work, 0o700)?;
    // The overlay's root directory takes its owner and mode from the upper directory.
    unistd::chown(&upper, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .step(|| "chown upper layer".into())?;
    fs::set_permissions(&upper, fs::Permissions::from_mode(lower_mode))
        .step(|| "chmod upper layer".into())?;
    let data = format!(
        "lowerdir=/proc/self/fd/{},upperdir={},workdir={}",
        lower.as_raw_fd(),
        upper.display(),
        work.display()
    );
    mnt(
        Some(Path::new("overlay")),
        &app,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(&data),
    )
}
