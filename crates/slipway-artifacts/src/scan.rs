//! Walking a source tree: ignore rules and the capture guards that can be decided from
//! names and metadata alone.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use rayon::slice::ParallelSliceMut;

use crate::capture::CaptureError;
use crate::fsutil::{list_dir, lossy, lstat_at, read_link_at, Root};
use crate::statcache::StatKey;
use crate::tree::{check_link, LinkProblem};
use crate::CaptureOptions;

/// Ignore rules applied before `.slipwayignore` (which can re-include with `!pattern`).
/// Directory-only patterns so a file called `build` (a script, say) is kept.
pub const DEFAULT_IGNORES: &[&str] = &[
    ".git",
    "node_modules/",
    "**/.next/cache/",
    "dist/",
    "build/",
    "*.log",
];

/// Name of the per-tree ignore file, read from the root only, gitignore syntax.
pub const IGNORE_FILE: &str = ".slipwayignore";

/// Largest `.slipwayignore` accepted; it is a list of patterns, not data.
const MAX_IGNORE_FILE: u64 = 1 << 20;

/// What the capture needs to know of a regular file's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileMeta {
    /// The owner exec bit.
    pub executable: bool,
    pub key: StatKey,
}

impl FileMeta {
    pub(crate) fn of_stat(st: &libc::stat) -> FileMeta {
        FileMeta {
            executable: st.st_mode & 0o100 != 0,
            key: StatKey::of_stat(st),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum ScanKind {
    /// A regular file; its metadata when the walk `stat`ed it (see [`scan`]'s `with_stats`),
    /// otherwise it is taken from the `fstat` of the open file when the file is read.
    File(Option<FileMeta>),
    Symlink {
        target: String,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct ScanEntry {
    pub path: String,
    /// Index of the entry's directory in [`Scan::dirs`].
    pub dir: u32,
    pub kind: ScanKind,
}

impl ScanEntry {
    /// The last component of the path: the name to open relative to its directory.
    pub(crate) fn name(&self) -> &str {
        match self.path.rfind('/') {
            Some(i) => &self.path[i + 1..],
            None => &self.path,
        }
    }
}

pub(crate) struct Scan {
    /// Canonical path of the source directory.
    pub root: PathBuf,
    pub dir: Root,
    /// Every directory walked, as a tree path (`""` is the root); entries refer to these by
    /// index, so readers open files relative to their directory rather than by full path.
    pub dirs: Vec<String>,
    /// Sorted by path bytes.
    pub entries: Vec<ScanEntry>,
    /// Sum of regular file sizes the walk saw (with stats), then of those learned on reading.
    bytes: AtomicU64,
    max_bytes: u64,
}

impl Scan {
    /// Sum of the sizes of the regular files whose metadata is known so far (all of them after
    /// a walk with stats, or after every file was read).
    pub(crate) fn total_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Accounts for the size of a file the walk did not `stat`, once, when it is first
    /// opened: the `max_uncompressed_bytes` guard.
    pub(crate) fn account(&self, size: u64) -> Result<(), CaptureError> {
        let total = self.bytes.fetch_add(size, Ordering::Relaxed) + size;
        if total > self.max_bytes {
            return Err(CaptureError::TooManyBytes {
                limit: self.max_bytes,
            });
        }
        Ok(())
    }
}

/// Walks `dir`, applies the ignore rules and the metadata guards, and returns the entries in
/// canonical order. `with_stats` is told the canonical root and says whether the walk should
/// `stat` every regular file (what a stat cache lookup needs); without, a file's metadata
/// comes from the `fstat` after opening it, one `stat` per file instead of two, and the size
/// guard is applied as files are read.
///
/// The walk is GNU tar's: each directory is opened once (beneath the root, no symlink
/// followed) and listed with `getdents64`, whose `d_type` tells files, directories, symlinks
/// and special files apart without a `stat`; a regular file costs one `fstatat` relative to
/// its directory (one path component); directories are walked in parallel on the rayon pool.
pub(crate) fn scan(
    dir: &Path,
    opts: &CaptureOptions,
    with_stats: impl FnOnce(&Path) -> bool,
) -> Result<Scan, CaptureError> {
    let root = match dir.canonicalize() {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CaptureError::SourceMissing {
                path: dir.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(CaptureError::Unreadable {
                path: dir.display().to_string(),
                source,
            })
        }
    };
    if !root.is_dir() {
        return Err(CaptureError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let root_dir = Root::open(&root).map_err(|source| CaptureError::Unreadable {
        path: dir.display().to_string(),
        source,
    })?;
    let matcher = ignore_matcher(&root, &root_dir)?;
    let stats = with_stats(&root);

    let walk = Walk {
        root: &root_dir,
        matcher: &matcher,
        opts,
        stats,
        dirs: Mutex::new(vec![String::new()]),
        entries: Mutex::new(Vec::new()),
        error: Mutex::new(None),
        stop: AtomicBool::new(false),
        count: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    };
    rayon::scope(|s| walk.dir(s, String::new(), 0));
    let Walk {
        error,
        entries,
        dirs,
        bytes,
        ..
    } = walk;
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut entries = entries.into_inner().unwrap_or_else(|p| p.into_inner());
    entries.par_sort_unstable_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    check_links(&entries)?;
    Ok(Scan {
        root,
        dir: root_dir,
        dirs: dirs.into_inner().unwrap_or_else(|p| p.into_inner()),
        entries,
        bytes,
        max_bytes: opts.max_uncompressed_bytes,
    })
}

/// The defaults plus the root's `.slipwayignore`, read without following a symlink (an agent
/// could otherwise point it at a host file and read it back through parse errors).
fn ignore_matcher(root: &Path, root_dir: &Root) -> Result<Gitignore, CaptureError> {
    let mut b = GitignoreBuilder::new(root);
    for line in DEFAULT_IGNORES {
        // The defaults are fixed, valid globs.
        b.add_line(None, line)
            .expect("default ignore patterns are valid");
    }
    let bad = |message: String| CaptureError::BadIgnoreFile {
        path: IGNORE_FILE.to_string(),
        message,
    };
    match root_dir.open_file(IGNORE_FILE) {
        Ok(f) => {
            let meta = f.metadata().map_err(|e| bad(e.to_string()))?;
            if !meta.is_file() {
                return Err(bad("not a regular file".into()));
            }
            if meta.len() > MAX_IGNORE_FILE {
                return Err(bad(format!("larger than {MAX_IGNORE_FILE} bytes")));
            }
            let mut text = String::new();
            f.take(MAX_IGNORE_FILE)
                .read_to_string(&mut text)
                .map_err(|e| bad(e.to_string()))?;
            let from = Some(root.join(IGNORE_FILE));
            for (n, line) in text.lines().enumerate() {
                b.add_line(from.clone(), line)
                    .map_err(|e| bad(format!("line {}: {e}", n + 1)))?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e)
            if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::EXDEV) =>
        {
            return Err(bad("is a symlink".into()))
        }
        Err(e) => return Err(bad(e.to_string())),
    }
    b.build().map_err(|e| bad(e.to_string()))
}

fn check_links(entries: &[ScanEntry]) -> Result<(), CaptureError> {
    let links: HashMap<String, String> = entries
        .iter()
        .filter_map(|e| match &e.kind {
            ScanKind::Symlink { target } => Some((e.path.clone(), target.clone())),
            ScanKind::File(_) => None,
        })
        .collect();
    for (path, target) in &links {
        match check_link(path, target, &links) {
            Ok(()) => {}
            Err(LinkProblem::Escapes { via }) => {
                return Err(CaptureError::SymlinkEscapes {
                    path: path.clone(),
                    target: target.clone(),
                    via,
                })
            }
            Err(LinkProblem::Loop) => return Err(CaptureError::SymlinkLoop { path: path.clone() }),
        }
    }
    Ok(())
}

struct Walk<'a> {
    root: &'a Root,
    matcher: &'a Gitignore,
    opts: &'a CaptureOptions,
    stats: bool,
    dirs: Mutex<Vec<String>>,
    entries: Mutex<Vec<ScanEntry>>,
    error: Mutex<Option<CaptureError>>,
    stop: AtomicBool,
    count: AtomicU64,
    bytes: AtomicU64,
}

/// What `d_type` (or, when the file system leaves it unknown, `lstat`) says an entry is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Type {
    Dir,
    File,
    Symlink,
    Special(&'static str),
}

fn type_of_mode(mode: libc::mode_t) -> Type {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => Type::Dir,
        libc::S_IFREG => Type::File,
        libc::S_IFLNK => Type::Symlink,
        libc::S_IFIFO => Type::Special("fifo"),
        libc::S_IFSOCK => Type::Special("socket"),
        libc::S_IFBLK | libc::S_IFCHR => Type::Special("device"),
        _ => Type::Special("special file"),
    }
}

impl<'a> Walk<'a> {
    fn fail(&self, e: CaptureError) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Lists the directory `rel` (index `idx` in `dirs`), records its entries and spawns a
    /// task per subdirectory. Only the directory being listed is open, so the walk holds at
    /// most one descriptor per worker however wide or deep the tree is.
    fn dir<'s>(&'s self, scope: &rayon::Scope<'s>, rel: String, idx: u32) {
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.list(scope, &rel, idx) {
            self.fail(e);
        }
    }

    fn list<'s>(
        &'s self,
        scope: &rayon::Scope<'s>,
        rel: &str,
        idx: u32,
    ) -> Result<(), CaptureError> {
        let shown = || {
            if rel.is_empty() {
                ".".to_string()
            } else {
                rel.to_string()
            }
        };
        let fd =
            self.root
                .open_dir_for_listing(rel)
                .map_err(|source| CaptureError::Unreadable {
                    path: shown(),
                    source,
                })?;
        let raw = fd.as_raw_fd();
        let mut out = Vec::new();
        let mut subdirs = Vec::new();
        let mut failed = None;
        list_dir(&fd, |name, d_type| {
            if failed.is_none() && !self.stop.load(Ordering::Relaxed) {
                if let Err(e) = self.entry(raw, rel, idx, name, d_type, &mut out, &mut subdirs) {
                    failed = Some(e);
                }
            }
        })
        .map_err(|source| CaptureError::Unreadable {
            path: shown(),
            source,
        })?;
        drop(fd);
        if let Some(e) = failed {
            return Err(e);
        }
        if !out.is_empty() {
            self.entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .append(&mut out);
        }
        for sub in subdirs {
            let sub_idx = {
                let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
                dirs.push(sub.clone());
                (dirs.len() - 1) as u32
            };
            scope.spawn(move |s| self.dir(s, sub, sub_idx));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &self,
        dir_fd: libc::c_int,
        rel: &str,
        idx: u32,
        name: &[u8],
        d_type: u8,
        out: &mut Vec<ScanEntry>,
        subdirs: &mut Vec<String>,
    ) -> Result<(), CaptureError> {
        let Ok(name_str) = std::str::from_utf8(name) else {
            return Err(CaptureError::NonUtf8Path {
                path: Path::new(rel).join(std::ffi::OsStr::from_bytes(name)),
            });
        };
        let path = if rel.is_empty() {
            name_str.to_string()
        } else {
            let mut p = String::with_capacity(rel.len() + 1 + name.len());
            p.push_str(rel);
            p.push('/');
            p.push_str(name_str);
            p
        };
        let lstat = |path: &str| {
            lstat_at(dir_fd, name).map_err(|source| CaptureError::Unreadable {
                path: path.to_string(),
                source,
            })
        };
        let mut st = None;
        let ty = match d_type {
            libc::DT_DIR => Type::Dir,
            libc::DT_REG => Type::File,
            libc::DT_LNK => Type::Symlink,
            libc::DT_FIFO => Type::Special("fifo"),
            libc::DT_SOCK => Type::Special("socket"),
            libc::DT_BLK | libc::DT_CHR => Type::Special("device"),
            _ => {
                let s = lstat(&path)?;
                let t = type_of_mode(s.st_mode);
                st = Some(s);
                t
            }
        };
        if self
            .matcher
            .matched(Path::new(&path), ty == Type::Dir)
            .is_ignore()
        {
            return Ok(());
        }
        let kind = match ty {
            Type::Dir => {
                subdirs.push(path);
                return Ok(());
            }
            Type::File => {
                let st = match st {
                    Some(s) => Some(s),
                    None if self.stats => Some(lstat(&path)?),
                    None => None,
                };
                let meta = match st {
                    Some(st) if type_of_mode(st.st_mode) != Type::File => {
                        // Replaced since the directory was listed.
                        return Err(CaptureError::FileChanged { path });
                    }
                    Some(st) => {
                        let size = st.st_size as u64;
                        let total = self.bytes.fetch_add(size, Ordering::Relaxed) + size;
                        if total > self.opts.max_uncompressed_bytes {
                            return Err(CaptureError::TooManyBytes {
                                limit: self.opts.max_uncompressed_bytes,
                            });
                        }
                        Some(FileMeta::of_stat(&st))
                    }
                    None => None,
                };
                ScanKind::File(meta)
            }
            Type::Symlink => {
                let target =
                    read_link_at(dir_fd, name).map_err(|source| CaptureError::Unreadable {
                        path: path.clone(),
                        source,
                    })?;
                match String::from_utf8(target) {
                    Ok(t) if !t.is_empty() => ScanKind::Symlink { target: t },
                    Ok(_) => {
                        return Err(CaptureError::SymlinkEscapes {
                            path: path.clone(),
                            target: String::new(),
                            via: path,
                        })
                    }
                    Err(e) => {
                        return Err(CaptureError::NonUtf8Target {
                            path,
                            target: lossy(e.as_bytes()),
                        })
                    }
                }
            }
            Type::Special(what) => {
                return Err(CaptureError::SpecialFile { path, kind: what });
            }
        };
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.opts.max_files {
            return Err(CaptureError::TooManyFiles {
                limit: self.opts.max_files,
            });
        }
        out.push(ScanEntry {
            path,
            dir: idx,
            kind,
        });
        Ok(())
    }
}
