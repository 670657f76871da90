//! Releases: the immutable, content-addressed output of a successful build, and the cached
//! extraction instances boot from.
//!
//! After the build commands succeed, the sandbox's merged workspace is exported (read through
//! the sandbox's root without following the workload's symlinks, see `docs/sandbox.md`), its
//! kind is decided (static or dynamic), and it is archived as a deterministic `.tar.zst` whose
//! name is the canonical content hash of the tree — the same definition as snapshots, with no
//! ignore rules (a release *is* `dist/` and `node_modules/`). The archive goes to the artifact
//! store's release namespace (`artifacts/<agentId>/releases/<hash>.tar.zst`) and a
//! [`ReleaseRecord`] row records hash, archive sha256, size and file count.
//!
//! Instances (cold boots, rollbacks) boot from the release only: extracted once per hash into
//! `<cache>/releases/<hash>` (read-only lower layer owned by the workload uid), then the start
//! command — never install or build.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use slipway_artifacts::tree::{EntryKind, TreeHasher};
use slipway_core::{DeploymentKind, DeploymentSpec, IdKind};
use slipway_sandbox::SandboxHandle;
use slipway_store::{ReleaseKind, ReleaseRecord, RunRecord};

use crate::{random_id, Engine};

/// Output directories a static build may produce, in the order they are looked for.
pub const OUTPUT_DIRS: [&str; 4] = ["dist", "build", "out", "public"];

/// Spec env naming the output directory explicitly (relative to the workspace).
pub const OUTPUT_DIR_ENV: &str = "SLIPWAY_OUTPUT_DIR";
/// Spec env turning on SPA fallback for a static release (`1` or `true`).
pub const SPA_ENV: &str = "SLIPWAY_SPA_FALLBACK";

/// Root files that mean "this app has a server of its own" for `kind: auto`.
const SERVER_ENTRY_POINTS: [&str; 12] = [
    "server.js",
    "server.mjs",
    "server.cjs",
    "server.ts",
    "app.py",
    "main.py",
    "manage.py",
    "wsgi.py",
    "asgi.py",
    "Procfile",
    "main.go",
    "config.ru",
];

/// Why a release could not be made or booted.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("exporting the built workspace failed: {0}")]
    Export(String),
    #[error("kind is static but the build produced no output directory with an index.html (looked in {looked})")]
    NoStaticOutput { looked: String },
    #[error("the release has a path that is not UTF-8: {0}")]
    NonUtf8(String),
    #[error("writing the release archive failed: {0}")]
    Write(String),
    #[error("extracting release {content_hash} failed: {message}")]
    Extract {
        content_hash: String,
        message: String,
    },
    #[error("store: {0}")]
    Store(#[from] slipway_store::StoreError),
}

/// What [`decide_kind`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindDecision {
    pub kind: ReleaseKind,
    /// The served directory of a static release, relative to the workspace (`.` = root).
    pub static_dir: Option<String>,
    pub reason: String,
}

/// What the built workspace looks like, for [`decide_kind`]. Pure data, so the rules are
/// tested without a file system.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuiltShape {
    /// Candidate directories (relative) that hold an `index.html`.
    pub dirs_with_index: Vec<String>,
    /// Root file names.
    pub root_files: Vec<String>,
    /// `package.json` has a `start` script or a `main`.
    pub package_has_server: bool,
}

