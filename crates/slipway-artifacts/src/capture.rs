//! Capture: source tree → content hash and deterministic `.tar.zst`.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Condvar, Mutex};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::fsutil::{
    fstat, fsync_dir, open_file_at, parent_or_dot, rename_noreplace, start_writeback,
};
use crate::scan::{scan, FileMeta, Scan, ScanEntry, ScanKind};
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
    let mut cache = StatCache::empty();
    let scan = scan(dir, opts, |root| {
        cache = load_cache(root, opts);
        // Stats in the walk only pay off when a cache can vouch for files unopened.
        !cache.is_empty()
    })?;
    let hashed = prehash(&scan, &cache)?;
    save_cache(&scan, opts, &hashed);
    Ok(hashed.content_hash)
}

/// Whether `opts.stat_cache_dir` holds a stat cache for `dir`, i.e. the tree was hashed or
/// captured with that cache before. Hashing it again ([`hash_tree`]) then reads only the files
/// that changed, so a caller that may not need the archive at all (the CLI, when the server
/// already has the content) can ask first and archive only when needed; for a tree never seen
/// it is cheaper to archive at once, since the archive reads every file anyway.
pub fn has_stat_cache(dir: &Path, opts: &CaptureOptions) -> bool {
    let Some(cache_dir) = &opts.stat_cache_dir else {
        return false;
    };
    dir.canonicalize()
        .is_ok_and(|root| StatCache::file_for(cache_dir, &root).is_file())
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
    // The archive needs every byte, so the cache is not consulted: no stats in the walk.
    let scan = scan(dir, opts, |_| false)?;
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
    let written = write_archive(&scan, tmp.as_file(), opts, out, opts.durable)?;
    if opts.durable {
        tmp.as_file().sync_all().map_err(werr)?;
    }
    if !rename_noreplace(tmp.path(), out).map_err(werr)? {
        return Err(CaptureError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    // The temp name is gone now; keep the guard from deleting whatever lands there later.
    let _ = tmp.into_temp_path().keep();
    if opts.durable {
        fsync_dir(&parent).map_err(werr)?;
    }
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

/// The stat cache of the source tree whose canonical root is `root`.
pub(crate) fn load_cache(root: &Path, opts: &CaptureOptions) -> StatCache {
    match &opts.stat_cache_dir {
        Some(d) => StatCache::load(d, root),
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
    let results: Vec<([u8; 32], EntryKind, Option<StatKey>, bool)> = scan
        .entries
        .par_iter()
        .map_init(
            || (vec![0u8; 256 * 1024], Opener::new(scan)),
            |(buf, opener), e| -> Result<_, CaptureError> {
                match &e.kind {
                    ScanKind::Symlink { target } => {
                        Ok((sha256(target.as_bytes()), EntryKind::Symlink, None, false))
                    }
                    ScanKind::File(seen) => {
                        if let Some(m) = seen {
                            if let Some(sha) = cache.lookup(&e.path, &m.key) {
                                return Ok((sha, file_kind(m), Some(m.key), false));
                            }
                        }
                        let (mut f, m) = opener.open_checked(e, seen.as_ref())?;
                        let mut h = Sha256::new();
                        let mut left = m.key.size;
                        while left > 0 {
                            let want = buf.len().min(left as usize);
                            let n = read_some(&mut f, &mut buf[..want], &e.path)?;
                            h.update(&buf[..n]);
                            left -= n as u64;
                        }
                        Ok((h.finalize().into(), file_kind(&m), Some(m.key), true))
                    }
                }
            },
        )
        .collect::<Result<_, _>>()?;
    let mut tree = TreeHasher::new();
    let mut shas = Vec::with_capacity(results.len());
    let mut keys = Vec::with_capacity(results.len());
    let mut misses = 0;
    for (e, (sha, kind, key, miss)) in scan.entries.iter().zip(results) {
        // The scan sorted and de-duplicated the paths.
        tree.push(&e.path, kind, &sha)
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

fn file_kind(m: &FileMeta) -> EntryKind {
    EntryKind::File {
        executable: m.executable,
    }
}

/// Opens scanned files relative to their directory (one path component per open, as GNU tar
/// does), keeping the directory of the previous file open: entries come in path order, so
/// consecutive files mostly share it.
pub(crate) struct Opener<'s> {
    scan: &'s Scan,
    cur: Option<(u32, OwnedFd)>,
}

impl<'s> Opener<'s> {
    pub(crate) fn new(scan: &'s Scan) -> Self {
        Opener { scan, cur: None }
    }

    /// Opens a scanned file without following symlinks (its directory is re-opened beneath
    /// the root with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, the file with `O_NOFOLLOW`) and
    /// takes its metadata from the `fstat` of the open file. When `expect` is given (what the
    /// walk or an earlier open saw), the file must still have the same inode, size and times,
    /// so the content matches the metadata we archive. Otherwise this is the first time the
    /// file's size is known, and it counts towards the `max_uncompressed_bytes` guard.
    pub(crate) fn open_checked(
        &mut self,
        e: &ScanEntry,
        expect: Option<&FileMeta>,
    ) -> Result<(File, FileMeta), CaptureError> {
        let map = |source: io::Error| match source.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::EXDEV) | Some(libc::ENOENT) | Some(libc::ENOTDIR) => {
                CaptureError::FileChanged {
                    path: e.path.clone(),
                }
            }
            _ => CaptureError::Unreadable {
                path: e.path.clone(),
                source,
            },
        };
        let dir_fd = if e.dir == 0 {
            self.scan.dir.raw()
        } else {
            match &self.cur {
                Some((i, fd)) if *i == e.dir => fd.as_raw_fd(),
                _ => {
                    self.cur = None;
                    let fd = self
                        .scan
                        .dir
                        .open_dir(&self.scan.dirs[e.dir as usize])
                        .map_err(map)?;
                    let raw = fd.as_raw_fd();
                    self.cur = Some((e.dir, fd));
                    raw
                }
            }
        };
        let f = open_file_at(dir_fd, e.name().as_bytes()).map_err(map)?;
        let st = fstat(&f).map_err(|source| CaptureError::Unreadable {
            path: e.path.clone(),
            source,
        })?;
        let changed = || CaptureError::FileChanged {
            path: e.path.clone(),
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(changed());
        }
        let now = FileMeta::of_stat(&st);
        match expect {
            Some(m) if now != *m => return Err(changed()),
            Some(_) => {}
            None => self.scan.account(now.key.size)?,
        }
        Ok((f, now))
    }
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

/// Reads exactly `size` bytes of `f` into a new vector, without zeroing it first (file
/// contents are most of the bytes a capture moves). A file shorter than `size` is
/// `FileChanged`, as in [`read_some`].
fn read_exact_vec(f: &File, size: usize, path: &str) -> Result<Vec<u8>, CaptureError> {
    let mut data = Vec::<u8>::with_capacity(size);
    while data.len() < size {
        let want = size - data.len();
        let spare = &mut data.spare_capacity_mut()[..want];
        // SAFETY: `spare` is writable for `spare.len()` bytes; read(2) writes at most that many
        // and reports how many, which are then initialised.
        let n = unsafe { libc::read(f.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
        match n {
            0 => {
                return Err(CaptureError::FileChanged {
                    path: path.to_string(),
                })
            }
            n if n > 0 => {
                // SAFETY: the kernel initialised the next `n` bytes (n <= spare.len()).
                unsafe { data.set_len(data.len() + n as usize) }
            }
            _ => {
                let source = io::Error::last_os_error();
                if source.kind() != io::ErrorKind::Interrupted {
                    return Err(CaptureError::Unreadable {
                        path: path.to_string(),
                        source,
                    });
                }
            }
        }
    }
    Ok(data)
}

/// The result of writing an archive.
pub(crate) struct Written {
    pub hashed: Hashed,
    pub file_count: u64,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
}

impl Written {
    pub(crate) fn captured(&self, artifact_path: PathBuf, deduplicated: bool) -> Captured {
        Captured {
            content_hash: self.hashed.content_hash.clone(),
            artifact_path,
            file_count: self.file_count,
            size_bytes: self.compressed_bytes,
            uncompressed_bytes: self.uncompressed_bytes,
            deduplicated,
        }
    }
}

/// Counts and bounds the compressed bytes, and hands them, in chunks of `OUT_CHUNK`, to the
/// output thread ([`write_out`]), which writes them while compression goes on.
struct Sink<'a> {
    tx: SyncSender<Vec<u8>>,
    /// Chunks the output thread is done with, for reuse.
    spare: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    count: u64,
    limit: u64,
    /// Set when the limit stopped a write, so the caller can tell the guard from an I/O error
    /// even after the encoder that wraps the sink is gone.
    over: &'a AtomicBool,
    /// Set by the output thread when writing failed; its error is reported at the end.
    failed: &'a AtomicBool,
}

/// Size of the chunks of compressed output handed to the output thread.
const OUT_CHUNK: usize = 1 << 20;
/// How much compressed output accumulates before its writeback is started.
const WRITEBACK_CHUNK: u64 = 2 << 20;
/// How much compressed output is written between two early `fdatasync`s ([`sync_early`]).
const SYNC_CHUNK: u64 = 2 << 20;

impl Sink<'_> {
    fn send(&mut self) -> io::Result<()> {
        let next = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(OUT_CHUNK));
        let full = std::mem::replace(&mut self.buf, next);
        self.tx
            .send(full)
            .map_err(|_| io::Error::other("the output thread stopped"))
    }
}

impl Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.count + buf.len() as u64 > self.limit {
            self.over.store(true, Ordering::Relaxed);
            return Err(io::Error::other("compressed size limit reached"));
        }
        if self.failed.load(Ordering::Relaxed) {
            return Err(io::Error::other("writing the archive failed"));
        }
        let n = buf.len().min(OUT_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        self.count += n as u64;
        if self.buf.len() == OUT_CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

/// The output thread: writes the compressed chunks to `out` and returns them for reuse. With
/// `sync` (a durable output), it also starts their writeback every `WRITEBACK_CHUNK` and asks
/// the sync thread for an early `fdatasync` every `SYNC_CHUNK` (see [`sync_early`]). Keeps
/// draining after an error so the sink never blocks; the first error is returned.
fn write_out(
    out: &File,
    rx: Receiver<Vec<u8>>,
    spare: SyncSender<Vec<u8>>,
    sync: Option<SyncSender<()>>,
    failed: &AtomicBool,
) -> io::Result<()> {
    let mut result = Ok(());
    let (mut written, mut written_back, mut synced) = (0u64, 0u64, 0u64);
    let mut w = out;
    for mut chunk in rx {
        if result.is_ok() {
            match w.write_all(&chunk) {
                Ok(()) => {
                    written += chunk.len() as u64;
                    if let Some(sync) = &sync {
                        if written - written_back >= WRITEBACK_CHUNK {
                            start_writeback(out, written_back, written - written_back);
                            written_back = written;
                        }
                        if written - synced >= SYNC_CHUNK {
                            // A request while one is running is dropped: the running one, or
                            // the next, covers it.
                            let _ = sync.try_send(());
                            synced = written;
                        }
                    }
                }
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    result = Err(e);
                }
            }
        }
        chunk.clear();
        let _ = spare.try_send(chunk);
    }
    result
}

/// The sync thread: an `fdatasync` of the archive whenever the output thread asks (every
/// `SYNC_CHUNK` written). The caller's final `fsync` is still what makes the archive durable
/// before it is renamed into place; these early ones only leave it less to wait for. On a
/// virtual disk whose host caches writes, an `fsync` costs in proportion to the data written
/// since the last one (about 40 ms for the 48 MB archive of the node-like benchmark tree, see
/// `docs/bench-snapshots.md`), so flushing in the background while compression goes on takes
/// that wait off the end of the capture. Errors are left for the final `fsync` to report.
fn sync_early(out: &File, rx: Receiver<()>) {
    for () in rx {
        let _ = out.sync_data();
    }
}

pub(crate) const TAR_BLOCK: usize = 512;
/// Longest path or link target stored in the header itself; longer ones get a GNU
/// long-name entry in front.
const NAME_FIELD: usize = 100;

/// Files up to this size are read and hashed ahead by the reader threads while earlier
/// entries are archived: for small files the per-file system calls (open, fstat, read, close)
/// cost more than their bytes, and for bigger ones hashing costs more than archiving; done on
/// the archiving thread, either would hold up the whole pipeline. Bigger files are streamed
/// (read, hashed and archived) by the archiving thread.
const READ_AHEAD_MAX_FILE: u64 = 4 << 20;
/// Most bytes of file contents read ahead and not yet archived, besides the one file the
/// archiver is waiting for (which is always read).
const AHEAD_BYTES: u64 = 4 << 20;
/// Entries handed out to a reader at a time (consecutive, so the reader's open directory is
/// mostly reused and the archiver is woken at most once per run).
const RUN: usize = 32;
/// Most entries claimed ahead of the archiver: the size of the ring of results.
const RING: usize = 4096;
/// Compressed chunks queued for the output thread.
const OUT_QUEUE: usize = 4;
/// Headers, padding and small files are gathered into writes of this size into the encoder
/// (each write costs a pass through zstd's streaming bookkeeping); larger pieces of data go to
/// the encoder directly, without a copy.
const TAR_CHUNK: usize = 64 << 10;
/// Read size of a streamed (big) file.
const STREAM_READ: usize = 1 << 20;

/// A file read ahead: its bytes and their sha256, or only its metadata when it is too big and
/// is to be streamed by the archiving thread.
enum Ahead {
    Symlink,
    Data(Vec<u8>, [u8; 32], FileMeta),
    Stream(FileMeta),
}

type ReadAhead = Result<Ahead, CaptureError>;

/// The read-ahead stage: reader threads (one per thread of the rayon pool) take runs of `RUN`
/// consecutive entries (in order, from a shared counter), read and hash the small files in
/// them and leave the results in a ring of `RING` slots, which the archiver takes in order. No barrier between
/// batches: a reader only waits when it is `RING` entries ahead of the archiver or when
/// `AHEAD_BYTES` of read contents are waiting to be archived (the entry the archiver waits for
/// is read whatever the budget, so the stage always progresses), and the archiver only waits
/// for the entry it needs. A file's size need not be known in advance: a file the walk did not
/// `stat` is opened, and its budget is taken once its size is known.
struct Readers<'s> {
    scan: &'s Scan,
    slots: Vec<RingSlot>,
    /// Next entry to hand out.
    next: AtomicUsize,
    /// The entry the archiver waits for (`usize::MAX`: none).
    wanted: AtomicUsize,
    /// Set when the archiver stops (done or failed): readers stop too.
    stop: AtomicBool,
    progress: Mutex<Progress>,
    /// Readers wait here for ring space or budget.
    readers_cv: Condvar,
    /// The archiver waits here for `wanted`.
    archiver_cv: Condvar,
}

struct RingSlot {
    ready: AtomicBool,
    result: Mutex<Option<ReadAhead>>,
}

/// What the archiver has consumed, as last published to the readers.
struct Progress {
    /// Entries before this one are archived.
    consumed: usize,
    /// Bytes of contents read ahead and not yet archived.
    held: u64,
    /// Readers waiting on `readers_cv`.
    waiting: usize,
}

impl<'s> Readers<'s> {
    fn new(scan: &'s Scan) -> Self {
        Readers {
            scan,
            slots: (0..RING.min(scan.entries.len().max(1)))
                .map(|_| RingSlot {
                    ready: AtomicBool::new(false),
                    result: Mutex::new(None),
                })
                .collect(),
            next: AtomicUsize::new(0),
            wanted: AtomicUsize::new(usize::MAX),
            stop: AtomicBool::new(false),
            progress: Mutex::new(Progress {
                consumed: 0,
                held: 0,
                waiting: 0,
            }),
            readers_cv: Condvar::new(),
            archiver_cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One reader thread.
    fn run(&self) {
        let _exit = ReaderExit(self);
        let n = self.scan.entries.len();
        let ring = self.slots.len();
        let mut opener = Opener::new(self.scan);
        loop {
            let start = self.next.fetch_add(RUN, Ordering::Relaxed);
            if start >= n {
                return;
            }
            let end = (start + RUN).min(n);
            // Ring space: the slots of this run must have been taken by the archiver.
            if self.wait_until(|p| end <= p.consumed + ring).is_none() {
                return;
            }
            for k in start..end {
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                let r = self.read(&mut opener, k);
                let slot = &self.slots[k % ring];
                *slot.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                slot.ready.store(true, Ordering::SeqCst);
                if self.wanted.load(Ordering::SeqCst) == k {
                    let _guard = self.lock();
                    self.archiver_cv.notify_one();
                }
            }
        }
    }

    /// Waits on `readers_cv` until `ok` holds, and returns the progress still locked; `None`
    /// once the archiver stops.
    fn wait_until(
        &self,
        ok: impl Fn(&Progress) -> bool,
    ) -> Option<std::sync::MutexGuard<'_, Progress>> {
        let mut p = self.lock();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            if ok(&p) {
                return Some(p);
            }
            self.before_waiting();
            p.waiting += 1;
            p = self.readers_cv.wait(p).unwrap_or_else(|e| e.into_inner());
            p.waiting -= 1;
        }
    }

    /// Takes `size` bytes of the read-ahead budget for entry `k`, waiting while the budget is
    /// spent and the archiver is not waiting for `k` itself.
    fn take_budget(&self, k: usize, size: u64) -> bool {
        let Some(mut p) = self.wait_until(|p| p.held + size <= AHEAD_BYTES || p.consumed == k)
        else {
            return false;
        };
        p.held += size;
        true
    }

    /// Called by a reader about to wait, with `progress` locked: the archiver may be waiting
    /// for the end of a run while entries before it are ready (see [`Readers::take`]); it must
    /// take those and publish its progress, or this reader could wait for ever.
    fn before_waiting(&self) {
        if self.wanted.load(Ordering::SeqCst) != usize::MAX {
            self.archiver_cv.notify_one();
        }
    }

    fn read(&self, opener: &mut Opener<'_>, k: usize) -> ReadAhead {
        let e = &self.scan.entries[k];
        let seen = match &e.kind {
            ScanKind::Symlink { .. } => return Ok(Ahead::Symlink),
            ScanKind::File(m) => *m,
        };
        if let Some(m) = &seen {
            if m.key.size > READ_AHEAD_MAX_FILE {
                return Ok(Ahead::Stream(*m));
            }
        }
        let (f, m) = opener.open_checked(e, seen.as_ref())?;
        let size = m.key.size;
        if size > READ_AHEAD_MAX_FILE {
            return Ok(Ahead::Stream(m));
        }
        if !self.take_budget(k, size) {
            return Err(CaptureError::FileChanged {
                path: e.path.clone(),
            });
        }
        let data = read_exact_vec(&f, size as usize, &e.path)?;
        let sha: [u8; 32] = Sha256::digest(&data).into();
        Ok(Ahead::Data(data, sha, m))
    }

    /// The archiver's side: the result for entry `k`, waiting for it if needed. `consumed` and
    /// `released` (bytes of archived contents not yet returned to the budget) are published to
    /// the readers before waiting.
    fn take(&self, k: usize, released: &mut u64) -> ReadAhead {
        let slot = &self.slots[k % self.slots.len()];
        if !slot.ready.load(Ordering::SeqCst) {
            self.publish(k, released);
            // Wake up when the whole run holding `k` is read: a reader fills a run in order.
            let last = (k | (RUN - 1)).min(self.scan.entries.len() - 1);
            let want = if self.slots[last % self.slots.len()]
                .ready
                .load(Ordering::SeqCst)
            {
                k
            } else {
                last
            };
            let mut p = self.lock();
            self.wanted.store(want, Ordering::SeqCst);
            let last_slot = &self.slots[want % self.slots.len()];
            while !last_slot.ready.load(Ordering::SeqCst) && !slot.ready.load(Ordering::SeqCst) {
                if self.stop.load(Ordering::SeqCst) {
                    // Only a reader that panicked sets `stop` while the archiver runs.
                    self.wanted.store(usize::MAX, Ordering::SeqCst);
                    return Err(CaptureError::Unreadable {
                        path: self.scan.entries[k].path.clone(),
                        source: io::Error::other("a reader thread failed"),
                    });
                }
                p = self.archiver_cv.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            self.wanted.store(usize::MAX, Ordering::SeqCst);
            drop(p);
            // `want` is the end of `k`'s run, read in order after `k` by the same reader.
            while !slot.ready.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
        }
        let r = slot
            .result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("a ready slot holds a result");
        slot.ready.store(false, Ordering::SeqCst);
        r
    }

    /// Tells the readers that entries before `consumed` are archived and returns `released`
    /// bytes to the budget.
    fn publish(&self, consumed: usize, released: &mut u64) {
        let mut p = self.lock();
        p.consumed = consumed;
        p.held -= *released;
        *released = 0;
        if p.waiting > 0 {
            self.readers_cv.notify_all();
        }
    }

    /// Stops the readers (the archiver is done or failed).
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _guard = self.lock();
        self.readers_cv.notify_all();
    }
}

/// Wakes the archiver if a reader thread panics, so it fails instead of waiting for ever.
struct ReaderExit<'a, 's>(&'a Readers<'s>);

impl Drop for ReaderExit<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop.store(true, Ordering::SeqCst);
            let _guard = self.0.lock();
            self.0.archiver_cv.notify_all();
            self.0.readers_cv.notify_all();
        }
    }
}

