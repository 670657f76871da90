//! Hostile archives, built here byte by byte. Each is refused by `extract` (nothing written
//! outside, no destination, no staging directory left) and by upload verification (nothing
//! left in the store).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use slipway_artifacts::{
    capture_to_file, extract, tree, CaptureOptions, ExtractError, ExtractOptions,
    LocalArtifactStore, UploadError,
};
use tar::EntryType;

use crate::util::*;

/// Builds the archive for a scene (some archives aim at the scene's sentinel by absolute path),
/// extracts it, checks the refusal and the scene, then uploads it and checks that refusal.
fn check(
    build: impl Fn(&Path) -> Vec<u8>,
    xopts: &ExtractOptions,
    want: impl Fn(&ExtractError) -> bool,
    want_upload: impl Fn(&UploadError) -> bool,
) -> ExtractError {
    let scene = Scene::new();
    let archive = build(&scene.sentinel());
    let e =
        extract(&archive[..], &scene.dest(), xopts).expect_err("extract must refuse this archive");
    assert!(want(&e), "unexpected extract error: {e:?}");
    scene.assert_untouched(&[]);

    let store_dir = tempfile::tempdir().unwrap();
    let store = LocalArtifactStore::new(store_dir.path()).unwrap();
    let copts = CaptureOptions {
        max_files: xopts.max_entries,
        max_uncompressed_bytes: xopts.max_bytes,
        ..opts()
    };
    // Any claim will do: the archive must be refused before its hash is compared.
    let claim = "0".repeat(64);
    let u = store
        .verify_upload("agent", &claim, &archive[..], &copts)
        .expect_err("upload must refuse this archive");
    assert!(want_upload(&u), "unexpected upload error: {u:?}");
    assert!(u.is_client_error(), "{u:?}");
    assert_eq!(
        names(&store_dir.path().join("agent")),
        Vec::<String>::new(),
        "upload left a file in the store"
    );
    scene.assert_untouched(&[]);
    e
}

fn x() -> ExtractOptions {
    ExtractOptions {
        owner: None,
        max_bytes: 1 << 20,
        max_entries: 1000,
    }
}

