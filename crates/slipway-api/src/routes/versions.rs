//! Production versions (issue 6): list, rollback, promote, route history.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use slipway_core::IdKind;
use slipway_engine::{Engine, EngineError, ProductionError};
use slipway_store::{DeploymentRecord, VersionRecord};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::AgentAccess;
use crate::dto::{
    DeploymentDto, RollbackDto, RouteChangeInput, RouteHistoryDto, VersionDto, VersionListDto,
};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::{ApiPath, ApiQuery};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_versions))
        .routes(routes!(rollback))
        .routes(routes!(promote))
        .routes(routes!(route_history))
}

impl From<ProductionError> for ApiError {
    fn from(e: ProductionError) -> Self {
        let message = e.to_string();
        match e {
            ProductionError::NoDeployment { .. } => {
                ApiError::with_message(ErrorCode::DeploymentNotFound, message)
            }
            ProductionError::VersionNotFound { .. } => {
                ApiError::with_message(ErrorCode::VersionNotFound, message)
            }
            ProductionError::NoPrevious { .. }
            | ProductionError::NotReady { .. }
            | ProductionError::NoRelease { .. }
            | ProductionError::InstanceGone { .. } => {
                ApiError::with_message(ErrorCode::Conflict, message)
            }
            ProductionError::BootFailed { .. } => {
                ApiError::with_message(ErrorCode::Unavailable, message)
            }
            ProductionError::Engine(EngineError::RunNotFound { .. }) => {
                ApiError::with_message(ErrorCode::RunNotFound, message)
            }
            ProductionError::Engine(EngineError::Store(s)) => s.into(),
            ProductionError::Engine(other) => {
                ApiError::with_message(ErrorCode::Conflict, other.to_string())
            }
        }
    }
}

fn engine(state: &AppState) -> Result<&Engine, ApiError> {
    state.engine.as_ref().ok_or_else(|| {
        ApiError::with_message(
            ErrorCode::Unavailable,
            "this server was started without a run engine",
        )
    })
}

fn deployment_dto(engine: &Engine, d: DeploymentRecord) -> DeploymentDto {
    DeploymentDto {
        production_url: engine.production_url(&d.slug),
        id: d.id,
        agent_id: d.agent_id,
        name: d.name,
        slug: d.slug,
        active_version: d.active_version,
        created_at: d.created_at,
    }
}

fn version_dto(v: VersionRecord, active: Option<i64>, live: &[i64]) -> VersionDto {
    VersionDto {
        active: active == Some(v.version_number),
        warm: live.contains(&v.version_number),
        version_number: v.version_number,
        run_id: v.run_id,
        origin: v.origin,
        release_id: v.release_id,
        release_hash: v.release_hash,
        snapshot_hash: v.snapshot_hash,
        operator: v.operator,
        note: v.note,
        spec: v.spec.into(),
        created_at: v.created_at,
    }
}

/// The optional body of rollback and promote: nothing, or a JSON object with a `note`.
fn note_of(body: &[u8]) -> Result<Option<String>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::with_message(
            ErrorCode::InvalidJson,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::with_message(
            ErrorCode::InvalidJson,
            "the request body must be a JSON object",
        ));
    }
    let input: RouteChangeInput = serde_json::from_value(value).map_err(|e| {
        ApiError::with_message(ErrorCode::InvalidRequest, format!("invalid request: {e}"))
    })?;
    if let Some(note) = &input.note {
        if note.chars().count() > 1000 {
            return Err(ApiError::with_message(
                ErrorCode::InvalidRequest,
                "note is longer than 1000 characters",
            ));
        }
    }
    Ok(input.note)
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct LimitQuery {
    /// At most this many entries (default 100, at most 1000).
    pub limit: Option<u64>,
}

/// The agent's production versions, newest first, with the deployment (production URL,
/// active version) and which versions are warm.
#[utoipa::path(
    get, path = "/api/agents/{id}/deployments/versions", tag = "versions",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), LimitQuery),
    responses((status = 200, body = VersionListDto), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
)]
pub async fn list_versions(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiQuery(q): ApiQuery<LimitQuery>,
) -> Result<Json<VersionListDto>, ApiError> {
    let engine = engine(&state)?;
    let agent = access.agent.id.clone();
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let (dep, versions) = state
        .store(move |s| Ok((s.get_deployment(&agent)?, s.list_versions(&agent, limit)?)))
        .await?;
    let live = engine.live_versions(&access.agent.id).await;
    let active = dep.as_ref().and_then(|d| d.active_version);
    Ok(Json(VersionListDto {
        deployment: dep.map(|d| deployment_dto(engine, d)),
        versions: versions
            .into_iter()
            .map(|v| version_dto(v, active, &live))
            .collect(),
    }))
}

