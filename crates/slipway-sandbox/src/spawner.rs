//! Starts helper processes from one dedicated, long-lived std thread.
//!
//! The helpers set PR_SET_PDEATHSIG so they die with slipway. The kernel delivers that signal
//! when the *thread* that forked them exits, not the process: spawning from tokio's blocking
//! pool (whose threads exit when idle) would kill sandboxes at random. This thread lives until
//! the process exits.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::OnceLock;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

fn spawner() -> &'static mpsc::Sender<Job> {
    SPAWNER.get_or_init(|| {
        reserve_status_fd();
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sandbox-spawner".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("cannot start the sandbox spawner thread");
        tx
    })
}

/// A helper process started by [`spawn_helper`]: its pid and a pidfd. Reaped by `wait`; a
/// helper dropped without `wait` stays a zombie until this process exits, so every owner waits.
#[derive(Debug)]
pub(crate) struct HelperChild {
    pid: i32,
    pidfd: OwnedFd,
    reaped: bool,
}

impl HelperChild {
    pub(crate) fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// SIGKILL through the pidfd (never hits a recycled pid).
    pub(crate) fn kill(&mut self) -> io::Result<()> {
        crate::process::pidfd_kill(&self.pidfd, libc::SIGKILL)
    }

    /// Waits for the helper to exit and reaps it.
    pub(crate) fn wait(&mut self) -> io::Result<()> {
        if self.reaped {
            return Ok(());
        }
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child, writing into an int we own.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                self.reaped = true;
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl Drop for HelperChild {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.kill();
            let _ = self.wait();
        }
    }
}

/// Starts `exe subcommand` on the spawner thread with `control` as its descriptor 3, stdin
/// and stdout on /dev/null, stderr inherited, an empty environment, its own process group,
/// default signal dispositions and an empty signal mask.
///
/// `posix_spawn` (glibc: `clone(CLONE_VM | CLONE_VFORK)` + `execve`) rather than `fork`: the
/// server is a large multi-threaded process, and copying its page tables for every helper
/// only to `execve` right away was a measurable part of each sandbox's CPU.
pub(crate) async fn spawn_helper(
    exe: &Path,
    subcommand: &str,
    control: OwnedFd,
) -> io::Result<HelperChild> {
    let exe = CString::new(exe.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let arg = CString::new(subcommand).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(posix_spawn(&exe, &arg, control.as_raw_fd()));
        drop(control);
    });
    spawner()
        .send(job)
        .map_err(|_| io::Error::other("sandbox spawner thread is gone"))?;
    rx.await
        .map_err(|_| io::Error::other("sandbox spawner thread is gone"))?
}

fn posix_spawn(exe: &CString, arg: &CString, control: RawFd) -> io::Result<HelperChild> {
    use nix::fcntl::OFlag;
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
    use nix::sys::signal::SigSet;
    use nix::sys::stat::Mode;
    use nix::unistd::Pid;
    // fd 3 is reserved (see `reserve_status_fd`), so `control` is never 3 and the dup2 below
    // always makes a fresh descriptor without close-on-exec.
    if control == crate::privileged::proto::CONTROL_FD {
        return Err(io::Error::other(
            "the control socket must not be descriptor 3",
        ));
    }
    let mut actions = PosixSpawnFileActions::init()?;
    actions.add_open(0, c"/dev/null", OFlag::O_RDONLY, Mode::empty())?;
    actions.add_open(1, c"/dev/null", OFlag::O_WRONLY, Mode::empty())?;
    actions.add_dup2(control, crate::privileged::proto::CONTROL_FD)?;
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_sigmask(&SigSet::empty())?;
    attr.set_sigdefault(&SigSet::all())?;
    attr.set_pgroup(Pid::from_raw(0))?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETPGROUP
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )?;
    let no_env: [&std::ffi::CStr; 0] = [];
    let pid = nix::spawn::posix_spawn(
        exe.as_c_str(),
        &actions,
        &attr,
        &[exe.as_c_str(), arg.as_c_str()],
        &no_env,
    )?;
    let pidfd = match crate::process::pidfd_open(pid.as_raw()) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            return Err(e);
        }
    };
    Ok(HelperChild {
        pid: pid.as_raw(),
        pidfd,
        reaped: false,
    })
}

/// The helpers receive their control socket as fd 3. If fd 3 were free in this process, a
/// control socket could land there; keep it occupied for the life of the process.
fn reserve_status_fd() {
    // SAFETY: F_GETFD only queries whether fd 3 is open.
    if unsafe { libc::fcntl(3, libc::F_GETFD) } == -1 {
        // SAFETY: opening /dev/null and moving it to the free fd 3; deliberately never closed.
        unsafe {
            let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd >= 0 && fd != 3 {
                libc::dup3(fd, 3, libc::O_CLOEXEC);
                libc::close(fd);
            }
        }
    }
}

/// Makes sure the spawner thread (and the fd-3 reservation) exists before anything else.
pub(crate) fn start() {
    let _ = spawner();
}
