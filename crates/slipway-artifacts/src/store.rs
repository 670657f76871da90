//! The content-addressed artifact store: `artifacts/<agentId>/<contentHash>.tar.zst`.
//!
//! An artifact is written under a temporary name in its agent's directory, fsynced, and renamed
//! into place without replacing anything; an existing hash is never rewritten. A crash leaves
//! at most a `.partial` temporary file, never a partial artifact under a real name.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::capture::{load_cache, prehash, save_cache, write_archive, CaptureError};
use crate::fsutil::{fsync_dir, rename_noreplace};
use crate::scan::scan;
use crate::statcache::StatCache;
use crate::upload::{verify_into, UploadError};
use crate::{CaptureOptions, Captured};

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0:?} is not a valid agent id")]
    BadAgent(String),
    #[error("{0:?} is not a content hash (64 lowercase hex characters)")]
    BadHash(String),
    #[error("snapshot {hash} is not in the artifact store")]
    NotFound { hash: String },
    #[error("artifact store I/O on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// True for 64 lowercase hex characters.
pub fn is_content_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_agent(agent: &str) -> Result<(), StoreError> {
    let ok = !agent.is_empty()
        && agent.len() <= 64
        && agent
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadAgent(agent.to_string()))
    }
}

fn check_hash(hash: &str) -> Result<(), StoreError> {
    if is_content_hash(hash) {
        Ok(())
    } else {
        Err(StoreError::BadHash(hash.to_string()))
    }
}

/// Where snapshot archives live. The local file system implements it today; an object store
/// (S3 and friends, for instance through the `object_store` crate) can later, because callers
/// only stage a verified file and ask for it to be published.
pub trait ArtifactStore: Send + Sync {
    /// The artifact's location as recorded in `SourceSnapshot.artifactPath`
    /// (`artifacts/<agentId>/<contentHash>.tar.zst`).
    fn location(&self, agent: &str, hash: &str) -> String {
        format!("artifacts/{agent}/{hash}.tar.zst")
    }
    /// Whether the artifact exists.
    fn contains(&self, agent: &str, hash: &str) -> bool;
    /// Opens the compressed archive for reading.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or an I/O error.
    fn open_archive(&self, agent: &str, hash: &str) -> Result<Box<dyn Read + Send>, StoreError>;
    /// Makes the complete, fsynced file `staged` the artifact for `hash`. Returns `false`, and
    /// drops `staged`, when the store already had it.
    ///
    /// # Errors
    /// An invalid name or an I/O error.
    fn publish(
        &self,
        agent: &str,
        hash: &str,
        staged: tempfile::TempPath,
    ) -> Result<bool, StoreError>;
}

/// The artifact store on the local file system.
#[derive(Debug, Clone)]
pub struct LocalArtifactStore {
    root: PathBuf,
}

