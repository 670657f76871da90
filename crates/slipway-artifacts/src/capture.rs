//! Capture: source tree → content hash and deterministic `.tar.zst`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::fsutil::{fsync_dir, parent_or_dot, rename_noreplace, start_writeback, Root};
use crate::scan::{scan, Scan, ScanEntry, ScanKind};
use crate::statcache::{StatCache, StatKey};
use crate::tree::{sha256, EntryKind, TreeHasher};
use crate::{CaptureOptions, Captured};

/// Why a source tree could not be captured. Each guard has its own variant.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("source directory {path} does not exist")]
    SourceMissing { path: PathBuf },
    #[error("source {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("more than {limit} files in the source tree")]
    TooManyFiles { limit: u64 },
    #[error("compressed snapshot is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("source files add up to more than the limit of {limit} bytes")]
    TooManyBytes { limit: u64 },
    #[error("symlink {path} -> {target} points outside the source directory (escapes at {via})")]
    SymlinkEscapes {
        path: String,
        target: String,
        via: String,
    },
    #[error("symlink {path} resolves through too many links")]
    SymlinkLoop { path: String },
    #[error("{path} is a {kind}; only regular files, directories and symlinks can be captured")]
    SpecialFile { path: String, kind: &'static str },
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("file name {} is not valid UTF-8", path.display())]
    NonUtf8Path { path: PathBuf },
    #[error("symlink {path} has a target that is not valid UTF-8 ({target})")]
    NonUtf8Target { path: String, target: String },
    #[error("{path} changed while it was being captured; try again")]
    FileChanged { path: String },
    #[error("bad {path}: {message}")]
    BadIgnoreFile { path: String, message: String },
    #[error("output {} already exists", path.display())]
    OutputExists { path: PathBuf },
    #[error("writing the archive {} failed: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Computes the content hash of `dir` without writing an archive (`slipway snapshot
/// --hash-only`). Uses and refreshes the stat cache when `opts.stat_cache_dir` is set.
///
/// # Errors
/// Any [`CaptureError`] guard; nothing is written except the stat cache.
pub fn hash_tree(dir: &Path, opts: &CaptureOptions) -> Result<String, CaptureError> {
    let scan = scan(dir, opts)?;
    let cache = load_cache(&scan, opts);
    let hashed = prehash(&scan, &cache)?;
    save_cache(&scan, opts, &hashed);
    Ok(hashed.content_hash)
}

