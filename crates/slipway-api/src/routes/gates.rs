//! The deploy permission gate (seed 000): request → pending gate → approve or deny →
//! single-use token → the action consumes it → audit.
//!
//! Every gated action goes through one function, [`require`]. It answers:
//! - [`Grant::NotRequired`] when the policy does not gate the action;
//! - `403 gate_required` with the `gateId` of a pending gate opened (or already open) for
//!   exactly this binding when no token was sent;
//! - `403 gate_token_*` when the token sent in `X-Slipway-Gate-Token` is malformed, forged,
//!   expired, used, or granted for another agent, action, subject or target;
//! - [`Grant::Granted`] otherwise. The handler then calls [`Grant::consume`] right before it
//!   acts (atomic: of two concurrent consumers exactly one wins), and [`Grant::invalidate`] if the
//!   action fails or is cancelled, so a new approval is needed.
//!
//! The token is minted lazily: an approved gate gets its token the first time its requester
//! reads the gate (`GET /api/gates/{gateId}`), in that one answer; only its sha256 is stored.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use slipway_core::IdKind;
use slipway_trust::{token, Binding, GateRecord, GateState, GatedAction, UseError};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{new_id, AgentAccess, Caller};
use crate::dto::{GateDecisionInput, GateDto, GateListDto, GateRequestInput};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::{ApiPath, ApiQuery};
use crate::json::ApiJson;
use crate::routes::audit;
use crate::state::AppState;

/// The header that carries a gate token to a gated action.
pub const GATE_TOKEN_HEADER: &str = "x-slipway-gate-token";

/// Longest long-poll of `GET /api/gates/{gateId}?wait=N`, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(request_gate))
        .routes(routes!(list_gates))
        .routes(routes!(get_gate))
        .routes(routes!(approve_gate))
        .routes(routes!(deny_gate))
}

/// What the approver is shown besides the binding.
#[derive(Debug, Clone, Default)]
pub struct GateDetails {
    pub framework: Option<String>,
    pub build_command: Option<String>,
    /// The snapshot hash, when the subject is one (for the audit log).
    pub snapshot_hash: Option<String>,
}

/// The outcome of [`require`].
#[derive(Debug, Clone)]
pub enum Grant {
    /// The policy does not gate this action.
    NotRequired,
    /// A valid, approved, not yet consumed token for exactly this action.
    Granted {
        gate: Box<GateRecord>,
        token_hash: String,
    },
}

impl Grant {
    /// The gate behind the grant, if any.
    pub fn gate_id(&self) -> Option<&str> {
        match self {
            Grant::NotRequired => None,
            Grant::Granted { gate, .. } => Some(&gate.id),
        }
    }

    /// Consumes the token, atomically. Call right before acting.
    ///
    /// # Errors
    /// `gate_token_used` when another request consumed it first, `gate_token_expired` when it
    /// expired meanwhile.
    pub async fn consume(&self, state: &AppState) -> Result<(), ApiError> {
        let Grant::Granted { gate, token_hash } = self else {
            return Ok(());
        };
        let (id, hash, now) = (gate.id.clone(), token_hash.clone(), state.now());
        if state
            .store(move |s| s.consume_gate(&id, &hash, now))
            .await?
        {
            return Ok(());
        }
        let id = gate.id.clone();
        let current = state.store(move |s| s.get_gate(&id)).await?;
        Err(match current.map(|g| g.effective_state(now)) {
            Some(GateState::Expired) => ErrorCode::GateTokenExpired.into(),
            _ => ApiError::with_message(
                ErrorCode::GateTokenUsed,
                format!(
                    "the gate token of {} was already used; a new approval is needed",
                    gate.id
                ),
            ),
        })
    }

    /// Records what the consumed token was used for (a run id).
    pub async fn record_use(&self, state: &AppState, used_for: &str) {
        if let Grant::Granted { gate, .. } = self {
            let (id, what) = (gate.id.clone(), used_for.to_string());
            if let Err(e) = state.store(move |s| s.set_gate_use(&id, &what)).await {
                tracing::warn!(gate = %gate.id, error = %e, "could not record the gate's use");
            }
        }
    }