/// The usual case: a `BadEntry` for the entry `path` whose reason contains `reason`.
fn bad_entry(build: impl Fn(&Path) -> Vec<u8>, path: impl Fn(&Path) -> String, reason: &str) {
    let scene_path = std::cell::RefCell::new(None);
    let e = check(
        |s| {
            *scene_path.borrow_mut() = Some(path(s));
            build(s)
        },
        &x(),
        |e| matches!(e, ExtractError::BadEntry { reason: r, .. } if r.contains(reason)),
        |u| matches!(u, UploadError::Archive(ExtractError::BadEntry { reason: r, .. }) if r.contains(reason)),
    );
    let ExtractError::BadEntry { path: p, .. } = &e else {
        unreachable!()
    };
    let want = scene_path.borrow().clone().unwrap();
    assert_eq!(p, &want);
    assert!(e.to_string().contains(&want), "{e}");
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn absolute_path() {
    bad_entry(
        |sentinel| {
            RawTar::new()
                .file("ok.txt", b"ok")
                .file(&format!("{}/pwned", s(sentinel)), b"pwned")
                .zst()
        },
        |sentinel| format!("{}/pwned", s(sentinel)),
        "absolute path",
    );
}

#[test]
fn dotdot_component() {
    bad_entry(
        |_| RawTar::new().file("../sentinel/pwned", b"pwned").zst(),
        |_| "../sentinel/pwned".into(),
        "'..'",
    );
    bad_entry(
        |_| {
            RawTar::new()
                .file("a/b/../../../sentinel/pwned", b"x")
                .zst()
        },
        |_| "a/b/../../../sentinel/pwned".into(),
        "'..'",
    );
    bad_entry(
        |_| RawTar::new().dir("../sentinel/").zst(),
        |_| "../sentinel/".into(),
        "'..'",
    );
}

#[test]
fn dotdot_through_gnu_long_name_and_pax_path() {
    let long = format!("{}/../../../sentinel/pwned", "a/".repeat(60));
    bad_entry(
        |_| {
            RawTar::new()
                .long_name(long.as_bytes())
                .file("innocent", b"x")
                .zst()
        },
        |_| long.clone(),
        "'..'",
    );
    bad_entry(
        |_| {
            RawTar::new()
                .pax_path("../sentinel/pwned")
                .file("innocent", b"x")
                .zst()
        },
        |_| "../sentinel/pwned".into(),
        "'..'",
    );
    bad_entry(
        |s| {
            RawTar::new()
                .pax_path(&format!("{}/pwned", s.display()))
                .file("innocent", b"x")
                .zst()
        },
        |s| format!("{}/pwned", s.display()),
        "absolute",
    );
}

#[test]
fn non_canonical_paths() {
    for p in ["./a", "a//b", "a/./b", "a/"] {
        bad_entry(
            |_| RawTar::new().file(p, b"x").zst(),
            |_| p.to_string(),
            "not canonical",
        );
    }
}

#[test]
fn write_through_a_symlink() {
    // An absolute link, then a file "beneath" it.
    bad_entry(
        |sentinel| {
            RawTar::new()
                .symlink("link", &s(sentinel))
                .file("link/pwned", b"pwned")
                .zst()
        },
        |_| "link/pwned".into(),
        "beneath link",
    );
    // A relative link out of the destination, then a directory and a file beneath it.
    bad_entry(
        |_| {
            RawTar::new()
                .symlink("d/up", "../../sentinel")
                .dir("d/up/sub/")
                .zst()
        },
        |_| "d/up/sub/".into(),
        "beneath d/up",
    );
    bad_entry(
        |_| {
            RawTar::new()
                .dir("d/")
                .symlink("d/up", "../../sentinel")
                .file("d/up/deep/er/pwned", b"x")
                .zst()
        },
        |_| "d/up/deep/er/pwned".into(),
        "beneath d/up",
    );
    // Beneath a regular file, too.
    bad_entry(
        |_| RawTar::new().file("f", b"x").file("f/g", b"y").zst(),
        |_| "f/g".into(),
        "beneath f",
    );
}

#[test]
fn hard_links() {
    bad_entry(
        |sentinel| {
            RawTar::new()
                .entry(
                    b"hl",
                    EntryType::Link,
                    0o644,
                    &[],
                    Some(format!("{}/target", s(sentinel)).as_bytes()),
                )
                .zst()
        },
        |_| "hl".into(),
        "hard links",
    );
    // Even to a file of the archive itself.
    bad_entry(
        |_| {
            RawTar::new()
                .file("a", b"a")
                .entry(b"hl", EntryType::Link, 0o644, &[], Some(b"a"))
                .zst()
        },
        |_| "hl".into(),
        "hard links",
    );
}

#[test]
fn device_files() {
    bad_entry(
        |_| {
            RawTar::new()
                .entry(b"null", EntryType::Char, 0o666, &[], None)
                .zst()
        },
        |_| "null".into(),
        "device",
    );
    bad_entry(
        |_| {
            RawTar::new()
                .entry(b"sda", EntryType::Block, 0o660, &[], None)
                .zst()
        },
        |_| "sda".into(),
        "device",
    );
}

#[test]
fn fifo() {
    bad_entry(
        |_| {
            RawTar::new()
                .entry(b"pipe", EntryType::Fifo, 0o644, &[], None)
                .zst()
        },
        |_| "pipe".into(),
        "FIFO",
    );
}

#[test]
fn unsupported_entry_types() {
    bad_entry(
        |_| {
            RawTar::new()
                .entry(b"vol", EntryType::new(b'V'), 0o644, &[], None)
                .zst()
        },
        |_| "vol".into(),
        "unsupported",
    );
}

#[test]
fn duplicate_entries() {
    bad_entry(
        |_| RawTar::new().file("a", b"first").file("a", b"second").zst(),
        |_| "a".into(),
        "more than once",
    );
    bad_entry(
        |_| RawTar::new().file("a", b"x").symlink("a", "b").zst(),
        |_| "a".into(),
        "more than once",
    );
    bad_entry(
        |_| RawTar::new().dir("d/").file("d", b"x").zst(),
        |_| "d".into(),
        "more than once",
    );
    bad_entry(
        |_| RawTar::new().file("d", b"x").dir("d/").zst(),
        |_| "d/".into(),
        "more than once",
    );
}

#[test]
fn file_where_an_earlier_entry_implied_a_directory() {
    // `a/b` makes `a` a directory; a later file or symlink `a` cannot also exist. Such an
    // archive has no tree, so it must not be accepted even with a "matching" hash.
    let z = |d: &[u8]| -> [u8; 32] {
        sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(d)).into()
    };
    let claim = tree::content_hash([
        ("a", tree::EntryKind::File { executable: false }, z(b"x")),
        ("a/b", tree::EntryKind::File { executable: false }, z(b"y")),
    ])
    .unwrap();
    for archive in [
        RawTar::new().file("a/b", b"y").file("a", b"x").zst(),
        RawTar::new().file("a/b", b"y").symlink("a", "x").zst(),
    ] {
        let scene = Scene::new();
        let e = extract(&archive[..], &scene.dest(), &x()).unwrap_err();
        assert!(
            matches!(&e, ExtractError::BadEntry { path, .. } if path == "a"),
            "{e:?}"
        );
        scene.assert_untouched(&[]);
        let store_dir = tempfile::tempdir().unwrap();
        let store = LocalArtifactStore::new(store_dir.path()).unwrap();
        let u = store
            .verify_upload("agent", &claim, &archive[..], &opts())
            .unwrap_err();
        assert!(
            matches!(&u, UploadError::Archive(ExtractError::BadEntry { path, .. }) if path == "a"),
            "{u:?}"
        );
        assert_eq!(names(&store_dir.path().join("agent")), Vec::<String>::new());
    }
}