/// Captures `dir` into the new file `out` (the CLI's upload path: no store involved). `out`
/// appears complete or not at all.
///
/// # Errors
/// Any [`CaptureError`] guard, [`CaptureError::OutputExists`] when `out` exists, or
/// [`CaptureError::Write`]. On error no file is left behind.
pub fn capture_to_file(
    dir: &Path,
    out: &Path,
    opts: &CaptureOptions,
) -> Result<Captured, CaptureError> {
    if out.symlink_metadata().is_ok() {
        return Err(CaptureError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    let scan = scan(dir, opts)?;
    let parent = parent_or_dot(out);
    let werr = |source| CaptureError::Write {
        path: out.to_path_buf(),
        source,
    };
    let tmp = tempfile::Builder::new()
        .prefix(".slipway-capture-")
        .suffix(".partial")
        .tempfile_in(&parent)
        .map_err(werr)?;
    let written = write_archive(&scan, tmp.as_file(), opts, out)?;
    tmp.as_file().sync_all().map_err(werr)?;
    if !rename_noreplace(tmp.path(), out).map_err(werr)? {
        return Err(CaptureError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    // The temp name is gone now; keep the guard from deleting whatever lands there later.
    let _ = tmp.into_temp_path().keep();
    fsync_dir(&parent).map_err(werr)?;
    save_cache(&scan, opts, &written.hashed);
    Ok(written.captured(out.to_path_buf(), false))
}

/// What hashing the tree produced: per-entry content sha256 (same order as the scan) and
/// the content hash.
pub(crate) struct Hashed {
    pub shas: Vec<[u8; 32]>,
    /// Stat fields each file had when it was hashed (None for symlinks); for the cache.
    pub keys: Vec<Option<StatKey>>,
    pub content_hash: String,
    pub cache_misses: u64,
}

pub(crate) fn load_cache(scan: &Scan, opts: &CaptureOptions) -> StatCache {
    match &opts.stat_cache_dir {
        Some(d) => StatCache::load(d, &scan.root),
        None => StatCache::empty(),
    }
}

pub(crate) fn save_cache(scan: &Scan, opts: &CaptureOptions, hashed: &Hashed) {
    let Some(dir) = &opts.stat_cache_dir else {
        return;
    };
    if hashed.cache_misses == 0 {
        return;
    }
    let entries = scan
        .entries
        .iter()
        .zip(&hashed.keys)
        .zip(&hashed.shas)
        .filter_map(|((e, k), s)| k.map(|k| (e.path.as_str(), k, *s)));
    if let Err(e) = StatCache::save(dir, &scan.root, entries) {
        // The cache only saves work; a capture does not fail because of it.
        tracing::warn!(dir = %dir.display(), error = %e, "could not save the stat cache");
    }
}

/// Hashes every entry, reading only files the cache cannot vouch for, in parallel.
pub(crate) fn prehash(scan: &Scan, cache: &StatCache) -> Result<Hashed, CaptureError> {
    let results: Vec<([u8; 32], Option<StatKey>, bool)> = scan
        .entries
        .par_iter()
        .map_init(
            || vec![0u8; 256 * 1024],
            |buf, e| -> Result<_, CaptureError> {
                match &e.kind {
                    ScanKind::Symlink { target } => Ok((sha256(target.as_bytes()), None, false)),
                    ScanKind::File { key, .. } => {
                        if let Some(sha) = cache.lookup(&e.path, key) {
                            return Ok((sha, Some(*key), false));
                        }
                        let (mut f, key) = open_checked(&scan.dir, e)?;
                        let mut h = Sha256::new();
                        let mut left = key.size;
                        while left > 0 {
                            let want = buf.len().min(left as usize);
                            let n = read_some(&mut f, &mut buf[..want], &e.path)?;
                            h.update(&buf[..n]);
                            left -= n as u64;
                        }
                        Ok((h.finalize().into(), Some(key), true))
                    }
                }
            },
        )
        .collect::<Result<_, _>>()?;
    let mut tree = TreeHasher::new();
    let mut shas = Vec::with_capacity(results.len());
    let mut keys = Vec::with_capacity(results.len());
    let mut misses = 0;
    for (e, (sha, key, miss)) in scan.entries.iter().zip(results) {
        // The scan sorted and de-duplicated the paths.
        tree.push(&e.path, entry_kind(e), &sha)
            .expect("scan entries are sorted and unique");
        shas.push(sha);
        keys.push(key);
        misses += u64::from(miss);
    }
    Ok(Hashed {
        shas,
        keys,
        content_hash: tree.finish(),
        cache_misses: misses,
    })
}

fn entry_kind(e: &ScanEntry) -> EntryKind {
    match e.kind {
        ScanKind::File { executable, .. } => EntryKind::File { executable },
        ScanKind::Symlink { .. } => EntryKind::Symlink,
    }
}

/// Opens a scanned file without following symlinks and checks it is still the file the walk
/// saw (same inode, size and times), so the content matches the metadata we archive.
fn open_checked(root: &Root, e: &ScanEntry) -> Result<(File, StatKey), CaptureError> {
    let ScanKind::File { key, .. } = &e.kind else {
        unreachable!("only files are opened")
    };
    let f =
        root.open_file(&e.path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EXDEV) | Some(libc::ENOENT)
                | Some(libc::ENOTDIR) => CaptureError::FileChanged {
                    path: e.path.clone(),
                },
                _ => CaptureError::Unreadable {
                    path: e.path.clone(),
                    source,
                },
            })?;
    let meta = f.metadata().map_err(|source| CaptureError::Unreadable {
        path: e.path.clone(),
        source,
    })?;
    let now = StatKey::of(&meta);
    if !meta.is_file() || now != *key {
        return Err(CaptureError::FileChanged {
            path: e.path.clone(),
        });
    }
    Ok((f, now))
}

fn read_some(f: &mut File, buf: &mut [u8], path: &str) -> Result<usize, CaptureError> {
    loop {
        match f.read(buf) {
            Ok(0) => {
                return Err(CaptureError::FileChanged {
                    path: path.to_string(),
                })
            }
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(CaptureError::Unreadable {
                    path: path.to_string(),
                    source,
                })
            }
        }
    }
}

/// The result of writing an archive.
pub(crate) struct Written {
    pub hashed: Hashed,
    pub file_count: u64,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
    pub artifact_sha256: String,
}

impl Written {
    pub(crate) fn captured(&self, artifact_path: PathBuf, deduplicated: bool) -> Captured {
        Captured {
            content_hash: self.hashed.content_hash.clone(),
            artifact_path,
            file_count: self.file_count,
            size_bytes: self.compressed_bytes,
            uncompressed_bytes: self.uncompressed_bytes,
            artifact_sha256: self.artifact_sha256.clone(),
            deduplicated,
        }
    }
}

/// Counts, hashes and bounds the compressed bytes on their way to the file.
struct Sink<'a> {
    out: &'a File,
    hasher: Sha256,
    count: u64,
    limit: u64,
    /// Set when the limit stopped a write, so the caller can tell the guard from an I/O error
    /// even after the encoder that wraps the sink is gone.
    over: &'a AtomicBool,
    /// Bytes already handed to [`start_writeback`].
    written_back: u64,
}