/// Stops the readers when the archiver leaves, however it leaves.
struct StopReaders<'a, 's>(&'a Readers<'s>);

impl Drop for StopReaders<'_, '_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Writes the deterministic archive of `scan` to `out` and hashes exactly the bytes archived.
/// `shown` names the output in errors. With `durable`, the output is written back and
/// flushed as it grows (the caller's final `fsync` then has little left to wait for).
pub(crate) fn write_archive(
    scan: &Scan,
    out: &File,
    opts: &CaptureOptions,
    shown: &Path,
    durable: bool,
) -> Result<Written, CaptureError> {
    let over = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
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
    // Four stages run at once, connected by bounded queues: reader threads read and hash
    // small files ahead (at most `RING` entries and `AHEAD_BYTES` of contents beyond the entry
    // being archived; see [`Readers`]), this thread assembles the tar stream in order, zstd's
    // workers compress it, and the output thread writes the compressed bytes. No
    // stage waits for another as long as its queue is neither empty nor full, and memory stays
    // bounded by the queues.
    let readers = &Readers::new(scan);
    std::thread::scope(|s| -> Result<Written, CaptureError> {
        let (out_tx, out_rx) = sync_channel::<Vec<u8>>(OUT_QUEUE);
        let (spare_tx, spare_rx) = sync_channel::<Vec<u8>>(OUT_QUEUE + 1);
        let failed = &failed;
        let (sync_tx, sync_rx) = sync_channel::<()>(1);
        s.spawn(move || sync_early(out, sync_rx));
        let sync_tx = durable.then_some(sync_tx);
        let output = s.spawn(move || write_out(out, out_rx, spare_tx, sync_tx, failed));
        let sink = Sink {
            tx: out_tx,
            spare: spare_rx,
            buf: Vec::with_capacity(OUT_CHUNK),
            count: 0,
            limit: opts.max_compressed_bytes,
            over: &over,
            failed,
        };
        let archived = archive(s, scan, readers, sink, opts, &io_err);
        // The sink is gone (finished or dropped on error): the output thread ends.
        let result = output.join().expect("the output thread does not panic");
        if let Err(source) = result {
            // A failed write makes the archiver fail too; report the real cause.
            return Err(CaptureError::Write {
                path: shown.to_path_buf(),
                source,
            });
        }
        let (w, compressed) = archived?;
        Ok(Written {
            file_count: scan.entries.len() as u64,
            uncompressed_bytes: w.uncompressed,
            compressed_bytes: compressed,
            hashed: Hashed {
                shas: w.shas,
                keys: w.keys,
                content_hash: w.tree.finish(),
                cache_misses: scan.entries.len() as u64,
            },
        })
    })
}

