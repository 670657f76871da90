//! The control channel between the driver and a sandbox's helper and init.
//!
//! One `SOCK_SEQPACKET` socket pair per sandbox, created by the driver. The helper gets its end
//! as descriptor 3 and passes it on to init, which keeps it for the sandbox's whole life. Every
//! message is one packet (no framing, no partial reads); descriptors travel with a message as
//! `SCM_RIGHTS`. Configuration is JSON, so nothing (environment values included) ever shows up in
//! the host's process list.
//!
//! Driver → helper/init: the [`InitConfig`] (first packet), [`MSG_CGROUPS`]; then, once the
//! sandbox is built up to its workspace (a spare), [`Assign`] with the lower dir's descriptor,
//! then [`Request`]s.
//! Helper/init → driver: one text line per packet, see the `MSG_*` prefixes.

use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

/// Everything `__sandbox-init` needs to build one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InitConfig {
    /// The pid the helper must see as its parent; if it differs, the driver is already gone.
    pub parent_pid: i32,
    /// The sandbox cgroup's parent directory in each hierarchy. The helper opens them when the
    /// config arrives; the driver creates `<parent>/<cgroup_name>` meanwhile and then sends
    /// [`MSG_CGROUPS`], and the helper moves init into `<name>/cgroup.procs` under each.
    pub cgroup_parents: Vec<PathBuf>,
    pub cgroup_name: String,
    /// Host directory that becomes the sandbox root (a tmpfs is mounted on it in the sandbox's
    /// private mount namespace only).
    pub root_dir: PathBuf,
    /// The driver's ready-made /etc for this uid, gid and hostname, bound read-only.
    pub etc_dir: PathBuf,
    /// Extra host directories bound read-only at the same path.
    pub toolchain_paths: Vec<PathBuf>,
    /// The workload user: every command runs as this uid and gid (never 0).
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    pub tmp_bytes: u64,
    pub home_bytes: u64,
    pub shm_bytes: u64,
}

/// Driver → a spare sandbox's init (which has built everything but the workspace): this spare
/// is now one sandbox's. Sent with one descriptor, the snapshot's cached extraction (the
/// overlay's lower layer) opened `O_PATH` by the driver: the host path is out of init's reach
/// after `pivot_root`, the descriptor is not. Init mounts the workspace, answers
/// [`MSG_ASSIGNED`] and only then serves [`Request`]s.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Assign {
    /// Size of the workspace's writable layer (the disk quota).
    pub workspace_bytes: u64,
}

/// What the driver asks a running sandbox's init to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Fork and exec one command. Sent with three descriptors: the write ends of its stdout
    /// and stderr pipes and of its status pipe (see [`ForkRequest`]).
    Exec(ForkRequest),
    /// Send `signal` to command `id`'s process group (and to its main process, in case that
    /// left the group). Ignored once the command has been reported as exited.
    Signal { id: u64, signal: i32 },
}

/// One command. It runs as the sandbox's workload uid and gid (from [`InitConfig`], never from
/// the request).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ForkRequest {
    /// The driver's number for this command; every reply about it carries it.
    pub id: u64,
    pub cwd: PathBuf,
    pub argv: Vec<String>,
    /// `KEY=value` strings, exactly the workload's environment.
    pub env: Vec<String>,
}

/// The descriptors that come with [`Request::Exec`], in this order.
pub(crate) const EXEC_FDS: usize = 3;

/// Driver → helper, after the config: the sandbox's cgroups exist, move init into them.
pub(crate) const MSG_CGROUPS: &str = "cgroups";

/// `pid <host pid of init>`: sent by the outer helper once init is in the sandbox's cgroups.
pub(crate) const MSG_PID: &str = "pid ";
/// `ready`: init built the sandbox (all but the workspace: a spare) and waits for [`Assign`].
pub(crate) const MSG_READY: &str = "ready";
/// `assigned`: init mounted the workspace and now serves requests.
pub(crate) const MSG_ASSIGNED: &str = "assigned";
/// `error <step>: <detail>`: building the sandbox failed.
pub(crate) const MSG_ERROR: &str = "error ";
/// `started <id>`: the command's process exists. Carries a pidfd of it (`SCM_RIGHTS`) and its
/// pid as credentials (`SCM_CREDENTIALS`), which the kernel translates into the receiver's pid
/// namespace: the driver learns the host pid without any lookup.
pub(crate) const MSG_STARTED: &str = "started ";
/// `failed <id> <message>`: the command could not be forked.
pub(crate) const MSG_FAILED: &str = "failed ";
/// `exited <id> code <n>` or `exited <id> signal <n>`: the command's main process ended (and
/// what it left in its process group was killed).
pub(crate) const MSG_EXITED: &str = "exited ";

