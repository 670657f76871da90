//! The stat cache: unchanged files are not read again, changed files always are.
//!
//! Reads are observed with inotify (`IN_OPEN`/`IN_ACCESS` on the source directories), which
//! the kernel queues synchronously during the `open`/`read` calls, so no waiting is involved.

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use filetime::FileTime;
use slipway_artifacts::{
    capture_to_file, has_stat_cache, hash_tree, CaptureOptions, LocalArtifactStore,
};

use crate::util::*;

/// Records which files beneath some directories were opened or read.
struct Watch {
    fd: OwnedFd,
    dirs: Vec<(i32, String)>,
}

impl Watch {
    /// Watches `root` and the given subdirectories (inotify is not recursive).
    fn new(root: &Path, subdirs: &[&str]) -> Option<Watch> {
        // SAFETY: plain syscall; the fd is checked and then owned.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: fresh fd from inotify_init1.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut dirs = Vec::new();
        for sub in std::iter::once("").chain(subdirs.iter().copied()) {
            let p = if sub.is_empty() {
                root.to_path_buf()
            } else {
                root.join(sub)
            };
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
            // SAFETY: valid fd and NUL-terminated path.
            let wd = unsafe {
                libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS)
            };
            if wd < 0 {
                return None;
            }
            dirs.push((wd, sub.to_string()));
        }
        Some(Watch { fd, dirs })
    }

    /// The files opened or read since the last call.
    fn take(&self) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            while off < n as usize {
                let wd = i32::from_ne_bytes(buf[off..off + 4].try_into().unwrap());
                let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap());
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
                let name = &buf[off + 16..off + 16 + len];
                let name =
                    String::from_utf8_lossy(name.split(|b| *b == 0).next().unwrap()).into_owned();
                off += 16 + len;
                assert_eq!(mask & libc::IN_Q_OVERFLOW, 0, "inotify queue overflowed");
                if name.is_empty() || mask & libc::IN_ISDIR != 0 {
                    continue; // the watched directory itself, or a subdirectory being listed
                }
                let dir = &self.dirs.iter().find(|(w, _)| *w == wd).unwrap().1;
                seen.insert(if dir.is_empty() {
                    name
                } else {
                    format!("{dir}/{name}")
                });
            }
        }
        seen
    }
}

fn watch(root: &Path, subdirs: &[&str], test: &str) -> Option<Watch> {
    let w = Watch::new(root, subdirs);
    if w.is_none() {
        skip(
            test,
            &format!(
                "inotify is not available: {}",
                std::io::Error::last_os_error()
            ),
        );
    }
    w
}

fn set(t: &[&str]) -> BTreeSet<String> {
    t.iter().map(|s| s.to_string()).collect()
}

/// A tree of `n` files in the root and `sub/`, all last modified an hour ago (so the cache
/// written now can vouch for them).
fn old_tree(root: &Path) -> Tree {
    let mut t: Tree = (0..12)
        .map(|i| {
            (
                format!("f{i:02}"),
                file(format!("file {i}\n").repeat(i + 1)),
            )
        })
        .collect();
    t.insert("sub/g".into(), exe("#!/bin/sh\n"));
    t.insert("sub/l".into(), link("../f01"));
    write_tree(root, &t);
    let hour_ago = FileTime::from_system_time(SystemTime::now() - Duration::from_secs(3600));
    for (p, n) in &t {
        if matches!(n, Node::File { .. }) {
            filetime::set_file_times(root.join(p), hour_ago, hour_ago).unwrap();
        }
    }
    t
}

fn file_names(t: &Tree) -> BTreeSet<String> {
    t.iter()
        .filter(|(_, n)| matches!(n, Node::File { .. }))
        .map(|(p, _)| p.clone())
        .collect()
}

fn cached(dir: &Path) -> CaptureOptions {
    CaptureOptions {
        stat_cache_dir: Some(dir.join("cache")),
        ..opts()
    }
}