/// How much compressed output accumulates before its writeback is started.
const WRITEBACK_CHUNK: u64 = 8 << 20;

impl Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.count + buf.len() as u64 > self.limit {
            self.over.store(true, Ordering::Relaxed);
            return Err(io::Error::other("compressed size limit reached"));
        }
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.count - self.written_back >= WRITEBACK_CHUNK {
            start_writeback(self.out, self.written_back, self.count - self.written_back);
            self.written_back = self.count;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

pub(crate) const TAR_BLOCK: usize = 512;
/// Longest path or link target stored in the header itself; longer ones get a GNU
/// long-name entry in front.
const NAME_FIELD: usize = 100;

/// Files up to this size are read ahead on the worker pool, a batch at a time, while the
/// previous batch is archived: for small files the per-file system calls (open, fstat, read,
/// close) cost more than their bytes, and done one by one on the archiving thread they would
/// leave the other cores idle. Bigger files are streamed by the archiving thread as before.
const READ_AHEAD_MAX_FILE: u64 = 256 * 1024;
/// Bounds of one read-ahead batch; two batches are in memory at most.
const BATCH_BYTES: u64 = 4 << 20;
const BATCH_ENTRIES: usize = 1024;

/// A file read ahead: its bytes, their sha256 and the stat fields it had.
type ReadAhead = Result<Option<(Vec<u8>, [u8; 32], StatKey)>, CaptureError>;

/// Splits the entries into consecutive batches of bounded read-ahead size.
fn batches(scan: &Scan) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, e) in scan.entries.iter().enumerate() {
        if let ScanKind::File { key, .. } = &e.kind {
            if key.size <= READ_AHEAD_MAX_FILE {
                bytes += key.size;
            }
        }
        if bytes >= BATCH_BYTES || i + 1 - start >= BATCH_ENTRIES {
            out.push(start..i + 1);
            start = i + 1;
            bytes = 0;
        }
    }
    if start < scan.entries.len() {
        out.push(start..scan.entries.len());
    }
    out
}

/// Reads the small files of `range` in parallel (`None` for symlinks and big files).
fn read_ahead(scan: &Scan, range: Range<usize>) -> Vec<ReadAhead> {
    scan.entries[range]
        .par_iter()
        .map(|e| match &e.kind {
            ScanKind::File { key, .. } if key.size <= READ_AHEAD_MAX_FILE => {
                let (mut f, key) = open_checked(&scan.dir, e)?;
                let mut data = vec![0u8; key.size as usize];
                let mut filled = 0;
                while filled < data.len() {
                    filled += read_some(&mut f, &mut data[filled..], &e.path)?;
                }
                let sha: [u8; 32] = Sha256::digest(&data).into();
                Ok(Some((data, sha, key)))
            }
            _ => Ok(None),
        })
        .collect()
}