#[test]
fn tar_bomb_one_huge_file() {
    // 32 MiB of zeros: a few KiB compressed, refused at the header, before any byte is written.
    let e = check(
        |_| {
            let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_path("zeros").unwrap();
            h.set_size(32 << 20);
            h.set_mode(0o644);
            h.set_entry_type(EntryType::Regular);
            h.set_cksum();
            enc.write_all(h.as_bytes()).unwrap();
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..32 {
                enc.write_all(&zeros).unwrap();
            }
            enc.write_all(&[0u8; 1024]).unwrap();
            let z = enc.finish().unwrap();
            assert!(z.len() < 64 * 1024, "the bomb should be small: {}", z.len());
            z
        },
        &x(),
        |e| matches!(e, ExtractError::TooManyBytes { limit } if *limit == 1 << 20),
        |u| {
            matches!(u, UploadError::Archive(ExtractError::TooManyBytes { .. })) && u.is_too_large()
        },
    );
    assert!(e.to_string().contains(&(1u64 << 20).to_string()), "{e}");
}

#[test]
fn tar_bomb_many_files_adding_up() {
    check(
        |_| {
            let mut t = RawTar::new();
            for i in 0..40 {
                t.file(&format!("f{i}"), &[b'x'; 30_000]);
            }
            t.zst()
        },
        &x(),
        |e| matches!(e, ExtractError::TooManyBytes { .. }),
        |u| {
            matches!(u, UploadError::Archive(ExtractError::TooManyBytes { .. })) && u.is_too_large()
        },
    );
}

#[test]
fn too_many_entries() {
    let few = ExtractOptions {
        max_entries: 10,
        ..x()
    };
    let e = check(
        |_| {
            let mut t = RawTar::new();
            for i in 0..50 {
                t.file(&format!("f{i}"), b"");
            }
            t.zst()
        },
        &few,
        |e| matches!(e, ExtractError::TooManyEntries { limit: 10 }),
        |u| matches!(u, UploadError::TooManyFiles { limit: 10 }) && u.is_too_large(),
    );
    assert!(e.to_string().contains("10 entries"), "{e}");
    // Directory entries count for extraction (upload verification bounds them separately, at
    // 4 × max_files but at least 1024, and then compares the hash).
    check(
        |_| {
            let mut t = RawTar::new();
            for i in 0..50 {
                t.dir(&format!("d{i}/"));
            }
            t.zst()
        },
        &few,
        |e| matches!(e, ExtractError::TooManyEntries { limit: 10 }),
        |u| matches!(u, UploadError::HashMismatch { .. }),
    );
}

fn valid_archive() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut t = example_tree();
    t.insert(
        "data.bin".into(),
        file((0..200_000u32).map(|i| (i % 253) as u8).collect::<Vec<_>>()),
    );
    write_tree(&dir.path().join("src"), &t);
    let out = dir.path().join("a.tar.zst");
    capture_to_file(&dir.path().join("src"), &out, &opts()).unwrap();
    fs::read(out).unwrap()
}

fn corrupt(build: impl Fn(&Path) -> Vec<u8>) {
    check(
        build,
        &x(),
        |e| matches!(e, ExtractError::Corrupt(_)),
        |u| matches!(u, UploadError::Archive(ExtractError::Corrupt(_))),
    );
}

#[test]
fn zstd_garbage() {
    corrupt(|_| {
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect()
    });
    // Not compressed at all: a plain tar.
    corrupt(|_| RawTar::new().file("a", b"a").tar());
}