/// Static or dynamic (issue 6): `static` needs an output directory with `index.html`
/// (explicit one first, then `dist build out public`, then the root); `auto` is static only
/// when such a directory exists among the explicit one or `dist build out public` *and* the
/// workspace has no server entry point; everything else is dynamic.
///
/// # Errors
/// [`ReleaseError::NoStaticOutput`] when `kind: static` finds no output.
pub fn decide_kind(
    kind: DeploymentKind,
    explicit: Option<&str>,
    shape: &BuiltShape,
) -> Result<KindDecision, ReleaseError> {
    let mut candidates: Vec<String> = Vec::new();
    if let Some(e) = explicit {
        candidates.push(e.trim_matches('/').to_string());
    }
    candidates.extend(OUTPUT_DIRS.iter().map(|s| s.to_string()));
    let found = candidates
        .iter()
        .find(|c| shape.dirs_with_index.contains(c))
        .cloned();
    match kind {
        DeploymentKind::Dynamic => Ok(KindDecision {
            kind: ReleaseKind::Dynamic,
            static_dir: None,
            reason: "kind: dynamic".into(),
        }),
        DeploymentKind::Static => {
            let dir = found.or_else(|| shape.dirs_with_index.iter().find(|d| *d == ".").cloned());
            match dir {
                Some(d) => Ok(KindDecision {
                    kind: ReleaseKind::Static,
                    reason: format!("kind: static, serving {d}/"),
                    static_dir: Some(d),
                }),
                None => Err(ReleaseError::NoStaticOutput {
                    looked: format!("{}, .", candidates.join(", ")),
                }),
            }
        }
        DeploymentKind::Auto => {
            let entry = shape
                .root_files
                .iter()
                .find(|f| SERVER_ENTRY_POINTS.contains(&f.as_str()));
            match (found, entry) {
                (Some(d), None) if !shape.package_has_server => Ok(KindDecision {
                    kind: ReleaseKind::Static,
                    reason: format!(
                        "kind: auto → static ({d}/index.html and no server entry point)"
                    ),
                    static_dir: Some(d),
                }),
                (Some(_), Some(e)) => Ok(KindDecision {
                    kind: ReleaseKind::Dynamic,
                    static_dir: None,
                    reason: format!("kind: auto → dynamic (server entry point {e})"),
                }),
                (Some(_), None) => Ok(KindDecision {
                    kind: ReleaseKind::Dynamic,
                    static_dir: None,
                    reason: "kind: auto → dynamic (package.json names a start script or main)"
                        .into(),
                }),
                (None, _) => Ok(KindDecision {
                    kind: ReleaseKind::Dynamic,
                    static_dir: None,
                    reason: "kind: auto → dynamic (no output directory with index.html)".into(),
                }),
            }
        }
    }
}

fn shape_of(dir: &Path, explicit: Option<&str>) -> BuiltShape {
    let mut shape = BuiltShape::default();
    let mut candidates: Vec<String> = OUTPUT_DIRS.iter().map(|s| s.to_string()).collect();
    candidates.push(".".into());
    if let Some(e) = explicit {
        candidates.push(e.trim_matches('/').to_string());
    }
    for c in candidates {
        // Only plain relative names: an explicit dir may not climb out.
        if c.split('/').any(|p| p == "..") {
            continue;
        }
        let index = dir.join(&c).join("index.html");
        if fs::symlink_metadata(&index).is_ok_and(|m| m.is_file()) && !is_symlink_path(dir, &c) {
            shape.dirs_with_index.push(c);
        }
    }
    if let Ok(rd) = fs::read_dir(dir) {
        shape.root_files = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
    }
    if let Ok(text) = fs::read_to_string(dir.join("package.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            shape.package_has_server =
                v.pointer("/scripts/start").is_some() || v.get("main").is_some();
        }
    }
    shape
}

/// True when any component of `rel` under `root` is a symlink (a static root must be a real
/// directory of the release).
fn is_symlink_path(root: &Path, rel: &str) -> bool {
    let mut p = root.to_path_buf();
    for part in rel.split('/').filter(|s| !s.is_empty() && *s != ".") {
        p.push(part);
        if fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return true;
        }
    }
    false
}

fn spa_on(spec: &DeploymentSpec) -> bool {
    spec.env.get(SPA_ENV).is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// Exports the run's built workspace and stores it as a release. Called once the build
/// commands succeeded, before the start command runs (so the release is exactly what was built).
pub(crate) async fn make_release(
    engine: &Engine,
    run: &RunRecord,
    sandbox: &dyn SandboxHandle,
) -> Result<ReleaseRecord, ReleaseError> {
    let inner = engine.inner.clone();
    let spec = &run.spec_snapshot;
    let exports = inner.config.cache_dir.join("exports");
    fs::create_dir_all(&exports).map_err(|e| ReleaseError::Export(e.to_string()))?;
    let dest = exports.join(&run.id);
    let _ = fs::remove_dir_all(&dest);
    sandbox
        .export_workspace(&dest)
        .await
        .map_err(|e| ReleaseError::Export(e.to_string()))?;
    let guard = RemoveOnDrop(dest.clone());

    let explicit = spec.env.get(OUTPUT_DIR_ENV).cloned();
    let shape = shape_of(&dest, explicit.as_deref());
    let decision = decide_kind(spec.kind, explicit.as_deref(), &shape)?;

    let artifacts = inner.artifacts.clone();
    let agent = run.agent_id.clone();
    let src = dest.clone();
    let archived = tokio::task::spawn_blocking(move || archive_tree(&artifacts, &agent, &src))
        .await
        .expect("release archive task panicked")?;
    drop(guard);
    let record = ReleaseRecord {
        id: random_id(IdKind::Release),
        agent_id: run.agent_id.clone(),
        run_id: Some(run.id.clone()),
        artifact_path: inner
            .artifacts
            .release_location(&run.agent_id, &archived.content_hash),
        content_hash: archived.content_hash,
        artifact_sha256: archived.artifact_sha256,
        kind: decision.kind,
        static_dir: decision.static_dir,
        spa_fallback: spa_on(spec),
        start_command: spec.start_command.clone(),
        runtime_port: spec.runtime_port,
        file_count: archived.file_count,
        size_bytes: archived.size_bytes,
        created_at: (inner.clock)(),
    };
    let store = inner.store.clone();
    let rec = record.clone();
    crate::blocking(move || store.insert_release(&rec)).await?;
    Ok(record)
}

/// Removes an export directory however the release step ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What [`archive_tree`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    pub content_hash: String,
    pub artifact_sha256: String,
    pub file_count: u64,
    pub size_bytes: u64,
}

