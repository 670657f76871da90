//! Starts helper processes from one dedicated, long-lived std thread.
//!
//! The helpers set PR_SET_PDEATHSIG so they die with slipway. The kernel delivers that signal
//! when the *thread* that forked them exits, not the process: spawning from tokio's blocking
//! pool (whose threads exit when idle) would kill sandboxes at random. This thread lives until
//! the process exits.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::OnceLock;
use tokio::sync::oneshot;

type Job = (Command, oneshot::Sender<io::Result<Child>>);

static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

fn spawner() -> &'static mpsc::Sender<Job> {
    SPAWNER.get_or_init(|| {
        reserve_status_fd();
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sandbox-spawner".into())
            .spawn(move || {
                while let Ok((mut cmd, reply)) = rx.recv() {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the sandbox spawner thread");
        tx
    })
}

/// The exec helper receives its status pipe as fd 3 (dup2 in the forked child). If fd 3 were
/// free in this process, std's own internal pipe could land there and be clobbered; keep it
/// occupied for the life of the process.
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

/// Spawns `cmd` on the spawner thread.
pub(crate) async fn spawn(cmd: Command) -> io::Result<Child> {
    let (tx, rx) = oneshot::channel();
    spawner()
        .send((cmd, tx))
        .map_err(|_| io::Error::other("sandbox spawner thread is gone"))?;
    rx.await
        .map_err(|_| io::Error::other("sandbox spawner thread is gone"))?
}

/// Makes sure the spawner thread (and the fd-3 reservation) exists before anything else.
pub(crate) fn start() {
    let _ = spawner();
}