/// What the archiving thread hands back: the per-entry results and the uncompressed size.
struct Archived {
    tree: TreeHasher,
    shas: Vec<[u8; 32]>,
    keys: Vec<Option<StatKey>>,
    uncompressed: u64,
}

/// The archiving side of [`write_archive`]: starts the read-ahead stage, assembles the tar
/// stream into the encoder, and finishes the frame. Returns the compressed size.
fn archive<'scope, 'env>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    scan: &'env Scan,
    readers: &'env Readers<'env>,
    sink: Sink<'_>,
    opts: &CaptureOptions,
    io_err: &(impl Fn(io::Error) -> CaptureError + Sync),
) -> Result<(Archived, u64), CaptureError> {
    let mut enc = zstd::stream::write::Encoder::new(sink, opts.zstd_level).map_err(io_err)?;
    // Multi-threaded mode (even with one worker) keeps the output independent of the worker
    // count, so every machine produces the same bytes.
    enc.multithread(opts.threads() as u32).map_err(io_err)?;
    enc.include_checksum(true).map_err(io_err)?;
    let mut w = ArchiveWriter {
        enc: BufWriter::with_capacity(TAR_CHUNK, enc),
        buf: vec![0u8; STREAM_READ],
        tree: TreeHasher::new(),
        shas: Vec::with_capacity(scan.entries.len()),
        keys: Vec::with_capacity(scan.entries.len()),
        uncompressed: 0,
    };
    let stopper = StopReaders(readers);
    // As many readers as the walk's pool has threads (one per CPU by default).
    for _ in 0..rayon::current_num_threads() {
        s.spawn(move || readers.run());
    }
    let mut opener = Opener::new(scan);
    let mut released = 0u64;
    for k in 0..scan.entries.len() {
        let pre = readers.take(k, &mut released);
        if let Ok(Ahead::Data(d, ..)) = &pre {
            released += d.len() as u64;
        }
        w.write_one(scan, &mut opener, k, pre, io_err)?;
        if (k + 1) % RUN == 0 {
            readers.publish(k + 1, &mut released);
        }
    }
    drop(stopper);
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
    let enc = enc.into_inner().map_err(|e| io_err(e.into_error()))?;
    let mut sink = enc.finish().map_err(io_err)?;
    sink.flush().map_err(io_err)?;
    Ok((
        Archived {
            tree,
            shas,
            keys,
            uncompressed,
        },
        sink.count,
    ))
}

