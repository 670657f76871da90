//! Every privileged step of the sandbox, in one place.
//!
//! Nothing outside this module calls `unshare`, `setns`, `mount`, `pivot_root`, changes uids or
//! capabilities, installs seccomp filters or writes cgroup files. The steps run in a small,
//! single-threaded helper process (the `slipway` binary re-executed with a hidden subcommand),
//! never in the multi-threaded async server: `docs/sandbox.md` lists them in order and explains
//! why.
//!
//! `__sandbox-init` (`init_main`) unshares the namespaces, forks the sandbox's pid 1 and moves
//! it into its cgroups. Init builds the root (`rootfs`) but the workspace, brings `lo` up and
//! waits as a *spare* until the driver assigns it to a sandbox (`Assign`, with the snapshot's
//! lower dir as a detached mount); then it mounts the workspace and serves the driver
//! (`forkserver`): for each command it forks a child that drops every privilege and `execve`s
//! the workload, reports its exit, and reaps orphans until the sandbox is destroyed.

pub(crate) mod cgroup;
mod forkserver;
pub(crate) mod netns;
pub(crate) mod proto;
mod rootfs;
mod seccomp;

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sched::{unshare, CloneFlags};
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{self, fork, ForkResult, Pid};
use std::ffi::CString;
use std::fmt;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use proto::{InitConfig, CONTROL_FD};

/// The workspace and its layers, relative to the sandbox root.
pub(crate) use rootfs::{
    build_etc_template, LAYERS_DIR as LAYERS_REL, WORKSPACE_DIR as WORKSPACE_REL,
};

/// Hidden subcommand that builds a sandbox and becomes (the parent of) its init.
pub const INIT_SUBCOMMAND: &str = "__sandbox-init";
/// Former hidden subcommand that ran one command in a running sandbox. Commands are now forked
/// by the sandbox's init; the name is still recognised so that an old driver gets a clear error.
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
/// on being single-threaded (`unshare` of a pid namespace followed by `fork`, and the forks of
/// the fork server, require it).
pub fn helper_main(args: &[String]) -> ! {
    let code = match args.first().map(String::as_str) {
        Some(INIT_SUBCOMMAND) => init_main(),
        Some(EXEC_SUBCOMMAND) => {
            eprintln!("slipway sandbox helper: {EXEC_SUBCOMMAND} is retired (init forks commands)");
            2
        }
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

/// Sends one text message to the driver. Best effort: if the driver is gone there is nobody
/// left to tell.
fn tell(control: BorrowedFd<'_>, line: &str) {
    let _ = proto::send_packet(control, line.as_bytes(), &[], None, 0);
}

/// Writes `data` to a pipe, best effort (a reader that is gone has nothing left to learn).
fn write_all(fd: BorrowedFd<'_>, data: impl AsRef<[u8]>) {
    let mut buf = data.as_ref();
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
    // SAFETY: close_range only closes descriptors; nothing in this single-threaded process
    // holds one of them at this point.
    if unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) } != 0 {
        return Err(StepError::new("close inherited descriptors", Errno::last()));
    }
    Ok(())
}

/// Reads the init config: the first packet on the control socket.
fn read_config(control: BorrowedFd<'_>) -> Result<Vec<u8>, StepError> {
    let mut buf = vec![0u8; 1 << 20];
    let packet =
        proto::recv_packet(control, &mut buf, 0).step(|| "read config from the driver".into())?;
    if packet.len == 0 {
        return Err(StepError::new(
            "read config from the driver",
            "the driver hung up",
        ));
    }
    buf.truncate(packet.len);
    Ok(buf)
}

/// Waits for the driver's word that the sandbox's cgroups exist.
fn wait_for_cgroups(control: BorrowedFd<'_>) -> Result<(), StepError> {
    let mut buf = [0u8; 64];
    let packet = proto::recv_packet(control, &mut buf, 0)
        .step(|| "wait for the sandbox's cgroups".into())?;
    if &buf[..packet.len] != proto::MSG_CGROUPS.as_bytes() {
        return Err(StepError::new(
            "wait for the sandbox's cgroups",
            "the driver hung up",
        ));
    }
    Ok(())
}