/// Points the production URL at an older version. A warm instance switches at once; otherwise
/// a fresh instance boots from the version's release (start command only — no install, no
/// build), becomes ready, then the switch happens. The production route is untouched on error.
#[utoipa::path(
    post, path = "/api/agents/{id}/deployments/versions/{versionNumber}/rollback", tag = "versions",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), ("versionNumber" = i64, Path, description = "version to serve")),
    request_body(content = RouteChangeInput, description = "optional"),
    responses(
        (status = 200, body = RollbackDto),
        (status = 404, description = "agent_not_found, deployment_not_found or version_not_found", body = ErrorBody),
        (status = 503, description = "unavailable: the version's instance could not be started", body = ErrorBody),
    ),
)]
pub async fn rollback(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiPath(ids): ApiPath<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Json<RollbackDto>, ApiError> {
    let (_, raw) = ids;
    let n: i64 = raw.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
        ApiError::with_message(
            ErrorCode::VersionNotFound,
            format!("version {raw} not found"),
        )
    })?;
    let note = note_of(&body)?;
    let engine = engine(&state)?;
    let agent = access.agent.id.clone();
    let gate = crate::routes::gates::ActionGate::check(
        &state,
        &access,
        &headers,
        slipway_trust::GatedAction::Rollback,
        format!("version:{n}"),
    )
    .await?;
    let out = engine
        .rollback(&agent, Some(n), Some(access.caller.token_id.clone()), note)
        .await;
    gate.finish(&state, &access.caller, "rollback", &out).await;
    let out = out?;
    let dep = engine
        .deployment(&agent)
        .await?
        .ok_or_else(|| ApiError::internal("deployment vanished after a rollback"))?;
    let live = engine.live_versions(&agent).await;
    Ok(Json(RollbackDto {
        production_url: engine.production_url(&dep.slug),
        was_warm: out.warm,
        changed: out.change.is_some(),
        version: version_dto(out.version, dep.active_version, &live),
    }))
}

/// Makes a ready run (typically a preview) a new production version: same release, same
/// instance, no rebuild.
#[utoipa::path(
    post, path = "/api/agents/{id}/deployments/{runId}/promote", tag = "versions",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), ("runId" = String, Path, description = "a ready run")),
    request_body(content = RouteChangeInput, description = "optional"),
    responses(
        (status = 201, body = VersionDto),
        (status = 404, description = "agent_not_found or run_not_found", body = ErrorBody),
        (status = 409, description = "conflict: the run is not ready or has no release", body = ErrorBody),
    ),
)]
pub async fn promote(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiPath(ids): ApiPath<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<VersionDto>), ApiError> {
    let (_, raw) = ids;
    if !IdKind::Run.is_valid(&raw) {
        return Err(ApiError::with_message(
            ErrorCode::RunNotFound,
            format!("run {raw} not found"),
        ));
    }
    let note = note_of(&body)?;
    let engine = engine(&state)?;
    let agent = access.agent.id.clone();
    let gate = crate::routes::gates::ActionGate::check(
        &state,
        &access,
        &headers,
        slipway_trust::GatedAction::Promote,
        format!("run:{raw}"),
    )
    .await?;
    let v = engine
        .promote(&agent, &raw, Some(access.caller.token_id.clone()), note)
        .await;
    gate.finish(&state, &access.caller, "promote", &v).await;
    let v = v?;
    let live = engine.live_versions(&agent).await;
    let active = Some(v.version_number);
    Ok((StatusCode::CREATED, Json(version_dto(v, active, &live))))
}

/// Every change of the production route (deploy, promote, rollback, stop): who, when, why,
/// from which version to which. Newest first.
#[utoipa::path(
    get, path = "/api/agents/{id}/deployments/routes/history", tag = "versions",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), LimitQuery),
    responses((status = 200, body = RouteHistoryDto), (status = 404, body = ErrorBody)),
)]
pub async fn route_history(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiQuery(q): ApiQuery<LimitQuery>,
) -> Result<Json<RouteHistoryDto>, ApiError> {
    let agent = access.agent.id;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let changes = state.store(move |s| s.route_history(&agent, limit)).await?;
    Ok(Json(RouteHistoryDto {
        changes: changes.into_iter().map(Into::into).collect(),
    }))
}
