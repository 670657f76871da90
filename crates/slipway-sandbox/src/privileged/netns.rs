//! Sockets created inside a sandbox's network namespace.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole life.
//! One dedicated std thread per sandbox joins the sandbox's network namespace (`setns`, which
//! only affects that thread) and creates sockets on request; the async side then connects or
//! binds them to the sandbox's 127.0.0.1 from any thread. No veth pair, no host port.

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use tokio::sync::oneshot;

type Request = oneshot::Sender<io::Result<Socket>>;

/// Handle to a sandbox's socket-factory thread. Dropping it ends the thread.
#[derive(Debug)]
pub(crate) struct NetnsSockets {
    requests: mpsc::Sender<Request>,
}

impl NetnsSockets {
    /// Starts the thread inside the network namespace `netns` (an open `/proc/<pid>/ns/net`).
    pub(crate) fn start(netns: OwnedFd, sandbox_id: &str) -> io::Result<Self> {
        let (requests, incoming) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        std::thread::Builder::new()
            .name(format!("netns-{sandbox_id}"))
            .spawn(move || {
                if let Err(e) = setns(&netns, CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
                drop(netns);
                let _ = ready_tx.send(Ok(()));
                while let Ok(reply) = incoming.recv() {
                    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                        .and_then(|s| s.set_nonblocking(true).map(|()| s));
                    let _ = reply.send(socket);
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("network namespace thread exited before starting"))??;
        Ok(Self { requests })
    }

    /// Asks for a fresh non-blocking IPv4 TCP socket in the sandbox's network namespace; the
    /// answer arrives on the returned channel.
    pub(crate) fn request_socket(&self) -> io::Result<oneshot::Receiver<io::Result<Socket>>> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .map_err(|_| io::Error::other("network namespace thread is gone"))?;
        Ok(rx)
    }
}
