//! The sandbox's init once the sandbox is built: a small fork server (init steps 13–14 and
//! every exec step of `docs/sandbox.md`).
//!
//! Init waits on two things with `poll`: the control socket (requests from the driver) and a
//! signalfd (SIGCHLD, and the signals that end the sandbox). For each `Exec` request it forks a
//! child, which is already in every namespace, the cgroups and the root of the sandbox; the
//! child drops every privilege and `execve`s the command. Init reports the command's host pid
//! and, when its main process ends, kills what is left of its process group *before* reaping it
//! (the unreaped zombie keeps the pid and process-group numbers from being reused, so the kill
//! cannot hit anything else) and reports how it ended. Everything else that exits is reaped.
//!
//! Init is single-threaded, so forking it and then allocating in the child is sound.

use super::proto::{self, ForkRequest, InitConfig, RawExit, Request, EXEC_FDS};
use super::{cstrings, seccomp, tell, write_all, write_file, Step, StepError};
use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::unistd::{self, fork, ForkResult, Gid, Uid};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Signals init takes through its signalfd. SIGCHLD means "reap"; the others end the sandbox.
const SIGNALS: [i32; 4] = [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

pub(super) struct ForkServer<'a> {
    control: BorrowedFd<'a>,
    signals: OwnedFd,
    uid: u32,
    gid: u32,
    /// Commands whose main process has not been reported yet: sandbox pid → command id.
    running: HashMap<i32, u64>,
    /// The seccomp programs, compiled once and inherited by every child.
    seccomp: Option<[seccompiler::BpfProgram; 2]>,
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

impl<'a> ForkServer<'a> {
    /// Blocks the signals init handles and opens its signalfd.
    pub(super) fn new(cfg: &InitConfig, control: BorrowedFd<'a>) -> Result<Self, StepError> {
        let set = sigset(&SIGNALS);
        // SAFETY: sigprocmask and signalfd only read the set we pass.
        let fd = unsafe {
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        if fd < 0 {
            return Err(StepError::new("create signalfd", Errno::last()));
        }
        Ok(Self {
            control,
            // SAFETY: signalfd just returned this descriptor; nothing else owns it.
            signals: unsafe { OwnedFd::from_raw_fd(fd) },
            uid: cfg.uid,
            gid: cfg.gid,
            running: HashMap::new(),
            seccomp: None,
        })
    }

    /// Compiles the seccomp programs ahead of the first command (a spare does it while it
    /// waits to be assigned).
    pub(super) fn prepare(&mut self) -> Result<(), StepError> {
        if self.seccomp.is_none() {
            self.seccomp = Some(seccomp::programs()?);
        }
        Ok(())
    }

    /// Serves the driver until the sandbox ends: the driver hangs up, or init is told to stop.
    pub(super) fn serve(mut self) -> ! {
        let mut buf = vec![0u8; proto::MAX_MESSAGE];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.control.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.signals.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll reads and writes the array we own.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                continue;
            }
            if fds[1].revents != 0 {
                self.take_signals();
            }
            if fds[0].revents != 0 {
                match proto::recv_packet(self.control, &mut buf, libc::MSG_DONTWAIT) {
                    // The driver is gone (or dropped the sandbox): so is the sandbox.
                    Ok(p) if p.len == 0 => std::process::exit(0),
                    Ok(p) => self.handle(&buf[..p.len], p.fds),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {}
                    Err(_) => std::process::exit(0),
                }
            }
        }
    }

    fn take_signals(&mut self) {
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: reads one signalfd_siginfo into the struct we own.
            let n = unsafe {
                libc::read(
                    self.signals.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if n != size as isize {
                break;
            }
            if info.ssi_signo as i32 != libc::SIGCHLD {
                std::process::exit(0);
            }
        }
        self.reap();
    }

    /// Reaps every child that has ended. A command's main process is looked at before it is
    /// reaped (`WNOWAIT`): its process group is killed while the zombie still pins its number.
    fn reap(&mut self) {
        loop {
            // SAFETY: siginfo_t is plain old data; waitid fills it.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid writes into the siginfo we own.
            let r = unsafe {
                libc::waitid(
                    libc::P_ALL,
                    0,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            // SAFETY: after a successful waitid the pid and status fields are the valid ones.
            let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
            if r != 0 || pid == 0 {
                return;
            }
            if let Some(id) = self.running.remove(&pid) {
                // SAFETY: kill(2) on a process group whose leader is our unreaped child.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                let exit = if info.si_code == libc::CLD_EXITED {
                    RawExit::Code(status)
                } else {
                    RawExit::Signal(status)
                };
                let line = match exit {
                    RawExit::Code(c) => format!("{}{id} code {c}", proto::MSG_EXITED),
                    RawExit::Signal(s) => format!("{}{id} signal {s}", proto::MSG_EXITED),
                };
                tell(self.control, &line);
            }
            // SAFETY: reaps exactly the child waitid just reported.
            unsafe {
                let mut st = 0;
                libc::waitpid(pid, &mut st, libc::WNOHANG);
            }
        }
    }

    fn handle(&mut self, data: &[u8], fds: Vec<OwnedFd>) {
        let Ok(request) = serde_json::from_slice::<Request>(data) else {
            return;
        };
        match request {
            Request::Exec(req) => {
                let id = req.id;
                if let Err(e) = self.start(req, fds) {
                    tell(self.control, &format!("{}{id} {e}", proto::MSG_FAILED));
                }
            }
            Request::Signal { id, signal } => {
                if let Some((&pid, _)) = self.running.iter().find(|(_, &cmd)| cmd == id) {
                    // SAFETY: kill(2) on a command's group and main process; both numbers are
                    // pinned until init reaps the main process, which it has not yet done.
                    unsafe {
                        libc::kill(-pid, signal);
                        libc::kill(pid, signal);
                    }
                }
            }
        }
    }

    fn start(&mut self, req: ForkRequest, fds: Vec<OwnedFd>) -> Result<(), StepError> {
        let fds: [OwnedFd; EXEC_FDS] = fds
            .try_into()
            .map_err(|_| StepError::new("read request", "expected three descriptors"))?;
        if self.seccomp.is_none() {
            self.seccomp = Some(seccomp::programs()?);
        }
        // SAFETY: init is single-threaded, so the child may allocate freely.
        match unsafe { fork() }.step(|| "fork workload".into())? {
            ForkResult::Child => {
                // Where errors go: the status pipe, at its received number until the
                // descriptors are placed, then on 3.
                let mut status = fds[2].as_raw_fd();
                let err = match self.workload(&req, &fds, &mut status) {
                    Ok(never) => match never {},
                    Err(e) => e,
                };
                // SAFETY: `status` is an open descriptor of this child.
                let status = unsafe { BorrowedFd::borrow_raw(status) };
                write_all(status, format!("{}{err}\n", proto::MSG_ERROR));
                // SAFETY: leave at once, without running this process's exit handlers or
                // flushing anything init had buffered.
                unsafe { libc::_exit(127) }
            }
            ForkResult::Parent { child } => {
                drop(fds);
                let pid = child.as_raw();
                self.running.insert(pid, req.id);
                // The driver gets a pidfd of the command and its pid as credentials, which the
                // kernel translates into the driver's (host) pid namespace.
                let pidfd = pidfd_open(pid);
                let sent_fds: Vec<RawFd> = pidfd.iter().map(|f| f.as_raw_fd()).collect();
                let _ = proto::send_packet(
                    self.control,
                    format!("{}{}", proto::MSG_STARTED, req.id).as_bytes(),
                    &sent_fds,
                    Some(pid),
                    0,
                );
                Ok(())
            }
        }
    }

    /// Exec steps, in the forked child: everything from "reset signals" to `execve`.
    fn workload(
        &self,
        req: &ForkRequest,
        fds: &[OwnedFd; EXEC_FDS],
        status: &mut RawFd,
    ) -> Result<std::convert::Infallible, StepError> {
        // Signals: default dispositions and nothing blocked, as a freshly started process has
        // (init blocks SIGCHLD and friends; a blocked mask would survive execve).
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                // SAFETY: restoring the default disposition has no preconditions.
                unsafe { libc::signal(sig, libc::SIG_DFL) };
            }
        }
        let empty = sigset(&[]);
        // SAFETY: sets the mask from a set we own.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) };

        // Its own session and process group, so stop/timeout can signal the whole command tree.
        unistd::setsid().step(|| "create session".into())?;
        write_file("/proc/self/oom_score_adj", "0")?;

        // Descriptors: stdin /dev/null, stdout and stderr the driver's pipes, the status pipe
        // on 3 (close-on-exec: the driver's end-of-file means execve succeeded), nothing else.
        place_fds(fds)?;
        *status = 3;

        prctl::set_no_new_privs().step(|| "set no_new_privs".into())?;
        // The bounding set can only be emptied while CAP_SETPCAP is still held, i.e. as root.
        caps::clear(None, caps::CapSet::Bounding).step(|| "drop bounding capabilities".into())?;
        caps::clear(None, caps::CapSet::Ambient).step(|| "drop ambient capabilities".into())?;
        unistd::setgroups(&[]).step(|| "drop supplementary groups".into())?;
        let (uid, gid) = (Uid::from_raw(self.uid), Gid::from_raw(self.gid));
        unistd::setresgid(gid, gid, gid).step(|| format!("setresgid {}", self.gid))?;
        unistd::setresuid(uid, uid, uid).step(|| format!("setresuid {}", self.uid))?;
        for set in [
            caps::CapSet::Effective,
            caps::CapSet::Permitted,
            caps::CapSet::Inheritable,
        ] {
            caps::clear(None, set).step(|| format!("drop {set:?} capabilities"))?;
        }
        // Changing uids cleared the parent-death signal; set it again (the parent is init).
        prctl::set_pdeathsig(Signal::SIGKILL).step(|| "set parent-death signal".into())?;
        unistd::chdir(&req.cwd).step(|| format!("chdir {}", req.cwd.display()))?;

        let argv = cstrings(&req.argv, "argv")?;
        let env = cstrings(&req.env, "environment")?;
        let program = argv
            .first()
            .ok_or_else(|| StepError::new("exec", "empty argv"))?
            .clone();
        let programs = self
            .seccomp
            .as_ref()
            .ok_or_else(|| StepError::new("install seccomp filter", "not compiled"))?;
        seccomp::apply(programs)?;
        let err = unistd::execve(&program, &argv, &env).unwrap_err();
        Err(StepError::new(format!("exec {}", req.argv[0]), err))
    }
}