    /// The action failed or was cancelled: the token can never be used again, and a new
    /// approval is needed. Audited.
    pub async fn invalidate(&self, state: &AppState, reason: &str) {
        if let Grant::Granted { gate, .. } = self {
            invalidate_gate(
                state,
                gate.id.clone(),
                Some(gate.binding.agent_id.clone()),
                reason,
            )
            .await;
        }
    }
}

/// Invalidates a gate's token by gate id (also used when a run fails long after its start).
pub async fn invalidate_gate(
    state: &AppState,
    gate_id: String,
    agent_id: Option<String>,
    reason: &str,
) {
    let (id, why, now) = (gate_id.clone(), reason.to_string(), state.now());
    match state
        .store(move |s| s.invalidate_gate(&id, &why, now))
        .await
    {
        Ok(true) => {
            let entry = slipway_trust::NewAuditEntry {
                agent_id,
                gate_id: Some(gate_id),
                reason: Some(reason.to_string()),
                ..slipway_trust::NewAuditEntry::new(now, "system", None, "gate.invalidate", "ok")
            };
            audit::record_or_log(state, entry).await;
            state.trust.decided.notify_waiters();
        }
        Ok(false) => {}
        Err(e) => tracing::error!(gate = %gate_id, error = %e, "could not invalidate a gate"),
    }
}

fn use_error(e: UseError, gate_id: &str) -> ApiError {
    match e {
        UseError::Invalid => ErrorCode::GateTokenInvalid.into(),
        UseError::Expired => ApiError::with_message(
            ErrorCode::GateTokenExpired,
            format!("the gate token of {gate_id} has expired; request a new approval"),
        ),
        UseError::Used { state } => ApiError::with_message(
            ErrorCode::GateTokenUsed,
            format!("the gate token of {gate_id} was already used (gate is {state}); a new approval is needed"),
        ),
        UseError::NotApproved { state } => {
            ApiError::with_message(ErrorCode::GateTokenInvalid, format!("gate {gate_id} is {state}, not approved"))
        }
        e @ UseError::Mismatch { .. } => ApiError::with_message(ErrorCode::GateTokenMismatch, e.to_string()),
    }
}

/// The one gate check of every gated action. See the module documentation.
///
/// # Errors
/// `gate_required` (with `gateId`) without a token; `gate_token_invalid|expired|used|mismatch`
/// for a token that may not do this. Refusals of a presented token are audited.
pub async fn require(
    state: &AppState,
    caller: &Caller,
    binding: Binding,
    details: GateDetails,
    headers: &HeaderMap,
) -> Result<Grant, ApiError> {
    let presented = headers
        .get(GATE_TOKEN_HEADER)
        .map(|v| v.to_str().map(str::trim).unwrap_or("").to_string());
    if !state.trust.policy.requires_gate(binding.action) {
        return Ok(Grant::NotRequired);
    }
    let now = state.now();
    let Some(secret) = presented else {
        let gate = open_gate(state, caller, binding, details).await?;
        return Err(ApiError::gate_required(gate.id));
    };
    let refuse = |err: ApiError, gate_id: Option<String>| {
        let entry = slipway_trust::NewAuditEntry {
            agent_id: Some(binding.agent_id.clone()),
            target: Some(binding.target.clone()),
            snapshot_hash: details.snapshot_hash.clone(),
            reason: Some(format!("{}: {}", err.code.as_str(), err.message)),
            gate_id,
            ..audit::by(
                caller,
                now,
                &format!("{}.refused", binding.action.as_str()),
                "refused",
            )
        };
        (err, entry)
    };
    let found = if token::is_well_formed(&secret) {
        let hash = token::hash(&secret);
        state
            .store(move |s| s.find_gate_by_token_hash(&hash))
            .await?
    } else {
        None
    };
    let gate = match found {
        Some(g)
            if g.token_hash
                .as_deref()
                .is_some_and(|h| token::matches(&secret, h)) =>
        {
            g
        }
        _ => {
            let (err, entry) = refuse(ErrorCode::GateTokenInvalid.into(), None);
            audit::record(state, entry).await?;
            return Err(err);
        }
    };
    if let Err(e) = gate.check_use(&binding, now) {
        if e == UseError::Expired {
            let id = gate.id.clone();
            state.store(move |s| s.expire_gate(&id, now)).await?;
        }
        let (err, entry) = refuse(use_error(e, &gate.id), Some(gate.id.clone()));
        audit::record(state, entry).await?;
        return Err(err);
    }
    let token_hash = gate.token_hash.clone().unwrap_or_default();
    Ok(Grant::Granted {
        gate: Box::new(gate),
        token_hash,
    })
}