enum Item {
    Dir,
    File { executable: bool, size: u64 },
    Symlink { target: String },
}

fn walk(root: &Path) -> Result<Vec<(String, Item)>, ReleaseError> {
    let mut out = Vec::new();
    let mut pending = vec![PathBuf::new()];
    let io = |e: io::Error| ReleaseError::Write(e.to_string());
    while let Some(rel) = pending.pop() {
        for entry in fs::read_dir(root.join(&rel)).map_err(io)? {
            let entry = entry.map_err(io)?;
            let child = rel.join(entry.file_name());
            let name = child
                .to_str()
                .ok_or_else(|| ReleaseError::NonUtf8(child.to_string_lossy().into_owned()))?
                .to_string();
            let meta = fs::symlink_metadata(root.join(&child)).map_err(io)?;
            let ft = meta.file_type();
            if ft.is_dir() {
                out.push((name, Item::Dir));
                pending.push(child);
            } else if ft.is_file() {
                out.push((
                    name,
                    Item::File {
                        executable: meta.permissions().mode() & 0o100 != 0,
                        size: meta.len(),
                    },
                ));
            } else if ft.is_symlink() {
                let target = fs::read_link(root.join(&child)).map_err(io)?;
                let target = target
                    .to_str()
                    .ok_or_else(|| {
                        ReleaseError::NonUtf8(format!("{name} -> {}", target.display()))
                    })?
                    .to_string();
                out.push((name, Item::Symlink { target }));
            }
            // Export never copies devices, fifos or sockets.
        }
    }
    out.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(out)
}

/// Hashes a reader while it is read.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Hashes what is written through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `dir` as a deterministic `.tar.zst` (sorted entries, fixed owner and times, modes
/// 0644/0755) into the agent's release namespace, named by the tree's canonical content hash.
///
/// # Errors
/// A non-UTF-8 name or an I/O error.
pub fn archive_tree(
    artifacts: &slipway_artifacts::LocalArtifactStore,
    agent: &str,
    dir: &Path,
) -> Result<Archived, ReleaseError> {
    let werr = |e: io::Error| ReleaseError::Write(e.to_string());
    let serr = |e: slipway_artifacts::StoreError| ReleaseError::Write(e.to_string());
    let entries = walk(dir)?;
    let stage_dir = artifacts.release_dir(agent).map_err(serr)?;
    let tmp = tempfile::Builder::new()
        .prefix(".release-")
        .suffix(".partial")
        .tempfile_in(&stage_dir)
        .map_err(werr)?;
    let file = tmp.as_file().try_clone().map_err(werr)?;
    let counting = HashingWriter {
        inner: io::BufWriter::new(file),
        hasher: Sha256::new(),
        written: 0,
    };
    let encoder = zstd::Encoder::new(counting, 3).map_err(werr)?;
    let mut tar = tar::Builder::new(encoder);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut tree = TreeHasher::new();
    let mut files = 0u64;
    for (path, item) in &entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match item {
            Item::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                tar.append_data(&mut h, format!("{path}/"), io::empty())
                    .map_err(werr)?;
            }
            Item::File { executable, size } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if *executable { 0o755 } else { 0o644 });
                h.set_size(*size);
                let f = fs::File::open(dir.join(path)).map_err(werr)?;
                // The export is ours and no longer changing; `take` keeps the header honest anyway.
                let mut reader = HashingReader {
                    inner: f.take(*size),
                    hasher: Sha256::new(),
                };
                tar.append_data(&mut h, path, &mut reader).map_err(werr)?;
                let digest: [u8; 32] = reader.hasher.finalize().into();
                tree.push(
                    path,
                    EntryKind::File {
                        executable: *executable,
                    },
                    &digest,
                )
                .map_err(|e| ReleaseError::Write(format!("entries out of order at {}", e.path)))?;
                files += 1;
            }
            Item::Symlink { target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                tar.append_link(&mut h, path, target).map_err(werr)?;
                let digest: [u8; 32] = Sha256::digest(target.as_bytes()).into();
                tree.push(path, EntryKind::Symlink, &digest).map_err(|e| {
                    ReleaseError::Write(format!("entries out of order at {}", e.path))
                })?;
                files += 1;
            }
        }
    }
    let encoder = tar.into_inner().map_err(werr)?;
    let mut counting = encoder.finish().map_err(werr)?;
    counting.flush().map_err(werr)?;
    let artifact_sha256 = hex::encode(counting.hasher.finalize());
    let size_bytes = counting.written;
    drop(counting.inner);
    tmp.as_file().sync_all().map_err(werr)?;
    let content_hash = tree.finish();
    artifacts
        .publish_release(agent, &content_hash, tmp.into_temp_path())
        .map_err(serr)?;
    Ok(Archived {
        content_hash,
        artifact_sha256,
        file_count: files,
        size_bytes,
    })
}

