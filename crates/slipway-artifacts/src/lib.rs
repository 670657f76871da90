//! Source snapshots: the canonical content hash of a directory, its deterministic `.tar.zst`
//! archive, the content-addressed artifact store, upload verification and safe extraction.
//!
//! The definition of the content hash is a public contract (see `docs/snapshots.md` and
//! [`tree`]); everything else here may change as long as it keeps producing that hash.

mod capture;
mod extract;
mod fsutil;
mod scan;
mod statcache;
mod store;
pub mod tree;
mod upload;

use std::path::PathBuf;

pub use capture::{capture_to_file, has_stat_cache, hash_tree, CaptureError};
pub use extract::{extract, ExtractError, ExtractOptions, Extracted};
pub use scan::{DEFAULT_IGNORES, IGNORE_FILE};
pub use store::{is_content_hash, ArtifactStore, LocalArtifactStore, StoreError};
pub use upload::UploadError;

/// Limits and knobs of a capture. The defaults are seed 004's guards.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Most files (regular files plus symlinks) a tree may hold.
    pub max_files: u64,
    /// Largest compressed archive accepted.
    pub max_compressed_bytes: u64,
    /// Largest sum of file sizes accepted (a bound on what extraction will write).
    pub max_uncompressed_bytes: u64,
    /// zstd level of the archive (default 1: at level 3 a capture costs about twice the CPU
    /// for archives only 2-10 % smaller; see `docs/bench-snapshots.md`). Part of what makes
    /// archives byte-identical: two captures compare equal only at the same level. The content
    /// hash does not depend on it.
    pub zstd_level: i32,
    /// zstd's compression workers; 0 picks the number of CPUs. (The walk runs on the rayon
    /// pool, and files are read and hashed by as many reader threads as the pool has.) The
    /// archive's bytes do not depend on it.
    pub threads: usize,
    /// Where the stat cache lives; `None` disables it (every file is read).
    pub stat_cache_dir: Option<PathBuf>,
    /// Whether [`capture_to_file`] makes its output durable: flushed to disk before the rename
    /// that publishes it, and the directory after (default). A temporary archive that is
    /// uploaded and then deleted (the CLI's) does not need it, and skipping it saves the wait
    /// for the disk (about 50 ms for 100,000 small files here). The artifact store always
    /// makes its archives durable, whatever this says.
    pub durable: bool,
}

/// One GiB, seed 004's default bound on a compressed snapshot.
pub const DEFAULT_MAX_COMPRESSED_BYTES: u64 = 1 << 30;
/// Seed 004's default bound on the number of files.
pub const DEFAULT_MAX_FILES: u64 = 100_000;

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            max_files: DEFAULT_MAX_FILES,
            max_compressed_bytes: DEFAULT_MAX_COMPRESSED_BYTES,
            max_uncompressed_bytes: 8 * DEFAULT_MAX_COMPRESSED_BYTES,
            zstd_level: 1,
            threads: 0,
            stat_cache_dir: None,
            durable: true,
        }
    }
}

impl CaptureOptions {
    pub(crate) fn threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

/// What a capture (or a verified upload) produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// The canonical content hash (64 lowercase hex).
    pub content_hash: String,
    /// Where the archive is: the output file, or the artifact's place in the store.
    pub artifact_path: PathBuf,
    /// Regular files plus symlinks.
    pub file_count: u64,
    /// Size of the compressed archive.
    pub size_bytes: u64,
    /// Sum of file sizes.
    pub uncompressed_bytes: u64,
    /// The store already had this content; nothing new was written.
    pub deduplicated: bool,
}
