//! The canonical content hash of a source tree, and the rules every tree path obeys.
//!
//! Definition (also in `docs/snapshots.md`, whose worked example is a test below): a tree is
//! the set of its regular files and symlinks (directories are not entries). Each entry becomes
//! the record
//!
//! ```text
//! <mode> SP <64 lowercase hex sha256 of content> SP <path> NUL
//! ```
//!
//! where `mode` is `100644` (file), `100755` (file with the owner exec bit) or `120000`
//! (symlink; content = the target's bytes), and `path` is the '/'-separated UTF-8 path relative
//! to the root. Records are concatenated in ascending byte order of `path`; the content hash is
//! the lowercase hex sha256 of that concatenation.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// What a tree entry is, as far as the hash is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File { executable: bool },
    Symlink,
}

impl EntryKind {
    /// The git-style mode string used in the canonical record.
    pub fn mode(self) -> &'static str {
        match self {
            EntryKind::File { executable: false } => "100644",
            EntryKind::File { executable: true } => "100755",
            EntryKind::Symlink => "120000",
        }
    }
}

/// Feeds canonical records in path order and produces the content hash.
#[derive(Clone, Default)]
pub struct TreeHasher {
    hasher: Sha256,
    last: Option<String>,
}

/// Records were not given in strictly ascending path order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfOrder {
    pub path: String,
}

impl TreeHasher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one entry; `content_sha256` is the sha256 of the file bytes or of the link target.
    ///
    /// # Errors
    /// [`OutOfOrder`] when `path` is not strictly greater than the previous path.
    pub fn push(
        &mut self,
        path: &str,
        kind: EntryKind,
        content_sha256: &[u8; 32],
    ) -> Result<(), OutOfOrder> {
        if let Some(last) = &self.last {
            if path.as_bytes() <= last.as_bytes() {
                return Err(OutOfOrder {
                    path: path.to_string(),
                });
            }
        }
        let mut hex_buf = [0u8; 64];
        // The buffer is exactly twice the input length, so encoding cannot fail.
        hex::encode_to_slice(content_sha256, &mut hex_buf).expect("64-byte buffer for 32 bytes");
        self.hasher.update(kind.mode().as_bytes());
        self.hasher.update(b" ");
        self.hasher.update(hex_buf);
        self.hasher.update(b" ");
        self.hasher.update(path.as_bytes());
        self.hasher.update([0u8]);
        match &mut self.last {
            Some(l) => {
                l.clear();
                l.push_str(path);
            }
            None => self.last = Some(path.to_string()),
        }
        Ok(())
    }

    /// The content hash, 64 lowercase hex characters.
    pub fn finish(self) -> String {
        hex::encode(self.hasher.finalize())
    }
}

/// Computes the content hash of a list of entries (sorted here).
///
/// # Errors
/// [`OutOfOrder`] when two entries share a path.
pub fn content_hash<'a>(
    entries: impl IntoIterator<Item = (&'a str, EntryKind, [u8; 32])>,
) -> Result<String, OutOfOrder> {
    let mut v: Vec<_> = entries.into_iter().collect();
    v.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut h = TreeHasher::new();
    for (p, k, s) in v {
        h.push(p, k, &s)?;
    }
    Ok(h.finish())
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Why a path cannot be a tree path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathProblem {
    Empty,
    Absolute,
    ParentDir,
    NotCanonical,
    NotUtf8,
}

/// Checks that `bytes` is a canonical tree path: UTF-8, relative, no empty, `.` or `..`
/// components, no NUL. A single trailing '/' is allowed when `dir_entry` is set.
pub(crate) fn check_path(bytes: &[u8], dir_entry: bool) -> Result<&str, PathProblem> {
    let mut b = bytes;
    if dir_entry && b.len() > 1 && b.ends_with(b"/") {
        b = &b[..b.len() - 1];
    }
    if b.is_empty() {
        return Err(PathProblem::Empty);
    }
    if b[0] == b'/' {
        return Err(PathProblem::Absolute);
    }
    if b.split(|c| *c == b'/').any(|c| c == b"..") {
        return Err(PathProblem::ParentDir);
    }
    if b.contains(&0) || b.split(|c| *c == b'/').any(|c| c.is_empty() || c == b".") {
        return Err(PathProblem::NotCanonical);
    }
    std::str::from_utf8(b).map_err(|_| PathProblem::NotUtf8)
}

/// How a symlink fails the "stays inside the tree" rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkProblem {
    /// The target leaves the root; `via` is the link whose target took it out (may be a
    /// different link than the one checked, for chains).
    Escapes { via: String },
    /// More than [`MAX_LINK_HOPS`] links followed.
    Loop,
}