/// The cached, read-only extraction of a release, owned by the workload uid; extracted once
/// per hash, concurrent callers wait for the one extraction.
pub(crate) async fn extracted(
    engine: &Engine,
    release: &ReleaseRecord,
    uid: u32,
) -> Result<PathBuf, ReleaseError> {
    // Every instance boots through here: verify the release's hash and signature first (issue 7).
    crate::trust::verify(
        engine,
        crate::trust::ArtifactKind::Release,
        &release.agent_id,
        &release.content_hash,
        release.run_id.as_deref(),
    )
    .await
    .map_err(|message| ReleaseError::Extract {
        content_hash: release.content_hash.clone(),
        message,
    })?;
    let inner = engine.inner.clone();
    let dir = inner
        .config
        .cache_dir
        .join("releases")
        .join(&release.content_hash);
    let gate = {
        let mut map = inner.extracting.lock().await;
        map.entry(format!("release:{}", release.content_hash))
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone()
    };
    let _held = gate.lock().await;
    if dir.is_dir() {
        return Ok(dir);
    }
    let artifacts = inner.artifacts.clone();
    let (agent, hash) = (release.agent_id.clone(), release.content_hash.clone());
    let dest = dir.clone();
    let max_bytes = inner.config.max_snapshot_bytes.saturating_mul(8);
    let max_entries = inner.config.max_snapshot_files.saturating_mul(4) + 1000;
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let reader = artifacts
            .open_release(&agent, &hash)
            .map_err(|e| e.to_string())?;
        let options = slipway_artifacts::ExtractOptions {
            owner: Some((uid, uid)),
            max_bytes,
            max_entries,
        };
        slipway_artifacts::extract(reader, &dest, &options).map_err(|e| e.to_string())?;
        Ok(())
    })
    .await
    .expect("extract task panicked")
    .map_err(|message| ReleaseError::Extract {
        content_hash: release.content_hash.clone(),
        message,
    })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(dirs: &[&str], files: &[&str], pkg: bool) -> BuiltShape {
        BuiltShape {
            dirs_with_index: dirs.iter().map(|s| s.to_string()).collect(),
            root_files: files.iter().map(|s| s.to_string()).collect(),
            package_has_server: pkg,
        }
    }

    #[test]
    fn auto_is_static_only_with_output_and_no_server() {
        let d = decide_kind(
            DeploymentKind::Auto,
            None,
            &shape(&["dist"], &["package.json"], false),
        )
        .unwrap();
        assert_eq!(
            (d.kind, d.static_dir.as_deref()),
            (ReleaseKind::Static, Some("dist"))
        );
        let d = decide_kind(
            DeploymentKind::Auto,
            None,
            &shape(&["dist"], &["server.js"], false),
        )
        .unwrap();
        assert_eq!(d.kind, ReleaseKind::Dynamic);
        let d = decide_kind(DeploymentKind::Auto, None, &shape(&["build"], &[], true)).unwrap();
        assert_eq!(d.kind, ReleaseKind::Dynamic);
        // A root index.html alone is not an output directory for auto.
        let d = decide_kind(
            DeploymentKind::Auto,
            None,
            &shape(&["."], &["index.html"], false),
        )
        .unwrap();
        assert_eq!(d.kind, ReleaseKind::Dynamic);
        let d = decide_kind(
            DeploymentKind::Auto,
            Some("site/"),
            &shape(&["site", "dist"], &[], false),
        )
        .unwrap();
        assert_eq!(d.static_dir.as_deref(), Some("site"));
    }

    #[test]
    fn static_needs_an_index_and_may_use_the_root() {
        let d = decide_kind(DeploymentKind::Static, None, &shape(&["."], &[], true)).unwrap();
        assert_eq!(
            (d.kind, d.static_dir.as_deref()),
            (ReleaseKind::Static, Some("."))
        );
        assert!(matches!(
            decide_kind(DeploymentKind::Static, None, &shape(&[], &[], false)),
            Err(ReleaseError::NoStaticOutput { .. })
        ));
        let d = decide_kind(DeploymentKind::Dynamic, None, &shape(&["dist"], &[], false)).unwrap();
        assert_eq!(d.kind, ReleaseKind::Dynamic);
    }

    #[test]
    fn archives_are_content_addressed_and_deterministic() {
        let root = tempfile::tempdir().unwrap();
        let store = slipway_artifacts::LocalArtifactStore::new(root.path().join("a")).unwrap();
        let src = root.path().join("src");
        fs::create_dir_all(src.join("dist/empty")).unwrap();
        fs::write(src.join("dist/index.html"), "<h1>v1</h1>").unwrap();
        fs::write(src.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("dist/index.html", src.join("link")).unwrap();
        let a = archive_tree(&store, "agt-x", &src).unwrap();
        assert_eq!(a.file_count, 3);
        let b = archive_tree(&store, "agt-x", &src).unwrap();
        assert_eq!(a, b, "same tree, same archive");
        assert!(store.contains_release("agt-x", &a.content_hash));
        let mut bytes = Vec::new();
        store
            .open_release("agt-x", &a.content_hash)
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), a.artifact_sha256);
        assert_eq!(bytes.len() as u64, a.size_bytes);
        // Extracts back to the same tree.
        let out = root.path().join("out");
        slipway_artifacts::extract(&bytes[..], &out, &Default::default()).unwrap();
        assert_eq!(
            fs::read_to_string(out.join("dist/index.html")).unwrap(),
            "<h1>v1</h1>"
        );
        assert!(out.join("dist/empty").is_dir());
        assert_eq!(
            fs::read_link(out.join("link")).unwrap(),
            Path::new("dist/index.html")
        );
        fs::write(src.join("dist/index.html"), "<h1>v2</h1>").unwrap();
        assert_ne!(
            archive_tree(&store, "agt-x", &src).unwrap().content_hash,
            a.content_hash
        );
    }
}

