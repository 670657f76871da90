//! A command running in a sandbox (wait, stop, exit status and why it ended), and the driver's
//! end of the sandbox's control socket, over which its init starts commands and reports them.

use crate::privileged::cgroup::Cgroup;
use crate::privileged::proto::{self, RawExit, Reply, Request};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

/// Why a command ended other than by exiting on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminationReason {
    /// The request's wall-clock timeout passed and the command was stopped.
    Timeout { after: Duration },
    /// The sandbox's memory limit was hit and the kernel killed a process of the command.
    OutOfMemory,
    /// A fork failed because the sandbox's process limit was reached and the command failed.
    ProcessLimit,
    /// Stopped by `Process::kill`; `forced` when it ignored SIGTERM and got SIGKILL.
    Stopped { forced: bool },
}

impl fmt::Display for TerminationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TerminationReason::Timeout { after } => {
                let secs = after.as_secs_f64();
                if secs.fract() == 0.0 {
                    write!(f, "timeout after {} s", after.as_secs())
                } else {
                    write!(f, "timeout after {secs:.1} s")
                }
            }
            TerminationReason::OutOfMemory => f.write_str("out of memory"),
            TerminationReason::ProcessLimit => f.write_str("process limit reached"),
            TerminationReason::Stopped { forced: false } => f.write_str("stopped"),
            TerminationReason::Stopped { forced: true } => {
                f.write_str("stopped (killed after the grace period)")
            }
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, when the command exited.
    pub code: Option<i32>,
    /// Signal number, when the command was killed by a signal.
    pub signal: Option<i32>,
    /// Why the platform ended it, if it did (or a limit it ran into).
    pub reason: Option<TerminationReason>,
}

impl ExitStatus {
    /// Exited with code 0 and was not stopped by the platform.
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.reason.is_none()
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}")?,
            (None, Some(s)) => write!(f, "killed by signal {s}")?,
            (None, None) => f.write_str("unknown exit")?,
        }
        if let Some(reason) = &self.reason {
            write!(f, " ({reason})")?;
        }
        Ok(())
    }
}

/// Errors of running a command.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Spec(#[from] crate::SpecError),
    #[error("sandbox {id} is destroyed")]
    Destroyed { id: String },
    #[error("cannot start the sandbox helper for {id}: {source}")]
    Spawn { id: String, source: io::Error },
    #[error("command setup failed in sandbox {id}: {message}")]
    Setup { id: String, message: String },
    #[error("waiting for a command in sandbox {id}: {source}")]
    Wait { id: String, source: io::Error },
}

#[derive(Debug, Clone, Copy)]
enum StopCause {
    Timeout(Duration),
    Stop,
}

/// How long output readers get to finish once the command is gone.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A command started by `Sandbox::spawn`. Dropping it kills the command.
#[derive(Debug)]
pub struct Process {
    /// Host pid of the workload; it leads its own session and process group.
    pid: i32,
    /// The driver's number for the command on the control socket.
    command: u64,
    control: Arc<Control>,
    /// A pidfd of the command's main process (a fallback way to kill it).
    pidfd: Option<OwnedFd>,
    /// Init's report of how the main process ended.
    exit: oneshot::Receiver<RawExit>,
    raw_exit: Option<RawExit>,
    cgroup: Cgroup,
    oom_before: u64,
    pids_hits_before: u64,
    timeout: Option<(Instant, Duration)>,
    grace: Duration,
    pumps: Vec<JoinHandle<()>>,
    stop_cause: Option<StopCause>,
    forced: bool,
    status: Option<ExitStatus>,
}

pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub(crate) fn pidfd_kill(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, a signal number and no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            0usize,
            0u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What `Process::new` needs besides the control socket.
pub(crate) struct Started {
    pub pid: i32,
    pub pidfd: Option<OwnedFd>,
}

impl Process {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        command: u64,
        control: Arc<Control>,
        started: Started,
        exit: oneshot::Receiver<RawExit>,
        cgroup: Cgroup,
        oom_before: u64,
        pids_hits_before: u64,
        timeout: Option<Duration>,
        grace: Duration,
        pumps: Vec<JoinHandle<()>>,
    ) -> Self {
        Self {
            pid: started.pid,
            command,
            control,
            pidfd: started.pidfd,
            exit,
            raw_exit: None,
            cgroup,
            oom_before,
            pids_hits_before,
            timeout: timeout.map(|t| (Instant::now() + t, t)),
            grace,
            pumps,
            stop_cause: None,
            forced: false,
            status: None,
        }
    }

    /// Host pid of the workload (also its process group id).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Signals the command's process group (and its main process). Init does it, inside the
    /// sandbox's pid namespace, while it still holds the main process unreaped: a recycled pid
    /// can never be hit. Should the request not go out, the main process alone is signalled
    /// through its pidfd (init then kills the rest of the group when it exits).
    fn signal_group(&self, signal: i32) {
        if self.control.signal(self.command, signal).is_err() {
            if let Some(pidfd) = &self.pidfd {
                let _ = pidfd_kill(pidfd, signal);
            }
        }
    }

    /// Waits for the main process to end. At `term_at` the group gets SIGTERM, `grace` later
    /// SIGKILL.
    async fn wait_exit(
        &mut self,
        mut term_at: Option<(Instant, StopCause)>,
        grace: Duration,
    ) -> RawExit {
        if let Some(raw) = self.raw_exit {
            return raw;
        }
        let mut kill_at: Option<Instant> = None;
        loop {
            let next = kill_at.or(term_at.map(|(t, _)| t));
            let far = Instant::now() + Duration::from_secs(86_400 * 365);
            tokio::select! {
                exit = &mut self.exit => {
                    // No report means init is gone, and with it (SIGKILL) every process of
                    // the sandbox.
                    let raw = exit.unwrap_or(RawExit::Signal(libc::SIGKILL));
                    self.raw_exit = Some(raw);
                    return raw;
                }
                _ = sleep_until(next.unwrap_or(far)), if next.is_some() => {
                    if kill_at.take().is_some() {
                        self.signal_group(libc::SIGKILL);
                        self.forced = true;
                    } else if let Some((_, cause)) = term_at.take() {
                        self.stop_cause.get_or_insert(cause);
                        self.signal_group(libc::SIGTERM);
                        kill_at = Some(Instant::now() + grace);
                    }
                }
            }
        }
    }

    /// Waits for the command to end, stopping it if its timeout passes first.
    ///
    /// # Errors
    /// None at present: a command whose sandbox is gone reports SIGKILL.
    pub async fn wait(&mut self) -> Result<ExitStatus, ExecError> {
        if let Some(status) = &self.status {
            return Ok(status.clone());
        }
        let term_at = self
            .timeout
            .map(|(at, after)| (at, StopCause::Timeout(after)));
        let raw = self.wait_exit(term_at, self.grace).await;
        Ok(self.finish(raw).await)
    }

    /// Stops the command: SIGTERM to its process group, SIGKILL after `grace`.
    ///
    /// # Errors
    /// None at present: a command whose sandbox is gone reports SIGKILL.
    pub async fn kill(&mut self, grace: Duration) -> Result<ExitStatus, ExecError> {
        if let Some(status) = &self.status {
            return Ok(status.clone());
        }
        let raw = self
            .wait_exit(Some((Instant::now(), StopCause::Stop)), grace)
            .await;
        Ok(self.finish(raw).await)
    }

    async fn finish(&mut self, raw: RawExit) -> ExitStatus {
        // Init already killed whatever the command left in its process group.
        for pump in std::mem::take(&mut self.pumps) {
            let abort = pump.abort_handle();
            if tokio::time::timeout(DRAIN_TIMEOUT, pump).await.is_err() {
                // A process that left the group still holds the pipe; stop reading it.
                abort.abort();
            }
        }
        let (code, signal) = match raw {
            RawExit::Code(c) => (Some(c), None),
            RawExit::Signal(s) => (None, Some(s)),
        };
        let failed = code != Some(0);
        let reason = match self.stop_cause {
            Some(StopCause::Timeout(after)) => Some(TerminationReason::Timeout { after }),
            Some(StopCause::Stop) => Some(TerminationReason::Stopped {
                forced: self.forced,
            }),
            None if failed && self.cgroup.oom_kills() > self.oom_before => {
                Some(TerminationReason::OutOfMemory)
            }
            None if failed && self.cgroup.pids_limit_hits() > self.pids_hits_before => {
                Some(TerminationReason::ProcessLimit)
            }
            None => None,
        };
        let status = ExitStatus {
            code,
            signal,
            reason,
        };
        self.status = Some(status.clone());
        status
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        self.signal_group(libc::SIGKILL);
        if let Some(pidfd) = &self.pidfd {
            let _ = pidfd_kill(pidfd, libc::SIGKILL);
        }
        for pump in &self.pumps {
            pump.abort();
        }
    }
}

/// A command the driver asked for and init has not finished reporting.
#[derive(Debug, Default)]
struct Pending {
    started: Option<oneshot::Sender<Result<Started, String>>>,
    exited: Option<oneshot::Sender<RawExit>>,
}

impl fmt::Debug for Started {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Started").field("pid", &self.pid).finish()
    }
}

#[derive(Debug, Default)]
struct ControlState {
    next_id: u64,
    /// Init hung up: no command can start, every pending one has been answered.
    closed: bool,
    pending: HashMap<u64, Pending>,
}

/// The driver's end of a sandbox's control socket. Requests go out from any task; one reader
/// task hands init's replies to the command they are about.
#[derive(Debug)]
pub(crate) struct Control {
    fd: AsyncFd<OwnedFd>,
    state: Mutex<ControlState>,
}

