//! A command running in a sandbox: wait, stop, exit status and why it ended.

use crate::privileged::cgroup::Cgroup;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
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
    sandbox_id: String,
    /// Host pid of the workload; it leads its own session and process group.
    pid: i32,
    /// The exec helper, which waits for the workload and exits the same way.
    helper: std::process::Child,
    helper_pidfd: AsyncFd<OwnedFd>,
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

impl Process {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        sandbox_id: String,
        pid: i32,
        helper: std::process::Child,
        helper_pidfd: OwnedFd,
        cgroup: Cgroup,
        oom_before: u64,
        pids_hits_before: u64,
        timeout: Option<Duration>,
        grace: Duration,
        pumps: Vec<JoinHandle<()>>,
    ) -> io::Result<Self> {
        Ok(Self {
            sandbox_id,
            pid,
            helper,
            // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and unchanged
            // until the AsyncFd is dropped.
            helper_pidfd: unsafe {
                AsyncFd::register_with_interest(helper_pidfd, tokio::io::Interest::READABLE)
            }
            .map_err(|e| io::Error::other(e.to_string()))?,
            cgroup,
            oom_before,
            pids_hits_before,
            timeout: timeout.map(|t| (Instant::now() + t, t)),
            grace,
            pumps,
            stop_cause: None,
            forced: false,
            status: None,
        })
    }

    /// Host pid of the workload (also its process group id).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn signal_group(&self, signal: i32) {
        // SAFETY: kill(2) on the workload's process group, then on the workload itself in case
        // it already left the group; errors (already gone) are irrelevant.
        unsafe {
            libc::kill(-self.pid, signal);
            libc::kill(self.pid, signal);
        }
    }

    /// Waits for the helper to exit. At `term_at` the group gets SIGTERM, `grace` later SIGKILL.
    async fn wait_exit(
        &mut self,
        mut term_at: Option<(Instant, StopCause)>,
        grace: Duration,
    ) -> io::Result<std::process::ExitStatus> {
        let mut kill_at: Option<Instant> = None;
        loop {
            if let Some(status) = self.helper.try_wait()? {
                return Ok(status);
            }
            let next = kill_at.or(term_at.map(|(t, _)| t));
            let far = Instant::now() + Duration::from_secs(86_400 * 365);
            tokio::select! {
                ready = self.helper_pidfd.readable() => {
                    ready?.clear_ready();
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
    /// Only if the helper process cannot be waited for.
    pub async fn wait(&mut self) -> Result<ExitStatus, ExecError> {
        if let Some(status) = &self.status {
            return Ok(status.clone());
        }
        let term_at = self
            .timeout
            .map(|(at, after)| (at, StopCause::Timeout(after)));
        let raw = self
            .wait_exit(term_at, self.grace)
            .await
            .map_err(|e| self.wait_err(e))?;
        Ok(self.finish(raw).await)
    }

    /// Stops the command: SIGTERM to its process group, SIGKILL after `grace`.
    ///
    /// # Errors
    /// Only if the helper process cannot be waited for.
    pub async fn kill(&mut self, grace: Duration) -> Result<ExitStatus, ExecError> {
        if let Some(status) = &self.status {
            return Ok(status.clone());
        }
        let raw = self
            .wait_exit(Some((Instant::now(), StopCause::Stop)), grace)
            .await
            .map_err(|e| self.wait_err(e))?;
        Ok(self.finish(raw).await)
    }

    fn wait_err(&self, source: io::Error) -> ExecError {
        ExecError::Wait {
            id: self.sandbox_id.clone(),
            source,
        }
    }

    async fn finish(&mut self, raw: std::process::ExitStatus) -> ExitStatus {
        // The command is over: whatever it left running in its process group goes too.
        for _ in 0..1000 {
            // SAFETY: kill(2) on the workload's process group.
            if unsafe { libc::kill(-self.pid, libc::SIGKILL) } != 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        for pump in std::mem::take(&mut self.pumps) {
            let abort = pump.abort_handle();
            if tokio::time::timeout(DRAIN_TIMEOUT, pump).await.is_err() {
                // A process that left the group still holds the pipe; stop reading it.
                abort.abort();
            }
        }
        let code = raw.code();
        let signal = raw.signal();
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
        let _ = pidfd_kill(self.helper_pidfd.get_ref(), libc::SIGKILL);
        // Reap the helper; it dies at once from SIGKILL, so this does not block for long.
        let _ = self.helper.wait();
        for pump in &self.pumps {
            pump.abort();
        }
    }
}