/// The pending gate for exactly this binding: an open one, or a new one. A new one is audited.
async fn open_gate(
    state: &AppState,
    caller: &Caller,
    binding: Binding,
    details: GateDetails,
) -> Result<GateRecord, ApiError> {
    let now = state.now();
    let b = binding.clone();
    if let Some(existing) = state.store(move |s| s.find_pending_gate(&b, now)).await? {
        return Ok(existing);
    }
    let gate = GateRecord {
        id: new_id(IdKind::Gate),
        warning: binding.action.warning().to_string(),
        binding,
        framework: details.framework,
        build_command: details.build_command,
        requested_by: caller.token_id.clone(),
        requested_by_kind: if caller.is_operator() {
            "operator"
        } else {
            "agent"
        }
        .to_string(),
        requested_at: now,
        state: GateState::Pending,
        decided_by: None,
        decided_at: None,
        reason: None,
        expires_at: now.saturating_add(state.trust.policy.request_ttl_ms),
        token_hash: None,
        token_issued_at: None,
        consumed_at: None,
        used_for: None,
    };
    let entry = slipway_trust::NewAuditEntry {
        agent_id: Some(gate.binding.agent_id.clone()),
        target: Some(gate.binding.target.clone()),
        snapshot_hash: details.snapshot_hash,
        gate_id: Some(gate.id.clone()),
        reason: Some(format!(
            "{} of {}",
            gate.binding.action.as_str(),
            gate.binding.subject
        )),
        ..audit::by(caller, now, "gate.request", "pending")
    };
    let g = gate.clone();
    state
        .store(move |s| {
            s.insert_gate(&g)?;
            s.append_audit(&entry).map(|_| ())
        })
        .await?;
    tracing::info!(gate = %gate.id, agent = %gate.binding.agent_id, action = gate.binding.action.as_str(), "gate requested");
    Ok(gate)
}

/// The production domain of an agent: its deployment's slug when it has one, else the slug
/// its spec's name will get.
///
/// # Errors
/// A store failure.
pub async fn production_domain(state: &AppState, agent_id: &str) -> Result<String, ApiError> {
    let a = agent_id.to_string();
    let (deployment, spec) = state
        .store(move |s| Ok((s.get_deployment(&a)?, s.get_spec(&a)?)))
        .await?;
    let slug = match (deployment, spec) {
        (Some(d), _) => d.slug,
        (None, Some(spec)) => slipway_engine::slugify(&spec.name),
        (None, None) => slipway_engine::slugify(agent_id),
    };
    Ok(format!("{slug}.{}", state.config.base_domain))
}

/// The details an approver sees for an agent's deploy: the spec's install and build commands.
///
/// # Errors
/// A store failure.
pub async fn deploy_details(
    state: &AppState,
    agent_id: &str,
    snapshot_hash: Option<String>,
) -> Result<GateDetails, ApiError> {
    let a = agent_id.to_string();
    let spec = state.store(move |s| s.get_spec(&a)).await?;
    let build_command = spec.as_ref().map(|s| {
        [s.install_command.trim(), s.build_command.trim()]
            .into_iter()
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>()
            .join(" && ")
    });
    let framework = spec
        .as_ref()
        .map(|s| describe_framework(&s.start_command, &s.build_command));
    Ok(GateDetails {
        framework,
        build_command,
        snapshot_hash,
    })
}

/// A best guess of the framework from the spec's commands (the requester may report a better
/// one when it asks for the gate).
fn describe_framework(start: &str, build: &str) -> String {
    let all = format!("{start} {build}");
    for (needle, name) in [
        ("next", "Next.js"),
        ("vite", "Vite"),
        ("astro", "Astro"),
        ("nuxt", "Nuxt"),
        ("gunicorn", "Python (gunicorn)"),
        ("uvicorn", "Python (uvicorn)"),
        ("flask", "Python (Flask)"),
        ("http.server", "static site"),
        ("node ", "Node.js"),
        ("npm ", "Node.js"),
        ("python", "Python"),
    ] {
        if all.contains(needle) {
            return name.to_string();
        }
    }
    "unknown".to_string()
}

