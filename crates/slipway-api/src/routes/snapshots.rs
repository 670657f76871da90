//! Snapshots (seed 004 `SourceSnapshot`): list, read, and the upload path
//! (`HEAD` to ask whether the server has a content hash, `PUT` to upload it).

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::Json;
use futures_util::TryStreamExt;
use serde::Deserialize;
use slipway_core::IdKind;
use slipway_store::SnapshotRecord;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{new_id, AgentAccess};
use crate::dto::{SnapshotDto, SnapshotListDto};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::ApiPath;
use crate::routes::deployments::is_content_hash;
use crate::state::AppState;

/// Largest snapshot upload: the 1 GiB snapshot limit plus room for the archive's framing.
pub const UPLOAD_BODY_LIMIT: usize = (1 << 30) + (16 << 20);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_snapshots))
        .routes(routes!(get_snapshot, head_snapshot))
        .merge(
            OpenApiRouter::new()
                .routes(routes!(put_snapshot))
                .layer(DefaultBodyLimit::max(UPLOAD_BODY_LIMIT)),
        )
}

fn hash_or_404(raw: &str) -> Result<String, ApiError> {
    if is_content_hash(raw) {
        Ok(raw.to_string())
    } else {
        Err(ApiError::with_message(
            ErrorCode::SnapshotNotFound,
            format!("snapshot {raw} not found"),
        ))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// At most this many snapshots (default 50, at most 500).
    pub limit: Option<u64>,
}

/// The agent's snapshots, newest first.
#[utoipa::path(
    get, path = "/api/agents/{id}/deployments/snapshots", tag = "snapshots",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), ListQuery),
    responses((status = 200, body = SnapshotListDto), (status = 404, body = ErrorBody)),
)]
pub async fn list_snapshots(
    State(state): State<AppState>,
    access: AgentAccess,
    Query(q): Query<ListQuery>,
) -> Result<Json<SnapshotListDto>, ApiError> {
    let agent = access.agent.id;
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let list = state
        .store(move |s| s.list_snapshots(&agent, limit))
        .await?;
    Ok(Json(SnapshotListDto {
        snapshots: list.into_iter().map(SnapshotDto::from).collect(),
    }))
}

/// The newest snapshot record with this content hash.
#[utoipa::path(
    get, path = "/api/agents/{id}/deployments/snapshots/{contentHash}", tag = "snapshots",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), ("contentHash" = String, Path, description = "content hash")),
    responses((status = 200, body = SnapshotDto), (status = 404, body = ErrorBody)),
)]
pub async fn get_snapshot(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiPath(ids): ApiPath<(String, String)>,
) -> Result<Json<SnapshotDto>, ApiError> {
    let (_, raw) = ids;
    let hash = hash_or_404(&raw)?;
    let agent = access.agent.id;
    let found = state
        .store(move |s| s.find_snapshot_by_hash(&agent, &hash))
        .await?;
    let snap = found.ok_or_else(|| {
        ApiError::with_message(
            ErrorCode::SnapshotNotFound,
            format!("snapshot {raw} not found"),
        )
    })?;
    Ok(Json(snap.into()))
}

