//! Helpers shared by the integration tests: tree builders, an independent implementation of
//! the documented content hash, hostile-archive construction, and the "needs root" policy.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use slipway_artifacts::CaptureOptions;

/// A tree as the content hash sees it: path → entry (directories are implied).
pub type Tree = BTreeMap<String, Node>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File { data: Vec<u8>, exec: bool },
    Link(String),
}

pub fn file(data: impl AsRef<[u8]>) -> Node {
    Node::File {
        data: data.as_ref().to_vec(),
        exec: false,
    }
}

pub fn exe(data: impl AsRef<[u8]>) -> Node {
    Node::File {
        data: data.as_ref().to_vec(),
        exec: true,
    }
}

pub fn link(target: &str) -> Node {
    Node::Link(target.to_string())
}

pub fn tree<'a>(entries: impl IntoIterator<Item = (&'a str, Node)>) -> Tree {
    entries
        .into_iter()
        .map(|(p, n)| (p.to_string(), n))
        .collect()
}

/// The worked example of docs/snapshots.md.
pub fn example_tree() -> Tree {
    tree([
        ("README.md", file("hello\n")),
        ("bin/run", exe("#!/bin/sh\necho hi\n")),
        ("docs/readme", link("README.md")),
    ])
}

/// The value the docs state for [`example_tree`].
pub fn documented_example_hash() -> String {
    docs("snapshots.md")
        .lines()
        .find_map(|l| l.strip_prefix("    content hash = "))
        .expect("docs/snapshots.md states the example's content hash")
        .trim()
        .to_string()
}

pub fn docs(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(name);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Writes `tree` beneath `root` (created if needed). Files get 0644 or 0755.
pub fn write_tree(root: &Path, tree: &Tree) {
    fs::create_dir_all(root).unwrap();
    for (path, node) in tree {
        let full = root.join(path);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        match node {
            Node::File { data, exec } => {
                fs::write(&full, data).unwrap();
                let mode = if *exec { 0o755 } else { 0o644 };
                fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
            }
            Node::Link(target) => symlink(target, &full).unwrap(),
        }
    }
}

/// Reads the regular files and symlinks beneath `root` (no ignore rules; directories only
/// through the paths beneath them). Panics on anything else.
pub fn read_tree(root: &Path) -> Tree {
    fn go(root: &Path, rel: &str, out: &mut Tree) {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let name = e
                .file_name()
                .into_string()
                .expect("test trees have UTF-8 names");
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = fs::symlink_metadata(e.path()).unwrap();
            let ft = meta.file_type();
            if ft.is_dir() {
                go(root, &path, out);
            } else if ft.is_symlink() {
                let t = fs::read_link(e.path())
                    .unwrap()
                    .into_os_string()
                    .into_string()
                    .unwrap();
                out.insert(path, Node::Link(t));
            } else if ft.is_file() {
                let data = fs::read(e.path()).unwrap();
                out.insert(
                    path,
                    Node::File {
                        data,
                        exec: meta.permissions().mode() & 0o100 != 0,
                    },
                );
            } else {
                panic!("unexpected file type at {path}: {ft:?}");
            }
        }
    }
    let mut out = Tree::new();
    go(root, "", &mut out);
    out
}

/// The content hash computed straight from the definition in docs/snapshots.md, without the
/// crate's `TreeHasher`: an oracle for the property tests.
pub fn oracle_hash(tree: &Tree) -> String {
    let mut all = Vec::new();
    for (path, node) in tree {
        let (mode, digest) = match node {
            Node::File { data, exec } => (
                if *exec { "100755" } else { "100644" },
                Sha256::digest(data),
            ),
            Node::Link(t) => ("120000", Sha256::digest(t.as_bytes())),
        };
        all.extend_from_slice(mode.as_bytes());
        all.push(b' ');
        all.extend_from_slice(hex::encode(digest).as_bytes());
        all.push(b' ');
        all.extend_from_slice(path.as_bytes());
        all.push(0);
    }
    hex::encode(Sha256::digest(&all))
}

/// Capture options for tests: no stat cache, two workers.
pub fn opts() -> CaptureOptions {
    CaptureOptions {
        threads: 2,
        ..CaptureOptions::default()
    }
}

/// Names in `dir` (sorted), for "nothing was left behind" checks.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("listing {}: {e}", dir.display()),
    };
    v.sort();
    v
}