#[test]
fn second_hash_reads_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let t = old_tree(&src);
    let Some(w) = watch(&src, &["sub"], "stat_cache::second_hash_reads_no_file") else {
        return;
    };
    let opts = cached(dir.path());

    let first = hash_tree(&src, &opts).unwrap();
    assert_eq!(first, oracle_hash(&t));
    assert_eq!(
        w.take(),
        file_names(&t),
        "the first run reads every file (and proves the watch works)"
    );
    let cache_files = names(&dir.path().join("cache"));
    assert_eq!(cache_files.len(), 1);
    let cache_stamp = fs::metadata(dir.path().join("cache").join(&cache_files[0]))
        .unwrap()
        .modified()
        .unwrap();

    for _ in 0..3 {
        assert_eq!(hash_tree(&src, &opts).unwrap(), first);
        assert_eq!(
            w.take(),
            BTreeSet::new(),
            "an unchanged tree is hashed without reading any file"
        );
    }
    // Nothing was read, so the cache was not rewritten either.
    let now = fs::metadata(dir.path().join("cache").join(&cache_files[0]))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(now, cache_stamp);

    // The store's capture path: the first capture reads everything to archive it; the second
    // is vouched for by the cache and deduplicated without reading a file.
    let store = LocalArtifactStore::new(dir.path().join("store")).unwrap();
    let c = store.capture_dir("agent", &src, &opts).unwrap();
    assert!(!c.deduplicated);
    assert_eq!(w.take(), file_names(&t));
    let c2 = store.capture_dir("agent", &src, &opts).unwrap();
    assert!(c2.deduplicated);
    assert_eq!(c2.content_hash, first);
    assert_eq!(w.take(), BTreeSet::new());
}

#[test]
fn capture_to_file_refreshes_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let t = old_tree(&src);
    let Some(w) = watch(
        &src,
        &["sub"],
        "stat_cache::capture_to_file_refreshes_the_cache",
    ) else {
        return;
    };
    let opts = cached(dir.path());
    let c = capture_to_file(&src, &dir.path().join("a.tar.zst"), &opts).unwrap();
    assert_eq!(w.take(), file_names(&t));
    assert_eq!(hash_tree(&src, &opts).unwrap(), c.content_hash);
    assert_eq!(w.take(), BTreeSet::new());
}

#[test]
fn racily_clean_files_are_read_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let t = old_tree(&src);
    // A file whose mtime is not older than the cache file can have changed without its stat
    // fields changing; it must be re-read on every run.
    let future = FileTime::from_system_time(SystemTime::now() + Duration::from_secs(3600));
    filetime::set_file_times(src.join("f03"), future, future).unwrap();
    let Some(w) = watch(
        &src,
        &["sub"],
        "stat_cache::racily_clean_files_are_read_every_time",
    ) else {
        return;
    };
    let opts = cached(dir.path());
    let h = hash_tree(&src, &opts).unwrap();
    assert_eq!(w.take(), file_names(&t));
    for _ in 0..2 {
        assert_eq!(hash_tree(&src, &opts).unwrap(), h);
        assert_eq!(w.take(), set(&["f03"]));
    }
}

/// Applies `change` to a cached tree and checks the cached hash equals the oracle's.
fn change_is_seen(change: impl FnOnce(&Path, &mut Tree)) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let mut t = old_tree(&src);
    let with_cache = cached(dir.path());
    let before = hash_tree(&src, &with_cache).unwrap();
    assert_eq!(hash_tree(&src, &with_cache).unwrap(), before); // now served from the cache
    change(&src, &mut t);
    let after = hash_tree(&src, &with_cache).unwrap();
    assert_ne!(after, before, "the change went unseen");
    assert_eq!(after, oracle_hash(&t));
    assert_eq!(
        after,
        hash_tree(&src, &opts()).unwrap(),
        "cached and uncached hashes differ"
    );
    // And a store capture with the cache archives the new content.
    let store = LocalArtifactStore::new(dir.path().join("store")).unwrap();
    let c = store.capture_dir("agent", &src, &with_cache).unwrap();
    assert_eq!(c.content_hash, after);
}