pub(crate) const MAX_LINK_HOPS: usize = 40;

/// Resolves the symlink at `link_path` with `target` lexically inside the tree, following other
/// symlinks of the tree (`links`: path → target) on the way. The tree on disk is never
/// consulted: what counts is the snapshot, which is all the sandbox will see.
pub(crate) fn check_link(
    link_path: &str,
    target: &str,
    links: &HashMap<String, String>,
) -> Result<(), LinkProblem> {
    let mut stack: Vec<&str> = link_path.split('/').collect();
    stack.pop();
    let mut pending: Vec<&str> = Vec::new();
    let mut via = link_path;
    push_components(&mut pending, target);
    if target.starts_with('/') {
        return Err(LinkProblem::Escapes {
            via: via.to_string(),
        });
    }
    let mut hops = 0usize;
    let mut joined = String::new();
    while let Some(c) = pending.pop() {
        match c {
            "" | "." => {}
            ".." => {
                if stack.pop().is_none() {
                    return Err(LinkProblem::Escapes {
                        via: via.to_string(),
                    });
                }
            }
            name => {
                stack.push(name);
                joined.clear();
                for (i, s) in stack.iter().enumerate() {
                    if i > 0 {
                        joined.push('/');
                    }
                    joined.push_str(s);
                }
                if let Some((p, t)) = links.get_key_value(joined.as_str()) {
                    hops += 1;
                    if hops > MAX_LINK_HOPS {
                        return Err(LinkProblem::Loop);
                    }
                    if t.starts_with('/') {
                        return Err(LinkProblem::Escapes { via: p.clone() });
                    }
                    via = p.as_str();
                    stack.pop();
                    push_components(&mut pending, t);
                }
            }
        }
    }
    Ok(())
}