/// 200 when the server already has this content hash for the agent (skip the upload), 404 when
/// it does not.
#[utoipa::path(
    head, path = "/api/agents/{id}/deployments/snapshots/{contentHash}", tag = "snapshots",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), ("contentHash" = String, Path, description = "content hash")),
    responses((status = 200, description = "the server has it"), (status = 404, description = "upload it")),
)]
pub async fn head_snapshot(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiPath(ids): ApiPath<(String, String)>,
) -> StatusCode {
    let (_, raw) = ids;
    let Ok(hash) = hash_or_404(&raw) else {
        return StatusCode::NOT_FOUND;
    };
    let agent = access.agent.id;
    let artifacts = state.artifacts.clone();
    let (a, h) = (agent.clone(), hash.clone());
    let present = match state.store(move |s| s.find_snapshot_by_hash(&a, &h)).await {
        Ok(found) => {
            found.is_some()
                && artifacts
                    .as_ref()
                    .is_some_and(|st| st.contains(&agent, &hash))
        }
        Err(_) => false,
    };
    if present {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

/// Uploads a snapshot archive (`.tar.zst` as produced by `slipway snapshot`). The server
/// re-validates every entry, recomputes the content hash and refuses a body whose content does
/// not hash to the path's hash. Idempotent: uploading content the server has answers 200.
#[utoipa::path(
    put, path = "/api/agents/{id}/deployments/snapshots/{contentHash}", tag = "snapshots",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), ("contentHash" = String, Path, description = "content hash")),
    request_body(content = Vec<u8>, content_type = "application/zstd", description = "the snapshot archive"),
    responses(
        (status = 201, body = SnapshotDto, description = "stored"),
        (status = 200, body = SnapshotDto, description = "already stored"),
        (status = 413, body = ErrorBody),
        (status = 422, description = "invalid_snapshot: hash mismatch or a refused entry", body = ErrorBody),
        (status = 507, description = "insufficient_storage: the server's disk is full; nothing was stored", body = ErrorBody),
    ),
)]
pub async fn put_snapshot(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiPath(ids): ApiPath<(String, String)>,
    body: Body,
) -> Result<(StatusCode, Json<SnapshotDto>), ApiError> {
    let (_, raw) = ids;
    let hash = hash_or_404(&raw)?;
    let agent = access.agent.id.clone();
    let artifacts = state.artifacts.clone().ok_or_else(|| {
        ApiError::with_message(ErrorCode::Unavailable, "this server has no artifact store")
    })?;
    let artifacts_for_path = artifacts.clone();
    let (a, h) = (agent.clone(), hash.clone());
    if let Some(existing) = state
        .store(move |s| s.find_snapshot_by_hash(&a, &h))
        .await?
    {
        if artifacts.contains(&agent, &hash) {
            return Ok((StatusCode::OK, Json(existing.into())));
        }
    }
    let opts = state.capture_options.clone();
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    let (a, h) = (agent.clone(), hash.clone());
    let captured = tokio::task::spawn_blocking(move || {
        let mut sync = tokio_util::io::SyncIoBridge::new(reader);
        let verified = artifacts.verify_upload(&a, &h, &mut sync, &opts);
        if verified.is_err() {
            drain_refused(&mut sync);
        }
        verified
    })
    .await
    .map_err(|e| ApiError::internal(format!("upload task failed: {e}")))?
    .map_err(|e| {
        if e.is_too_large() {
            ApiError::with_message(ErrorCode::PayloadTooLarge, e.to_string())
        } else if e.is_client_error() {
            ApiError::with_message(
                ErrorCode::InvalidSnapshot,
                format!("snapshot rejected: {e}"),
            )
        } else {
            ApiError::storage("storing the upload failed", &e)
        }
    })?;
    let spec_id = {
        let a = agent.clone();
        state.store(move |s| s.get_spec(&a)).await?.map(|s| s.id)
    };
    let record = SnapshotRecord {
        id: new_id(IdKind::Snapshot),
        agent_id: agent.clone(),
        spec_id,
        source_dir: "(upload)".into(),
        artifact_path: slipway_artifacts::ArtifactStore::location(
            &*artifacts_for_path,
            &agent,
            &hash,
        ),
        content_hash: captured.content_hash.clone(),
        file_count: captured.file_count,
        size_bytes: captured.size_bytes,
        created_at: state.now(),
    };
    if let Ok(path) = artifacts_for_path.path(&agent, &hash) {
        crate::routes::keys::sign_artifact(&state, "snapshot", &agent, &hash, &path).await?;
    }
    let rec = record.clone();
    state.store(move |s| s.insert_snapshot(&rec)).await?;
    if let Some(engine) = &state.engine {
        engine
            .events()
            .publish(slipway_engine::Event::SnapshotCreated(record.clone()));
    }
    Ok((StatusCode::CREATED, Json(record.into())))
}

/// After refusing an upload part-way (its size crossed the limit, the disk filled up, while
/// staging it; entries are checked only once it is all staged), reads and discards what the
/// client is still sending, within
/// [`REFUSED_DRAIN_BYTES`] and [`REFUSED_DRAIN_TIME`], before the error is answered. Closing
/// with unread bytes would make the kernel reset the connection, and a client still writing
/// would see a broken pipe instead of the answer that says what was wrong.
fn drain_refused(body: &mut impl std::io::Read) {
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    let mut left = REFUSED_DRAIN_BYTES;
    while left > 0 && started.elapsed() < REFUSED_DRAIN_TIME {
        match body.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n as u64),
        }
    }
}

/// How much of a refused upload is still read (see [`drain_refused`]).
const REFUSED_DRAIN_BYTES: u64 = 64 << 20;
/// How long a refused upload is still read.
const REFUSED_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);