fn gate_id(raw: &str) -> Result<String, ApiError> {
    if IdKind::Gate.is_valid(raw) {
        Ok(raw.to_string())
    } else {
        Err(ApiError::with_message(
            ErrorCode::GateNotFound,
            format!("gate {raw} not found"),
        ))
    }
}

/// Reads a gate the caller may see (an agent only its own; others answer 404 like missing ones).
async fn visible_gate(
    state: &AppState,
    caller: &Caller,
    raw: &str,
) -> Result<GateRecord, ApiError> {
    let id = gate_id(raw)?;
    let gate = state.store(move |s| s.get_gate(&id)).await?;
    match gate {
        Some(g) if caller.may_access(&g.binding.agent_id) => Ok(g),
        _ => Err(ApiError::with_message(
            ErrorCode::GateNotFound,
            format!("gate {raw} not found"),
        )),
    }
}

const SUBJECT_KINDS: [&str; 5] = ["snapshot:", "source:", "run:", "version:", "env:"];

/// Requests a gate for an action of this agent. Answers the pending gate already open for
/// exactly the same action, subject and target (200) or a new one (201).
#[utoipa::path(
    post, path = "/api/agents/{id}/gates", tag = "gates",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id")),
    request_body = GateRequestInput,
    responses(
        (status = 201, body = GateDto, description = "a new pending gate"),
        (status = 200, body = GateDto, description = "the pending gate already open for this action"),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody),
    ),
)]
pub async fn request_gate(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiJson(input): ApiJson<GateRequestInput>,
) -> Result<(StatusCode, Json<GateDto>), ApiError> {
    let action = GatedAction::parse(&input.action).ok_or_else(|| {
        let valid: Vec<&str> = GatedAction::ALL.iter().map(|a| a.as_str()).collect();
        ApiError::with_message(
            ErrorCode::InvalidRequest,
            format!(
                "action must be one of {}, got {:?}",
                valid.join(", "),
                input.action
            ),
        )
    })?;
    let agent_id = access.agent.id.clone();
    let subject = match input.subject {
        Some(s) => {
            if !SUBJECT_KINDS
                .iter()
                .any(|k| s.starts_with(k) && s.len() > k.len())
                || s.len() > 500
            {
                return Err(ApiError::with_message(
                    ErrorCode::InvalidRequest,
                    format!(
                        "subject must start with one of {} and name something, got {s:?}",
                        SUBJECT_KINDS.join(" ")
                    ),
                ));
            }
            s
        }
        None => {
            let a = agent_id.clone();
            match state.store(move |s| s.get_spec(&a)).await? {
                Some(spec) => format!("source:{}", spec.source_dir),
                None => return Err(ErrorCode::SpecNotFound.into()),
            }
        }
    };
    let target = match input.target {
        Some(t) if !t.trim().is_empty() && t.len() <= 253 => t.trim().to_string(),
        Some(_) => {
            return Err(ApiError::with_message(
                ErrorCode::InvalidRequest,
                "target must be a domain name",
            ))
        }
        None => production_domain(&state, &agent_id).await?,
    };
    let snapshot_hash = subject.strip_prefix("snapshot:").map(str::to_string);
    let mut details = deploy_details(&state, &agent_id, snapshot_hash).await?;
    if let Some(f) = input.framework.filter(|f| !f.trim().is_empty()) {
        details.framework = Some(f.chars().take(100).collect());
    }
    let binding = Binding {
        agent_id,
        action,
        subject,
        target,
    };
    let now = state.now();
    let b = binding.clone();
    let existed = state
        .store(move |s| s.find_pending_gate(&b, now))
        .await?
        .is_some();
    let gate = open_gate(&state, &access.caller, binding, details).await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(GateDto::at(gate, now))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GateListQuery {
    /// Only gates in this state.
    pub state: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<u64>,
}

/// Gates, pending first, then newest first. Operators see every agent's; an agent its own.
#[utoipa::path(
    get, path = "/api/gates", tag = "gates",
    security(("bearer" = [])),
    params(GateListQuery),
    responses((status = 200, body = GateListDto), (status = 401, body = ErrorBody)),
)]
pub async fn list_gates(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<GateListQuery>,
) -> Result<Json<GateListDto>, ApiError> {
    let agent = caller.agent_id().map(str::to_string);
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let gates = state
        .store(move |s| s.list_gates(agent.as_deref(), limit))
        .await?;
    let now = state.now();
    let mut out: Vec<GateDto> = gates.into_iter().map(|g| GateDto::at(g, now)).collect();
    // A lapsed pending gate reads as expired: keep the still-pending ones first.
    out.sort_by_key(|g| g.state != "pending");
    if let Some(want) = q.state {
        out.retain(|g| g.state == want);
    }
    Ok(Json(GateListDto { gates: out }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GateGetQuery {
    /// Long-poll: wait up to this many seconds (at most 60) while the gate is pending.
    pub wait: Option<u64>,
}

/// One gate. The requester's first read after approval carries the single-use `token`; with
/// `?wait=N` a pending gate is answered as soon as it is decided (or after N seconds).
#[utoipa::path(
    get, path = "/api/gates/{gateId}", tag = "gates",
    security(("bearer" = [])),
    params(("gateId" = String, Path, description = "gate id"), GateGetQuery),
    responses((status = 200, body = GateDto), (status = 404, body = ErrorBody)),
)]
pub async fn get_gate(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
    ApiQuery(q): ApiQuery<GateGetQuery>,
) -> Result<Json<GateDto>, ApiError> {
    let mut gate = visible_gate(&state, &caller, &raw).await?;
    if let Some(wait) = q.wait.filter(|w| *w > 0) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.min(MAX_WAIT_SECS));
        while gate.effective_state(state.now()) == GateState::Pending {
            let notified = state.trust.decided.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-read after registering, so a decision in between is not missed.
            gate = visible_gate(&state, &caller, &raw).await?;
            if gate.effective_state(state.now()) != GateState::Pending {
                break;
            }
            // Wake at least every second: a pending gate may lapse with no one deciding it.
            let step = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            if tokio::time::timeout_at(step, notified).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                break;
            }
            gate = visible_gate(&state, &caller, &raw).await?;
        }
    }
    let now = state.now();
    let mut token_secret = None;
    if gate.effective_state(now) == GateState::Approved
        && gate.token_hash.is_none()
        && gate.requested_by == caller.token_id
    {
        let minted = token::mint(rand::random());
        let (id, hash) = (gate.id.clone(), minted.hash.clone());
        if state
            .store(move |s| s.issue_gate_token(&id, &hash, now))
            .await?
        {
            let entry = slipway_trust::NewAuditEntry {
                agent_id: Some(gate.binding.agent_id.clone()),
                target: Some(gate.binding.target.clone()),
                gate_id: Some(gate.id.clone()),
                reason: Some(format!(
                    "single-use token for {} of {}",
                    gate.binding.action.as_str(),
                    gate.binding.subject
                )),
                ..audit::by(&caller, now, "gate.token.create", "ok")
            };
            audit::record(&state, entry).await?;
            gate.token_hash = Some(minted.hash);
            gate.token_issued_at = Some(now);
            token_secret = Some(minted.secret);
        } else {
            let id = gate.id.clone();
            gate = state
                .store(move |s| s.get_gate(&id))
                .await?
                .ok_or(ErrorCode::GateNotFound)?;
        }
    }
    let mut dto = GateDto::at(gate, now);
    dto.token = token_secret;
    Ok(Json(dto))
}

