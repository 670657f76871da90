//! Reading snapshot archives: the one validating walk shared by upload verification and
//! extraction, and the safe extractor built on it.
//!
//! Archives are hostile input. Every entry must be a directory, a regular file or a symlink with
//! a canonical relative path; nothing may appear twice or beneath a file or symlink (which is
//! how "write through a symlink" would happen); hard links, devices and FIFOs are refused; the
//! entry count and total file bytes are bounded before anything is read, and zstd's window is
//! bounded by the decoder's default (128 MiB), so neither a tar bomb nor a zstd bomb gets far.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::fsutil::{lossy, parent_or_dot, rename_noreplace};
use crate::tree::{check_path, PathProblem};

/// Bounds and ownership for [`extract`].
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Owner (uid, gid) given to everything extracted; `None` keeps the caller's.
    pub owner: Option<(u32, u32)>,
    /// Most total file bytes written before extraction stops.
    pub max_bytes: u64,
    /// Most entries (directories included) read before extraction stops.
    pub max_entries: u64,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            owner: None,
            max_bytes: 8 << 30,
            max_entries: 200_000,
        }
    }
}

/// What an extraction wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extracted {
    /// Regular files plus symlinks.
    pub files: u64,
    /// Sum of file sizes.
    pub bytes: u64,
}

/// Why an archive was refused (by extraction or by upload verification).
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("archive entry {path}: {reason}")]
    BadEntry { path: String, reason: String },
    #[error("the archive holds more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("the archive's files add up to more than {limit} bytes")]
    TooManyBytes { limit: u64 },
    #[error("the archive is not a valid .tar.zst: {0}")]
    Corrupt(String),
    #[error("destination {} already exists", path.display())]
    DestinationExists { path: PathBuf },
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One validated archive entry, as handed to a [`walk`] visitor.
pub(crate) enum Item<'a> {
    Dir,
    /// The visitor must consume exactly `size` bytes from `data`.
    File {
        executable: bool,
        size: u64,
        data: &'a mut dyn Read,
    },
    Symlink {
        target: String,
    },
}

pub(crate) struct Limits {
    pub max_entries: u64,
    pub max_bytes: u64,
}

fn bad(path: &[u8], reason: impl Into<String>) -> ExtractError {
    ExtractError::BadEntry {
        path: lossy(path),
        reason: reason.into(),
    }
}

fn corrupt(e: io::Error) -> ExtractError {
    ExtractError::Corrupt(e.to_string())
}

/// Most zero bytes accepted after the tar stream's first end-of-archive block (tar pads to
/// its record size, 10 KiB by default).
const MAX_TRAILER: u64 = 1 << 20;

/// Decompresses and walks the archive, validating each entry before handing it to `visit`.
/// Returns the number of non-directory entries and their total bytes.
pub(crate) fn walk<R: Read>(
    reader: R,
    limits: &Limits,
    mut visit: impl FnMut(&str, Item<'_>) -> Result<(), ExtractError>,
) -> Result<Extracted, ExtractError> {
    let decoder = zstd::stream::read::Decoder::new(reader).map_err(corrupt)?;
    let mut archive = tar::Archive::new(decoder);
    let mut leaves: HashSet<String> = HashSet::new();
    let mut dirs: HashSet<String> = HashSet::new();
    let mut entries = 0u64;
    let mut total = Extracted { files: 0, bytes: 0 };
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        entries += 1;
        if entries > limits.max_entries {
            return Err(ExtractError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let raw = entry.path_bytes().into_owned();
        let is_dir = kind == tar::EntryType::Directory;
        let path = check_path(&raw, is_dir)
            .map_err(|p| {
                bad(
                    &raw,
                    match p {
                        PathProblem::Empty => "empty path",
                        PathProblem::Absolute => "absolute path",
                        PathProblem::ParentDir => "path has a '..' component",
                        PathProblem::NotCanonical => {
                            "path is not canonical (empty or '.' component)"
                        }
                        PathProblem::NotUtf8 => "path is not valid UTF-8",
                    },
                )
            })?
            .to_string();
        // Nothing may live beneath a file or a symlink: that is how an archive writes through
        // a link it planted earlier.
        for (i, _) in path.match_indices('/') {
            let ancestor = &path[..i];
            if leaves.contains(ancestor) {
                return Err(bad(
                    &raw,
                    format!("lies beneath {ancestor}, which is a file or symlink"),
                ));
            }
        }
        if leaves.contains(&path) || (!is_dir && dirs.contains(&path)) {
            return Err(bad(&raw, "appears more than once"));
        }
        // The ancestors are directories from now on, listed or not: a later file or symlink
        // of the same name would make a tree that cannot exist (and that extraction could
        // not write), so it counts as a second appearance.
        for (i, _) in path.match_indices('/') {
            if !dirs.contains(&path[..i]) {
                dirs.insert(path[..i].to_string());
            }
        }
        match kind {
            tar::EntryType::Directory => {
                dirs.insert(path.clone());
                visit(&path, Item::Dir)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                total.bytes = total.bytes.saturating_add(size);
                if total.bytes > limits.max_bytes {
                    return Err(ExtractError::TooManyBytes {
                        limit: limits.max_bytes,
                    });
                }
                let mode = entry.header().mode().map_err(corrupt)?;
                leaves.insert(path.clone());
                total.files += 1;
                visit(
                    &path,
                    Item::File {
                        executable: mode & 0o100 != 0,
                        size,
                        data: &mut entry,
                    },
                )?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target = match String::from_utf8(target) {
                    Ok(t) if !t.is_empty() && !t.contains('\0') => t,
                    Ok(_) => return Err(bad(&raw, "symlink with an empty target")),
                    Err(_) => return Err(bad(&raw, "symlink target is not valid UTF-8")),
                };
                leaves.insert(path.clone());
                total.files += 1;
                visit(&path, Item::Symlink { target })?;
            }
            tar::EntryType::Link => {
                return Err(bad(&raw, "hard links are not allowed in a snapshot"))
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(bad(&raw, "device files are not allowed"))
            }
            tar::EntryType::Fifo => return Err(bad(&raw, "FIFOs are not allowed")),
            other => return Err(bad(&raw, format!("unsupported entry type {other:?}"))),
        }
    }
    // The tar reader stops at the first zero block. Read the rest of the zstd stream too, so
    // the frame checksum is verified (a flipped bit must not pass unnoticed) and nothing but a
    // little zero padding follows the archive.
    let mut rest = archive.into_inner().take(MAX_TRAILER + 1);
    let mut buf = [0u8; 8192];
    let mut trailer = 0u64;
    loop {
        let n = match rest.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(e)),
        };
        if buf[..n].iter().any(|b| *b != 0) {
            return Err(ExtractError::Corrupt(
                "data after the end of the tar archive".into(),
            ));
        }
        trailer += n as u64;
    }
    if trailer > MAX_TRAILER {
        return Err(ExtractError::Corrupt(
            "too much padding after the end of the tar archive".into(),
        ));
    }
    Ok(total)
}