/// Pushes `path`'s components so that popping yields them in order.
fn push_components<'a>(pending: &mut Vec<&'a str>, path: &'a str) {
    for c in path.split('/').rev() {
        pending.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// The worked example of docs/snapshots.md. If this fails, fix the doc and this test
    /// together: the definition is a public contract.
    #[test]
    fn worked_example_from_the_docs() {
        let hello = sha256(b"hello\n");
        let run = sha256(b"#!/bin/sh\necho hi\n");
        let link = sha256(b"README.md");
        assert_eq!(
            hex::encode(hello),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        let mut h = TreeHasher::new();
        h.push("README.md", EntryKind::File { executable: false }, &hello)
            .unwrap();
        h.push("bin/run", EntryKind::File { executable: true }, &run)
            .unwrap();
        h.push("docs/readme", EntryKind::Symlink, &link).unwrap();
        let doc_hash = include_str!("../../../docs/snapshots.md")
            .lines()
            .find_map(|l| l.strip_prefix("    content hash = "))
            .expect("docs/snapshots.md states the example's content hash")
            .trim()
            .to_string();
        assert_eq!(h.finish(), doc_hash);
    }

    #[test]
    fn records_must_be_strictly_ascending() {
        let z = [0u8; 32];
        let mut h = TreeHasher::new();
        h.push("b", EntryKind::Symlink, &z).unwrap();
        assert!(h.push("a", EntryKind::Symlink, &z).is_err());
        assert!(h.push("b", EntryKind::Symlink, &z).is_err());
        // '-' (0x2d) sorts before '/' (0x2f): byte order, not directory order.
        let mut h = TreeHasher::new();
        h.push("a-b", EntryKind::Symlink, &z).unwrap();
        h.push("a/b", EntryKind::Symlink, &z).unwrap();
    }

    #[test]
    fn content_hash_sorts_and_rejects_duplicates() {
        let z = [1u8; 32];
        let a = content_hash([("b", EntryKind::Symlink, z), ("a", EntryKind::Symlink, z)]).unwrap();
        let b = content_hash([("a", EntryKind::Symlink, z), ("b", EntryKind::Symlink, z)]).unwrap();
        assert_eq!(a, b);
        assert!(
            content_hash([("a", EntryKind::Symlink, z), ("a", EntryKind::Symlink, z)]).is_err()
        );
    }

    #[test]
    fn path_rules() {
        assert_eq!(check_path(b"a/b.txt", false), Ok("a/b.txt"));
        assert_eq!(
            check_path(b"/etc/passwd", false),
            Err(PathProblem::Absolute)
        );
        assert_eq!(check_path(b"a/../../x", false), Err(PathProblem::ParentDir));
        assert_eq!(check_path(b"..", false), Err(PathProblem::ParentDir));
        assert_eq!(check_path(b"./a", false), Err(PathProblem::NotCanonical));
        assert_eq!(check_path(b"a//b", false), Err(PathProblem::NotCanonical));
        assert_eq!(check_path(b"a/", false), Err(PathProblem::NotCanonical));
        assert_eq!(check_path(b"a/", true), Ok("a"));
        assert_eq!(check_path(b"", false), Err(PathProblem::Empty));
        assert_eq!(check_path(b"a\xffb", false), Err(PathProblem::NotUtf8));
    }

    #[test]
    fn links_inside_the_tree_are_fine() {
        let l = links(&[("a/b", "../c"), ("lib", "a"), ("x", "lib/b")]);
        assert_eq!(check_link("a/b", "../c", &l), Ok(()));
        assert_eq!(check_link("x", "lib/b", &l), Ok(()));
        assert_eq!(check_link("self", ".", &l), Ok(()));
        assert_eq!(
            check_link("d/e", "../../d", &l),
            Err(LinkProblem::Escapes { via: "d/e".into() })
        );
    }

    #[test]
    fn escapes_are_found() {
        let l = links(&[("x", "/etc/passwd")]);
        assert!(matches!(
            check_link("x", "/etc/passwd", &l),
            Err(LinkProblem::Escapes { .. })
        ));
        assert!(matches!(
            check_link("x", "../../outside", &links(&[])),
            Err(LinkProblem::Escapes { .. })
        ));
        // a -> b, b -> .. : a escapes through b.
        let l = links(&[("a", "b"), ("b", "..")]);
        assert_eq!(
            check_link("a", "b", &l),
            Err(LinkProblem::Escapes { via: "b".into() })
        );
        // Through a link to an absolute path.
        let l = links(&[("etc", "/etc"), ("p", "etc/passwd")]);
        assert_eq!(
            check_link("p", "etc/passwd", &l),
            Err(LinkProblem::Escapes { via: "etc".into() })
        );
        // A deep link climbing out through a link that points to the root's parent directory.
        let l = links(&[("d/up", "../.."), ("q", "d/up/x")]);
        assert!(matches!(
            check_link("q", "d/up/x", &l),
            Err(LinkProblem::Escapes { .. })
        ));
    }

    #[test]
    fn loops_are_reported() {
        let l = links(&[("a", "b"), ("b", "a")]);
        assert_eq!(check_link("a", "b", &l), Err(LinkProblem::Loop));
    }
}