/// Writes the deterministic archive of `scan` to `out` and hashes exactly the bytes archived.
/// `shown` names the output in errors.
pub(crate) fn write_archive(
    scan: &Scan,
    out: &File,
    opts: &CaptureOptions,
    shown: &Path,
) -> Result<Written, CaptureError> {
    let over = AtomicBool::new(false);
    let sink = Sink {
        out,
        hasher: Sha256::new(),
        count: 0,
        limit: opts.max_compressed_bytes,
        over: &over,
        written_back: 0,
    };
    let io_err = |source: io::Error| {
        if over.load(Ordering::Relaxed) {
            CaptureError::TooLarge {
                limit: opts.max_compressed_bytes,
            }
        } else {
            CaptureError::Write {
                path: shown.to_path_buf(),
                source,
            }
        }
    };
    let werr = io_err;
    let mut enc = zstd::stream::write::Encoder::new(sink, opts.zstd_level).map_err(werr)?;
    // Multi-threaded mode (even with one worker) keeps the output independent of the worker
    // count, so every machine produces the same bytes.
    enc.multithread(opts.threads() as u32).map_err(werr)?;
    enc.include_checksum(true).map_err(werr)?;

    let mut w = ArchiveWriter {
        enc,
        buf: vec![0u8; 256 * 1024],
        tree: TreeHasher::new(),
        shas: Vec::with_capacity(scan.entries.len()),
        keys: Vec::with_capacity(scan.entries.len()),
        uncompressed: 0,
    };
    let plan = batches(scan);
    let mut ahead = plan
        .first()
        .map(|r| read_ahead(scan, r.clone()))
        .unwrap_or_default();
    for (i, range) in plan.iter().enumerate() {
        let current = std::mem::take(&mut ahead);
        let next = plan.get(i + 1).cloned();
        // Archive this batch while the pool reads the next one.
        let (written, fetched) = rayon::join(
            || w.write_batch(scan, range.clone(), current, &io_err),
            || next.map(|r| read_ahead(scan, r)).unwrap_or_default(),
        );
        written?;
        ahead = fetched;
    }
    // End of archive: two zero blocks.
    w.enc.write_all(&[0u8; 2 * TAR_BLOCK]).map_err(io_err)?;
    let ArchiveWriter {
        enc,
        tree,
        shas,
        keys,
        uncompressed,
        ..
    } = w;
    let sink = enc.finish().map_err(io_err)?;
    Ok(Written {
        file_count: scan.entries.len() as u64,
        uncompressed_bytes: uncompressed,
        compressed_bytes: sink.count,
        artifact_sha256: hex::encode(sink.hasher.finalize()),
        hashed: Hashed {
            shas,
            keys,
            content_hash: tree.finish(),
            cache_misses: scan.entries.len() as u64,
        },
    })
}

/// The archiving side of [`write_archive`]: entries go into the encoder strictly in scan
/// order, which is what makes the archive deterministic.
struct ArchiveWriter<'a> {
    enc: zstd::stream::write::Encoder<'static, Sink<'a>>,
    buf: Vec<u8>,
    tree: TreeHasher,
    shas: Vec<[u8; 32]>,
    keys: Vec<Option<StatKey>>,
    uncompressed: u64,
}

