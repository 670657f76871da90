//! Property tests: capture → extract reproduces generated trees exactly.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use proptest::prelude::*;
use slipway_artifacts::{capture_to_file, extract, hash_tree, ExtractOptions, LocalArtifactStore};

use crate::util::*;

/// Names chosen to collide (so directories nest and share prefixes) and to sort in
/// interesting ways ('-' and '.' before '/', upper case before lower, non-ASCII last).
const NAMES: &[&str] = &[
    "a",
    "b",
    "c",
    "ab",
    "a-b",
    "a.b",
    "Z",
    "x.js",
    "README.md",
    ".hidden",
    "sp ace",
    "ü",
    "日本",
];

#[derive(Debug, Clone)]
enum Gen {
    File(Vec<u8>, bool),
    /// Points at the n-th entry (or directory) made before it, or at a missing name.
    Link(usize),
}

fn gen_entry() -> impl Strategy<Value = (Vec<&'static str>, Gen)> {
    let name = proptest::sample::select(NAMES);
    let data = prop_oneof![
        8 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => proptest::collection::vec(any::<u8>(), 60_000..300_000),
    ];
    let kind = prop_oneof![
        4 => (data, any::<bool>()).prop_map(|(d, x)| Gen::File(d, x)),
        1 => any::<usize>().prop_map(Gen::Link),
    ];
    (proptest::collection::vec(name, 1..5), kind)
}

/// The relative symlink target that leads from the link at `from` to the tree path `to`.
fn relative(from: &str, to: &str) -> String {
    let parent: Vec<&str> =
        from.split('/').collect::<Vec<_>>()[..from.split('/').count() - 1].to_vec();
    let target: Vec<&str> = if to.is_empty() {
        vec![]
    } else {
        to.split('/').collect()
    };
    let common = parent
        .iter()
        .zip(&target)
        .take_while(|(a, b)| a == b)
        .count();
    let mut parts: Vec<&str> = vec![".."; parent.len() - common];
    parts.extend(&target[common..]);
    if parts.is_empty() {
        ".".to_string()
    } else {
        parts.join("/")
    }
}

/// Turns generated entries into a valid tree: no path both a leaf and a directory, symlinks
/// only to things made before them (so no loops) and never out of the root.
fn build(entries: Vec<(Vec<&'static str>, Gen)>) -> Tree {
    let mut t = Tree::new();
    let mut targets: Vec<String> = vec![String::new()]; // the root itself
    for (parts, g) in entries {
        let path = parts.join("/");
        let clash = t.contains_key(&path)
            || t.keys().any(|k| k.starts_with(&format!("{path}/")))
            || parts
                .iter()
                .enumerate()
                .any(|(i, _)| i > 0 && t.contains_key(&parts[..i].join("/")));
        if clash {
            continue;
        }
        let node = match g {
            Gen::File(data, exec) => Node::File { data, exec },
            Gen::Link(n) => {
                let to = if n % 7 == 0 {
                    "missing/inside".to_string()
                } else {
                    targets[n % targets.len()].clone()
                };
                Node::Link(relative(&path, &to))
            }
        };
        for i in 1..parts.len() {
            targets.push(parts[..i].join("/"));
        }
        targets.push(path.clone());
        t.insert(path, node);
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn capture_then_extract_reproduces_the_tree(entries in proptest::collection::vec(gen_entry(), 0..25)) {
        let t = build(entries);
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        write_tree(&src, &t);
        let want = oracle_hash(&t);
        prop_assert_eq!(hash_tree(&src, &opts()).unwrap(), want.clone());

        let out = dir.path().join("snap.tar.zst");
        let c = capture_to_file(&src, &out, &opts()).unwrap();
        prop_assert_eq!(&c.content_hash, &want);
        prop_assert_eq!(c.file_count, t.len() as u64);
        let bytes: u64 = t.values().map(|n| match n { Node::File { data, .. } => data.len() as u64, Node::Link(_) => 0 }).sum();
        prop_assert_eq!(c.uncompressed_bytes, bytes);

        let dest = dir.path().join("dest");
        let x = extract(fs::File::open(&out).unwrap(), &dest, &ExtractOptions::default()).unwrap();
        prop_assert_eq!((x.files, x.bytes), (t.len() as u64, bytes));
        // Contents, exec bits and link targets.
        prop_assert_eq!(&read_tree(&dest), &t);
        prop_assert_eq!(hash_tree(&dest, &opts()).unwrap(), want.clone());
        for (p, n) in &t {
            if let Node::File { exec, .. } = n {
                let mode = fs::symlink_metadata(dest.join(p)).unwrap().permissions().mode() & 0o7777;
                prop_assert_eq!(mode, if *exec { 0o755 } else { 0o644 }, "{}", p);
            }
        }

        // The upload path accepts the same archive under the same hash.
        let store = LocalArtifactStore::new(dir.path().join("store")).unwrap();
        let up = store.verify_upload("agent", &want, fs::File::open(&out).unwrap(), &opts()).unwrap();
        prop_assert_eq!(&up.content_hash, &want);
        prop_assert_eq!(up.file_count, t.len() as u64);
        prop_assert_eq!(up.size_bytes, c.size_bytes);
        prop_assert_eq!(fs::read(&up.artifact_path).unwrap(), fs::read(&out).unwrap());
    }
}

#[test]
fn relative_targets() {
    assert_eq!(relative("a/b/l", "a/c"), "../c");
    assert_eq!(relative("l", "a/c"), "a/c");
    assert_eq!(relative("a/l", ""), "..");
    assert_eq!(relative("a/l", "a"), ".");
    assert_eq!(relative("a/b/l", "x"), "../../x");
}