/// Paths of the entries of a `.tar.zst` (in archive order).
pub fn archive_paths(archive: &[u8]) -> Vec<String> {
    let dec = zstd::stream::read::Decoder::new(archive).unwrap();
    let mut a = tar::Archive::new(dec);
    a.entries()
        .unwrap()
        .map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap())
        .collect()
}

/// Whether the test process may do what only root can (mknod, chown, bypass permissions).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A test that cannot run here says so loudly; under CI (where the facility must exist) it
/// fails instead.
pub fn skip(test: &str, why: &str) {
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    if ci {
        panic!("{test}: cannot run: {why} (CI is set, so this is a failure rather than a skip)");
    }
    eprintln!("\n*** SKIPPED {test}: {why} (set CI=1 to make this a failure) ***\n");
}

const CHILD_ENV: &str = "SLIPWAY_ARTIFACTS_TEST_UNPRIVILEGED_CHILD";

/// Runs the test `name` (its full path in this test binary) again in a child process as the
/// unprivileged user `nobody`, for checks that root would bypass (permission bits). Returns
/// `true` when the caller is that child and should run the body; `false` when the caller is
/// the root parent, which has already checked that the child passed.
pub fn run_unprivileged(name: &str) -> bool {
    if !is_root() {
        return true;
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        panic!("{name}: still root in the unprivileged child");
    }
    use std::os::unix::process::CommandExt;
    // The build directory may sit under a path `nobody` cannot traverse (a 0700 home or CI
    // work dir): run a copy of the test binary from a world-readable temporary directory.
    let exe = {
        let dir = tempfile::Builder::new()
            .prefix("slipway-unprivileged-")
            .tempdir()
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.path().join("tests");
        fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
        (dir, copy)
    };
    let (_exe_dir, exe) = exe;
    let out = std::process::Command::new(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("TMPDIR", std::env::temp_dir())
        .uid(65534)
        .gid(65534)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            skip(
                name,
                &format!(
                    "running as root, and the test binary {} could not be re-run as nobody: {e}",
                    exe.display()
                ),
            );
            return false;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} as nobody failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    false
}

/// A base directory for a test: a `sentinel/` directory that must stay empty, and room for a
/// destination next to it.
pub struct Scene {
    pub dir: tempfile::TempDir,
}

impl Scene {
    pub fn new() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sentinel")).unwrap();
        Scene { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn sentinel(&self) -> PathBuf {
        self.dir.path().join("sentinel")
    }
    pub fn dest(&self) -> PathBuf {
        self.dir.path().join("dest")
    }
    /// Nothing was written outside: the sentinel is empty, the destination does not exist, and
    /// the parent holds no staging directory (only `sentinel` and the names in `also`).
    pub fn assert_untouched(&self, also: &[&str]) {
        assert_eq!(
            names(&self.sentinel()),
            Vec::<String>::new(),
            "something was written into the sentinel"
        );
        assert!(
            self.dest().symlink_metadata().is_err(),
            "the destination exists after a refused archive"
        );
        let mut expected: Vec<String> = also
            .iter()
            .map(|s| s.to_string())
            .chain(["sentinel".to_string()])
            .collect();
        expected.sort();
        assert_eq!(
            names(self.path()),
            expected,
            "left-overs (a .slipway-extract-* staging dir?) in the parent"
        );
    }
}

/// Builds tar streams entry by entry with raw GNU headers, so tests can write what the `tar`
/// crate's safe API refuses (absolute paths, `..`, devices, hard links…).
#[derive(Default)]
pub struct RawTar {
    pub bytes: Vec<u8>,
}

pub const BLOCK: usize = 512;

impl RawTar {
    pub fn new() -> RawTar {
        RawTar::default()
    }

    /// One entry with `name` copied byte for byte into the header's 100-byte name field.
    pub fn entry(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        mode: u32,
        data: &[u8],
        link: Option<&[u8]>,
    ) -> &mut Self {
        self.entry_sized(name, kind, mode, data.len() as u64, data, link)
    }

