//! The upload path: the CLI captures, the server verifies.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;

use slipway_artifacts::{
    capture_to_file, CaptureOptions, ExtractError, LocalArtifactStore, StoreError, UploadError,
};

use crate::util::*;

struct Up {
    dir: tempfile::TempDir,
    store: LocalArtifactStore,
}

impl Up {
    fn new() -> Up {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalArtifactStore::new(dir.path().join("artifacts")).unwrap();
        Up { dir, store }
    }
    /// Captures `t` the CLI's way and returns (hash, archive bytes).
    fn cli_capture(&self, t: &Tree, name: &str) -> (String, Vec<u8>) {
        let src = self.dir.path().join(name);
        write_tree(&src, t);
        let out = self.dir.path().join(format!("{name}.tar.zst"));
        let c = capture_to_file(&src, &out, &opts()).unwrap();
        (c.content_hash, fs::read(&out).unwrap())
    }
    fn agent_files(&self, agent: &str) -> Vec<String> {
        names(&self.dir.path().join("artifacts").join(agent))
    }
}

#[test]
fn host_path_and_upload_path_give_the_same_hash() {
    let up = Up::new();
    let mut t = example_tree();
    t.insert(
        "lib/data.bin".into(),
        file((0..100_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
    );
    t.insert(format!("{}/deep.txt", "n".repeat(110)), file("long name"));
    let (hash, archive) = up.cli_capture(&t, "tree");

    let host = up
        .store
        .capture_dir("host-agent", &up.dir.path().join("tree"), &opts())
        .unwrap();
    let uploaded = up
        .store
        .verify_upload("upload-agent", &hash, &archive[..], &opts())
        .unwrap();
    assert_eq!(uploaded.content_hash, host.content_hash);
    assert_eq!(uploaded.content_hash, oracle_hash(&t));
    assert!(!uploaded.deduplicated);
    assert_eq!(
        uploaded.artifact_path,
        up.store.path("upload-agent", &hash).unwrap()
    );
    assert_eq!(
        (uploaded.file_count, uploaded.uncompressed_bytes),
        (host.file_count, host.uncompressed_bytes)
    );
    assert_eq!(uploaded.size_bytes, archive.len() as u64);
    // Stored as received; and with the same options the host capture wrote the same bytes.
    assert_eq!(fs::read(&uploaded.artifact_path).unwrap(), archive);
    assert_eq!(fs::read(&host.artifact_path).unwrap(), archive);
    assert_eq!(
        up.agent_files("upload-agent"),
        vec![format!("{hash}.tar.zst")]
    );
}

#[test]
fn archive_that_does_not_match_the_claimed_hash_is_rejected() {
    let up = Up::new();
    let (hash, archive) = up.cli_capture(&example_tree(), "a");
    let mut other = example_tree();
    other.insert("README.md".into(), file("hellO\n"));
    let (other_hash, _) = up.cli_capture(&other, "b");

    let e = up
        .store
        .verify_upload("agent", &other_hash, &archive[..], &opts())
        .unwrap_err();
    match &e {
        UploadError::HashMismatch { claimed, actual } => {
            assert_eq!((claimed, actual), (&other_hash, &hash))
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    assert!(
        e.to_string().contains(&hash) && e.to_string().contains(&other_hash),
        "{e}"
    );
    assert!(e.is_client_error() && !e.is_too_large());
    assert_eq!(
        up.agent_files("agent"),
        Vec::<String>::new(),
        "a refused upload left a file"
    );

    // A claim that is not a content hash at all.
    let e = up
        .store
        .verify_upload("agent", "../../x", &archive[..], &opts())
        .unwrap_err();
    assert!(
        matches!(e, UploadError::Store(StoreError::BadHash(_))),
        "{e:?}"
    );
    // An agent id that would leave the store.
    let e = up
        .store
        .verify_upload("../x", &hash, &archive[..], &opts())
        .unwrap_err();
    assert!(
        matches!(e, UploadError::Store(StoreError::BadAgent(_))),
        "{e:?}"
    );
}

#[test]
fn second_upload_of_the_same_content_is_deduplicated() {
    let up = Up::new();
    let (hash, archive) = up.cli_capture(&example_tree(), "a");
    let first = up
        .store
        .verify_upload("agent", &hash, &archive[..], &opts())
        .unwrap();
    assert!(!first.deduplicated);
    let ino = fs::metadata(&first.artifact_path).unwrap().ino();
    let second = up
        .store
        .verify_upload("agent", &hash, &archive[..], &opts())
        .unwrap();
    assert!(second.deduplicated);
    assert_eq!(second.content_hash, hash);
    assert_eq!(
        fs::metadata(&second.artifact_path).unwrap().ino(),
        ino,
        "the artifact was replaced"
    );
    assert_eq!(up.agent_files("agent"), vec![format!("{hash}.tar.zst")]);

    // An archive of the same tree with other bytes (another zstd level) is the same content:
    // accepted, deduplicated, and the stored bytes stay the first ones.
    let src = up.dir.path().join("a");
    let out = up.dir.path().join("level9.tar.zst");
    capture_to_file(
        &src,
        &out,
        &CaptureOptions {
            zstd_level: 9,
            ..opts()
        },
    )
    .unwrap();
    let third = up
        .store
        .verify_upload("agent", &hash, fs::File::open(&out).unwrap(), &opts())
        .unwrap();
    assert!(third.deduplicated);
    assert_eq!(fs::read(&first.artifact_path).unwrap(), archive);

    // And a host capture of the tree after an upload finds it too.
    let host = up.store.capture_dir("agent", &src, &opts()).unwrap();
    assert!(host.deduplicated);
    assert_eq!(up.agent_files("agent"), vec![format!("{hash}.tar.zst")]);
}

#[test]
fn oversized_uploads_are_too_large() {
    let up = Up::new();
    let mut t = example_tree();
    t.insert("pad.bin".into(), file(noise(50_000, 2)));
    let (hash, archive) = up.cli_capture(&t, "a");

    let small = CaptureOptions {
        max_compressed_bytes: archive.len() as u64 - 1,
        ..opts()
    };
    let e = up
        .store
        .verify_upload("agent", &hash, &archive[..], &small)
        .unwrap_err();
    assert!(matches!(e, UploadError::TooLarge { .. }), "{e:?}");
    assert!(e.is_too_large() && e.is_client_error());
    assert!(
        e.to_string().contains(&(archive.len() - 1).to_string()),
        "{e}"
    );

    let few = CaptureOptions {
        max_files: 3,
        ..opts()
    };
    let e = up
        .store
        .verify_upload("agent", &hash, &archive[..], &few)
        .unwrap_err();
    assert!(matches!(e, UploadError::TooManyFiles { limit: 3 }), "{e:?}");
    assert!(e.is_too_large());

    let tight = CaptureOptions {
        max_uncompressed_bytes: 10_000,
        ..opts()
    };
    let e = up
        .store
        .verify_upload("agent", &hash, &archive[..], &tight)
        .unwrap_err();
    assert!(
        matches!(
            e,
            UploadError::Archive(ExtractError::TooManyBytes { limit: 10_000 })
        ),
        "{e:?}"
    );
    assert!(e.is_too_large());

    assert_eq!(up.agent_files("agent"), Vec::<String>::new());
    // At exactly the limit it is fine.
    let exact = CaptureOptions {
        max_compressed_bytes: archive.len() as u64,
        ..opts()
    };
    up.store
        .verify_upload("agent", &hash, &archive[..], &exact)
        .unwrap();
}

#[test]
fn failing_reader_leaves_nothing() {
    struct Broken(usize);
    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "client went away",
                ));
            }
            self.0 -= 1;
            buf[..10].fill(7);
            Ok(10)
        }
    }
    let up = Up::new();
    let e = up
        .store
        .verify_upload("agent", &"a".repeat(64), Broken(3), &opts())
        .unwrap_err();
    assert!(matches!(e, UploadError::Read(_)), "{e:?}");
    assert_eq!(up.agent_files("agent"), Vec::<String>::new());
}