/// The helper's end of the control socket is always this descriptor.
pub(crate) const CONTROL_FD: i32 = 3;

/// Largest packet either side sends; large enough for any command line and environment that
/// `execve` would accept.
pub(crate) const MAX_MESSAGE: usize = 4 << 20;

/// How a command's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawExit {
    Code(i32),
    Signal(i32),
}

/// A packet from the helper or init.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Pid(i32),
    Ready,
    Assigned,
    Error(String),
    Started { id: u64 },
    Failed { id: u64, message: String },
    Exited { id: u64, exit: RawExit },
}

pub(crate) fn parse_reply(text: &str) -> Option<Reply> {
    let text = text.trim_end_matches('\n');
    if let Some(pid) = text.strip_prefix(MSG_PID) {
        return pid.trim().parse().ok().map(Reply::Pid);
    }
    if text == MSG_READY {
        return Some(Reply::Ready);
    }
    if text == MSG_ASSIGNED {
        return Some(Reply::Assigned);
    }
    if let Some(msg) = text.strip_prefix(MSG_ERROR) {
        return Some(Reply::Error(msg.to_string()));
    }
    if let Some(id) = text.strip_prefix(MSG_STARTED) {
        return id.trim().parse().ok().map(|id| Reply::Started { id });
    }
    if let Some(rest) = text.strip_prefix(MSG_FAILED) {
        let (id, message) = rest.split_once(' ').unwrap_or((rest, ""));
        return id.parse().ok().map(|id| Reply::Failed {
            id,
            message: message.to_string(),
        });
    }
    if let Some(rest) = text.strip_prefix(MSG_EXITED) {
        let mut parts = rest.split(' ');
        let id = parts.next()?.parse().ok()?;
        let kind = parts.next()?;
        let n: i32 = parts.next()?.parse().ok()?;
        let exit = match kind {
            "code" => RawExit::Code(n),
            "signal" => RawExit::Signal(n),
            _ => return None,
        };
        return Some(Reply::Exited { id, exit });
    }
    None
}

/// Space for the control messages of one packet: up to four descriptors and one set of
/// credentials (each `CMSG_SPACE` rounds up to 8 bytes; 128 bytes is ample).
type CmsgBuf = [u64; 16];