/// Approves a pending gate (operator only; an agent can never approve a gate, its own
/// included). The requester then reads the single-use token from `GET /api/gates/{gateId}`.
#[utoipa::path(
    post, path = "/api/gates/{gateId}/approve", tag = "gates",
    security(("bearer" = [])),
    params(("gateId" = String, Path, description = "gate id")),
    responses(
        (status = 200, body = GateDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "gate_not_pending: denied, expired, already approved, …", body = ErrorBody),
    ),
)]
pub async fn approve_gate(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<GateDto>, ApiError> {
    decide(&state, caller, &raw, GateState::Approved, None).await
}

/// Denies a pending gate (operator only), with an optional `reason`.
#[utoipa::path(
    post, path = "/api/gates/{gateId}/deny", tag = "gates",
    security(("bearer" = [])),
    params(("gateId" = String, Path, description = "gate id")),
    request_body(content = GateDecisionInput, description = "optional"),
    responses(
        (status = 200, body = GateDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody),
    ),
)]
pub async fn deny_gate(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<GateDto>, ApiError> {
    let input: GateDecisionInput = if body.iter().all(u8::is_ascii_whitespace) {
        GateDecisionInput::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::with_message(
                ErrorCode::InvalidRequest,
                format!("invalid deny request: {e}"),
            )
        })?
    };
    let reason = input
        .reason
        .map(|r| r.trim().chars().take(1000).collect::<String>())
        .filter(|r| !r.is_empty());
    decide(&state, caller, &raw, GateState::Denied, reason).await
}

