//! Every capture guard, each refused with its own error naming the path or the figure, and
//! leaving nothing behind.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use slipway_artifacts::{
    capture_to_file, hash_tree, CaptureError, CaptureOptions, LocalArtifactStore,
};

use crate::util::*;

/// A source tree next to an empty output directory and an empty store.
struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new(t: &Tree) -> Case {
        let dir = tempfile::tempdir().unwrap();
        write_tree(&dir.path().join("src"), t);
        fs::create_dir(dir.path().join("out")).unwrap();
        Case { dir }
    }
    fn src(&self) -> PathBuf {
        self.dir.path().join("src")
    }

    /// Runs the three entry points that scan a tree and checks they agree on refusing it and
    /// left no output, temporary file or artifact behind. Returns the error of
    /// `capture_to_file` and its message.
    fn refuse(&self, opts: &CaptureOptions) -> (CaptureError, String) {
        let out_dir = self.dir.path().join("out");
        let e = capture_to_file(&self.src(), &out_dir.join("snap.tar.zst"), opts)
            .expect_err("capture_to_file must refuse");
        assert_eq!(
            names(&out_dir),
            Vec::<String>::new(),
            "capture_to_file left something behind"
        );

        let store = LocalArtifactStore::new(self.dir.path().join("store")).unwrap();
        let e2 = store
            .capture_dir("agent", &self.src(), opts)
            .expect_err("capture_dir must refuse");
        assert_eq!(
            std::mem::discriminant(&e),
            std::mem::discriminant(&e2),
            "{e} vs {e2}"
        );
        assert_eq!(
            names(&self.dir.path().join("store/agent")),
            Vec::<String>::new(),
            "capture_dir left something in the store"
        );

        // TooLarge is about the archive, which hash_tree does not write.
        if !matches!(e, CaptureError::TooLarge { .. }) {
            let e3 = hash_tree(&self.src(), opts).expect_err("hash_tree must refuse");
            assert_eq!(
                std::mem::discriminant(&e),
                std::mem::discriminant(&e3),
                "{e} vs {e3}"
            );
        }
        let msg = e.to_string();
        (e, msg)
    }
}

fn files(n: usize) -> Tree {
    (0..n)
        .map(|i| (format!("d{}/f{i}", i % 3), file(format!("{i}"))))
        .collect()
}

#[test]
fn too_many_files() {
    let opts = CaptureOptions {
        max_files: 7,
        ..opts()
    };
    // Exactly at the limit is fine (symlinks count as files).
    let mut t = files(6);
    t.insert("l".into(), link("d0/f0"));
    let ok = Case::new(&t);
    capture_to_file(&ok.src(), &ok.dir.path().join("out/ok.tar.zst"), &opts).unwrap();

    t.insert("one-more".into(), file(""));
    let (e, msg) = Case::new(&t).refuse(&opts);
    assert!(
        matches!(e, CaptureError::TooManyFiles { limit: 7 }),
        "{e:?}"
    );
    assert!(msg.contains("more than 7 files"), "{msg}");
}

#[test]
fn compressed_too_large() {
    // Incompressible bytes, so the archive outgrows the limit.
    let t = tree([
        ("noise.bin", file(noise(200_000, 1))),
        ("small.txt", file("ok")),
    ]);
    let opts = CaptureOptions {
        max_compressed_bytes: 50_000,
        ..opts()
    };
    let (e, msg) = Case::new(&t).refuse(&opts);
    assert!(
        matches!(e, CaptureError::TooLarge { limit: 50_000 }),
        "{e:?}"
    );
    assert!(msg.contains("50000 bytes"), "{msg}");
}

#[test]
fn uncompressed_too_large() {
    let t = tree([("a", file(vec![b'a'; 600])), ("b", file(vec![b'b'; 600]))]);
    let opts = CaptureOptions {
        max_uncompressed_bytes: 1000,
        ..opts()
    };
    let (e, msg) = Case::new(&t).refuse(&opts);
    assert!(
        matches!(e, CaptureError::TooManyBytes { limit: 1000 }),
        "{e:?}"
    );
    assert!(msg.contains("1000 bytes"), "{msg}");
}