fn parse_config(raw: &[u8]) -> Result<InitConfig, StepError> {
    serde_json::from_slice(raw).step(|| "parse config".into())
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

/// Opens the sandbox cgroup's parent directories (`O_PATH`), which stay usable after init's
/// `pivot_root` has taken the host's /sys out of this mount namespace.
fn open_cgroup_parents(paths: &[std::path::PathBuf]) -> Result<Vec<OwnedFd>, StepError> {
    paths
        .iter()
        .map(|path| {
            open(
                path.as_path(),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .step(|| format!("open {}", path.display()))
        })
        .collect()
}

/// Moves process `pid` into cgroup `name` under each parent.
fn join_cgroups(parents: &[OwnedFd], name: &str, pid: i32) -> Result<(), StepError> {
    let file = format!("{name}/cgroup.procs");
    let pid = pid.to_string();
    for parent in parents {
        let fd = nix::fcntl::openat(
            parent,
            file.as_str(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .step(|| format!("open cgroup {file}"))?;
        let written = unistd::write(&fd, pid.as_bytes()).step(|| format!("join cgroup {file}"))?;
        if written != pid.len() {
            return Err(StepError::new(format!("join cgroup {file}"), "short write"));
        }
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

/// Waits for `child` to end.
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
    // SAFETY: the driver put its control socket on fd 3; this process owns it from here on.
    // Everything below runs before any other descriptor above 2 is opened.
    let mut control = Some(unsafe { OwnedFd::from_raw_fd(CONTROL_FD) });
    match init_outer(&mut control) {
        Ok(code) => code,
        Err(e) => {
            if let Some(control) = &control {
                tell(control.as_fd(), &format!("{}{e}", proto::MSG_ERROR));
            }
            1
        }
    }
}

/// Steps 1–9 of `docs/sandbox.md`, in the host's namespaces.
///
/// Everything up to the fork of init happens before the config arrives: the driver starts the
/// helper ahead of time (a spare), so that creating a sandbox only waits for the steps that
/// depend on it. The namespaces are still new for every sandbox; they are just made early.
fn init_outer(control_slot: &mut Option<OwnedFd>) -> Result<i32, StepError> {
    let control = control_slot.as_ref().expect("control socket").as_fd();
    prctl::set_pdeathsig(Signal::SIGKILL).step(|| "set parent-death signal".into())?;
    close_fds_from(CONTROL_FD as u32 + 1)?;
    protect_from_oom();
    // The cgroup namespace is unshared by init itself, once it is in the sandbox's cgroups,
    // so that those are the root of its view.
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .step(|| "unshare namespaces".into())?;
    // The config reaches init through this pipe, once the driver has sent it.
    let (config_r, config_w) = unistd::pipe2(OFlag::O_CLOEXEC).step(|| "create pipe".into())?;
    // One byte on this pipe tells init it is in the sandbox's cgroups; the pipe hanging up
    // tells it that this process died (and with it the driver).
    let (alive_r, alive_w) = unistd::pipe2(OFlag::O_CLOEXEC).step(|| "create pipe".into())?;
    // SAFETY: this helper process is single-threaded, so the child may allocate freely.
    match unsafe { fork() }.step(|| "fork init".into())? {
        ForkResult::Child => {
            drop(alive_w);
            drop(config_w);
            let err = match init_inner(control, alive_r, config_r) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            tell(control, &format!("{}{err}", proto::MSG_ERROR));
            std::process::exit(1)
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            drop(config_r);
            // Init dies with this process (its parent-death signal); kill it at once on error.
            let fail = |e: StepError| {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                e
            };
            let raw = read_config(control).map_err(fail)?;
            let cfg = parse_config(&raw).map_err(fail)?;
            check_parent(cfg.parent_pid).map_err(fail)?;
            // Opened before init can pivot its root: this process shares its mount namespace,
            // so its root moves too, and the host's /sys is out of reach by path after that.
            let parents = open_cgroup_parents(&cfg.cgroup_parents).map_err(fail)?;
            write_all(config_w.as_fd(), &raw);
            drop(config_w);
            // While init builds the root, the driver creates the sandbox's cgroups; then this
            // process moves init into them. Both run in parallel with the mounts instead of
            // before them (migrating a process waits for an RCU grace period on cgroup v1).
            // Init runs nothing but this module's code until it has the byte below, and
            // starts no command before the driver has its "ready" (sent after that byte).
            wait_for_cgroups(control).map_err(fail)?;
            join_cgroups(&parents, &cfg.cgroup_name, child.as_raw()).map_err(fail)?;
            drop(parents);
            write_all(alive_w.as_fd(), "j");
            tell(control, &format!("{}{}", proto::MSG_PID, child.as_raw()));
            // Only init may hold the control socket from now on: when init is gone, the
            // driver sees the socket hang up.
            drop(control_slot.take());
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

/// Steps 10–19: pid 1 of the new pid namespace.
fn init_inner(
    control: BorrowedFd<'_>,
    alive: OwnedFd,
    config: OwnedFd,
) -> Result<std::convert::Infallible, StepError> {
    prctl::set_pdeathsig(Signal::SIGKILL).step(|| "set parent-death signal".into())?;
    if parent_gone(&alive) {
        std::process::exit(1);
    }
    rootfs::make_private()?;
    // Wait for the config (end-of-file without one: the outer helper failed and said why).
    let mut raw = Vec::new();
    std::fs::File::from(config)
        .read_to_end(&mut raw)
        .step(|| "read config".into())?;
    if raw.is_empty() {
        std::process::exit(1);
    }
    let cfg = parse_config(&raw)?;
    rootfs::build(&cfg)?;
    loopback_up()?;
    unistd::sethostname(&cfg.hostname).step(|| "set hostname".into())?;
    // Wait until the outer helper has moved this process into the sandbox's cgroups.
    let mut byte = [0u8; 1];
    loop {
        match unistd::read(&alive, &mut byte) {
            Ok(1) => break,
            Err(Errno::EINTR) => continue,
            // The outer helper failed (and said why) or died.
            _ => std::process::exit(1),
        }
    }
    unshare(CloneFlags::CLONE_NEWCGROUP).step(|| "unshare cgroup namespace".into())?;
    let mut server = forkserver::ForkServer::new(&cfg, control)?;
    server.prepare()?;
    // A spare: everything that does not depend on the snapshot or the limits is done.
    tell(control, proto::MSG_READY);
    stdio_to_null(&[0, 1, 2]);
    let (assign, lower) = wait_for_assign(control)?;
    rootfs::mount_workspace(&lower, assign.workspace_bytes, cfg.uid, cfg.gid)?;
    drop(lower);
    tell(control, proto::MSG_ASSIGNED);
    server.serve()
}

/// Waits for the driver to hand this spare to a sandbox: the [`proto::Assign`] packet and the
/// lower dir's descriptor. The driver hanging up means the spare was discarded.
fn wait_for_assign(control: BorrowedFd<'_>) -> Result<(proto::Assign, OwnedFd), StepError> {
    let mut buf = vec![0u8; 4096];
    let packet = proto::recv_packet(control, &mut buf, 0).step(|| "wait for assign".into())?;
    if packet.len == 0 {
        std::process::exit(0);
    }
    let assign: proto::Assign =
        serde_json::from_slice(&buf[..packet.len]).step(|| "parse assign".into())?;
    let mut fds = packet.fds.into_iter();
    match (fds.next(), fds.next()) {
        (Some(lower), None) => Ok((assign, lower)),
        _ => Err(StepError::new(
            "parse assign",
            "expected exactly one descriptor (the lower dir)",
        )),
    }
}

fn parent_gone(alive: &OwnedFd) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        alive.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
        Ok(0) => false,
        // Hung up: the writer (the outer helper) is gone. (Readable alone is the outer
        // helper's "in the cgroups" byte, which may already be there.)
        Ok(_) => fds[0].revents().is_none_or(|r| {
            r.intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLERR)
        }),
        Err(_) => true,
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

fn cstrings(items: &[String], what: &str) -> Result<Vec<CString>, StepError> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).step(|| format!("{what} contains a NUL byte")))
        .collect()
}

/// A detached copy of the mount at `path` (`open_tree(OPEN_TREE_CLONE)`): the root of an
/// anonymous mount namespace, which the kernel lets overlayfs use as a layer from inside
/// another mount namespace (a path of the host's own mount tree it refuses there). The driver
/// passes it to a spare's init, which mounts the workspace over it after `pivot_root`; it
/// vanishes when the last descriptor is closed (the overlay keeps a private clone of it).
pub(crate) fn detached_tree(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open_tree reads a NUL-terminated path we own and returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether a path is safe to splice into mount option strings (`lowerdir=...`).
pub(crate) fn path_is_mount_safe(path: &Path) -> bool {
    path.is_absolute()
        && path
            .to_str()
            .is_some_and(|s| !s.contains([',', ':', '\\', '\n', '\0']))
}
