//! The stat cache: (path, size, mtime, ctime, inode, device) → file sha256, persisted per
//! source directory, so an unchanged tree is hashed without reading any file.
//!
//! The "racily clean" rule (as in git's index): an entry is trusted only when the file's mtime
//! is strictly older than the cache file's own mtime. A file changed within the same
//! timestamp tick as its hashing keeps its mtime, so without the rule the change would go
//! unseen; with it such entries are hashed again until a later cache write vouches for them.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"SLWSC001";

/// The stat fields that must all be equal for a cached hash to be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatKey {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

impl StatKey {
    /// The same fields from a raw `stat` (what the walk's `fstatat` and the reader's `fstat`
    /// return); what `std::fs::Metadata` reports too.
    // The field types of `struct stat` vary by target; the casts are not no-ops everywhere.
    #[allow(clippy::unnecessary_cast)]
    pub(crate) fn of_stat(st: &libc::stat) -> StatKey {
        StatKey {
            size: st.st_size as u64,
            mtime_ns: (st.st_mtime as i64)
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_mtime_nsec as i64),
            ctime_ns: (st.st_ctime as i64)
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_ctime_nsec as i64),
            ino: st.st_ino as u64,
            dev: st.st_dev as u64,
        }
    }
}

pub(crate) struct StatCache {
    entries: HashMap<String, (StatKey, [u8; 32])>,
    /// mtime of the cache file when it was loaded; entries at or after it are racy.
    trusted_before_ns: i64,
}

impl StatCache {
    pub(crate) fn empty() -> StatCache {
        StatCache {
            entries: HashMap::new(),
            trusted_before_ns: i64::MIN,
        }
    }

    #[cfg(test)]
    pub(crate) fn with_entries(
        entries: HashMap<String, (StatKey, [u8; 32])>,
        trusted_before_ns: i64,
    ) -> StatCache {
        StatCache {
            entries,
            trusted_before_ns,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cache file for the source tree rooted at `root` (a canonical path).
    pub(crate) fn file_for(dir: &Path, root: &Path) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        let key = hex::encode(Sha256::digest(root.as_os_str().as_bytes()));
        dir.join(format!("{key}.statcache"))
    }

    /// Loads the cache for `root`; a missing, unreadable or corrupt cache is an empty one (the
    /// cache only ever saves work, it never decides content on its own).
    pub(crate) fn load(dir: &Path, root: &Path) -> StatCache {
        let path = Self::file_for(dir, root);
        match Self::try_load(&path) {
            Ok(c) => c,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unusable stat cache");
                }
                StatCache::empty()
            }
        }
    }

    fn try_load(path: &Path) -> io::Result<StatCache> {
        let meta = fs::metadata(path)?;
        let bytes = fs::read(path)?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "corrupt stat cache");
        if bytes.len() < MAGIC.len() + 8 + 32 || &bytes[..8] != MAGIC {
            return Err(bad());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(bad());
        }
        let mut r = &body[8..];
        let count = take_u64(&mut r).ok_or_else(bad)?;
        let mut entries = HashMap::with_capacity(count.min(1 << 20) as usize);
        for _ in 0..count {
            let len = take_u64(&mut r).ok_or_else(bad)? as usize;
            if r.len() < len {
                return Err(bad());
            }
            let (p, rest) = r.split_at(len);
            r = rest;
            let path = std::str::from_utf8(p).map_err(|_| bad())?.to_string();
            let key = StatKey {
                size: take_u64(&mut r).ok_or_else(bad)?,
                mtime_ns: take_u64(&mut r).ok_or_else(bad)? as i64,
                ctime_ns: take_u64(&mut r).ok_or_else(bad)? as i64,
                ino: take_u64(&mut r).ok_or_else(bad)?,
                dev: take_u64(&mut r).ok_or_else(bad)?,
            };
            if r.len() < 32 {
                return Err(bad());
            }
            let mut sha = [0u8; 32];
            sha.copy_from_slice(&r[..32]);
            r = &r[32..];
            entries.insert(path, (key, sha));
        }
        let trusted_before_ns = meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec());
        Ok(StatCache {
            entries,
            trusted_before_ns,
        })
    }

    /// The cached sha256 of `path`, when its stat fields are unchanged and it is not racy.
    pub(crate) fn lookup(&self, path: &str, key: &StatKey) -> Option<[u8; 32]> {
        let (k, sha) = self.entries.get(path)?;
        (k == key && key.mtime_ns < self.trusted_before_ns).then_some(*sha)
    }

    /// Replaces the cache for `root` with `entries` (temp file + rename; concurrent writers
    /// for one tree just race to the last word). The file names source paths, so directories
    /// it creates are private (0700) and the file is 0600, like the CLI's token file: the
    /// CLI's cache lives in the user's cache directory, which need not be private itself.
    pub(crate) fn save<'a>(
        dir: &Path,
        root: &Path,
        entries: impl Iterator<Item = (&'a str, StatKey, [u8; 32])>,
    ) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut body = Vec::with_capacity(1 << 16);
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&0u64.to_le_bytes());
        let mut count = 0u64;
        for (path, k, sha) in entries {
            body.extend_from_slice(&(path.len() as u64).to_le_bytes());
            body.extend_from_slice(path.as_bytes());
            for v in [k.size, k.mtime_ns as u64, k.ctime_ns as u64, k.ino, k.dev] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body.extend_from_slice(&sha);
            count += 1;
        }
        body[8..16].copy_from_slice(&count.to_le_bytes());
        let sum = Sha256::digest(&body);
        let mut tmp = tempfile::Builder::new()
            .prefix(".statcache-")
            .tempfile_in(dir)?;
        tmp.write_all(&body)?;
        tmp.write_all(&sum)?;
        tmp.as_file().sync_data()?;
        tmp.persist(Self::file_for(dir, root))
            .map_err(|e| e.error)?;
        Ok(())
    }
}