async fn decide(
    state: &AppState,
    caller: Caller,
    raw: &str,
    to: GateState,
    reason: Option<String>,
) -> Result<Json<GateDto>, ApiError> {
    let verb = if to == GateState::Approved {
        "approve"
    } else {
        "deny"
    };
    let gate = visible_gate(state, &caller, raw).await?;
    if !caller.is_operator() {
        let now = state.now();
        let entry = slipway_trust::NewAuditEntry {
            agent_id: Some(gate.binding.agent_id.clone()),
            gate_id: Some(gate.id.clone()),
            reason: Some("an agent token may not decide gates".into()),
            ..audit::by(&caller, now, &format!("gate.{verb}"), "refused")
        };
        audit::record(state, entry).await?;
        return Err(ApiError::with_message(
            ErrorCode::Forbidden,
            format!("only an operator can {verb} a gate; an agent can never {verb} a gate, its own included"),
        ));
    }
    let operator = caller;
    let now = state.now();
    let current = gate.effective_state(now);
    if current != GateState::Pending {
        if current == GateState::Expired && gate.state == GateState::Pending {
            let id = gate.id.clone();
            state.store(move |s| s.expire_gate(&id, now)).await?;
        }
        return Err(ApiError::with_message(
            ErrorCode::GateNotPending,
            format!("gate {} is {current}; it can no longer be {verb}d", gate.id),
        ));
    }
    let expires_at = if to == GateState::Approved {
        now.saturating_add(state.trust.policy.token_ttl_ms)
    } else {
        gate.expires_at
    };
    let (id, by, why) = (gate.id.clone(), operator.token_id.clone(), reason.clone());
    let decided = state
        .store(move |s| s.decide_gate(&id, to, &by, why.as_deref(), expires_at, now))
        .await?;
    let id = gate.id.clone();
    let after = state
        .store(move |s| s.get_gate(&id))
        .await?
        .ok_or(ErrorCode::GateNotFound)?;
    if !decided {
        return Err(ApiError::with_message(
            ErrorCode::GateNotPending,
            format!(
                "gate {} is {}; it can no longer be {verb}d",
                after.id,
                after.effective_state(now)
            ),
        ));
    }
    let entry = slipway_trust::NewAuditEntry {
        agent_id: Some(after.binding.agent_id.clone()),
        target: Some(after.binding.target.clone()),
        snapshot_hash: after
            .binding
            .subject
            .strip_prefix("snapshot:")
            .map(str::to_string),
        gate_id: Some(after.id.clone()),
        reason: Some(match &reason {
            Some(r) => format!(
                "{} of {}: {r}",
                after.binding.action.as_str(),
                after.binding.subject
            ),
            None => format!(
                "{} of {}",
                after.binding.action.as_str(),
                after.binding.subject
            ),
        }),
        ..audit::by(
            &operator,
            now,
            &format!("gate.{verb}"),
            if to == GateState::Approved {
                "approved"
            } else {
                "denied"
            },
        )
    };
    audit::record(state, entry).await?;
    state.trust.decided.notify_waiters();
    tracing::info!(gate = %after.id, decision = verb, "gate decided");
    Ok(Json(GateDto::at(after, now)))
}

/// The gate check of `POST …/deployments/start`, and what happens around the start: the token
/// is consumed right before the run is created; a refused start invalidates it; a run that later
/// fails or is cancelled invalidates it too; every step is audited.
pub struct DeployGate {
    grant: Grant,
    /// Subscribed before the start, so no status change of the new run is missed.
    events: Option<slipway_engine::events::Subscription>,
    agent_id: String,
    target: String,
    snapshot_hash: Option<String>,
}