/// What [`Engine::collect_garbage`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Artifact files removed (snapshots and releases no row references).
    pub removed: Vec<PathBuf>,
    /// Artifact files kept.
    pub kept: usize,
}

impl Engine {
    /// Removes artifacts that no snapshot, run, release or version row references and that are
    /// older than `min_age` (so an artifact published a moment before its row is written is
    /// never taken). A version's release and snapshot are always referenced — versions are never
    /// deleted — so a rollback target can never have been collected.
    ///
    /// # Errors
    /// A store failure. File system errors skip the file (it is tried again next time).
    pub async fn collect_garbage(
        &self,
        min_age: std::time::Duration,
    ) -> Result<GcReport, crate::EngineError> {
        let store = self.inner.store.clone();
        let refs = crate::blocking(move || store.referenced_artifacts()).await?;
        let root = self.inner.artifacts.root().to_path_buf();
        let report = tokio::task::spawn_blocking(move || {
            let mut report = GcReport::default();
            let now = std::time::SystemTime::now();
            let old_enough = |p: &Path| {
                fs::metadata(p)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= min_age)
            };
            let Ok(agents) = fs::read_dir(&root) else {
                return report;
            };
            for agent in agents.flatten() {
                let agent_id = agent.file_name().to_string_lossy().into_owned();
                let empty = Default::default();
                let snaps = refs.snapshots.get(&agent_id).unwrap_or(&empty);
                let rels = refs.releases.get(&agent_id).unwrap_or(&empty);
                for (dir, keep) in [(agent.path(), snaps), (agent.path().join("releases"), rels)] {
                    let Ok(files) = fs::read_dir(&dir) else {
                        continue;
                    };
                    for f in files.flatten() {
                        let name = f.file_name().to_string_lossy().into_owned();
                        let Some(hash) = name.strip_suffix(".tar.zst") else {
                            continue;
                        };
                        if !slipway_artifacts::is_content_hash(hash) {
                            continue;
                        }
                        let path = f.path();
                        if keep.contains(hash) || !old_enough(&path) {
                            report.kept += 1;
                        } else if fs::remove_file(&path).is_ok() {
                            report.removed.push(path);
                        }
                    }
                }
            }
            report
        })
        .await
        .expect("gc task panicked");
        Ok(report)
    }
}
