//! Agents: created and listed by the operator; each agent may read itself.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use slipway_core::{AgentName, IdKind};
use slipway_store::{Agent, TokenKind};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{mint_token, new_id, AgentAccess, Operator};
use crate::dto::{AgentDto, AgentListDto, CreateAgentRequest, CreatedAgentDto};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::json::ApiJson;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_agent, list_agents))
        .routes(routes!(get_agent))
}

/// Creates an agent and its API token (operator only). The token is in this response only.
#[utoipa::path(
    post, path = "/api/agents", tag = "agents",
    security(("bearer" = [])),
    request_body = CreateAgentRequest,
    responses(
        (status = 201, body = CreatedAgentDto),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody),
    ),
)]
pub async fn create_agent(
    State(state): State<AppState>,
    Operator(operator): Operator,
    ApiJson(req): ApiJson<CreateAgentRequest>,
) -> Result<(StatusCode, Json<CreatedAgentDto>), ApiError> {
    let name = AgentName::parse(&req.name)
        .map_err(|m| ApiError::with_message(ErrorCode::InvalidRequest, m))?;
    let now = state.now();
    let agent = Agent {
        id: new_id(IdKind::Agent),
        name: name.as_str().to_string(),
        created_at: now,
    };
    let token = mint_token(TokenKind::Agent, Some(agent.id.clone()), now);
    let token_id = token.record.id.clone();
    let (stored, record) = (agent.clone(), token.record);
    state
        .store(move |s| {
            s.insert_agent(&stored)?;
            s.insert_token(&record)
        })
        .await?;
    tracing::info!(agent_id = %agent.id, "agent created");
    let entry = slipway_trust::NewAuditEntry {
        agent_id: Some(agent.id.clone()),
        target: Some(token_id.clone()),
        reason: Some(format!(
            "agent {:?} and its agent token {token_id}",
            agent.name
        )),
        ..crate::routes::audit::by(&operator, now, "token.create", "ok")
    };
    crate::routes::audit::record(&state, entry).await?;
    let dto = CreatedAgentDto {
        id: agent.id,
        name: agent.name,
        token: token.secret,
        created_at: agent.created_at,
    };
    Ok((StatusCode::CREATED, Json(dto)))
}

/// Lists every agent (operator only).
#[utoipa::path(
    get, path = "/api/agents", tag = "agents",
    security(("bearer" = [])),
    responses((status = 200, body = AgentListDto), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
)]
pub async fn list_agents(
    State(state): State<AppState>,
    _operator: Operator,
) -> Result<Json<AgentListDto>, ApiError> {
    let agents = state.store(|s| s.list_agents()).await?;
    Ok(Json(AgentListDto {
        agents: agents.into_iter().map(AgentDto::from).collect(),
    }))
}

/// One agent (the operator, or the agent itself).
#[utoipa::path(
    get, path = "/api/agents/{id}", tag = "agents",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id")),
    responses((status = 200, body = AgentDto), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
)]
pub async fn get_agent(access: AgentAccess) -> Json<AgentDto> {
    Json(access.agent.into())
}
