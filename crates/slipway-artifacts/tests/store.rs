//! The content-addressed artifact store.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;

use slipway_artifacts::{
    capture_to_file, extract, is_content_hash, ArtifactStore, CaptureOptions, ExtractOptions,
    LocalArtifactStore, StoreError,
};

use crate::util::*;

fn stamp(p: &std::path::Path) -> (u64, i64, i64, u64) {
    let m = fs::metadata(p).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec(), m.size())
}

#[test]
fn capture_dir_twice_deduplicates_and_leaves_the_artifact_alone() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_tree(&src, &example_tree());
    let store = LocalArtifactStore::new(dir.path().join("artifacts")).unwrap();

    let first = store.capture_dir("agent-1", &src, &opts()).unwrap();
    assert!(!first.deduplicated);
    assert_eq!(first.content_hash, documented_example_hash());
    assert_eq!(
        first.artifact_path,
        dir.path()
            .join(format!("artifacts/agent-1/{}.tar.zst", first.content_hash))
    );
    assert_eq!(
        store.path("agent-1", &first.content_hash).unwrap(),
        first.artifact_path
    );
    assert_eq!(first.file_count, 3);
    assert_eq!(first.uncompressed_bytes, 6 + 18);
    assert_eq!(
        first.size_bytes,
        fs::metadata(&first.artifact_path).unwrap().len()
    );
    let before = stamp(&first.artifact_path);
    let bytes = fs::read(&first.artifact_path).unwrap();

    let second = store.capture_dir("agent-1", &src, &opts()).unwrap();
    assert!(second.deduplicated);
    assert_eq!(second.content_hash, first.content_hash);
    assert_eq!(second.artifact_path, first.artifact_path);
    assert_eq!(
        stamp(&first.artifact_path),
        before,
        "the artifact was rewritten"
    );
    assert_eq!(fs::read(&first.artifact_path).unwrap(), bytes);
    // No .partial left behind, nothing else in the agent's directory.
    assert_eq!(
        names(&dir.path().join("artifacts/agent-1")),
        vec![format!("{}.tar.zst", first.content_hash)]
    );

    // With the stat cache: deduplicated as well, same answer.
    let cached = CaptureOptions {
        stat_cache_dir: Some(dir.path().join("cache")),
        ..opts()
    };
    for _ in 0..2 {
        let c = store.capture_dir("agent-1", &src, &cached).unwrap();
        assert!(c.deduplicated);
        assert_eq!(c.content_hash, first.content_hash);
        assert_eq!(c.artifact_path, first.artifact_path);
        assert_eq!(
            (c.file_count, c.size_bytes, c.uncompressed_bytes),
            (first.file_count, first.size_bytes, first.uncompressed_bytes)
        );
    }
    assert_eq!(stamp(&first.artifact_path), before);
    assert_eq!(names(&dir.path().join("artifacts/agent-1")).len(), 1);

    // Another agent gets its own copy.
    let other = store.capture_dir("agent-2", &src, &opts()).unwrap();
    assert!(!other.deduplicated);
    assert_eq!(fs::read(&other.artifact_path).unwrap(), bytes);
}

#[test]
fn host_capture_and_cli_capture_write_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_tree(&src, &example_tree());
    let store = LocalArtifactStore::new(dir.path().join("artifacts")).unwrap();
    let host = store.capture_dir("a", &src, &opts()).unwrap();
    let cli = capture_to_file(&src, &dir.path().join("cli.tar.zst"), &opts()).unwrap();
    assert_eq!(
        fs::read(&host.artifact_path).unwrap(),
        fs::read(&cli.artifact_path).unwrap()
    );
}

#[test]
fn open_contains_and_extract_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_tree(&src, &example_tree());
    let store = LocalArtifactStore::new(dir.path().join("artifacts")).unwrap();
    let c = store.capture_dir("agent", &src, &opts()).unwrap();
    assert!(store.contains("agent", &c.content_hash));
    assert!(!store.contains("other", &c.content_hash));
    assert!(!store.contains("agent", &"0".repeat(64)));

    let dyn_store: &dyn ArtifactStore = &store;
    assert_eq!(
        dyn_store.location("agent", &c.content_hash),
        format!("artifacts/agent/{}.tar.zst", c.content_hash)
    );
    let mut via_trait = Vec::new();
    dyn_store
        .open_archive("agent", &c.content_hash)
        .unwrap()
        .read_to_end(&mut via_trait)
        .unwrap();
    assert_eq!(via_trait, fs::read(&c.artifact_path).unwrap());

    let dest = dir.path().join("dest");
    extract(
        store.open("agent", &c.content_hash).unwrap(),
        &dest,
        &ExtractOptions::default(),
    )
    .unwrap();
    assert_eq!(read_tree(&dest), example_tree());

    assert!(matches!(
        store.open("agent", &"0".repeat(64)),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn names_that_would_leave_the_store_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalArtifactStore::new(dir.path().join("artifacts")).unwrap();
    let h = "a".repeat(64);
    for agent in ["", "..", "../x", "a/b", "Agent", "a b", &"a".repeat(65)] {
        assert!(
            matches!(store.path(agent, &h), Err(StoreError::BadAgent(_))),
            "{agent:?}"
        );
        assert!(!store.contains(agent, &h));
    }
    for hash in [
        "",
        "../../etc/passwd",
        &"A".repeat(64),
        &"a".repeat(63),
        &"g".repeat(64),
    ] {
        assert!(
            matches!(store.path("agent", hash), Err(StoreError::BadHash(_))),
            "{hash:?}"
        );
        assert!(!is_content_hash(hash));
    }
    let src = dir.path().join("src");
    write_tree(&src, &example_tree());
    assert!(store.capture_dir("../evil", &src, &opts()).is_err());
    assert_eq!(names(&dir.path().join("artifacts")), Vec::<String>::new());
    assert!(!dir.path().join("evil").exists());
}

#[test]
fn store_directories_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_tree(&src, &example_tree());
    let store = LocalArtifactStore::new(dir.path().join("artifacts")).unwrap();
    store.capture_dir("agent", &src, &opts()).unwrap();
    for d in ["artifacts", "artifacts/agent"] {
        let mode = fs::metadata(dir.path().join(d))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700, "{d}");
    }
}