/// Reads exactly `size` bytes of `data` into `sink`, failing on a short archive.
pub(crate) fn copy_exact(
    data: &mut dyn Read,
    size: u64,
    sink: &mut impl io::Write,
    path: &str,
) -> Result<(), ExtractError> {
    let copied = io::copy(&mut data.take(size), sink).map_err(|e| match e.kind() {
        io::ErrorKind::WriteZero | io::ErrorKind::StorageFull => ExtractError::Io {
            path: PathBuf::from(path),
            source: e,
        },
        _ => corrupt(e),
    })?;
    if copied != size {
        return Err(ExtractError::Corrupt(format!(
            "{path}: archive ends inside the file"
        )));
    }
    Ok(())
}

/// Extracts a `.tar.zst` snapshot archive into the new directory `dest`.
///
/// Everything is written beneath a fresh sibling directory that is renamed to `dest` only when
/// the whole archive passed, so a refused archive leaves nothing behind and `dest` appears
/// complete or not at all. Files get mode 0644 or 0755 (exec bit), directories 0755.
///
/// # Errors
/// [`ExtractError::DestinationExists`], a refused entry or limit, or an I/O error.
pub fn extract(
    reader: impl Read,
    dest: &Path,
    opts: &ExtractOptions,
) -> Result<Extracted, ExtractError> {
    if dest.symlink_metadata().is_ok() {
        return Err(ExtractError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let parent = parent_or_dot(dest);
    let io_at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExtractError::Io { path, source }
    };
    let staging = tempfile::Builder::new()
        .prefix(".slipway-extract-")
        .tempdir_in(&parent)
        .map_err(io_at(&parent))?;
    let root = staging.path().to_path_buf();
    let chown = |p: &Path| -> Result<(), ExtractError> {
        if let Some((uid, gid)) = opts.owner {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(io_at(p))?;
        }
        Ok(())
    };
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).map_err(io_at(&root))?;
    chown(&root)?;
    let mut made: HashSet<String> = HashSet::new();
    let mut mkdirs = |path: &str, include_self: bool| -> Result<(), ExtractError> {
        let ends = path
            .match_indices('/')
            .map(|(i, _)| i)
            .chain(include_self.then_some(path.len()));
        for end in ends {
            let d = &path[..end];
            if made.contains(d) {
                continue;
            }
            // Only directories this extraction made can exist beneath the staging directory,
            // and `walk` refused any entry beneath a file or symlink, so this cannot follow a
            // link.
            let full = root.join(d);
            match fs::create_dir(&full) {
                Ok(()) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::AlreadyExists
                        && full.symlink_metadata().is_ok_and(|m| m.is_dir()) => {}
                Err(e) => {
                    return Err(ExtractError::Io {
                        path: full,
                        source: e,
                    })
                }
            }
            fs::set_permissions(&full, fs::Permissions::from_mode(0o755)).map_err(io_at(&full))?;
            chown(&full)?;
            made.insert(d.to_string());
        }
        Ok(())
    };
    let limits = Limits {
        max_entries: opts.max_entries,
        max_bytes: opts.max_bytes,
    };
    let summary = walk(reader, &limits, |path, item| {
        match item {
            Item::Dir => mkdirs(path, true)?,
            Item::File {
                executable,
                size,
                data,
            } => {
                mkdirs(path, false)?;
                let full = root.join(path);
                let mode = if executable { 0o755 } else { 0o644 };
                let mut f: File = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&full)
                    .map_err(io_at(&full))?;
                copy_exact(data, size, &mut f, path)?;
                // The umask may have cut the mode.
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_at(&full))?;
                chown(&full)?;
            }
            Item::Symlink { target } => {
                mkdirs(path, false)?;
                let full = root.join(path);
                std::os::unix::fs::symlink(&target, &full).map_err(io_at(&full))?;
                chown(&full)?;
            }
        }
        Ok(())
    })?;
    if !rename_noreplace(&root, dest).map_err(io_at(dest))? {
        return Err(ExtractError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    // The directory now lives at `dest`; the guard must not remove it.
    let _ = staging.keep();
    Ok(summary)
}
