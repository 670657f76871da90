//! Runs (seed 004): start, list, read, stop, logs.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use slipway_core::{DeploymentTarget, IdKind};
use slipway_engine::{EngineError, Source, StartRequest};
use slipway_store::LogQuery;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::AgentAccess;
use crate::dto::{LogLineDto, LogsDto, RunDto, RunListDto};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::ApiPath;
use crate::json::JsonObject;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_runs))
        .routes(routes!(start_run))
        .routes(routes!(get_run))
        .routes(routes!(stop_run))
        .routes(routes!(get_logs))
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NoSpec { .. } => {
                ApiError::with_message(ErrorCode::SpecNotFound, e.to_string())
            }
            EngineError::Busy { .. } => ApiError::with_message(ErrorCode::Conflict, e.to_string()),
            EngineError::RunNotFound { .. } => {
                ApiError::with_message(ErrorCode::RunNotFound, e.to_string())
            }
            EngineError::SnapshotNotFound { .. } => {
                ApiError::with_message(ErrorCode::SnapshotNotFound, e.to_string())
            }
            EngineError::Store(s) => s.into(),
        }
    }
}

fn engine(state: &AppState) -> Result<&slipway_engine::Engine, ApiError> {
    state.engine.as_ref().ok_or_else(|| {
        ApiError::with_message(
            ErrorCode::Unavailable,
            "this server was started without a run engine",
        )
    })
}

fn run_id(raw: &str) -> Result<String, ApiError> {
    if IdKind::Run.is_valid(raw) {
        Ok(raw.to_string())
    } else {
        Err(ApiError::with_message(
            ErrorCode::RunNotFound,
            format!("run {raw} not found"),
        ))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// At most this many runs (default 50, at most 500).
    pub limit: Option<u64>,
}

/// The agent's runs, newest first.
#[utoipa::path(
    get, path = "/api/agents/{id}/deployments", tag = "deployments",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), ListQuery),
    responses((status = 200, body = RunListDto), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
)]
pub async fn list_runs(
    State(state): State<AppState>,
    access: AgentAccess,
    Query(q): Query<ListQuery>,
) -> Result<Json<RunListDto>, ApiError> {
    let agent = access.agent.id;
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let (runs, versions) = state
        .store(move |s| Ok((s.list_runs(&agent, limit)?, s.versions_by_run(&agent)?)))
        .await?;
    let runs = runs
        .into_iter()
        .map(|r| {
            let version_number = versions.get(&r.id).copied();
            RunDto {
                version_number,
                ..RunDto::from(r)
            }
        })
        .collect();
    Ok(Json(RunListDto { runs }))
}

/// Body of `POST …/deployments/start`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StartInput {
    /// `preview` or `production`; default: the spec's `targetDefault`.
    pub target: Option<String>,
    /// A free-text note kept with the run.
    pub note: Option<String>,
    /// Deploy this already-uploaded snapshot (content hash) instead of capturing `sourceDir`.
    pub snapshot: Option<String>,
}

/// Starts a new run in a fresh sandbox. Returns at once (202) with the `queued` run; the
/// pipeline continues in the background.
#[utoipa::path(
    post, path = "/api/agents/{id}/deployments/start", tag = "deployments",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id")),
    request_body = StartInput,
    responses(
        (status = 202, body = RunDto),
        (status = 400, body = ErrorBody),
        (status = 403, description = "gate_required (with gateId) for a gated target without a gate token; gate_token_invalid, gate_token_expired, gate_token_used or gate_token_mismatch", body = ErrorBody),
        (status = 404, description = "agent_not_found, spec_not_found or snapshot_not_found", body = ErrorBody),
        (status = 409, description = "conflict: another run of this agent is in its start pipeline", body = ErrorBody),
    ),
)]
pub async fn start_run(
    State(state): State<AppState>,
    access: AgentAccess,
    headers: axum::http::HeaderMap,
    JsonObject(body): JsonObject,
) -> Result<(StatusCode, Json<RunDto>), ApiError> {
    let input: StartInput =
        serde_json::from_value(serde_json::Value::Object(body)).map_err(|e| {
            ApiError::with_message(
                ErrorCode::InvalidRequest,
                format!("invalid start request: {e}"),
            )
        })?;
    let target = match input.target.as_deref() {
        None => None,
        Some(t) => Some(DeploymentTarget::parse(t).ok_or_else(|| {
            ApiError::with_message(
                ErrorCode::InvalidRequest,
                format!("target must be \"preview\" or \"production\", got {t:?}"),
            )
        })?),
    };
    if let Some(note) = &input.note {
        if note.chars().count() > 1000 {
            return Err(ApiError::with_message(
                ErrorCode::InvalidRequest,
                "note is longer than 1000 characters",
            ));
        }
    }
    let source = match input.snapshot {
        None => Source::SpecSourceDir,
        Some(h) if is_content_hash(&h) => Source::Snapshot(h),
        Some(h) => {
            return Err(ApiError::with_message(
                ErrorCode::InvalidRequest,
                format!("snapshot must be a content hash (64 lowercase hex characters), got {h:?}"),
            ))
        }
    };
    // Production (by policy) needs an approved gate; the token is consumed just before starting.
    let eng = engine(&state)?;
    let gate =
        crate::routes::gates::DeployGate::check(&state, &access, &headers, target, &source).await?;
    let started = eng
        .start(StartRequest {
            agent_id: access.agent.id.clone(),
            target,
            note: input.note,
            source,
            operator: Some(access.caller.token_id.clone()),
        })
        .await;
    let run = gate.started(&state, &access.caller, started).await?;
    Ok((StatusCode::ACCEPTED, Json(run.into())))
}

