//! Every privileged step of the sandbox, in one place.
//!
//! Nothing outside this module calls `unshare`, `setns`, `mount`, `pivot_root`, changes uids or
//! capabilities, installs seccomp filters or writes cgroup files. The steps run in a small,
//! single-threaded helper process (the `slipway` binary re-executed with a hidden subcommand),
//! never in the multi-threaded async server: `docs/sandbox.md` lists them in order and explains
//! why. The helper has two entry points:
//!
//! - `__sandbox-init` (`init_main`): joins the sandbox's cgroups, unshares the namespaces, forks
//!   the sandbox's pid 1, builds its root (`rootfs`), brings `lo` up and then reaps zombies until
//!   it is killed.
//! - `__sandbox-exec` (`exec_main`): joins the cgroups and namespaces of a running sandbox,
//!   forks into its pid namespace, drops every privilege and `execve`s the workload.

pub(crate) mod cgroup;
pub(crate) mod netns;
pub(crate) mod proto;
mod rootfs;
mod seccomp;

use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, FdFlag, OFlag};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::prctl;
use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::sys::stat::{fstat, Mode};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{self, fork, ForkResult, Gid, Pid, Uid};
use std::ffi::CString;
use std::fmt;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use proto::{ExecConfig, InitConfig, EXEC_STATUS_FD};

/// The workspace and its layers, relative to the sandbox root.
pub(crate) use rootfs::{
    build_etc_template, LAYERS_DIR as LAYERS_REL, WORKSPACE_DIR as WORKSPACE_REL,
};

/// Hidden subcommand that builds a sandbox and becomes (the parent of) its init.
pub const INIT_SUBCOMMAND: &str = "__sandbox-init";
/// Hidden subcommand that runs one workload command inside a running sandbox.
pub const EXEC_SUBCOMMAND: &str = "__sandbox-exec";

/// A privileged step that failed, named so the driver's error says which one.
#[derive(Debug)]
pub(crate) struct StepError {
    step: String,
    detail: String,
}

impl StepError {
    pub(crate) fn new(step: impl Into<String>, detail: impl fmt::Display) -> Self {
        Self {
            step: step.into(),
            detail: detail.to_string(),
        }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.detail)
    }
}

/// Names the step a fallible call belongs to.
pub(crate) trait Step<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, StepError>;
}

impl<T, E: fmt::Display> Step<T> for Result<T, E> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, StepError> {
        self.map_err(|e| StepError::new(what(), e))
    }
}

/// Entry point of the hidden helper subcommands. `args[0]` is the subcommand.
///
/// Call it first thing in `main`, before any thread or async runtime exists: the helper relies
/// on being single-threaded (`setns` into a mount namespace and `fork` require it).
pub fn helper_main(args: &[String]) -> ! {
    let code = match args.first().map(String::as_str) {
        Some(INIT_SUBCOMMAND) => init_main(),
        Some(EXEC_SUBCOMMAND) => exec_main(),
        other => {
            eprintln!("slipway sandbox helper: unknown subcommand {other:?}");
            2
        }
    };
    std::process::exit(code)
}

/// Whether `subcommand` is one of the hidden helper subcommands.
pub fn is_helper_subcommand(subcommand: &str) -> bool {
    subcommand == INIT_SUBCOMMAND || subcommand == EXEC_SUBCOMMAND
}

fn write_status(fd: BorrowedFd<'_>, line: &str) {
    // Best effort: if the driver is gone there is nobody left to tell.
    let mut buf = line.as_bytes();
    while !buf.is_empty() {
        match unistd::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
    }
}

/// Closes every descriptor from `first` up. The helpers inherit whatever the driver's process
/// had open without close-on-exec (slipway does not control everything it inherits); none of it
/// may reach the sandbox.
fn close_fds_from(first: u32) -> Result<(), StepError> {
    // SAFETY: close_range only closes descriptors; nothing in this single-threaded helper
    // holds one of them at this point.
    if unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) } != 0 {
        return Err(StepError::new("close inherited descriptors", Errno::last()));
    }
    Ok(())
}

fn read_config<T: serde::de::DeserializeOwned>() -> Result<T, StepError> {
    let mut raw = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut raw)
        .step(|| "read config from stdin".into())?;
    serde_json::from_slice(&raw).step(|| "parse config".into())
}

