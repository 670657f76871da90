//! Walking a source tree: ignore rules and the capture guards that can be decided from
//! names and metadata alone.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::{DirEntry, ParallelVisitor, ParallelVisitorBuilder, WalkBuilder, WalkState};

use crate::capture::CaptureError;
use crate::fsutil::{lossy, Root};
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

#[derive(Debug, Clone)]
pub(crate) enum ScanKind {
    File { executable: bool, key: StatKey },
    Symlink { target: String },
}

#[derive(Debug, Clone)]
pub(crate) struct ScanEntry {
    pub path: String,
    pub kind: ScanKind,
}

pub(crate) struct Scan {
    /// Canonical path of the source directory.
    pub root: PathBuf,
    pub dir: Root,
    /// Sorted by path bytes.
    pub entries: Vec<ScanEntry>,
    /// Sum of regular file sizes.
    pub total_bytes: u64,
}

/// Walks `dir`, applies the ignore rules and the metadata guards, and returns the entries in
/// canonical order.
pub(crate) fn scan(dir: &Path, opts: &CaptureOptions) -> Result<Scan, CaptureError> {
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
    let matcher = Arc::new(ignore_matcher(&root, &root_dir)?);

    let mut builder = WalkBuilder::new(&root);
    builder
        .standard_filters(false)
        .follow_links(false)
        .threads(opts.threads());
    let m = matcher.clone();
    builder.filter_entry(move |e: &DirEntry| {
        let is_dir = e.file_type().is_some_and(|t| t.is_dir());
        !(e.depth() > 0 && m.matched(e.path(), is_dir).is_ignore())
    });

    let shared = Shared {
        root: root.clone(),
        dir: &root_dir,
        entries: Mutex::new(Vec::new()),
        error: Mutex::new(None),
        count: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        opts,
    };
    builder
        .build_parallel()
        .visit(&mut VisitorBuilder { shared: &shared });
    let Shared {
        error,
        entries,
        bytes,
        ..
    } = shared;
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut entries = entries.into_inner().unwrap_or_else(|p| p.into_inner());
    entries.sort_unstable_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    check_links(&entries)?;
    let total_bytes = bytes.into_inner();
    Ok(Scan {
        root,
        dir: root_dir,
        entries,
        total_bytes,
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
            ScanKind::File { .. } => None,
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

struct Shared<'a> {
    root: PathBuf,
    dir: &'a Root,
    entries: Mutex<Vec<ScanEntry>>,
    error: Mutex<Option<CaptureError>>,
    count: AtomicU64,
    bytes: AtomicU64,
    opts: &'a CaptureOptions,
}

impl Shared<'_> {
    fn fail(&self, e: CaptureError) -> WalkState {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        WalkState::Quit
    }

    fn visit(
        &self,
        result: Result<DirEntry, ignore::Error>,
        out: &mut Vec<ScanEntry>,
    ) -> WalkState {
        let entry = match result {
            Ok(e) => e,
            Err(e) => return self.fail(walk_error(e, &self.root)),
        };
        if entry.depth() == 0 {
            return WalkState::Continue;
        }
        let Some(ft) = entry.file_type() else {
            return WalkState::Continue;
        };
        if ft.is_dir() {
            return WalkState::Continue;
        }
        let rel = match entry
            .path()
            .strip_prefix(&self.root)
            .ok()
            .and_then(|p| p.to_str())
        {
            Some(r) => r.to_string(),
            None => {
                let shown = entry
                    .path()
                    .strip_prefix(&self.root)
                    .unwrap_or(entry.path());
                return self.fail(CaptureError::NonUtf8Path {
                    path: shown.to_path_buf(),
                });
            }
        };
        let kind = if ft.is_file() {
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) => return self.fail(walk_error(e, &self.root)),
            };
            let total = self.bytes.fetch_add(meta.len(), Ordering::Relaxed) + meta.len();
            if total > self.opts.max_uncompressed_bytes {
                return self.fail(CaptureError::TooManyBytes {
                    limit: self.opts.max_uncompressed_bytes,
                });
            }
            ScanKind::File {
                executable: meta.mode() & 0o100 != 0,
                key: StatKey::of(&meta),
            }
        } else if ft.is_symlink() {
            let target = match self.dir.read_link(&rel) {
                Ok(t) => t,
                Err(source) => return self.fail(CaptureError::Unreadable { path: rel, source }),
            };
            match String::from_utf8(target) {
                Ok(t) if !t.is_empty() => ScanKind::Symlink { target: t },
                Ok(_) => {
                    return self.fail(CaptureError::SymlinkEscapes {
                        path: rel.clone(),
                        target: String::new(),
                        via: rel,
                    })
                }
                Err(e) => {
                    return self.fail(CaptureError::NonUtf8Target {
                        path: rel,
                        target: lossy(e.as_bytes()),
                    })
                }
            }
        } else {
            let what = if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_block_device() || ft.is_char_device() {
                "device"
            } else {
                "special file"
            };
            return self.fail(CaptureError::SpecialFile {
                path: rel,
                kind: what,
            });
        };
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.opts.max_files {
            return self.fail(CaptureError::TooManyFiles {
                limit: self.opts.max_files,
            });
        }
        out.push(ScanEntry { path: rel, kind });
        WalkState::Continue
    }
}

/// The walk's error, naming the path relative to the source root like every other guard (a
/// host path is nobody's business but the server's).
fn walk_error(e: ignore::Error, root: &Path) -> CaptureError {
    let mut path = None;
    let mut cur = &e;
    loop {
        match cur {
            ignore::Error::WithPath { path: p, err } => {
                path.get_or_insert_with(|| match p.strip_prefix(root) {
                    Ok(rel) if rel.as_os_str().is_empty() => ".".to_string(),
                    Ok(rel) => rel.display().to_string(),
                    Err(_) => p.display().to_string(),
                });
                cur = err;
            }
            ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
                cur = err
            }
            ignore::Error::Io(io) => {
                return CaptureError::Unreadable {
                    path: path.unwrap_or_default(),
                    source: std::io::Error::new(io.kind(), io.to_string()),
                }
            }
            other => {
                return CaptureError::Unreadable {
                    path: path.unwrap_or_default(),
                    source: std::io::Error::other(other.to_string()),
                }
            }
        }
    }
}

struct VisitorBuilder<'s, 'a> {
    shared: &'s Shared<'a>,
}

impl<'s, 'a: 's> ParallelVisitorBuilder<'s> for VisitorBuilder<'s, 'a> {
    fn build(&mut self) -> Box<dyn ParallelVisitor + 's> {
        Box::new(Visitor {
            shared: self.shared,
            out: Vec::new(),
        })
    }
}

/// Collects locally and hands its entries over once, on drop, to keep the lock cold.
struct Visitor<'s, 'a> {
    shared: &'s Shared<'a>,
    out: Vec<ScanEntry>,
}

impl ParallelVisitor for Visitor<'_, '_> {
    fn visit(&mut self, entry: Result<DirEntry, ignore::Error>) -> WalkState {
        self.shared.visit(entry, &mut self.out)
    }
}

impl Drop for Visitor<'_, '_> {
    fn drop(&mut self) {
        let mut all = self
            .shared
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        all.append(&mut self.out);
    }
}