impl ArchiveWriter<'_> {
    fn write_batch(
        &mut self,
        scan: &Scan,
        range: Range<usize>,
        ahead: Vec<ReadAhead>,
        io_err: &(impl Fn(io::Error) -> CaptureError + Sync),
    ) -> Result<(), CaptureError> {
        for (e, pre) in scan.entries[range].iter().zip(ahead) {
            match &e.kind {
                ScanKind::Symlink { target } => {
                    write_header(
                        &mut self.enc,
                        &e.path,
                        EntryKind::Symlink,
                        0,
                        Some(target.as_bytes()),
                    )
                    .map_err(io_err)?;
                    let sha = sha256(target.as_bytes());
                    self.tree
                        .push(&e.path, EntryKind::Symlink, &sha)
                        .expect("scan entries are sorted and unique");
                    self.shas.push(sha);
                    self.keys.push(None);
                }
                ScanKind::File { executable, .. } => {
                    let kind = EntryKind::File {
                        executable: *executable,
                    };
                    let (sha, key) = match pre? {
                        Some((data, sha, key)) => {
                            write_header(&mut self.enc, &e.path, kind, key.size, None)
                                .map_err(io_err)?;
                            self.enc.write_all(&data).map_err(io_err)?;
                            (sha, key)
                        }
                        None => {
                            let (mut f, key) = open_checked(&scan.dir, e)?;
                            write_header(&mut self.enc, &e.path, kind, key.size, None)
                                .map_err(io_err)?;
                            let mut h = Sha256::new();
                            let mut left = key.size;
                            while left > 0 {
                                let want = self.buf.len().min(left as usize);
                                let n = read_some(&mut f, &mut self.buf[..want], &e.path)?;
                                h.update(&self.buf[..n]);
                                self.enc.write_all(&self.buf[..n]).map_err(io_err)?;
                                left -= n as u64;
                            }
                            (h.finalize().into(), key)
                        }
                    };
                    pad(&mut self.enc, key.size).map_err(io_err)?;
                    self.tree
                        .push(&e.path, kind, &sha)
                        .expect("scan entries are sorted and unique");
                    self.shas.push(sha);
                    self.keys.push(Some(key));
                    self.uncompressed += key.size;
                }
            }
        }
        Ok(())
    }
}

fn pad(w: &mut impl Write, size: u64) -> io::Result<()> {
    let rem = (size % TAR_BLOCK as u64) as usize;
    if rem != 0 {
        w.write_all(&[0u8; TAR_BLOCK][..TAR_BLOCK - rem])?;
    }
    Ok(())
}

/// Writes one entry header with fixed metadata: mtime 0, uid/gid 0, no user/group names,
/// mode 0644/0755 (0777 for symlinks, as `ln -s` makes them).
fn write_header(
    w: &mut impl Write,
    path: &str,
    kind: EntryKind,
    size: u64,
    link: Option<&[u8]>,
) -> io::Result<()> {
    if path.len() > NAME_FIELD {
        write_long_name(w, tar::EntryType::GNULongName, path.as_bytes())?;
    }
    if let Some(l) = link {
        if l.len() > NAME_FIELD {
            write_long_name(w, tar::EntryType::GNULongLink, l)?;
        }
    }
    let mut h = tar::Header::new_gnu();
    let (entry_type, mode) = match kind {
        EntryKind::File { executable: false } => (tar::EntryType::Regular, 0o644),
        EntryKind::File { executable: true } => (tar::EntryType::Regular, 0o755),
        EntryKind::Symlink => (tar::EntryType::Symlink, 0o777),
    };
    fill_fixed(&mut h, entry_type, mode, size);
    let name = path.as_bytes();
    let n = name.len().min(NAME_FIELD);
    h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
    if let Some(l) = link {
        let n = l.len().min(NAME_FIELD);
        h.as_old_mut().linkname[..n].copy_from_slice(&l[..n]);
    }
    h.set_cksum();
    w.write_all(h.as_bytes())
}

fn fill_fixed(h: &mut tar::Header, entry_type: tar::EntryType, mode: u32, size: u64) {
    h.set_entry_type(entry_type);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
}

fn write_long_name(w: &mut impl Write, entry_type: tar::EntryType, bytes: &[u8]) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    fill_fixed(&mut h, entry_type, 0o644, bytes.len() as u64 + 1);
    let name = b"././@LongLink";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    w.write_all(h.as_bytes())?;
    w.write_all(bytes)?;
    w.write_all(&[0])?;
    pad(w, bytes.len() as u64 + 1)
}