#[test]
fn truncated_archive() {
    let full = valid_archive();
    for cut in [full.len() / 2, full.len() - 5, 20] {
        corrupt(|_| full[..cut].to_vec());
    }
    // A complete zstd stream of a tar that ends inside a file's data.
    let tar = RawTar::new()
        .file("a", b"aaaa")
        .entry_sized(b"b", EntryType::Regular, 0o644, 10_000, b"short", None)
        .bytes
        .clone();
    corrupt(|_| zst(&tar));
}

#[test]
fn flipped_checksum_is_noticed() {
    // The frame checksum covers the decompressed bytes; a flip in it (or in the data) must not
    // go unnoticed just because the tar stream ended first.
    let full = valid_archive();
    let mut bad = full.clone();
    let n = bad.len();
    bad[n - 2] ^= 0x01;
    corrupt(|_| bad.clone());
}

#[test]
fn trailing_garbage_after_the_frame() {
    let mut full = valid_archive();
    full.extend_from_slice(b"this is not a zstd frame");
    corrupt(|_| full.clone());
}

#[test]
fn escaping_symlinks_are_refused_on_upload() {
    // Extraction creates symlinks as they are (never following them); whether they stay inside
    // is decided when an archive enters the store, which is where these are refused.
    for (links, path) in [
        (vec![("etc", "/etc")], "etc"),
        (vec![("a/up", "../../x")], "a/up"),
        (vec![("d/up", ".."), ("e", "d/up/..")], "e"),
    ] {
        let mut t = RawTar::new();
        for (p, target) in &links {
            t.symlink(p, target);
        }
        let store_dir = tempfile::tempdir().unwrap();
        let store = LocalArtifactStore::new(store_dir.path()).unwrap();
        let u = store
            .verify_upload("agent", &"0".repeat(64), &t.zst()[..], &opts())
            .unwrap_err();
        assert!(
            matches!(&u, UploadError::SymlinkEscapes { path: p, .. } if p == path),
            "{u:?}"
        );
        assert!(u.to_string().contains(path));
        assert_eq!(names(&store_dir.path().join("agent")), Vec::<String>::new());
    }
    let store_dir = tempfile::tempdir().unwrap();
    let store = LocalArtifactStore::new(store_dir.path()).unwrap();
    let t = RawTar::new().symlink("a", "b").symlink("b", "a").zst();
    let u = store
        .verify_upload("agent", &"0".repeat(64), &t[..], &opts())
        .unwrap_err();
    assert!(matches!(u, UploadError::SymlinkLoop { .. }), "{u:?}");
}

#[test]
fn destination_that_exists_is_left_alone() {
    let scene = Scene::new();
    fs::create_dir(scene.dest()).unwrap();
    put(&scene.dest(), "mine", b"keep");
    let e = extract(&valid_archive()[..], &scene.dest(), &x()).unwrap_err();
    assert!(matches!(e, ExtractError::DestinationExists { .. }), "{e:?}");
    assert_eq!(names(&scene.dest()), vec!["mine"]);
    assert_eq!(names(scene.path()), vec!["dest", "sentinel"]);
}

#[test]
fn special_mode_bits_are_dropped_and_owner_applied() {
    let scene = Scene::new();
    let archive = RawTar::new()
        .entry(b"suid", EntryType::Regular, 0o4755, b"#!/bin/sh\n", None)
        .entry(b"sticky", EntryType::Regular, 0o1666, b"x", None)
        .entry(b"d/", EntryType::Directory, 0o7777, &[], None)
        .symlink("d/l", "../suid")
        .zst();
    let owner = is_root().then_some((4242, 4343));
    let got = extract(
        &archive[..],
        &scene.dest(),
        &ExtractOptions { owner, ..x() },
    )
    .unwrap();
    assert_eq!((got.files, got.bytes), (3, 11));
    let mode = |p: &str| {
        fs::symlink_metadata(scene.dest().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("suid"), 0o755);
    assert_eq!(mode("sticky"), 0o644);
    assert_eq!(mode("d"), 0o755);
    assert_eq!(mode(""), 0o755);
    assert_eq!(
        fs::read_link(scene.dest().join("d/l")).unwrap(),
        Path::new("../suid")
    );
    if let Some((uid, gid)) = owner {
        for p in ["", "suid", "sticky", "d", "d/l"] {
            let m = fs::symlink_metadata(scene.dest().join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (uid, gid), "{p:?}");
        }
    } else {
        skip(
            "extract_hostile::special_mode_bits_are_dropped_and_owner_applied (owner part)",
            "lchown to another user needs root",
        );
    }
    assert_eq!(names(scene.path()), vec!["dest", "sentinel"]);
}