fn escapes(t: Tree, path: &str, target: &str, via: &str) {
    let (e, msg) = Case::new(&t).refuse(&opts());
    match &e {
        CaptureError::SymlinkEscapes {
            path: p,
            target: tg,
            via: v,
        } => {
            assert_eq!((p.as_str(), tg.as_str(), v.as_str()), (path, target, via));
        }
        other => panic!("expected SymlinkEscapes, got {other:?}"),
    }
    assert!(msg.contains(path) && msg.contains(target), "{msg}");
}

#[test]
fn symlink_with_an_absolute_target() {
    escapes(
        tree([("ok", file("x")), ("conf/passwd", link("/etc/passwd"))]),
        "conf/passwd",
        "/etc/passwd",
        "conf/passwd",
    );
}

#[test]
fn symlink_climbing_out_with_dotdot() {
    // `..` up to the root itself is fine; one more is not.
    let ok = Case::new(&tree([("a/b/root", link("../.."))]));
    hash_tree(&ok.src(), &opts()).unwrap();
    escapes(
        tree([("a/b/out", link("../../../outside"))]),
        "a/b/out",
        "../../../outside",
        "a/b/out",
    );
    escapes(
        tree([("a/sneaky", link("x/../../.."))]),
        "a/sneaky",
        "x/../../..",
        "a/sneaky",
    );
}

#[test]
fn symlink_escaping_through_another_symlink() {
    // `d/up -> ..` is the root (fine on its own); `e -> d/up/..` reads as `d` lexically but
    // resolves to the root's parent.
    escapes(
        tree([("d/up", link("..")), ("e", link("d/up/.."))]),
        "e",
        "d/up/..",
        "d/up",
    );
    // A chain ending in an absolute link: the escape is reported at that link.
    let (e, _) =
        Case::new(&tree([("etc", link("/etc")), ("p", link("etc/passwd"))])).refuse(&opts());
    assert!(matches!(e, CaptureError::SymlinkEscapes { .. }), "{e:?}");
}

#[test]
fn symlink_loop() {
    let (e, msg) = Case::new(&tree([("a", link("b")), ("b", link("a"))])).refuse(&opts());
    assert!(
        matches!(&e, CaptureError::SymlinkLoop { path } if path == "a" || path == "b"),
        "{e:?}"
    );
    assert!(msg.contains("too many links"), "{msg}");
}