impl DeployGate {
    /// Resolves the target (`None`: the spec's default), checks the gate when the policy gates
    /// it, and consumes the token.
    ///
    /// # Errors
    /// See [`require`] and [`Grant::consume`].
    pub async fn check(
        state: &AppState,
        access: &AgentAccess,
        headers: &HeaderMap,
        target: Option<slipway_core::DeploymentTarget>,
        source: &slipway_engine::Source,
    ) -> Result<Self, ApiError> {
        let agent_id = access.agent.id.clone();
        let a = agent_id.clone();
        let spec = state.store(move |s| s.get_spec(&a)).await?;
        let snapshot_hash = match source {
            slipway_engine::Source::Snapshot(h) => Some(h.clone()),
            slipway_engine::Source::SpecSourceDir => None,
        };
        let events = state.engine.as_ref().map(|e| e.events().subscribe());
        // Without a spec the engine answers spec_not_found; there is nothing to gate yet.
        let Some(spec) = spec else {
            return Ok(Self {
                grant: Grant::NotRequired,
                events,
                agent_id,
                target: "preview".into(),
                snapshot_hash,
            });
        };
        let (action, domain) = match target.unwrap_or(spec.target_default) {
            slipway_core::DeploymentTarget::Production => (
                GatedAction::ProductionDeploy,
                production_domain(state, &agent_id).await?,
            ),
            slipway_core::DeploymentTarget::Preview => {
                (GatedAction::PreviewDeploy, "preview".to_string())
            }
        };
        let subject = match &snapshot_hash {
            Some(h) => format!("snapshot:{h}"),
            None => format!("source:{}", spec.source_dir),
        };
        let details = deploy_details(state, &agent_id, snapshot_hash.clone()).await?;
        let binding = Binding {
            agent_id: agent_id.clone(),
            action,
            subject,
            target: domain.clone(),
        };
        let grant = require(state, &access.caller, binding, details, headers).await?;
        grant.consume(state).await?;
        Ok(Self {
            grant,
            events,
            agent_id,
            target: domain,
            snapshot_hash,
        })
    }

    /// Records the start (or its refusal) and follows the run to invalidate the token if it
    /// fails.
    ///
    /// # Errors
    /// The engine's refusal, converted by the error table.
    pub async fn started(
        self,
        state: &AppState,
        caller: &Caller,
        started: Result<slipway_store::RunRecord, slipway_engine::EngineError>,
    ) -> Result<slipway_store::RunRecord, ApiError> {
        let now = state.now();
        let gate_id = self.grant.gate_id().map(str::to_string);
        match started {
            Ok(run) => {
                self.grant.record_use(state, &run.id).await;
                let entry = slipway_trust::NewAuditEntry {
                    agent_id: Some(run.agent_id.clone()),
                    target: Some(self.target.clone()),
                    snapshot_hash: self.snapshot_hash.clone(),
                    gate_id: gate_id.clone(),
                    run_id: Some(run.id.clone()),
                    reason: Some(format!("{} deploy", run.target.as_str())),
                    ..audit::by(caller, now, "deploy.start", "ok")
                };
                audit::record_or_log(state, entry).await;
                if let Some(events) = self.events {
                    tokio::spawn(watch_run(
                        state.clone(),
                        events,
                        run.clone(),
                        gate_id,
                        self.target,
                    ));
                }
                Ok(run)
            }
            Err(e) => {
                let err: ApiError = e.into();
                self.grant
                    .invalidate(state, &format!("the deploy was refused: {}", err.message))
                    .await;
                let entry = slipway_trust::NewAuditEntry {
                    agent_id: Some(self.agent_id),
                    target: Some(self.target),
                    snapshot_hash: self.snapshot_hash,
                    gate_id,
                    reason: Some(format!("{}: {}", err.code.as_str(), err.message)),
                    ..audit::by(caller, now, "deploy.start", "refused")
                };
                audit::record_or_log(state, entry).await;
                Err(err)
            }
        }
    }
}

