//! The default ignore rules and `.slipwayignore`.

use std::fs;

use slipway_artifacts::{capture_to_file, hash_tree, CaptureError, DEFAULT_IGNORES, IGNORE_FILE};

use crate::util::*;

/// Captures `t` and returns the archived paths; also checks the hash is that of exactly the
/// archived entries.
fn captured_paths(t: &Tree) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_tree(&src, t);
    let out = dir.path().join("a.tar.zst");
    let c = capture_to_file(&src, &out, &opts()).unwrap();
    let paths = archive_paths(&fs::read(&out).unwrap());
    let kept: Tree = t
        .iter()
        .filter(|(p, _)| paths.contains(p))
        .map(|(p, n)| (p.clone(), n.clone()))
        .collect();
    assert_eq!(c.content_hash, oracle_hash(&kept));
    assert_eq!(hash_tree(&src, &opts()).unwrap(), c.content_hash);
    paths
}

#[test]
fn defaults_are_the_documented_ones() {
    assert_eq!(
        DEFAULT_IGNORES,
        &[
            ".git",
            "node_modules/",
            "**/.next/cache/",
            "dist/",
            "build/",
            "*.log"
        ]
    );
    assert_eq!(IGNORE_FILE, ".slipwayignore");
    let doc = docs("snapshots.md");
    for p in DEFAULT_IGNORES {
        assert!(
            doc.contains(&format!("\n{p}\n")),
            "docs/snapshots.md lists {p}"
        );
    }
}

#[test]
fn default_ignores() {
    let t = tree([
        (".git/config", file("[core]")),
        ("vendor/lib/.git", file("gitdir: ../../.git/modules/lib")), // a worktree's .git file
        ("node_modules/left-pad/index.js", file("module.exports")),
        ("packages/x/node_modules/y/index.js", file("y")),
        (".next/cache/webpack/a.pack", file("cache")),
        ("apps/web/.next/cache/b.pack", file("cache")),
        (".next/server/page.js", file("kept: only the cache goes")),
        ("dist/bundle.js", file("built")),
        ("packages/x/dist/index.js", file("built")),
        ("build/out.o", file("built")),
        ("npm-debug.log", file("log")),
        ("logs/deep/server.log", file("log")),
        // Kept: files named like ignored directories, near misses.
        ("tools/build", exe("#!/bin/sh\nmake\n")),
        ("src/dist", file("a file called dist")),
        ("scripts/node_modules", file("a file called node_modules")),
        ("log.txt", file("not a .log")),
        ("changelog.md", file("kept")),
        ("src/builder/x.js", file("kept")),
        (".gitignore", file("kept")),
        ("package.json", file("{}")),
    ]);
    let paths = captured_paths(&t);
    assert_eq!(
        paths,
        vec![
            ".gitignore",
            ".next/server/page.js",
            "changelog.md",
            "log.txt",
            "package.json",
            "scripts/node_modules",
            "src/builder/x.js",
            "src/dist",
            "tools/build",
        ]
    );
    // At the root too: a file called `build` (no `build/` directory beside it, of course).
    let t = tree([
        ("build", exe("#!/bin/sh\n")),
        ("dist", file("x")),
        ("node_modules", file("x")),
        ("a.log", file("x")),
    ]);
    assert_eq!(captured_paths(&t), vec!["build", "dist", "node_modules"]);
}

#[test]
fn slipwayignore_adds_patterns_and_reincludes_with_bang() {
    let t = tree([
        (
            ".slipwayignore",
            file("# comment\nsecret.txt\ntmp/\n/root-only.txt\n*.bak\n!build/\n!keep.log\n!vendor/keep.js\n"),
        ),
        ("secret.txt", file("s")),
        ("sub/secret.txt", file("s")),
        ("tmp/x", file("t")),
        ("root-only.txt", file("r")),
        ("sub/root-only.txt", file("kept: anchored pattern")),
        ("a.bak", file("b")),
        ("build/out.js", file("re-included directory")),
        ("keep.log", file("re-included file")),
        ("other.log", file("still ignored")),
        ("node_modules/vendor/keep.js", file("beneath an ignored directory: cannot be re-included")),
        ("index.js", file("i")),
    ]);
    let paths = captured_paths(&t);
    assert_eq!(
        paths,
        vec![
            ".slipwayignore",
            "build/out.js",
            "index.js",
            "keep.log",
            "sub/root-only.txt"
        ]
    );
}

#[test]
fn slipwayignore_can_ignore_itself_and_applies_from_the_root_only() {
    let t = tree([
        (".slipwayignore", file("/.slipwayignore\n")),
        ("sub/.slipwayignore", file("*\n")),
        ("sub/a", file("a")),
    ]);
    assert_eq!(captured_paths(&t), vec!["sub/.slipwayignore", "sub/a"]);
}

#[test]
fn slipwayignore_that_is_a_symlink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let secret = put(dir.path(), "host-secret", b"root:x:0:0\n");
    let src = dir.path().join("src");
    write_tree(&src, &tree([("a", file("a"))]));
    std::os::unix::fs::symlink(&secret, src.join(".slipwayignore")).unwrap();
    let e = hash_tree(&src, &opts()).unwrap_err();
    assert!(
        matches!(&e, CaptureError::BadIgnoreFile { path, .. } if path == ".slipwayignore"),
        "{e:?}"
    );
    assert!(e.to_string().contains("symlink"), "{e}");
    assert!(!e.to_string().contains("root:x"), "{e}");
}

#[test]
fn slipwayignore_with_a_bad_pattern_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(
        dir.path(),
        &tree([(".slipwayignore", file("ok\n[z-a\n")), ("a", file("a"))]),
    );
    let e = hash_tree(dir.path(), &opts()).unwrap_err();
    assert!(matches!(e, CaptureError::BadIgnoreFile { .. }), "{e:?}");
    assert!(
        e.to_string().contains(".slipwayignore") && e.to_string().contains("line 2"),
        "{e}"
    );
}

#[test]
fn slipwayignore_that_is_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), &tree([(".slipwayignore/x", file("x"))]));
    let e = hash_tree(dir.path(), &opts()).unwrap_err();
    assert!(matches!(e, CaptureError::BadIgnoreFile { .. }), "{e:?}");
}