/// Sends one packet with `fds` attached and, when given, `pid` as its credentials (the sender
/// must be that process or hold CAP_SYS_ADMIN over its pid namespace). `flags` are `send`
/// flags (`MSG_DONTWAIT` on a blocking socket, for example); `MSG_NOSIGNAL` is always added.
pub(crate) fn send_packet(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[RawFd],
    pid: Option<i32>,
    flags: i32,
) -> io::Result<()> {
    let mut cmsg: CmsgBuf = [0; 16];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let fds_len = std::mem::size_of_val(fds) as u32;
    let creds_len = std::mem::size_of::<libc::ucred>() as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe {
        (if fds.is_empty() {
            0
        } else {
            libc::CMSG_SPACE(fds_len)
        }) + (if pid.is_some() {
            libc::CMSG_SPACE(creds_len)
        } else {
            0
        })
    } as usize;
    assert!(
        space <= std::mem::size_of::<CmsgBuf>(),
        "too many descriptors"
    );
    if space > 0 {
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is `space` bytes long, aligned for cmsghdr, and each
        // header is written inside it as CMSG_FIRSTHDR/CMSG_NXTHDR lay them out.
        unsafe {
            let mut hdr = libc::CMSG_FIRSTHDR(&msg);
            if !fds.is_empty() {
                (*hdr).cmsg_level = libc::SOL_SOCKET;
                (*hdr).cmsg_type = libc::SCM_RIGHTS;
                (*hdr).cmsg_len = libc::CMSG_LEN(fds_len) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(hdr),
                    fds_len as usize,
                );
                hdr = libc::CMSG_NXTHDR(&msg, hdr);
            }
            if let Some(pid) = pid {
                (*hdr).cmsg_level = libc::SOL_SOCKET;
                (*hdr).cmsg_type = libc::SCM_CREDENTIALS;
                (*hdr).cmsg_len = libc::CMSG_LEN(creds_len) as usize;
                let creds = libc::ucred {
                    pid,
                    uid: libc::geteuid(),
                    gid: libc::getegid(),
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(hdr).cast::<libc::ucred>(), creds);
            }
        }
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, flags | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One received packet: its length (0 means the peer is gone), the descriptors that came with
/// it (close-on-exec) and the sender's credentials' pid, when the socket has `SO_PASSCRED`.
pub(crate) struct Packet {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    pub pid: Option<i32>,
}

/// Receives one packet into `buf`. A packet longer than `buf` is an error (its tail would be
/// lost); so are descriptors that did not fit.
pub(crate) fn recv_packet(sock: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> io::Result<Packet> {
    let mut cmsg: CmsgBuf = [0; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of::<CmsgBuf>();
    let n = loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n =
            unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut packet = Packet {
        len: n,
        fds: Vec::new(),
        pid: None,
    };
    // SAFETY: the kernel filled the control buffer; CMSG_FIRSTHDR/CMSG_NXTHDR walk it within
    // msg_controllen, and every SCM_RIGHTS descriptor is ours to own from now on.
    unsafe {
        let mut hdr = libc::CMSG_FIRSTHDR(&msg);
        while !hdr.is_null() {
            let data = libc::CMSG_DATA(hdr);
            let len = (*hdr).cmsg_len - (data as usize - hdr as usize);
            match ((*hdr).cmsg_level, (*hdr).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        packet.fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) => {
                    let creds = std::ptr::read_unaligned(data.cast::<libc::ucred>());
                    packet.pid = Some(creds.pid);
                }
                _ => {}
            }
            hdr = libc::CMSG_NXTHDR(&msg, hdr);
        }
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message too long",
        ));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message carried too many descriptors",
        ));
    }
    Ok(packet)
}

/// A connected `SOCK_SEQPACKET` pair, both ends close-on-exec.
pub(crate) fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array we own.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned these descriptors; nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets an integer socket option.
pub(crate) fn set_sockopt(
    sock: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: i32,
) -> io::Result<()> {
    // SAFETY: setsockopt reads an int from the pointer we pass with its size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn replies_parse() {
        assert_eq!(parse_reply("pid 42\n"), Some(Reply::Pid(42)));
        assert_eq!(parse_reply("ready"), Some(Reply::Ready));
        assert_eq!(parse_reply("assigned"), Some(Reply::Assigned));
        assert_eq!(
            parse_reply("error mount /proc: EPERM"),
            Some(Reply::Error("mount /proc: EPERM".into()))
        );
        assert_eq!(parse_reply("started 7"), Some(Reply::Started { id: 7 }));
        assert_eq!(
            parse_reply("failed 7 fork workload: EAGAIN"),
            Some(Reply::Failed {
                id: 7,
                message: "fork workload: EAGAIN".into()
            })
        );
        assert_eq!(
            parse_reply("exited 7 code 3"),
            Some(Reply::Exited {
                id: 7,
                exit: RawExit::Code(3)
            })
        );
        assert_eq!(
            parse_reply("exited 8 signal 9"),
            Some(Reply::Exited {
                id: 8,
                exit: RawExit::Signal(9)
            })
        );
        assert_eq!(parse_reply("exited 8 oops 9"), None);
        assert_eq!(parse_reply("nonsense"), None);
    }

    #[test]
    fn packets_carry_descriptors_and_credentials() {
        let (a, b) = socket_pair().unwrap();
        set_sockopt(b.as_fd(), libc::SOL_SOCKET, libc::SO_PASSCRED, 1).unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let me = std::process::id() as i32;
        send_packet(a.as_fd(), b"started 1", &[w.as_raw_fd()], Some(me), 0).unwrap();
        drop(w);
        let mut buf = [0u8; 64];
        let p = recv_packet(b.as_fd(), &mut buf, 0).unwrap();
        assert_eq!(&buf[..p.len], b"started 1");
        assert_eq!(p.pid, Some(me));
        assert_eq!(p.fds.len(), 1);
        nix::unistd::write(&p.fds[0], b"x").unwrap();
        let mut one = [0u8; 1];
        assert_eq!(nix::unistd::read(&r, &mut one).unwrap(), 1);
        drop(a);
        assert_eq!(recv_packet(b.as_fd(), &mut buf, 0).unwrap().len, 0);
    }
}
