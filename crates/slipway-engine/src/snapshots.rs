//! The capturing phase's two sources, and the cache of extracted snapshots that sandboxes use
//! as their read-only lower layer.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use slipway_store::{RunRecord, SnapshotRecord};

use crate::events::Event;
use crate::{random_id, Engine, Source};
use slipway_core::IdKind;

/// Why a run's source could not be turned into a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("sourceDir {source_dir} does not exist on this server (looked for it under the agent's root)")]
    Missing { source_dir: String },
    #[error("sourceDir {source_dir} leads outside the agent's root through a symlink")]
    Escapes { source_dir: String },
    #[error("the agent's root directory is not usable: {0}")]
    AgentRoot(io::Error),
    #[error("snapshot {content_hash} not found for this agent")]
    NotFound { content_hash: String },
    #[error("capture failed: {0}")]
    Capture(String),
    #[error("extracting snapshot {content_hash} failed: {message}")]
    Extract {
        content_hash: String,
        message: String,
    },
    #[error("store: {0}")]
    Store(#[from] slipway_store::StoreError),
}

/// Resolves the host directory of a spec's `sourceDir`, refusing any path that leaves the
/// agent's root once symlinks are resolved.
///
/// # Errors
/// [`SnapshotError::Missing`], [`SnapshotError::Escapes`] or [`SnapshotError::AgentRoot`].
pub fn host_source_dir(
    engine: &Engine,
    agent_id: &str,
    source_dir: &str,
) -> Result<PathBuf, SnapshotError> {
    let template = &engine.inner.config.agent_root;
    let root = template.agent_root(agent_id);
    let root = match root.canonicalize() {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SnapshotError::Missing {
                source_dir: source_dir.to_string(),
            })
        }
        Err(e) => return Err(SnapshotError::AgentRoot(e)),
    };
    let lexical = template.host_path(agent_id, source_dir);
    let resolved = match lexical.canonicalize() {
        Ok(p) => p,
        Err(_) => {
            return Err(SnapshotError::Missing {
                source_dir: source_dir.to_string(),
            })
        }
    };
    if !resolved.starts_with(&root) || resolved == root {
        return Err(SnapshotError::Escapes {
            source_dir: source_dir.to_string(),
        });
    }
    Ok(resolved)
}

/// The snapshot a run deploys: captured now from the spec's `sourceDir`, or an uploaded one.
pub(crate) async fn resolve(
    engine: &Engine,
    run: &RunRecord,
    source: &Source,
) -> Result<SnapshotRecord, SnapshotError> {
    let inner = engine.inner.clone();
    match source {
        Source::Snapshot(hash) => {
            let store = inner.store.clone();
            let (agent, h) = (run.agent_id.clone(), hash.clone());
            let found =
                tokio::task::spawn_blocking(move || store.find_snapshot_by_hash(&agent, &h))
                    .await
                    .expect("store task panicked")?;
            found.ok_or_else(|| SnapshotError::NotFound {
                content_hash: hash.clone(),
            })
        }
        Source::SpecSourceDir => {
            let spec = &run.spec_snapshot;
            let dir = host_source_dir(engine, &run.agent_id, &spec.source_dir)?;
            let artifacts = inner.artifacts.clone();
            let artifacts_loc = inner.artifacts.clone();
            let agent = run.agent_id.clone();
            let options = capture_options(engine);
            let captured =
                tokio::task::spawn_blocking(move || artifacts.capture_dir(&agent, &dir, &options))
                    .await
                    .expect("capture task panicked")
                    .map_err(|e| SnapshotError::Capture(agent_facing(&e)))?;
            crate::trust::sign(
                engine,
                crate::trust::ArtifactKind::Snapshot,
                &run.agent_id,
                &captured.content_hash,
            )
            .await
            .map_err(SnapshotError::Capture)?;
            let record = SnapshotRecord {
                id: random_id(IdKind::Snapshot),
                agent_id: run.agent_id.clone(),
                spec_id: Some(run.spec_id.clone()),
                source_dir: spec.source_dir.clone(),
                artifact_path: slipway_artifacts::ArtifactStore::location(
                    &*artifacts_loc,
                    &run.agent_id,
                    &captured.content_hash,
                ),
                content_hash: captured.content_hash.clone(),
                file_count: captured.file_count,
                size_bytes: captured.size_bytes,
                created_at: (inner.clock)(),
            };
            let store = inner.store.clone();
            let rec = record.clone();
            tokio::task::spawn_blocking(move || store.insert_snapshot(&rec))
                .await
                .expect("store task panicked")?;
            inner.events.publish(Event::SnapshotCreated(record.clone()));
            Ok(record)
        }
    }
}

