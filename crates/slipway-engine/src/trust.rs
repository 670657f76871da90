//! Signed artifacts at rollout (issue 7): every snapshot and release artifact is signed over its
//! sha256 when it is first stored, and verified — file hash and signature — before any sandbox
//! or instance is made from it. A mismatch refuses the rollout with the reason, and leaves an
//! audit entry; nothing else changes (production keeps serving what it served).
//!
//! Without a signer ([`Engine::set_signer`] never called: engine tests, tools) artifacts are
//! neither signed nor verified.

use std::path::PathBuf;
use std::sync::Arc;

use slipway_trust::signing::Expected;
use slipway_trust::{NewAuditEntry, Signer};

use crate::Engine;

/// Kind of artifact, as signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactKind {
    Snapshot,
    Release,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Snapshot => "snapshot",
            ArtifactKind::Release => "release",
        }
    }
}

impl Engine {
    /// Turns on signing and verification with the server's key. Call once, before serving.
    pub fn set_signer(&self, signer: Arc<Signer>) {
        if self.inner.signer.set(signer).is_err() {
            tracing::warn!("the engine's signer was already set; keeping the first");
        }
    }

    fn artifact_path(
        &self,
        kind: ArtifactKind,
        agent_id: &str,
        content_hash: &str,
    ) -> Result<PathBuf, String> {
        let a = &self.inner.artifacts;
        match kind {
            ArtifactKind::Snapshot => a.path(agent_id, content_hash),
            ArtifactKind::Release => a.release_path(agent_id, content_hash),
        }
        .map_err(|e| e.to_string())
    }
}

/// Signs a freshly stored artifact once (an artifact that already has a signature keeps it).
pub(crate) async fn sign(
    engine: &Engine,
    kind: ArtifactKind,
    agent_id: &str,
    content_hash: &str,
) -> Result<(), String> {
    let Some(signer) = engine.inner.signer.get().cloned() else {
        return Ok(());
    };
    let path = engine.artifact_path(kind, agent_id, content_hash)?;
    let (agent, hash) = (agent_id.to_string(), content_hash.to_string());
    tokio::task::spawn_blocking(move || signer.sign_file_once(kind.as_str(), &agent, &hash, &path))
        .await
        .map_err(|e| format!("signing task failed: {e}"))?
        .map_err(|e| format!("cannot sign {} {content_hash}: {e}", kind.as_str()))?;
    Ok(())
}

/// Verifies an artifact's file hash and signature before anything is made from it. On failure
/// the reason is audited (`rollout.refused`) and returned; the caller refuses the rollout.
pub(crate) async fn verify(
    engine: &Engine,
    kind: ArtifactKind,
    agent_id: &str,
    content_hash: &str,
    run_id: Option<&str>,
) -> Result<(), String> {
    let Some(signer) = engine.inner.signer.get().cloned() else {
        return Ok(());
    };
    let path = engine.artifact_path(kind, agent_id, content_hash)?;
    let (agent, hash) = (agent_id.to_string(), content_hash.to_string());
    let checked = tokio::task::spawn_blocking(move || {
        let key = signer.public();
        let want = Expected {
            kind: Some(kind.as_str()),
            agent_id: Some(&agent),
            content_hash: Some(&hash),
        };
        slipway_trust::signing::verify_artifact(&key, &path, &want).map(|_| ())
    })
    .await
    .map_err(|e| format!("verification task failed: {e}"))?;
    let Err(e) = checked else { return Ok(()) };
    let reason = format!("{} {content_hash} failed verification: {e}", kind.as_str());
    tracing::error!(agent = agent_id, run = ?run_id, "{reason}; rollout refused");
    let entry = NewAuditEntry {
        agent_id: Some(agent_id.to_string()),
        target: Some(format!("{}:{content_hash}", kind.as_str())),
        snapshot_hash: Some(content_hash.to_string()),
        run_id: run_id.map(str::to_string),
        reason: Some(reason.clone()),
        ..NewAuditEntry::new(
            (engine.inner.clock)(),
            "system",
            None,
            "rollout.refused",
            "refused",
        )
    };
    let store = engine.inner.store.clone();
    if let Err(err) = crate::blocking(move || store.append_audit(&entry)).await {
        tracing::error!(error = %err, "could not write the audit entry of a refused rollout");
    }
    Err(format!("rollout refused: {reason}"))
}

/// Verifies the release a version points at (rollback, warm or cold).
pub(crate) async fn verify_version(
    engine: &Engine,
    version: &slipway_store::VersionRecord,
) -> Result<(), String> {
    let store = engine.inner.store.clone();
    let (a, r) = (version.agent_id.clone(), version.release_id.clone());
    let release = crate::blocking(move || store.get_release(&a, &r))
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("release {} is missing", version.release_id))?;
    verify(
        engine,
        ArtifactKind::Release,
        &release.agent_id,
        &release.content_hash,
        release.run_id.as_deref(),
    )
    .await
}