    /// Like [`entry`](Self::entry) but with a header size that may differ from the data written
    /// (for truncation and bomb tests).
    pub fn entry_sized(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        mode: u32,
        size: u64,
        data: &[u8],
        link: Option<&[u8]>,
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        assert!(
            name.len() <= 100,
            "use a long-name entry for names over 100 bytes"
        );
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
        }
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        self.bytes.extend_from_slice(h.as_bytes());
        self.bytes.extend_from_slice(data);
        self.pad();
        self
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(name.as_bytes(), tar::EntryType::Regular, 0o644, data, None)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(
            name.as_bytes(),
            tar::EntryType::Symlink,
            0o777,
            &[],
            Some(target.as_bytes()),
        )
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name.as_bytes(), tar::EntryType::Directory, 0o755, &[], None)
    }

    /// A GNU long-name (`L`) entry giving the next entry the path `name`.
    pub fn long_name(&mut self, name: &[u8]) -> &mut Self {
        let mut data = name.to_vec();
        data.push(0);
        self.entry(
            b"././@LongLink",
            tar::EntryType::GNULongName,
            0o644,
            &data,
            None,
        )
    }

    /// A PAX extended header (`x`) overriding the next entry's path.
    pub fn pax_path(&mut self, path: &str) -> &mut Self {
        let body = format!(" path={path}\n");
        // The record's length field counts itself.
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        let rec = format!("{len}{body}");
        self.entry(
            b"PaxHeaders/x",
            tar::EntryType::XHeader,
            0o644,
            rec.as_bytes(),
            None,
        )
    }

    fn pad(&mut self) {
        let rem = self.bytes.len() % BLOCK;
        if rem != 0 {
            self.bytes.resize(self.bytes.len() + BLOCK - rem, 0);
        }
    }

    /// The tar stream with its end-of-archive blocks.
    pub fn tar(&self) -> Vec<u8> {
        let mut t = self.bytes.clone();
        t.extend_from_slice(&[0u8; 2 * BLOCK]);
        t
    }

    /// The zstd-compressed archive.
    pub fn zst(&self) -> Vec<u8> {
        zstd::encode_all(&self.tar()[..], 3).unwrap()
    }
}

/// Compresses `tar` with zstd.
pub fn zst(tar: &[u8]) -> Vec<u8> {
    zstd::encode_all(tar, 3).unwrap()
}

/// Writes `data` into the file `path` of `dir`, creating parents; returns the full path.
pub fn put(dir: &Path, path: &str, data: &[u8]) -> PathBuf {
    let full = dir.join(path);
    fs::create_dir_all(full.parent().unwrap()).unwrap();
    let mut f = fs::File::create(&full).unwrap();
    f.write_all(data).unwrap();
    full
}

/// `n` deterministic, incompressible bytes (xorshift64*).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// The uncompressed tar stream docs/snapshots.md describes for `tree`, built independently of
/// the crate: GNU headers in path-byte order, fixed metadata, GNU long-name/long-link entries
/// for names over 100 bytes, two zero blocks at the end.
pub fn documented_tar(tree: &Tree) -> Vec<u8> {
    fn header(
        name: &[u8],
        kind: tar::EntryType,
        mode: u32,
        size: u64,
        link: Option<&[u8]>,
    ) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        let n = name.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
        if let Some(l) = link {
            let n = l.len().min(100);
            h.as_old_mut().linkname[..n].copy_from_slice(&l[..n]);
        }
        h.set_cksum();
        h
    }
    fn push(out: &mut Vec<u8>, h: &tar::Header, data: &[u8]) {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }
    let mut out = Vec::new();
    for (path, node) in tree {
        let p = path.as_bytes();
        if p.len() > 100 {
            let mut d = p.to_vec();
            d.push(0);
            push(
                &mut out,
                &header(
                    b"././@LongLink",
                    tar::EntryType::GNULongName,
                    0o644,
                    d.len() as u64,
                    None,
                ),
                &d,
            );
        }
        match node {
            Node::File { data, exec } => {
                let mode = if *exec { 0o755 } else { 0o644 };
                push(
                    &mut out,
                    &header(p, tar::EntryType::Regular, mode, data.len() as u64, None),
                    data,
                );
            }
            Node::Link(t) => {
                let t = t.as_bytes();
                if t.len() > 100 {
                    let mut d = t.to_vec();
                    d.push(0);
                    push(
                        &mut out,
                        &header(
                            b"././@LongLink",
                            tar::EntryType::GNULongLink,
                            0o644,
                            d.len() as u64,
                            None,
                        ),
                        &d,
                    );
                }
                push(
                    &mut out,
                    &header(p, tar::EntryType::Symlink, 0o777, 0, Some(t)),
                    &[],
                );
            }
        }
    }
    out.extend_from_slice(&[0u8; 2 * BLOCK]);
    out
}