/// A capture error as the agent reads it in its run: the guards name paths inside its own
/// tree, but a failure to store the archive would name the server's data directory, so only
/// its OS reason is kept (the whole error goes to the log).
fn agent_facing(err: &slipway_artifacts::CaptureError) -> String {
    use slipway_artifacts::{CaptureError, StoreError};
    match err {
        CaptureError::Write { source, .. } | CaptureError::Store(StoreError::Io { source, .. }) => {
            tracing::warn!(error = %err, "storing a captured snapshot failed");
            format!("the server could not store the snapshot: {source}")
        }
        other => other.to_string(),
    }
}

fn capture_options(engine: &Engine) -> slipway_artifacts::CaptureOptions {
    let cfg = &engine.inner.config;
    slipway_artifacts::CaptureOptions {
        max_files: cfg.max_snapshot_files,
        max_compressed_bytes: cfg.max_snapshot_bytes,
        stat_cache_dir: Some(cfg.cache_dir.join("stat")),
        ..Default::default()
    }
}

/// The cached, read-only extraction of a snapshot, owned by the workload uid. Extracted once
/// per content hash and shared by every sandbox of that hash; concurrent callers wait for the
/// one extraction.
pub(crate) async fn extracted(
    engine: &Engine,
    snapshot: &SnapshotRecord,
    uid: u32,
) -> Result<PathBuf, SnapshotError> {
    let inner = engine.inner.clone();
    let dir = inner
        .config
        .cache_dir
        .join("snapshots")
        .join(&snapshot.content_hash);
    let gate = {
        let mut map = inner.extracting.lock().await;
        map.entry(snapshot.content_hash.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone()
    };
    let _held = gate.lock().await;
    if dir.is_dir() {
        return Ok(dir);
    }
    let artifacts = inner.artifacts.clone();
    let (agent, hash) = (snapshot.agent_id.clone(), snapshot.content_hash.clone());
    let dest = dir.clone();
    let max_bytes = inner.config.max_snapshot_bytes.saturating_mul(8);
    let max_entries = inner.config.max_snapshot_files + 1000;
    tokio::task::spawn_blocking(move || {
        extract_into(
            &artifacts,
            &agent,
            &hash,
            &dest,
            uid,
            max_bytes,
            max_entries,
        )
    })
    .await
    .expect("extract task panicked")
    .map_err(|message| SnapshotError::Extract {
        content_hash: snapshot.content_hash.clone(),
        message,
    })?;
    Ok(dir)
}

fn extract_into(
    artifacts: &slipway_artifacts::LocalArtifactStore,
    agent: &str,
    hash: &str,
    dest: &Path,
    uid: u32,
    max_bytes: u64,
    max_entries: u64,
) -> Result<(), String> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    let reader = artifacts.open(agent, hash).map_err(|e| e.to_string())?;
    let options = slipway_artifacts::ExtractOptions {
        owner: Some((uid, uid)),
        max_bytes,
        max_entries,
    };
    slipway_artifacts::extract(reader, dest, &options).map_err(|e| e.to_string())?;
    Ok(())
}