fn take_u64(r: &mut &[u8]) -> Option<u64> {
    if r.len() < 8 {
        return None;
    }
    let (a, b) = r.split_at(8);
    *r = b;
    Some(u64::from_le_bytes(a.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(mtime_ns: i64) -> StatKey {
        StatKey {
            size: 5,
            mtime_ns,
            ctime_ns: mtime_ns,
            ino: 7,
            dev: 1,
        }
    }

    #[test]
    fn racily_clean_entries_are_not_trusted() {
        let mut m = HashMap::new();
        m.insert("old".to_string(), (key(100), [1u8; 32]));
        m.insert("same-tick".to_string(), (key(200), [2u8; 32]));
        m.insert("newer".to_string(), (key(300), [3u8; 32]));
        let c = StatCache::with_entries(m, 200);
        assert_eq!(c.lookup("old", &key(100)), Some([1u8; 32]));
        assert_eq!(c.lookup("same-tick", &key(200)), None);
        assert_eq!(c.lookup("newer", &key(300)), None);
    }

    #[test]
    fn any_changed_stat_field_misses() {
        let mut m = HashMap::new();
        m.insert("f".to_string(), (key(100), [1u8; 32]));
        let c = StatCache::with_entries(m, 1_000);
        for changed in [
            StatKey {
                size: 6,
                ..key(100)
            },
            StatKey {
                ctime_ns: 101,
                ..key(100)
            },
            StatKey { ino: 8, ..key(100) },
            StatKey { dev: 2, ..key(100) },
            key(99),
        ] {
            assert_eq!(c.lookup("f", &changed), None, "{changed:?}");
        }
        assert_eq!(c.lookup("g", &key(100)), None);
    }

    #[test]
    fn save_load_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new("/some/tree");
        StatCache::save(dir.path(), root, [("a/b", key(1), [9u8; 32])].into_iter()).unwrap();
        let c = StatCache::load(dir.path(), root);
        assert_eq!(c.lookup("a/b", &key(1)), Some([9u8; 32]));
        // Another tree has its own cache.
        assert!(StatCache::load(dir.path(), Path::new("/other")).is_empty());
        // A flipped byte makes the whole cache unusable rather than wrong.
        let f = StatCache::file_for(dir.path(), root);
        let mut bytes = fs::read(&f).unwrap();
        bytes[20] ^= 1;
        fs::write(&f, bytes).unwrap();
        assert!(StatCache::load(dir.path(), root).is_empty());
    }

    #[test]
    fn a_new_cache_directory_and_file_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache/slipway/stat");
        let root = Path::new("/some/tree");
        StatCache::save(&cache, root, [("a", key(1), [1u8; 32])].into_iter()).unwrap();
        for d in [
            dir.path().join("cache"),
            dir.path().join("cache/slipway"),
            cache.clone(),
        ] {
            let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        let file = StatCache::file_for(&cache, root);
        assert_eq!(
            fs::metadata(file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