/// Follows one run until it is ready or has failed: audits the outcome; a failed or cancelled
/// run invalidates its gate's token.
async fn watch_run(
    state: AppState,
    mut events: slipway_engine::events::Subscription,
    run: slipway_store::RunRecord,
    gate_id: Option<String>,
    target: String,
) {
    use slipway_core::DeploymentStatus;
    use slipway_engine::events::Delivery;
    use slipway_engine::Event;
    let settled = loop {
        let update = match events.recv().await {
            None => return,
            Some(Delivery::Event(ev)) => match &*ev {
                Event::RunUpdate(r) if r.id == run.id => Some(r.clone()),
                _ => None,
            },
            Some(Delivery::Resync { .. }) => {
                let (a, r) = (run.agent_id.clone(), run.id.clone());
                state.store(move |s| s.get_run(&a, &r)).await.ok().flatten()
            }
        };
        if let Some(r) = update.filter(|r| r.status.is_settled()) {
            break r;
        }
    };
    drop(events);
    let snapshot_hash = match &settled.snapshot_id {
        Some(id) => {
            let (a, i) = (settled.agent_id.clone(), id.clone());
            state
                .store(move |s| s.get_snapshot(&a, &i))
                .await
                .ok()
                .flatten()
                .map(|s| s.content_hash)
        }
        None => None,
    };
    let failed = settled.status != DeploymentStatus::Ready;
    let reason = settled
        .error
        .clone()
        .unwrap_or_else(|| settled.status.as_str().to_string());
    let entry = slipway_trust::NewAuditEntry {
        agent_id: Some(settled.agent_id.clone()),
        target: Some(target),
        snapshot_hash,
        gate_id: gate_id.clone(),
        run_id: Some(settled.id.clone()),
        reason: if failed {
            Some(reason.clone())
        } else {
            settled.url.clone()
        },
        ..slipway_trust::NewAuditEntry::new(
            state.now(),
            "system",
            None,
            if failed {
                "deploy.failed"
            } else {
                "deploy.ready"
            },
            if failed { "failed" } else { "ok" },
        )
    };
    audit::record_or_log(&state, entry).await;
    if failed {
        if let Some(id) = gate_id {
            invalidate_gate(
                &state,
                id,
                Some(settled.agent_id),
                &format!("the deploy failed: {reason}"),
            )
            .await;
        }
    }
}

/// The gate check of a synchronous gated action on the production target (promote, rollback):
/// [`ActionGate::check`] before acting (gate required, token checked and consumed),
/// [`ActionGate::finish`] after (audit; a failed action invalidates the token).
///
/// ```ignore
/// let gate = ActionGate::check(&state, &access, &headers, GatedAction::Rollback, format!("version:{n}")).await?;
/// let out = engine.rollback(…).await;
/// gate.finish(&state, &access.caller, "rollback", &out).await;
/// let out = out?;
/// ```
pub struct ActionGate {
    grant: Grant,
    binding: Binding,
}

impl ActionGate {
    /// # Errors
    /// See [`require`] and [`Grant::consume`].
    pub async fn check(
        state: &AppState,
        access: &AgentAccess,
        headers: &HeaderMap,
        action: GatedAction,
        subject: String,
    ) -> Result<Self, ApiError> {
        let agent_id = access.agent.id.clone();
        let target = production_domain(state, &agent_id).await?;
        let details = deploy_details(state, &agent_id, None).await?;
        let binding = Binding {
            agent_id,
            action,
            subject,
            target,
        };
        let grant = require(state, &access.caller, binding.clone(), details, headers).await?;
        grant.consume(state).await?;
        Ok(Self { grant, binding })
    }

    /// Audits the action's outcome (`<what>` with `ok` or `failed`) and, when it failed,
    /// invalidates the token.
    pub async fn finish<T, E: std::fmt::Display>(
        self,
        state: &AppState,
        caller: &Caller,
        what: &str,
        result: &Result<T, E>,
    ) {
        let now = state.now();
        let failure = result.as_ref().err().map(ToString::to_string);
        if let Some(reason) = &failure {
            self.grant
                .invalidate(state, &format!("the {what} failed: {reason}"))
                .await;
        } else if let Some(id) = self.grant.gate_id() {
            self.grant.record_use(state, &self.binding.subject).await;
            tracing::info!(gate = id, what, "gated action done");
        }
        let entry = slipway_trust::NewAuditEntry {
            agent_id: Some(self.binding.agent_id.clone()),
            target: Some(self.binding.target.clone()),
            gate_id: self.grant.gate_id().map(str::to_string),
            run_id: self
                .binding
                .subject
                .strip_prefix("run:")
                .map(str::to_string),
            reason: Some(match &failure {
                Some(r) => format!("{}: {r}", self.binding.subject),
                None => self.binding.subject.clone(),
            }),
            ..audit::by(
                caller,
                now,
                what,
                if failure.is_some() { "failed" } else { "ok" },
            )
        };
        audit::record_or_log(state, entry).await;
    }
}