/// The archiving side of [`write_archive`]: entries go into the encoder strictly in scan
/// order, which is what makes the archive deterministic.
struct ArchiveWriter<'a> {
    enc: BufWriter<zstd::stream::write::Encoder<'static, Sink<'a>>>,
    buf: Vec<u8>,
    tree: TreeHasher,
    shas: Vec<[u8; 32]>,
    keys: Vec<Option<StatKey>>,
    uncompressed: u64,
}

impl ArchiveWriter<'_> {
    fn write_one(
        &mut self,
        scan: &Scan,
        opener: &mut Opener<'_>,
        k: usize,
        pre: ReadAhead,
        io_err: &(impl Fn(io::Error) -> CaptureError + Sync),
    ) -> Result<(), CaptureError> {
        let e = &scan.entries[k];
        let (kind, sha, key) = match (&e.kind, pre?) {
            (ScanKind::Symlink { target }, _) => {
                write_header(
                    &mut self.enc,
                    &e.path,
                    EntryKind::Symlink,
                    0,
                    Some(target.as_bytes()),
                )
                .map_err(io_err)?;
                (EntryKind::Symlink, sha256(target.as_bytes()), None)
            }
            (_, Ahead::Data(data, sha, m)) => {
                let kind = file_kind(&m);
                write_header(&mut self.enc, &e.path, kind, m.key.size, None).map_err(io_err)?;
                self.enc.write_all(&data).map_err(io_err)?;
                pad(&mut self.enc, m.key.size).map_err(io_err)?;
                (kind, sha, Some(m.key))
            }
            (_, Ahead::Stream(seen)) => {
                let (mut f, m) = opener.open_checked(e, Some(&seen))?;
                let kind = file_kind(&m);
                write_header(&mut self.enc, &e.path, kind, m.key.size, None).map_err(io_err)?;
                let mut h = Sha256::new();
                let mut left = m.key.size;
                while left > 0 {
                    let want = self.buf.len().min(left as usize);
                    let n = read_some(&mut f, &mut self.buf[..want], &e.path)?;
                    h.update(&self.buf[..n]);
                    self.enc.write_all(&self.buf[..n]).map_err(io_err)?;
                    left -= n as u64;
                }
                pad(&mut self.enc, m.key.size).map_err(io_err)?;
                (kind, h.finalize().into(), Some(m.key))
            }
            (ScanKind::File(_), Ahead::Symlink) => unreachable!("readers keep kinds"),
        };
        self.tree
            .push(&e.path, kind, &sha)
            .expect("scan entries are sorted and unique");
        self.shas.push(sha);
        self.keys.push(key);
        self.uncompressed += key.map_or(0, |k| k.size);
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
    let (entry_type, mode, slot) = match kind {
        EntryKind::File { executable: false } => (tar::EntryType::Regular, 0o644, 0),
        EntryKind::File { executable: true } => (tar::EntryType::Regular, 0o755, 1),
        EntryKind::Symlink => (tar::EntryType::Symlink, 0o777, 2),
    };
    let mut h = if size < MAX_OCTAL_SIZE {
        // The fixed fields come from a template filled once by the `tar` crate; only the size
        // (written here as `tar` writes it) and the name change. Saves formatting five
        // numbers per entry.
        let mut h = header_templates()[slot].clone();
        octal_digits(&mut h.as_old_mut().size[..11], size);
        h
    } else {
        let mut h = tar::Header::new_gnu();
        fill_fixed(&mut h, entry_type, mode, size);
        h
    };
    let name = path.as_bytes();
    let n = name.len().min(NAME_FIELD);
    h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
    if let Some(l) = link {
        let n = l.len().min(NAME_FIELD);
        h.as_old_mut().linkname[..n].copy_from_slice(&l[..n]);
    }
    set_cksum(&mut h);
    w.write_all(h.as_bytes())
}