impl LocalArtifactStore {
    /// Opens (creating, mode 0700) the store rooted at `root`.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
        Ok(LocalArtifactStore { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of an artifact (which may not exist).
    ///
    /// # Errors
    /// `agent` or `hash` is not a valid name (so no caller can build a path out of the store).
    pub fn path(&self, agent: &str, hash: &str) -> Result<PathBuf, StoreError> {
        check_agent(agent)?;
        check_hash(hash)?;
        Ok(self.root.join(agent).join(format!("{hash}.tar.zst")))
    }

    /// The agent's directory, created on first use; temporary files are staged there so the
    /// final rename never crosses a file system.
    pub(crate) fn agent_dir(&self, agent: &str) -> Result<PathBuf, StoreError> {
        check_agent(agent)?;
        let dir = self.root.join(agent);
        create_private_dir(dir)
    }

    /// Whether the artifact exists.
    pub fn contains(&self, agent: &str, hash: &str) -> bool {
        self.path(agent, hash).is_ok_and(|p| p.is_file())
    }

    /// Opens the compressed archive of `hash`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or an I/O error.
    pub fn open(&self, agent: &str, hash: &str) -> Result<File, StoreError> {
        let path = self.path(agent, hash)?;
        open_existing(path, hash)
    }

    /// Captures the directory `dir` into the store for `agent`. When the stat cache can vouch
    /// for the tree and the store already has its hash, no file is read and nothing is
    /// written (`deduplicated`).
    ///
    /// # Errors
    /// Any capture guard, or a store error.
    pub fn capture_dir(
        &self,
        agent: &str,
        dir: &Path,
        opts: &CaptureOptions,
    ) -> Result<Captured, CaptureError> {
        let agent_dir = self.agent_dir(agent)?;
        let mut cache = StatCache::empty();
        let scan = scan(dir, opts, |root| {
            cache = load_cache(root, opts);
            // Stats in the walk only pay off when a cache can vouch for files unopened.
            !cache.is_empty()
        })?;
        if !cache.is_empty() {
            let hashed = prehash(&scan, &cache)?;
            if self.contains(agent, &hashed.content_hash) {
                save_cache(&scan, opts, &hashed);
                return Ok(self.existing(
                    agent,
                    &hashed.content_hash,
                    scan.entries.len() as u64,
                    scan.total_bytes(),
                )?);
            }
        }
        let werr = |source| CaptureError::Write {
            path: agent_dir.clone(),
            source,
        };
        let tmp = tempfile::Builder::new()
            .prefix(".capture-")
            .suffix(".partial")
            .tempfile_in(&agent_dir)
            .map_err(werr)?;
        let written = write_archive(&scan, tmp.as_file(), opts, &agent_dir, true)?;
        tmp.as_file().sync_all().map_err(werr)?;
        let hash = written.hashed.content_hash.clone();
        let fresh = self.publish(agent, &hash, tmp.into_temp_path())?;
        save_cache(&scan, opts, &written.hashed);
        Ok(written.captured(self.path(agent, &hash)?, !fresh))
    }

    /// Receives an uploaded archive claimed to hold the tree `claimed`: streams it to a staging
    /// file (bounded by `opts.max_compressed_bytes`), re-validates every entry, recomputes the
    /// content hash, and publishes it only if it matches.
    ///
    /// # Errors
    /// [`UploadError`]: too large, a refused entry, a hash mismatch, or I/O.
    pub fn verify_upload(
        &self,
        agent: &str,
        claimed: &str,
        body: impl Read,
        opts: &CaptureOptions,
    ) -> Result<Captured, UploadError> {
        check_hash(claimed)?;
        let dir = self.agent_dir(agent)?;
        let (staged, captured) = verify_into(&dir, claimed, body, opts)?;
        let fresh = self.publish(agent, claimed, staged)?;
        Ok(Captured {
            artifact_path: self.path(agent, claimed)?,
            deduplicated: !fresh,
            ..captured
        })
    }

    /// The description of an artifact the store already has.
    fn existing(
        &self,
        agent: &str,
        hash: &str,
        file_count: u64,
        uncompressed: u64,
    ) -> Result<Captured, StoreError> {
        let path = self.path(agent, hash)?;
        let ioerr = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let size = fs::metadata(&path).map_err(ioerr)?.len();
        Ok(Captured {
            content_hash: hash.to_string(),
            artifact_path: path.clone(),
            file_count,
            size_bytes: size,
            uncompressed_bytes: uncompressed,
            deduplicated: true,
        })
    }
}

/// Releases (issue 6): the immutable build outputs, content-addressed like snapshots but in
/// their own namespace, `artifacts/<agentId>/releases/<contentHash>.tar.zst`, so a release and a
/// snapshot of the same tree never share (or collect) one file.
impl LocalArtifactStore {
    /// The location of a release as recorded in its row.
    pub fn release_location(&self, agent: &str, hash: &str) -> String {
        format!("artifacts/{agent}/releases/{hash}.tar.zst")
    }

    /// The file of a release archive (which may not exist).
    ///
    /// # Errors
    /// `agent` or `hash` is not a valid name.
    pub fn release_path(&self, agent: &str, hash: &str) -> Result<PathBuf, StoreError> {
        check_agent(agent)?;
        check_hash(hash)?;
        Ok(self
            .root
            .join(agent)
            .join("releases")
            .join(format!("{hash}.tar.zst")))
    }

    /// The agent's release directory, created on first use; stage release archives here so the
    /// final rename never crosses a file system.
    ///
    /// # Errors
    /// An invalid agent id or an I/O error.
    pub fn release_dir(&self, agent: &str) -> Result<PathBuf, StoreError> {
        let dir = self.agent_dir(agent)?.join("releases");
        create_private_dir(dir)
    }

    /// Whether the release archive exists.
    pub fn contains_release(&self, agent: &str, hash: &str) -> bool {
        self.release_path(agent, hash).is_ok_and(|p| p.is_file())
    }

    /// Opens the compressed archive of a release.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or an I/O error.
    pub fn open_release(&self, agent: &str, hash: &str) -> Result<File, StoreError> {
        let path = self.release_path(agent, hash)?;
        open_existing(path, hash)
    }

    /// Makes the complete, fsynced file `staged` (in [`Self::release_dir`]) the release archive
    /// of `hash`. Returns `false`, and drops `staged`, when the store already had it.
    ///
    /// # Errors
    /// An invalid name or an I/O error.
    pub fn publish_release(
        &self,
        agent: &str,
        hash: &str,
        staged: tempfile::TempPath,
    ) -> Result<bool, StoreError> {
        publish_at(staged, self.release_path(agent, hash)?)
    }
}

impl ArtifactStore for LocalArtifactStore {
    fn contains(&self, agent: &str, hash: &str) -> bool {
        LocalArtifactStore::contains(self, agent, hash)
    }

    fn open_archive(&self, agent: &str, hash: &str) -> Result<Box<dyn Read + Send>, StoreError> {
        Ok(Box::new(self.open(agent, hash)?))
    }

    fn publish(
        &self,
        agent: &str,
        hash: &str,
        staged: tempfile::TempPath,
    ) -> Result<bool, StoreError> {
        publish_at(staged, self.path(agent, hash)?)
    }
}

/// Creates `dir` (and its parents) private to the user, if missing.
fn create_private_dir(dir: PathBuf) -> Result<PathBuf, StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
    Ok(dir)
}

/// Opens the archive at `path`; a missing file is [`StoreError::NotFound`] for `hash`.
fn open_existing(path: PathBuf, hash: &str) -> Result<File, StoreError> {
    File::open(&path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            StoreError::NotFound {
                hash: hash.to_string(),
            }
        } else {
            StoreError::Io { path, source }
        }
    })
}

/// Renames the complete, fsynced file `staged` to `dest` unless `dest` exists (then `false`,
/// and `staged` is dropped), and makes the rename durable.
fn publish_at(staged: tempfile::TempPath, dest: PathBuf) -> Result<bool, StoreError> {
    let ioerr = |source| StoreError::Io {
        path: dest.clone(),
        source,
    };
    if !rename_noreplace(&staged, &dest).map_err(ioerr)? {
        return Ok(false);
    }
    // The staged name is gone; keep the guard from deleting whatever lands there later.
    let _ = staged.keep();
    fsync_dir(dest.parent().expect("artifact paths have a parent")).map_err(ioerr)?;
    Ok(true)
}