/// Puts the command's descriptors in place: 0 `/dev/null`, 1 stdout, 2 stderr, 3 the status
/// pipe (close-on-exec), and closes every other descriptor (the control socket, the signalfd).
fn place_fds(fds: &[OwnedFd; EXEC_FDS]) -> Result<(), StepError> {
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .step(|| "open /dev/null".into())?;
    // First move every source above the targets, so no dup2 overwrites a source still needed.
    let mut high = Vec::with_capacity(4);
    for fd in [
        null.as_raw_fd(),
        fds[0].as_raw_fd(),
        fds[1].as_raw_fd(),
        fds[2].as_raw_fd(),
    ] {
        // SAFETY: F_DUPFD_CLOEXEC duplicates an open descriptor to the lowest free number >= 10.
        let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        if d < 0 {
            return Err(StepError::new("place descriptors", Errno::last()));
        }
        high.push(d);
    }
    for (target, &src) in high.iter().enumerate() {
        let flags = if target == 3 { libc::O_CLOEXEC } else { 0 };
        // SAFETY: dup3 onto a fixed small number; whatever was there is closed atomically.
        if unsafe { libc::dup3(src, target as i32, flags) } < 0 {
            return Err(StepError::new("place descriptors", Errno::last()));
        }
    }
    // SAFETY: closes everything above the status pipe; this child holds nothing else it needs
    // (the OwnedFds above are never closed again: the child execs or _exits).
    if unsafe { libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) } != 0 {
        return Err(StepError::new("close descriptors", Errno::last()));
    }
    std::mem::forget(null);
    Ok(())
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