fn check_parent(expected: i32) -> Result<(), StepError> {
    // PR_SET_PDEATHSIG only helps if the parent was still alive when it was set.
    if unistd::getppid().as_raw() != expected {
        return Err(StepError::new(
            "check parent",
            "the driver exited before the helper started",
        ));
    }
    Ok(())
}

fn write_file(path: &str, content: &str) -> Result<(), StepError> {
    std::fs::write(path, content).step(|| format!("write {path}"))
}

/// Init and the helpers should never be the OOM killer's choice: the workload should. Lowering
/// the score needs CAP_SYS_RESOURCE, which some hosts withhold even from root; then init and
/// the helpers keep the driver's score and still lose to the workload on size.
fn protect_from_oom() {
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
}

fn join_cgroups(procs: &[std::path::PathBuf]) -> Result<(), StepError> {
    let pid = unistd::getpid().to_string();
    for file in procs {
        std::fs::write(file, &pid).step(|| format!("join cgroup {}", file.display()))?;
    }
    Ok(())
}

fn stdio_to_null(fds: &[i32]) {
    if let Ok(null) = open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty()) {
        for &fd in fds {
            // SAFETY: dup2 onto a standard descriptor number; the old one is closed atomically.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// Waits for `child` and returns the exit code to mirror it with.
fn wait_child(child: Pid) -> Result<WaitStatus, StepError> {
    loop {
        match waitpid(child, None) {
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return Ok(status),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(StepError::new("wait for child", e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// __sandbox-init

fn init_main() -> i32 {
    // SAFETY: fd 1 is the status pipe the driver gave us; it outlives this function.
    let status = unsafe { BorrowedFd::borrow_raw(1) };
    match init_outer(status) {
        Ok(code) => code,
        Err(e) => {
            write_status(status, &format!("{}{e}\n", proto::STATUS_ERROR));
            1
        }
    }
}

/// Steps 1–5 of `docs/sandbox.md`, in the host's namespaces.
fn init_outer(status: BorrowedFd<'_>) -> Result<i32, StepError> {
    prctl::set_pdeathsig(Signal::SIGKILL).step(|| "set parent-death signal".into())?;
    close_fds_from(3)?;
    let cfg: InitConfig = read_config()?;
    check_parent(cfg.parent_pid)?;
    protect_from_oom();
    // Join the cgroups before anything else so no process of the sandbox ever runs unlimited.
    join_cgroups(&cfg.cgroup_procs)?;
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .step(|| "unshare namespaces".into())?;
    // Init learns that this process died (and with it the driver) by this pipe hanging up.
    let (alive_r, alive_w) = unistd::pipe2(OFlag::O_CLOEXEC).step(|| "create pipe".into())?;
    // SAFETY: this helper process is single-threaded, so the child may allocate freely.
    match unsafe { fork() }.step(|| "fork init".into())? {
        ForkResult::Child => {
            drop(alive_w);
            let err = match init_inner(&cfg, status, alive_r) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            write_status(status, &format!("{}{err}\n", proto::STATUS_ERROR));
            std::process::exit(1)
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            write_status(
                status,
                &format!("{}{}\n", proto::STATUS_PID, child.as_raw()),
            );
            // The driver reads the status pipe to its end: only init may hold it open now.
            stdio_to_null(&[0, 1]);
            let result = wait_child(child);
            drop(alive_w);
            Ok(match result? {
                WaitStatus::Exited(_, code) => code,
                WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
                _ => 1,
            })
        }
    }
}

/// Steps 6–11: pid 1 of the new pid namespace.
fn init_inner(
    cfg: &InitConfig,
    status: BorrowedFd<'_>,
    alive: OwnedFd,
) -> Result<std::convert::Infallible, StepError> {
    prctl::set_pdeathsig(Signal::SIGKILL).step(|| "set parent-death signal".into())?;
    if parent_gone(&alive) {
        std::process::exit(1);
    }
    rootfs::build(cfg)?;
    loopback_up()?;
    unistd::sethostname(&cfg.hostname).step(|| "set hostname".into())?;
    write_status(status, &format!("{}\n", proto::STATUS_READY));
    stdio_to_null(&[0, 1, 2]);
    reap_forever()
}

fn parent_gone(alive: &OwnedFd) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        alive.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
        Ok(0) => false,
        // Readable or hung up: the writer (the outer helper) is gone.
        _ => true,
    }
}

/// Brings the namespace's loopback interface up (`ip link set lo up`, without `ip`).
fn loopback_up() -> Result<(), StepError> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .step(|| "create socket for lo".into())?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own, which is large enough.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(StepError::new("read lo flags", Errno::last()));
    }
    // SAFETY: after SIOCGIFFLAGS the flags member of the union is the initialised one.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS only reads the ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(StepError::new("bring lo up", Errno::last()));
    }
    Ok(())
}

/// Pid 1's only job once the sandbox is built: reap orphans until told to stop.
fn reap_forever() -> ! {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(sig);
    }
    let _ = signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
    loop {
        let sig = set.wait().unwrap_or(Signal::SIGCHLD);
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        if sig != Signal::SIGCHLD {
            std::process::exit(0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// __sandbox-exec

fn exec_main() -> i32 {
    // The driver put the status pipe on fd 3. Close-on-exec: the workload must not inherit it,
    // and its closing on a successful execve is how the driver learns the command started.
    if fcntl(
        // SAFETY: fd 3 is only borrowed for this call.
        unsafe { BorrowedFd::borrow_raw(EXEC_STATUS_FD) },
        FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC),
    )
    .is_err()
    {
        eprintln!("slipway sandbox helper: no status channel on fd {EXEC_STATUS_FD}");
        return 125;
    }
    // SAFETY: fd 3 is open (checked above) and nothing else in this process owns it.
    let mut status = Some(unsafe { OwnedFd::from_raw_fd(EXEC_STATUS_FD) });
    match exec_outer(&mut status) {
        Ok(code) => code,
        Err(e) => {
            if let Some(fd) = &status {
                write_status(fd.as_fd(), &format!("{}{e}\n", proto::STATUS_ERROR));
            }
            125
        }
    }
}

const JOINED_NAMESPACES: [(&str, CloneFlags); 5] = [
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("pid", CloneFlags::CLONE_NEWPID),
];

fn open_ns(pid: i32, name: &str) -> Result<OwnedFd, StepError> {
    let path = format!("/proc/{pid}/ns/{name}");
    open(
        path.as_str(),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .step(|| format!("open {path}"))
}

/// Exec steps 1–4 of `docs/sandbox.md`, in the host's pid namespace.
fn exec_outer(status: &mut Option<OwnedFd>) -> Result<i32, StepError> {
    prctl::set_pdeathsig(Signal::SIGKILL).step(|| "set parent-death signal".into())?;
    close_fds_from(EXEC_STATUS_FD as u32 + 1)?;
    let cfg: ExecConfig = read_config()?;
    check_parent(cfg.parent_pid)?;
    stdio_to_null(&[0]);
    protect_from_oom();

    // Open everything first: once inside the mount namespace the host's /proc is out of reach.
    let mut namespaces = Vec::with_capacity(JOINED_NAMESPACES.len());
    for (name, flag) in JOINED_NAMESPACES {
        namespaces.push((open_ns(cfg.init_pid, name)?, flag, name));
    }
    let mnt = open_ns(cfg.init_pid, "mnt")?;
    let st = fstat(mnt.as_fd()).step(|| "stat mount namespace".into())?;
    if (st.st_dev, st.st_ino) != cfg.mnt_ns {
        return Err(StepError::new(
            "check sandbox init",
            "the sandbox's init is gone",
        ));
    }
    let root_path = format!("/proc/{}/root", cfg.init_pid);
    let root = open(
        root_path.as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .step(|| format!("open {root_path}"))?;

    join_cgroups(&cfg.cgroup_procs)?;
    for (fd, flag, name) in &namespaces {
        setns(fd, *flag).step(|| format!("join {name} namespace"))?;
    }
    drop(namespaces);

    // SAFETY: single-threaded helper; the child may allocate.
    match unsafe { fork() }.step(|| "fork workload".into())? {
        ForkResult::Child => {
            let err = match exec_workload(&cfg, mnt, root) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            if let Some(fd) = status {
                write_status(fd.as_fd(), &format!("{}{err}\n", proto::STATUS_ERROR));
            }
            std::process::exit(127)
        }
        ForkResult::Parent { child } => {
            if let Some(fd) = status.take() {
                write_status(
                    fd.as_fd(),
                    &format!("{}{}\n", proto::STATUS_PID, child.as_raw()),
                );
                // The workload keeps its copy open until its execve; dropping ours is what
                // lets the driver see end-of-file exactly then.
                drop(fd);
            }
            drop(mnt);
            drop(root);
            mirror_exit(wait_child(child)?)
        }
    }
}

/// Exits the way the workload exited, so the driver sees its status on this helper.
fn mirror_exit(status: WaitStatus) -> Result<i32, StepError> {
    match status {
        WaitStatus::Exited(_, code) => Ok(code),
        WaitStatus::Signaled(_, sig, _) => {
            let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
            // SAFETY: restoring the default disposition of a signal has no preconditions.
            let _ = unsafe { signal::signal(sig, signal::SigHandler::SigDfl) };
            let mut set = SigSet::empty();
            set.add(sig);
            let _ = signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
            let _ = signal::raise(sig);
            Ok(128 + sig as i32)
        }
        _ => Ok(1),
    }
}

/// Exec steps 5–13: the workload process, already in the sandbox's pid namespace.
fn exec_workload(
    cfg: &ExecConfig,
    mnt: OwnedFd,
    root: OwnedFd,
) -> Result<std::convert::Infallible, StepError> {
    // Its own session and process group, so stop/timeout can signal the whole command tree.
    unistd::setsid().step(|| "create session".into())?;
    write_file("/proc/self/oom_score_adj", "0")?;

    setns(&mnt, CloneFlags::CLONE_NEWNS).step(|| "join mount namespace".into())?;
    unistd::fchdir(&root).step(|| "enter sandbox root".into())?;
    unistd::chroot(".").step(|| "chroot into sandbox root".into())?;
    unistd::chdir("/").step(|| "chdir /".into())?;
    drop(mnt);
    drop(root);

    prctl::set_no_new_privs().step(|| "set no_new_privs".into())?;
    // The bounding set can only be emptied while CAP_SETPCAP is still held, i.e. as root.
    caps::clear(None, caps::CapSet::Bounding).step(|| "drop bounding capabilities".into())?;
    caps::clear(None, caps::CapSet::Ambient).step(|| "drop ambient capabilities".into())?;
    unistd::setgroups(&[]).step(|| "drop supplementary groups".into())?;
    let (uid, gid) = (Uid::from_raw(cfg.uid), Gid::from_raw(cfg.gid));
    unistd::setresgid(gid, gid, gid).step(|| format!("setresgid {}", cfg.gid))?;
    unistd::setresuid(uid, uid, uid).step(|| format!("setresuid {}", cfg.uid))?;
    for set in [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
    ] {
        caps::clear(None, set).step(|| format!("drop {set:?} capabilities"))?;
    }
    // Changing uids cleared the parent-death signal; set it again.
    prctl::set_pdeathsig(Signal::SIGKILL).step(|| "set parent-death signal".into())?;
    unistd::chdir(&cfg.cwd).step(|| format!("chdir {}", cfg.cwd.display()))?;

    let argv = cstrings(&cfg.argv, "argv")?;
    let env = cstrings(&cfg.env, "environment")?;
    let program = argv
        .first()
        .ok_or_else(|| StepError::new("exec", "empty argv"))?
        .clone();
    seccomp::install()?;
    let err = unistd::execve(&program, &argv, &env).unwrap_err();
    Err(StepError::new(format!("exec {}", cfg.argv[0]), err))
}

fn cstrings(items: &[String], what: &str) -> Result<Vec<CString>, StepError> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).step(|| format!("{what} contains a NUL byte")))
        .collect()
}

/// Whether a path is safe to splice into mount option strings (`lowerdir=...`).
pub(crate) fn path_is_mount_safe(path: &Path) -> bool {
    path.is_absolute()
        && path
            .to_str()
            .is_some_and(|s| !s.contains([',', ':', '\\', '\n', '\0']))
}
