//! The few raw file-system calls this crate needs, kept in one place.
//!
//! Capture reads directories an agent controls while running as a privileged user, so no open
//! of a captured file follows a symlink (an agent swapping `src/` for a symlink to `/etc`
//! between the walk and the read must get an error, not `/etc/shadow` in its snapshot): a
//! directory is opened beneath the source's [`Root`] with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS` (or one `O_NOFOLLOW` open per component on older kernels), and the
//! files in it by their single-component name with `O_NOFOLLOW` ([`open_file_at`]), the way
//! GNU tar works relative to directory descriptors.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A directory opened once; relative paths are resolved beneath it without following symlinks.
pub(crate) struct Root {
    fd: OwnedFd,
}

/// Mirrors `struct open_how` from `linux/openat2.h` (libc's copy is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Root {
    /// Opens `path` as the root of later lookups.
    pub(crate) fn open(path: &Path) -> io::Result<Root> {
        let c = cstring(path.as_os_str().as_bytes())?;
        // SAFETY: `c` is a valid NUL-terminated string; the returned fd is checked and owned.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just returned by open(2) and nothing else owns it.
        Ok(Root {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Opens the regular file `rel` ('/'-separated, relative) for reading, refusing symlinks in
    /// any component. `O_NONBLOCK` keeps a FIFO swapped in after the walk from hanging the open.
    pub(crate) fn open_file(&self, rel: &str) -> io::Result<File> {
        let flags =
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK;
        let fd = match self.openat2(rel, flags) {
            Err(e) if fallback_wanted(&e) => self.open_by_components(rel, flags)?,
            other => other?,
        };
        Ok(File::from(fd))
    }

    /// The root's own descriptor, usable as the `dirfd` of `*at` calls.
    pub(crate) fn raw(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }

    /// Opens the directory `rel` (a tree path, '/'-separated) beneath the root as an `O_PATH`
    /// descriptor for later `*at` calls, refusing symlinks in any component.
    pub(crate) fn open_dir(&self, rel: &str) -> io::Result<OwnedFd> {
        self.open_dir_with(rel, libc::O_PATH)
    }

    /// Opens the directory `rel` beneath the root for listing ([`list_dir`]), refusing
    /// symlinks in any component; `""` is the root itself.
    pub(crate) fn open_dir_for_listing(&self, rel: &str) -> io::Result<OwnedFd> {
        if rel.is_empty() {
            return open_dir_at(self.fd.as_raw_fd(), b".");
        }
        self.open_dir_with(rel, libc::O_RDONLY)
    }

    fn open_dir_with(&self, rel: &str, mode: libc::c_int) -> io::Result<OwnedFd> {
        let flags = mode | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        match self.openat2(rel, flags) {
            Err(e) if fallback_wanted(&e) => self.open_by_components(rel, flags),
            other => other,
        }
    }

    fn openat2(&self, rel: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
        let c = cstring(rel.as_bytes())?;
        let how = OpenHow {
            flags: flags as u64,
            mode: 0,
            resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: all pointers are valid for the duration of the call and `size` matches the
        // struct we pass; the kernel copies it before returning.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a non-negative return of openat2 is a fresh fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) })
    }

    /// The pre-5.6-kernel way: one `openat(O_NOFOLLOW)` per component.
    pub(crate) fn open_by_components(&self, rel: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
        let mut parts = rel.split('/').peekable();
        let mut current: Option<OwnedFd> = None;
        while let Some(part) = parts.next() {
            if part.is_empty() || part == "." || part == ".." {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "path is not canonical",
                ));
            }
            let last = parts.peek().is_none();
            let f = if last {
                flags | libc::O_NOFOLLOW
            } else {
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC
            };
            let c = cstring(part.as_bytes())?;
            let dir = current
                .as_ref()
                .map_or(self.fd.as_raw_fd(), |f| f.as_raw_fd());
            // SAFETY: `dir` is an open directory fd and `c` is NUL-terminated.
            let fd = cvt(unsafe { libc::openat(dir, c.as_ptr(), f) })?;
            // SAFETY: fresh fd from openat(2).
            current = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        current.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty path"))
    }
}

/// Opens the entry `name` (one path component, no '/') of the directory `dir` for reading,
/// without following a symlink: with a single component, `O_NOFOLLOW` gives what
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` gives for a longer path. `O_NONBLOCK` keeps a FIFO
/// swapped in after the walk from hanging the open.
pub(crate) fn open_file_at(dir: libc::c_int, name: &[u8]) -> io::Result<File> {
    let c = cstring(name)?;
    let flags =
        libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK;
    // SAFETY: `c` is NUL-terminated; the returned fd is checked and then owned by the File.
    let fd = cvt(unsafe { libc::openat(dir, c.as_ptr(), flags) })?;
    // SAFETY: fresh fd from openat(2) that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Opens the subdirectory `name` of `dir` for listing, without following a symlink.
pub(crate) fn open_dir_at(dir: libc::c_int, name: &[u8]) -> io::Result<OwnedFd> {
    let c = cstring(name)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    // SAFETY: as in `open_file_at`.
    let fd = cvt(unsafe { libc::openat(dir, c.as_ptr(), flags) })?;
    // SAFETY: fresh fd from openat(2).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `lstat` of `name` in `dir` (`fstatat(AT_SYMLINK_NOFOLLOW)`).
pub(crate) fn lstat_at(dir: libc::c_int, name: &[u8]) -> io::Result<libc::stat> {
    let c = cstring(name)?;
    // SAFETY: zeroed `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable.
    cvt(unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// `fstat` of an open file.
pub(crate) fn fstat(f: &File) -> io::Result<libc::stat> {
    // SAFETY: as in `lstat_at`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `f` is an open fd and `st` is writable.
    cvt(unsafe { libc::fstat(f.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// Reads the target of the symlink `name` in `dir`.
pub(crate) fn read_link_at(dir: libc::c_int, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cstring(name)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` is writable for `buf.len()` bytes and `c` is NUL-terminated.
    let n = unsafe { libc::readlinkat(dir, c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n == buf.len() {
        // PATH_MAX is 4096, so a target this long cannot be used by anything anyway.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "symlink target is too long",
        ));
    }
    buf.truncate(n);
    Ok(buf)
}

/// Lists a directory opened with [`open_dir_at`]: `(name, d_type)` for every entry but `.`
/// and `..`. `d_type` may be `DT_UNKNOWN` on file systems that do not fill it in.
pub(crate) fn list_dir(dir: &OwnedFd, mut each: impl FnMut(&[u8], u8)) -> io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: `buf` is writable for its length; getdents64 fills whole records.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(());
        }
        let mut off = 0usize;
        while off < n as usize {
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let rec = &buf[off..n as usize];
            if rec.len() < 20 {
                break;
            }
            let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
            if reclen < 20 || reclen > rec.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed directory record",
                ));
            }
            let d_type = rec[18];
            let name_field = &rec[19..reclen];
            let len = name_field
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(name_field.len());
            let name = &name_field[..len];
            if name != b"." && name != b".." {
                each(name, d_type);
            }
            off += reclen;
        }
    }
}

/// openat2 is missing (old kernel) or filtered (seccomp): use the per-component walk.
fn fallback_wanted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::E2BIG)
    )
}

/// Renames `from` to `to` unless `to` exists. Returns `false` (and leaves `from` alone) when
/// `to` already exists.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    let a = cstring(from.as_os_str().as_bytes())?;
    let b = cstring(to.as_os_str().as_bytes())?;
    // SAFETY: both strings are valid and NUL-terminated.
    let ret = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(false),
        // The file system has no RENAME_NOREPLACE: check then rename. Writers of one name race
        // only with writers of the same content, so losing the race is harmless.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if to.symlink_metadata().is_ok() {
                return Ok(false);
            }
            std::fs::rename(from, to)?;
            Ok(true)
        }
        _ => Err(err),
    }
}

/// Asks the kernel to start writing `len` bytes of `f` from `offset` to disk, without waiting.
/// Best effort: an archive is still fsynced at the end; starting early lets the disk work while
/// the rest is compressed, so that final fsync has little left to do.
pub(crate) fn start_writeback(f: &File, offset: u64, len: u64) {
    // SAFETY: plain syscall on an open fd; failure only loses the head start.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Makes a rename or create in `dir` durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `dir` itself, or the current directory when `dir` is empty (a bare file name's parent).
pub(crate) fn parent_or_dot(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

pub(crate) fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