/// What `Control::register` hands out for one command.
pub(crate) struct Registered {
    pub id: u64,
    pub started: oneshot::Receiver<Result<Started, String>>,
    pub exited: oneshot::Receiver<RawExit>,
}

fn lock(m: &Mutex<ControlState>) -> std::sync::MutexGuard<'_, ControlState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Control {
    /// Wraps the driver's end of the socket (made non-blocking here).
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self {
            // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and unchanged
            // until the AsyncFd is dropped.
            fd: unsafe {
                AsyncFd::register_with_interest(
                    fd,
                    tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
                )
            }
            .map_err(|e| io::Error::other(e.to_string()))?,
            state: Mutex::default(),
        })
    }

    /// Whether a packet (or the peer's hang-up) is waiting, without reading it.
    pub(crate) fn has_input(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.fd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: poll reads and writes the one-element array we own; zero timeout.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) != 0 }
    }

    /// Receives one packet (length 0: init and the helper are gone).
    pub(crate) async fn recv(&self, buf: &mut [u8]) -> io::Result<proto::Packet> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard
                .try_io(|fd| proto::recv_packet(fd.get_ref().as_fd(), buf, libc::MSG_DONTWAIT))
            {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends one request with `fds` attached.
    pub(crate) async fn send(&self, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                proto::send_packet(fd.get_ref().as_fd(), data, fds, None, libc::MSG_DONTWAIT)
            }) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Asks init to signal command `id`'s process group, without waiting (for `Drop` and
    /// timers). Fails when the socket's queue is full or init is gone.
    pub(crate) fn signal(&self, id: u64, signal: i32) -> io::Result<()> {
        if lock(&self.state).closed {
            return Err(io::Error::other("the sandbox's init is gone"));
        }
        let data = serde_json::to_vec(&Request::Signal { id, signal }).expect("request serializes");
        proto::send_packet(
            self.fd.get_ref().as_fd(),
            &data,
            &[],
            None,
            libc::MSG_DONTWAIT,
        )
    }

    /// A number for a new command and the channels its reports arrive on; `None` once init is
    /// gone.
    pub(crate) fn register(&self) -> Option<Registered> {
        let mut state = lock(&self.state);
        if state.closed {
            return None;
        }
        state.next_id += 1;
        let id = state.next_id;
        let (started_tx, started) = oneshot::channel();
        let (exited_tx, exited) = oneshot::channel();
        state.pending.insert(
            id,
            Pending {
                started: Some(started_tx),
                exited: Some(exited_tx),
            },
        );
        Some(Registered {
            id,
            started,
            exited,
        })
    }

    /// Drops the bookkeeping of a command whose start failed.
    pub(crate) fn forget(&self, id: u64) {
        lock(&self.state).pending.remove(&id);
    }

    /// Starts the task that reads init's reports until init hangs up.
    pub(crate) fn start_reader(self: &Arc<Self>) {
        let control = self.clone();
        tokio::spawn(async move { control.read_loop().await });
    }

    async fn read_loop(&self) {
        let mut buf = vec![0u8; 4096];
        loop {
            let packet = match self.recv(&mut buf).await {
                Ok(p) if p.len > 0 => p,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
                _ => break,
            };
            let Some(reply) = std::str::from_utf8(&buf[..packet.len])
                .ok()
                .and_then(proto::parse_reply)
            else {
                continue;
            };
            let mut state = lock(&self.state);
            match reply {
                Reply::Started { id } => {
                    if let Some(tx) = state.pending.get_mut(&id).and_then(|p| p.started.take()) {
                        let _ = tx.send(Ok(Started {
                            pid: packet.pid.unwrap_or(-1),
                            pidfd: packet.fds.into_iter().next(),
                        }));
                    }
                }
                Reply::Failed { id, message } => {
                    if let Some(tx) = state.pending.remove(&id).and_then(|mut p| p.started.take()) {
                        let _ = tx.send(Err(message));
                    }
                }
                Reply::Exited { id, exit } => {
                    if let Some(tx) = state.pending.remove(&id).and_then(|mut p| p.exited.take()) {
                        let _ = tx.send(exit);
                    }
                }
                Reply::Pid(_) | Reply::Ready | Reply::Assigned | Reply::Error(_) => {}
            }
        }
        // Init is gone, and with it every process of the sandbox (killed by SIGKILL).
        let mut state = lock(&self.state);
        state.closed = true;
        for (_, pending) in state.pending.drain() {
            if let Some(tx) = pending.started {
                let _ = tx.send(Err("the sandbox's init is gone".into()));
            }
            if let Some(tx) = pending.exited {
                let _ = tx.send(RawExit::Signal(libc::SIGKILL));
            }
        }
    }
}
