//! Copying a sandbox's workspace out, for the engine to make a release from.
//!
//! The source tree belongs to a hostile workload and is read by root on the host, through
//! `/proc/<init>/root`. A symlink there resolves against the *host's* root if followed, and a
//! directory can be swapped for a symlink between two system calls. So every open goes through
//! `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` relative to the workspace directory:
//! the kernel refuses any path that would leave it or pass through a symlink.

use nix::fcntl::{openat2, readlinkat, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, FileStat, SFlag};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Entries copied beyond this count abort the export (the workspace quota bounds it anyway).
const MAX_ENTRIES: u64 = 2_000_000;
/// Directory nesting beyond this depth aborts the export.
const MAX_DEPTH: usize = 256;

/// What an export copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Devices, fifos and sockets, which are never copied (relative paths).
    pub skipped: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "sandbox {id}: export destination {path:?} already exists or cannot be created: {source}"
    )]
    Dest {
        id: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("sandbox {id}: reading workspace entry {path:?}: {source}")]
    Read {
        id: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("sandbox {id}: writing {path:?}: {source}")]
    Write {
        id: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("sandbox {id}: the workspace has more than {limit} entries")]
    TooManyEntries { id: String, limit: u64 },
    #[error("sandbox {id}: {path:?} is nested deeper than {limit} directories")]
    TooDeep {
        id: String,
        path: PathBuf,
        limit: usize,
    },
}

fn resolve_beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV
}

fn open_beneath(root: &OwnedFd, rel: &Path, dir: bool) -> io::Result<OwnedFd> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    if dir {
        flags |= OFlag::O_DIRECTORY;
    }
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    Ok(openat2(
        root,
        rel,
        OpenHow::new().flags(flags).resolve(resolve_beneath()),
    )?)
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Copies the tree at `src` into the new directory `dest`.
pub(crate) fn copy_tree(id: &str, src: &Path, dest: &Path) -> Result<ExportSummary, ExportError> {
    let read_err = |path: &Path| {
        let (id, path) = (id.to_string(), path.to_path_buf());
        move |source: io::Error| ExportError::Read { id, path, source }
    };
    let write_err = |path: &Path| {
        let (id, path) = (id.to_string(), path.to_path_buf());
        move |source: io::Error| ExportError::Write { id, path, source }
    };
    // The components of `src` (`/proc/<pid>/root/workspace/app`) are not the workload's.
    let root: OwnedFd = fs::File::open(src).map_err(read_err(Path::new("")))?.into();
    fs::DirBuilder::new()
        .mode(0o755)
        .create(dest)
        .map_err(|source| ExportError::Dest {
            id: id.to_string(),
            path: dest.to_path_buf(),
            source,
        })?;

    let mut summary = ExportSummary::default();
    let mut entries = 0u64;
    let mut pending: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        if rel.components().count() > MAX_DEPTH {
            return Err(ExportError::TooDeep {
                id: id.to_string(),
                path: rel,
                limit: MAX_DEPTH,
            });
        }
        let dir = open_beneath(&root, &rel, true).map_err(read_err(&rel))?;
        // Listing through the descriptor's /proc/self/fd link reads exactly the directory we
        // opened, whatever happens to its path meanwhile.
        let listing =
            fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())).map_err(read_err(&rel))?;
        for entry in listing {
            let entry = entry.map_err(read_err(&rel))?;
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(ExportError::TooManyEntries {
                    id: id.to_string(),
                    limit: MAX_ENTRIES,
                });
            }
            let name = entry.file_name();
            let child = rel.join(&name);
            let out = dest.join(&child);
            let st = fstatat(
                &dir,
                name.as_os_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| read_err(&child)(e.into()))?;
            let perm = st.st_mode & 0o777;
            match kind(&st) {
                SFlag::S_IFDIR => {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&out)
                        .map_err(write_err(&out))?;
                    fs::set_permissions(&out, fs::Permissions::from_mode(perm | 0o700))
                        .map_err(write_err(&out))?;
                    summary.dirs += 1;
                    pending.push(child);
                }
                SFlag::S_IFREG => {
                    let fd = open_beneath(&root, &child, false).map_err(read_err(&child))?;
                    let mut input = fs::File::from(fd);
                    if !input.metadata().map_err(read_err(&child))?.is_file() {
                        // Swapped for something else since the listing; not ours to copy.
                        summary.skipped.push(child);
                        continue;
                    }
                    let mut output = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(perm | 0o600)
                        .open(&out)
                        .map_err(write_err(&out))?;
                    summary.bytes += io::copy(&mut input, &mut output).map_err(write_err(&out))?;
                    fs::set_permissions(&out, fs::Permissions::from_mode(perm))
                        .map_err(write_err(&out))?;
                    summary.files += 1;
                }
                SFlag::S_IFLNK => {
                    let target = readlinkat(&dir, name.as_os_str())
                        .map_err(|e| read_err(&child)(e.into()))?;
                    std::os::unix::fs::symlink(&target, &out).map_err(write_err(&out))?;
                    summary.symlinks += 1;
                }
                _ => summary.skipped.push(child),
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_files_dirs_and_symlinks_without_following_links() {
        let src = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "host secret").unwrap();
        fs::create_dir(src.path().join("dist")).unwrap();
        fs::write(src.path().join("dist/index.html"), "<h1>hi</h1>").unwrap();
        fs::write(src.path().join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(src.path().join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(outside.path(), src.path().join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), src.path().join("leak")).unwrap();

        let dest = tempfile::tempdir().unwrap();
        let out = dest.path().join("export");
        let summary = copy_tree("sb", src.path(), &out).unwrap();
        assert_eq!((summary.files, summary.dirs, summary.symlinks), (2, 1, 2));
        assert_eq!(
            fs::read_to_string(out.join("dist/index.html")).unwrap(),
            "<h1>hi</h1>"
        );
        let mode = fs::metadata(out.join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        // The links are copied as links, never as the content they point to.
        assert!(fs::symlink_metadata(out.join("escape"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::symlink_metadata(out.join("leak"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(
            copy_tree("sb", src.path(), &out).is_err(),
            "destination must be new"
        );
    }
}