/// Sizes below 8^11 are written as 11 octal digits; larger ones take the GNU binary form,
/// which is left to the `tar` crate.
const MAX_OCTAL_SIZE: u64 = 1 << 33;

/// Header templates (size 0, no name) for a file, an executable file and a symlink.
fn header_templates() -> &'static [tar::Header; 3] {
    static T: std::sync::OnceLock<[tar::Header; 3]> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let make = |t, mode| {
            let mut h = tar::Header::new_gnu();
            fill_fixed(&mut h, t, mode, 0);
            h
        };
        [
            make(tar::EntryType::Regular, 0o644),
            make(tar::EntryType::Regular, 0o755),
            make(tar::EntryType::Symlink, 0o777),
        ]
    })
}

/// Writes `v` as zero-padded octal filling `dst` (what `tar` writes before a field's NUL).
fn octal_digits(dst: &mut [u8], mut v: u64) {
    for d in dst.iter_mut().rev() {
        *d = b'0' + (v & 7) as u8;
        v >>= 3;
    }
}

/// `tar::Header::set_cksum` without formatting: the sum of the header's bytes with the
/// checksum field counted as spaces, as 7 octal digits (the 8th byte is left as it is: NUL).
fn set_cksum(h: &mut tar::Header) {
    let sum: u32 = h.as_bytes()[..148]
        .iter()
        .chain(&h.as_bytes()[156..])
        .map(|b| u32::from(*b))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    octal_digits(&mut h.as_old_mut().cksum[..7], u64::from(sum));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The header fast path writes exactly what the `tar` crate writes.
    #[test]
    fn header_fast_path_matches_the_tar_crate() {
        let kinds = [
            (
                EntryKind::File { executable: false },
                tar::EntryType::Regular,
                0o644,
            ),
            (
                EntryKind::File { executable: true },
                tar::EntryType::Regular,
                0o755,
            ),
            (EntryKind::Symlink, tar::EntryType::Symlink, 0o777),
        ];
        for (kind, t, mode) in kinds {
            for size in [
                0,
                1,
                511,
                512,
                4096,
                123_456_789,
                MAX_OCTAL_SIZE - 1,
                MAX_OCTAL_SIZE,
            ] {
                let mut fast = Vec::new();
                write_header(&mut fast, "dir/näme.txt", kind, size, Some(b"target")).unwrap();
                let mut h = tar::Header::new_gnu();
                fill_fixed(&mut h, t, mode, size);
                h.as_old_mut().name[..13].copy_from_slice("dir/näme.txt".as_bytes());
                h.as_old_mut().linkname[..6].copy_from_slice(b"target");
                h.set_cksum();
                assert_eq!(fast, h.as_bytes().to_vec(), "{kind:?} size {size}");
            }
        }
    }
}
