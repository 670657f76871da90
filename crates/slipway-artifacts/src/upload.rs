//! The upload path's server side: an archive claimed to hold a given tree is staged, walked
//! entry by entry with the same rules as extraction, and accepted only when its content hashes
//! to the claim. The archive's bytes are stored as received (their layout is not part of the
//! contract; the content hash is).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::extract::{copy_exact, walk, ExtractError, Item, Limits};
use crate::store::StoreError;
use crate::tree::{check_link, sha256, EntryKind, LinkProblem, TreeHasher};
use crate::{CaptureOptions, Captured};

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the archive is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the archive holds more than {limit} files")]
    TooManyFiles { limit: u64 },
    #[error("the archive's content hashes to {actual}, not to the claimed {claimed}")]
    HashMismatch { claimed: String, actual: String },
    #[error("symlink {path} -> {target} points outside the snapshot (escapes at {via})")]
    SymlinkEscapes {
        path: String,
        target: String,
        via: String,
    },
    #[error("symlink {path} resolves through too many links")]
    SymlinkLoop { path: String },
    #[error(transparent)]
    Archive(#[from] ExtractError),
    #[error("reading the upload failed: {0}")]
    Read(#[source] io::Error),
    #[error("staging the upload in {} failed: {source}", path.display())]
    Stage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl UploadError {
    /// The refusal is about size (maps to HTTP 413) rather than content (422).
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            UploadError::TooLarge { .. }
                | UploadError::TooManyFiles { .. }
                | UploadError::Archive(
                    ExtractError::TooManyBytes { .. } | ExtractError::TooManyEntries { .. }
                )
        )
    }

    /// The client sent something unacceptable (as opposed to a server-side failure).
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            UploadError::Stage { .. } | UploadError::Store(StoreError::Io { .. })
        )
    }
}

/// Streams `body` into a staging file in `dir`, validates it and checks its hash. Returns the
/// staged file (deleted on drop unless published) and its description.
pub(crate) fn verify_into(
    dir: &Path,
    claimed: &str,
    mut body: impl Read,
    opts: &CaptureOptions,
) -> Result<(tempfile::TempPath, Captured), UploadError> {
    let stage_err = |source| UploadError::Stage {
        path: dir.to_path_buf(),
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".upload-")
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(stage_err)?;
    let mut size = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(UploadError::Read(e)),
        };
        size += n as u64;
        if size > opts.max_compressed_bytes {
            return Err(UploadError::TooLarge {
                limit: opts.max_compressed_bytes,
            });
        }
        tmp.write_all(&buf[..n]).map_err(stage_err)?;
    }
    tmp.as_file().sync_all().map_err(stage_err)?;
    let file: &mut File = tmp.as_file_mut();
    file.rewind().map_err(stage_err)?;

    let limits = Limits {
        max_entries: opts.max_files.saturating_mul(4).max(1024),
        max_bytes: opts.max_uncompressed_bytes,
    };
    let mut records: Vec<(String, EntryKind, [u8; 32])> = Vec::new();
    let mut links: HashMap<String, String> = HashMap::new();
    let summary = walk(io::BufReader::new(&*file), &limits, |path, item| {
        match item {
            Item::Dir => {}
            Item::File {
                executable,
                size,
                data,
            } => {
                let mut h = Sha256::new();
                copy_exact(data, size, &mut h, path)?;
                records.push((
                    path.to_string(),
                    EntryKind::File { executable },
                    h.finalize().into(),
                ));
            }
            Item::Symlink { target } => {
                records.push((
                    path.to_string(),
                    EntryKind::Symlink,
                    sha256(target.as_bytes()),
                ));
                links.insert(path.to_string(), target);
            }
        }
        if records.len() as u64 > opts.max_files {
            return Err(ExtractError::TooManyEntries {
                limit: opts.max_files,
            });
        }
        Ok(())
    })
    .map_err(|e| match e {
        ExtractError::TooManyEntries { limit } if limit == opts.max_files => {
            UploadError::TooManyFiles { limit }
        }
        other => UploadError::Archive(other),
    })?;
    for (path, target) in &links {
        match check_link(path, target, &links) {
            Ok(()) => {}
            Err(LinkProblem::Escapes { via }) => {
                return Err(UploadError::SymlinkEscapes {
                    path: path.clone(),
                    target: target.clone(),
                    via,
                })
            }
            Err(LinkProblem::Loop) => return Err(UploadError::SymlinkLoop { path: path.clone() }),
        }
    }
    records.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut tree = TreeHasher::new();
    for (p, k, s) in &records {
        // `walk` refused duplicates, so the sorted paths are strictly ascending.
        tree.push(p, *k, s).expect("archive paths are unique");
    }
    let actual = tree.finish();
    if actual != claimed {
        return Err(UploadError::HashMismatch {
            claimed: claimed.to_string(),
            actual,
        });
    }
    let captured = Captured {
        content_hash: actual,
        artifact_path: tmp.path().to_path_buf(),
        file_count: summary.files,
        size_bytes: size,
        uncompressed_bytes: summary.bytes,
        deduplicated: false,
    };
    Ok((tmp.into_temp_path(), captured))
}
