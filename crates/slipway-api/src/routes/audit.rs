//! The audit log: `GET /api/audit` (filters and paging) and `GET /api/audit/verify` (the hash
//! chain), plus [`record`], which every privileged route calls.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use slipway_store::AuditQuery;
use slipway_trust::NewAuditEntry;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Caller, Operator};
use crate::dto::{AuditBadEntryDto, AuditEntryDto, AuditListDto, AuditVerifyDto};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::ApiQuery;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_audit))
        .routes(routes!(verify_audit))
}

/// An entry whose actor is `caller` (its token id and kind).
pub fn by(caller: &Caller, now: i64, action: &str, outcome: &str) -> NewAuditEntry {
    let kind = if caller.is_operator() {
        "operator"
    } else {
        "agent"
    };
    NewAuditEntry::new(now, kind, Some(&caller.token_id), action, outcome)
}

/// Appends an entry to the audit log.
///
/// # Errors
/// The store failed; the caller should not report the action as done.
pub async fn record(state: &AppState, entry: NewAuditEntry) -> Result<(), ApiError> {
    state.store(move |s| s.append_audit(&entry)).await?;
    Ok(())
}

/// Appends an entry, logging rather than failing (for outcomes reported after the fact).
pub async fn record_or_log(state: &AppState, entry: NewAuditEntry) {
    let action = entry.action.clone();
    if let Err(e) = record(state, entry).await {
        tracing::error!(action, error = %e, "could not write an audit entry");
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditListQuery {
    /// Only this agent's entries (an agent token always sees only its own).
    pub agent: Option<String>,
    /// Only this action (`deploy.start`), or a family ending in `.` (`gate.`).
    pub action: Option<String>,
    /// Only entries at or after this time (ms since the epoch).
    pub since: Option<i64>,
    /// Only entries before this time (ms since the epoch).
    pub until: Option<i64>,
    /// Paging: only entries with a smaller `seq` (the previous page's `nextBefore`).
    pub before: Option<u64>,
    /// At most this many entries (default 100, at most 1000).
    pub limit: Option<u64>,
}

/// Audit entries, newest first. Operators see every entry; an agent token sees its agent's.
#[utoipa::path(
    get, path = "/api/audit", tag = "audit",
    security(("bearer" = [])),
    params(AuditListQuery),
    responses((status = 200, body = AuditListDto), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)),
)]
pub async fn list_audit(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<AuditListQuery>,
) -> Result<Json<AuditListDto>, ApiError> {
    let agent_id = match caller.agent_id() {
        Some(own) => {
            if q.agent.as_deref().is_some_and(|a| a != own) {
                return Ok(Json(AuditListDto {
                    entries: Vec::new(),
                    next_before: None,
                }));
            }
            Some(own.to_string())
        }
        None => q.agent.clone(),
    };
    if let (Some(s), Some(u)) = (q.since, q.until) {
        if s > u {
            return Err(ApiError::with_message(
                ErrorCode::InvalidRequest,
                "since must not be after until",
            ));
        }
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let query = AuditQuery {
        agent_id,
        action: q.action,
        since: q.since,
        until: q.until,
        before: q.before,
        limit,
    };
    let entries = state.store(move |s| s.list_audit(&query)).await?;
    let next_before = if entries.len() as u64 == limit {
        entries.last().map(|e| e.seq)
    } else {
        None
    };
    Ok(Json(AuditListDto {
        entries: entries.into_iter().map(AuditEntryDto::from).collect(),
        next_before,
    }))
}

/// Verifies the whole audit chain (operator): every entry's hash, every link, no gap, no
/// missing tail. Answers 200 either way; `firstBad` names the first bad entry.
#[utoipa::path(
    get, path = "/api/audit/verify", tag = "audit",
    security(("bearer" = [])),
    responses((status = 200, body = AuditVerifyDto), (status = 403, body = ErrorBody)),
)]
pub async fn verify_audit(
    State(state): State<AppState>,
    _op: Operator,
) -> Result<Json<AuditVerifyDto>, ApiError> {
    let (entries, head) = state.store(|s| s.audit_chain()).await?;
    let result =
        slipway_trust::verify_chain(&entries, head.as_ref().map(|(s, h)| (*s, h.as_str())));
    Ok(Json(match result {
        Ok(n) => AuditVerifyDto {
            ok: true,
            entries: n,
            head_hash: entries.last().map(|e| e.hash.clone()),
            first_bad: None,
        },
        Err(e) => AuditVerifyDto {
            ok: false,
            entries: entries.len() as u64,
            head_hash: head.map(|(_, h)| h),
            first_bad: Some(AuditBadEntryDto {
                seq: e.seq,
                reason: e.reason,
            }),
        },
    }))
}