pub fn is_content_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One run.
#[utoipa::path(
    get, path = "/api/agents/{id}/deployments/{runId}", tag = "deployments",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), ("runId" = String, Path, description = "run id")),
    responses((status = 200, body = RunDto), (status = 404, description = "agent_not_found or run_not_found", body = ErrorBody)),
)]
pub async fn get_run(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiPath(ids): ApiPath<(String, String)>,
) -> Result<Json<RunDto>, ApiError> {
    let (_, raw) = ids;
    let id = run_id(&raw)?;
    let agent = access.agent.id;
    let run = state
        .store(move |s| s.get_run(&agent, &id))
        .await?
        .ok_or_else(|| {
            ApiError::with_message(ErrorCode::RunNotFound, format!("run {raw} not found"))
        })?;
    Ok(Json(run.into()))
}

/// Stops one run: cancels its pipeline if it is still in one, stops its app and destroys its
/// sandbox. Stopping a stopped run returns it unchanged.
#[utoipa::path(
    post, path = "/api/agents/{id}/deployments/{runId}/stop", tag = "deployments",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), ("runId" = String, Path, description = "run id")),
    responses((status = 200, body = RunDto), (status = 404, body = ErrorBody)),
)]
pub async fn stop_run(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiPath(ids): ApiPath<(String, String)>,
) -> Result<Json<RunDto>, ApiError> {
    let (_, raw) = ids;
    let id = run_id(&raw)?;
    let run = engine(&state)?.stop(&access.agent.id, &id).await?;
    let entry = slipway_trust::NewAuditEntry {
        agent_id: Some(access.agent.id.clone()),
        run_id: Some(run.id.clone()),
        target: Some(run.target.as_str().to_string()),
        ..crate::routes::audit::by(&access.caller, state.now(), "run.stop", run.status.as_str())
    };
    crate::routes::audit::record(&state, entry).await?;
    Ok(Json(run.into()))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct LogsQuery {
    /// Only lines after this line number.
    pub since: Option<u64>,
    /// Only the last N lines.
    pub tail: Option<u64>,
    /// At most this many lines (default 10,000).
    pub limit: Option<u64>,
    /// Only lines containing this text (case-sensitive, taken literally): a search of the
    /// run's history. Each line keeps its number.
    pub q: Option<String>,
}

/// A run's log: platform lines (`system`) and the commands' `stdout`/`stderr`, numbered from 1.
/// Readable while the run is going and after it ended; `q` searches it. With
/// `Accept: text/event-stream` the answer is the run's live stream (see `…/logs/stream`).
#[utoipa::path(
    get, path = "/api/agents/{id}/deployments/{runId}/logs", tag = "deployments",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), ("runId" = String, Path, description = "run id"), LogsQuery),
    responses(
        (status = 200, body = LogsDto),
        (status = 200, description = "with `Accept: text/event-stream`: the live stream", content_type = "text/event-stream", body = String),
        (status = 404, body = ErrorBody),
    ),
)]
pub async fn get_logs(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiPath(ids): ApiPath<(String, String)>,
    Query(q): Query<LogsQuery>,
    headers: axum::http::HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let (_, raw) = ids;
    if crate::routes::stream::wants_event_stream(&headers) {
        let since = crate::routes::stream::resume_point(&headers, q.since)?;
        return crate::routes::stream::sse_response(state, access.agent.id, raw, since).await;
    }
    let id = run_id(&raw)?;
    let agent = access.agent.id;
    let limit = q.limit.unwrap_or(10_000).clamp(1, 100_000);
    let query = LogQuery {
        since: q.since,
        tail: q.tail,
        limit: Some(limit),
        q: q.q.clone(),
    };
    let (run, lines, total) = state
        .store(move |s| {
            let run = s.get_run(&agent, &id)?;
            let lines = if run.is_some() {
                s.read_logs(&id, query)?
            } else {
                Vec::new()
            };
            let total = if run.is_some() { s.log_count(&id)? } else { 0 };
            Ok((run, lines, total))
        })
        .await?;
    let run = run.ok_or_else(|| {
        ApiError::with_message(ErrorCode::RunNotFound, format!("run {raw} not found"))
    })?;
    let next_since = lines.last().map(|l| l.line_no).or(q.since).unwrap_or(0);
    Ok(Json(LogsDto {
        run_id: run.id,
        status: run.status.as_str().to_string(),
        total_lines: total,
        next_since,
        lines: lines.into_iter().map(LogLineDto::from).collect(),
    })
    .into_response())
}