fn old_times(p: &Path) -> (FileTime, FileTime) {
    let m = fs::metadata(p).unwrap();
    (
        FileTime::from_last_access_time(&m),
        FileTime::from_last_modification_time(&m),
    )
}

#[test]
fn content_change_with_a_new_size_is_seen() {
    change_is_seen(|src, t| {
        let (a, m) = old_times(&src.join("f05"));
        fs::write(src.join("f05"), b"shorter").unwrap();
        filetime::set_file_times(src.join("f05"), a, m).unwrap();
        t.insert("f05".into(), file("shorter"));
    });
}

#[test]
fn same_size_rewrite_with_the_mtime_restored_is_seen() {
    change_is_seen(|src, t| {
        let p = src.join("f07");
        let (a, m) = old_times(&p);
        let mut data = fs::read(&p).unwrap();
        data[0] ^= 0x20;
        fs::write(&p, &data).unwrap();
        // Size and mtime are as cached; only ctime (which cannot be set back) tells.
        filetime::set_file_times(&p, a, m).unwrap();
        t.insert("f07".into(), file(data));
    });
}

#[test]
fn same_size_replacement_by_rename_is_seen() {
    change_is_seen(|src, t| {
        let p = src.join("sub/g");
        let (a, m) = old_times(&p);
        let tmp = src.join("sub/.g.new");
        fs::write(&tmp, b"#!/bin/zz\n").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
        filetime::set_file_times(&tmp, a, m).unwrap();
        fs::rename(&tmp, &p).unwrap();
        t.insert("sub/g".into(), exe("#!/bin/zz\n"));
    });
}

#[test]
fn exec_bit_change_is_seen() {
    change_is_seen(|src, t| {
        fs::set_permissions(src.join("f02"), fs::Permissions::from_mode(0o755)).unwrap();
        let Node::File { data, .. } = t["f02"].clone() else {
            unreachable!()
        };
        t.insert("f02".into(), exe(data));
    });
}

#[test]
fn corrupt_or_foreign_cache_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let mut t = old_tree(&src);
    let opts = cached(dir.path());
    hash_tree(&src, &opts).unwrap();
    let cache_dir = dir.path().join("cache");
    let cache_file: PathBuf = cache_dir.join(&names(&cache_dir)[0]);
    let mut bytes = fs::read(&cache_file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&cache_file, &bytes).unwrap();
    fs::write(src.join("f01"), b"changed").unwrap();
    t.insert("f01".into(), file("changed"));
    assert_eq!(hash_tree(&src, &opts).unwrap(), oracle_hash(&t));
    fs::write(&cache_file, b"not a cache").unwrap();
    assert_eq!(hash_tree(&src, &opts).unwrap(), oracle_hash(&t));

    // Another tree with the same cache directory gets its own cache file.
    let other = dir.path().join("other");
    write_tree(&other, &example_tree());
    assert_eq!(hash_tree(&other, &opts).unwrap(), documented_example_hash());
    assert_eq!(names(&cache_dir).len(), 2);
}

#[test]
fn has_stat_cache_tells_a_tree_hashed_before_from_one_never_seen() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    old_tree(&src);
    let other = dir.path().join("other");
    old_tree(&other);
    assert!(!has_stat_cache(&src, &opts()), "no cache directory");
    let opts = cached(dir.path());
    assert!(!has_stat_cache(&src, &opts), "nothing hashed yet");

    hash_tree(&src, &opts).unwrap();
    assert!(has_stat_cache(&src, &opts));
    // The same tree by another spelling of its path: the cache is keyed by the real path.
    assert!(has_stat_cache(&dir.path().join("src/../src"), &opts));
    assert!(!has_stat_cache(&other, &opts), "another tree");
    assert!(!has_stat_cache(&dir.path().join("missing"), &opts));

    // Capturing fills the cache as well.
    capture_to_file(&other, &dir.path().join("other.tar.zst"), &opts).unwrap();
    assert!(has_stat_cache(&other, &opts));
}