fn special(make: impl FnOnce(&Path), kind: &str) {
    let c = Case::new(&tree([("ok.txt", file("fine"))]));
    fs::create_dir(c.src().join("sub")).unwrap();
    make(&c.src().join("sub/special"));
    let (e, msg) = c.refuse(&opts());
    match &e {
        CaptureError::SpecialFile { path, kind: k } => {
            assert_eq!((path.as_str(), *k), ("sub/special", kind))
        }
        other => panic!("expected SpecialFile, got {other:?}"),
    }
    assert!(msg.contains("sub/special") && msg.contains(kind), "{msg}");
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
fn fifo() {
    special(
        |p| {
            // SAFETY: valid NUL-terminated path.
            assert_eq!(
                unsafe { libc::mkfifo(cpath(p).as_ptr(), 0o644) },
                0,
                "{}",
                std::io::Error::last_os_error()
            );
        },
        "fifo",
    );
}

#[test]
fn unix_socket() {
    special(
        |p| {
            // The listener is dropped but the socket file stays.
            std::os::unix::net::UnixListener::bind(p).unwrap();
        },
        "socket",
    );
}

#[test]
fn device_file() {
    if !is_root() {
        return skip(
            "guards::device_file",
            "mknod of a character device needs root (CAP_MKNOD)",
        );
    }
    special(
        |p| {
            // SAFETY: valid NUL-terminated path; makedev has no preconditions.
            let r = unsafe {
                libc::mknod(
                    cpath(p).as_ptr(),
                    libc::S_IFCHR | 0o600,
                    libc::makedev(1, 3),
                )
            };
            assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
        },
        "device",
    );
}

#[test]
fn unreadable_file_and_directory() {
    // Root reads through any permission bits, so as root the test re-runs itself as `nobody`.
    if !run_unprivileged("guards::unreadable_file_and_directory") {
        return;
    }
    let c = Case::new(&tree([
        ("ok.txt", file("fine")),
        ("secret/key", file("shh")),
    ]));
    let key = c.src().join("secret/key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o000)).unwrap();
    let (e, msg) = c.refuse(&opts());
    match &e {
        CaptureError::Unreadable { path, source } => {
            assert_eq!(path, "secret/key");
            assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied);
        }
        other => panic!("expected Unreadable, got {other:?}"),
    }
    assert!(msg.contains("secret/key"), "{msg}");

    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    /// Gives the directory its permissions back, even when an assertion fails, so the temp
    /// dir can be removed.
    struct Restore(PathBuf);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o755));
        }
    }
    let _restore = Restore(c.src().join("secret"));
    fs::set_permissions(c.src().join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    let (e, msg) = c.refuse(&opts());
    // Named like every other tree path: relative to the source, no host path.
    assert!(
        matches!(&e, CaptureError::Unreadable { path, .. } if path == "secret"),
        "{e:?}"
    );
    assert!(
        msg.contains("secret") && !msg.contains(&*c.dir.path().to_string_lossy()),
        "{msg}"
    );
}

#[test]
fn missing_source_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir");
    let e = hash_tree(&missing, &opts()).unwrap_err();
    assert!(
        matches!(&e, CaptureError::SourceMissing { path } if path == &missing),
        "{e:?}"
    );
    assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");
    let out = dir.path().join("x.tar.zst");
    assert!(matches!(
        capture_to_file(&missing, &out, &opts()),
        Err(CaptureError::SourceMissing { .. })
    ));
    assert!(!out.exists());
    // A dangling symlink as the source is missing too.
    symlink(dir.path().join("nowhere"), dir.path().join("dangling")).unwrap();
    assert!(matches!(
        hash_tree(&dir.path().join("dangling"), &opts()),
        Err(CaptureError::SourceMissing { .. })
    ));
}

#[test]
fn source_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let f = put(dir.path(), "file.txt", b"x");
    let e = hash_tree(&f, &opts()).unwrap_err();
    assert!(
        matches!(&e, CaptureError::NotADirectory { path } if path == &f),
        "{e:?}"
    );
    assert!(e.to_string().contains("file.txt"), "{e}");
    let store = LocalArtifactStore::new(dir.path().join("store")).unwrap();
    assert!(matches!(
        store.capture_dir("agent", &f, &opts()),
        Err(CaptureError::NotADirectory { .. })
    ));
}

#[test]
fn non_utf8_file_name() {
    let c = Case::new(&tree([("ok", file("x"))]));
    let name = std::ffi::OsStr::from_bytes(b"bad-\xff-name");
    fs::write(c.src().join(name), b"x").unwrap();
    let (e, msg) = c.refuse(&opts());
    assert!(matches!(e, CaptureError::NonUtf8Path { .. }), "{e:?}");
    assert!(msg.contains("bad-"), "{msg}");
}

#[test]
fn output_that_already_exists_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_tree(&src, &example_tree());
    let out = put(dir.path(), "out.tar.zst", b"precious");
    let e = capture_to_file(&src, &out, &opts()).unwrap_err();
    assert!(matches!(e, CaptureError::OutputExists { .. }), "{e:?}");
    assert_eq!(fs::read(&out).unwrap(), b"precious");
    assert_eq!(names(dir.path()), vec!["out.tar.zst", "src"]);
}
