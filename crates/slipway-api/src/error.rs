//! The API's one error table: every error a client can see has a code, a status and a default
//! message, decided in exactly one `match` each.
//!
//! Handlers return [`ApiError`]; axum's own rejections (JSON, path, body size) are converted
//! here so that no response ever leaves the API as plain text or with an internal detail.

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use slipway_store::StoreError;
use utoipa::ToSchema;

/// Every error code of the API. Adding a variant forces a decision in each table below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No token, a malformed token, an unknown token or a revoked one.
    Unauthorized,
    /// A valid token that may not do this (an agent token on an operator route).
    Forbidden,
    /// The agent does not exist, or the caller may not see it (the two are indistinguishable).
    AgentNotFound,
    /// The agent has no deployment spec yet.
    SpecNotFound,
    /// The run does not exist for this agent.
    RunNotFound,
    /// The snapshot (content hash) does not exist for this agent.
    SnapshotNotFound,
    /// An uploaded snapshot was refused: its content does not hash to the claimed hash, or an
    /// entry breaks a rule (path traversal, special file, size).
    InvalidSnapshot,
    /// A route that does not exist.
    NotFound,
    /// A route that exists, with another method.
    MethodNotAllowed,
    /// The body is not JSON at all (syntax, encoding, not an object).
    InvalidJson,
    /// A well-formed spec that breaks a rule, has a field of the wrong type, or an unknown field.
    InvalidSpec,
    /// Any other well-formed body or parameter that breaks a rule.
    InvalidRequest,
    /// The body is larger than the route accepts.
    PayloadTooLarge,
    /// The body is not declared as JSON.
    UnsupportedMediaType,
    /// The request conflicts with the current state (e.g. a run already in progress).
    Conflict,
    /// The server is not able to do this right now (e.g. a component is not configured).
    Unavailable,
    /// A bug or an I/O failure on the server; details are only in the server log.
    Internal,
    /// The server's disk (or the data directory's quota) is full: nothing was stored.
    InsufficientStorage,
    /// A gated action was called without a gate token; the body's `gateId` names the pending
    /// gate opened for exactly this action.
    GateRequired,
    /// The gate token is malformed, truncated or forged: it belongs to no gate.
    GateTokenInvalid,
    /// The gate token's approval has expired.
    GateTokenExpired,
    /// The gate token was already used (or invalidated by a failed action).
    GateTokenUsed,
    /// The gate token was granted for another agent, action, subject or target.
    GateTokenMismatch,
    /// The gate does not exist, or the caller may not see it.
    GateNotFound,
    /// The gate is no longer pending (approved, denied, expired, …): it cannot be decided.
    GateNotPending,
    /// The agent has no production deployment yet (nothing was deployed to production).
    DeploymentNotFound,
    /// The version number does not exist in the agent's deployment.
    VersionNotFound,
}

impl ErrorCode {
    /// Every code, for tables in documentation and tests.
    pub const ALL: [ErrorCode; 27] = [
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::AgentNotFound,
        ErrorCode::SpecNotFound,
        ErrorCode::RunNotFound,
        ErrorCode::SnapshotNotFound,
        ErrorCode::InvalidSnapshot,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::InvalidJson,
        ErrorCode::InvalidSpec,
        ErrorCode::InvalidRequest,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::Conflict,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::InsufficientStorage,
        ErrorCode::GateRequired,
        ErrorCode::GateTokenInvalid,
        ErrorCode::GateTokenExpired,
        ErrorCode::GateTokenUsed,
        ErrorCode::GateTokenMismatch,
        ErrorCode::GateNotFound,
        ErrorCode::GateNotPending,
        ErrorCode::DeploymentNotFound,
        ErrorCode::VersionNotFound,
    ];

    /// The `code` field of the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::AgentNotFound => "agent_not_found",
            ErrorCode::SpecNotFound => "spec_not_found",
            ErrorCode::RunNotFound => "run_not_found",
            ErrorCode::SnapshotNotFound => "snapshot_not_found",
            ErrorCode::InvalidSnapshot => "invalid_snapshot",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidSpec => "invalid_spec",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::InsufficientStorage => "insufficient_storage",
            ErrorCode::GateRequired => "gate_required",
            ErrorCode::GateTokenInvalid => "gate_token_invalid",
            ErrorCode::GateTokenExpired => "gate_token_expired",
            ErrorCode::GateTokenUsed => "gate_token_used",
            ErrorCode::GateTokenMismatch => "gate_token_mismatch",
            ErrorCode::GateNotFound => "gate_not_found",
            ErrorCode::GateNotPending => "gate_not_pending",
            ErrorCode::DeploymentNotFound => "deployment_not_found",
            ErrorCode::VersionNotFound => "version_not_found",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::AgentNotFound
            | ErrorCode::SpecNotFound
            | ErrorCode::RunNotFound
            | ErrorCode::SnapshotNotFound
            | ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::InvalidJson => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidSpec | ErrorCode::InvalidRequest | ErrorCode::InvalidSnapshot => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ErrorCode::GateRequired
            | ErrorCode::GateTokenInvalid
            | ErrorCode::GateTokenExpired
            | ErrorCode::GateTokenUsed
            | ErrorCode::GateTokenMismatch => StatusCode::FORBIDDEN,
            ErrorCode::GateNotFound => StatusCode::NOT_FOUND,
            ErrorCode::GateNotPending => StatusCode::CONFLICT,
            ErrorCode::DeploymentNotFound | ErrorCode::VersionNotFound => StatusCode::NOT_FOUND,
        }
    }

    pub fn default_message(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "a valid API token is required: send `Authorization: Bearer <token>`",
            ErrorCode::Forbidden => "this token may not do that: an operator token is required",
            ErrorCode::AgentNotFound => "agent not found",
            ErrorCode::SpecNotFound => "this agent has no deployment spec yet: PUT one to /api/agents/{id}/deployments/spec",
            ErrorCode::RunNotFound => "run not found",
            ErrorCode::SnapshotNotFound => "snapshot not found for this agent: upload it first",
            ErrorCode::InvalidSnapshot => "the snapshot archive was refused",
            ErrorCode::NotFound => "no such route",
            ErrorCode::MethodNotAllowed => "this route does not accept that method",
            ErrorCode::InvalidJson => "the request body is not valid JSON",
            ErrorCode::InvalidSpec => "the deployment spec is invalid",
            ErrorCode::InvalidRequest => "the request is invalid",
            ErrorCode::PayloadTooLarge => "the request body is too large",
            ErrorCode::UnsupportedMediaType => "the request body must be JSON: send `Content-Type: application/json`",
            ErrorCode::Conflict => "the request conflicts with the current state",
            ErrorCode::Unavailable => "the server cannot do this right now",
            ErrorCode::Internal => "internal server error",
            ErrorCode::InsufficientStorage => "the server is out of disk space, so nothing was stored; ask its operator to free some, then try again",
            ErrorCode::GateRequired => "this action needs an operator's approval: a gate was opened (see gateId); once it is approved, read its token from GET /api/gates/{gateId} and send it in X-Slipway-Gate-Token",
            ErrorCode::GateTokenInvalid => "the gate token is not valid",
            ErrorCode::GateTokenExpired => "the gate token has expired; request a new approval",
            ErrorCode::GateTokenUsed => "the gate token was already used; a new approval is needed",
            ErrorCode::GateTokenMismatch => "the gate token was granted for another action",
            ErrorCode::GateNotFound => "gate not found",
            ErrorCode::GateNotPending => "the gate is not pending any more",
            ErrorCode::DeploymentNotFound => "this agent has no production deployment yet",
            ErrorCode::VersionNotFound => "version not found",
        }
    }
}

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable, machine-readable code (`unauthorized`, `agent_not_found`, `invalid_spec`, ...).
    pub code: String,
    /// A sentence a person can act on.
    pub message: String,
    /// With `gate_required`: the pending gate opened for the refused action.
    #[serde(rename = "gateId", skip_serializing_if = "Option::is_none")]
    pub gate_id: Option<String>,
}

/// An error on its way to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Only with [`ErrorCode::GateRequired`].
    pub gate_id: Option<String>,
}

impl ApiError {
    /// The code with its default message.
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            message: code.default_message().to_string(),
            gate_id: None,
        }
    }

    /// The code with a specific message; the message must not carry internal details.
    pub fn with_message(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            gate_id: None,
        }
    }

    /// `gate_required`, naming the pending gate opened for the refused action.
    pub fn gate_required(gate_id: impl Into<String>) -> Self {
        Self {
            gate_id: Some(gate_id.into()),
            ..Self::new(ErrorCode::GateRequired)
        }
    }

    /// An internal error: `detail` goes to the server log only, the client gets the generic
    /// message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(ErrorCode::Internal)
    }

    /// A failure of the server's own storage while doing `what`: `insufficient_storage` when
    /// any error in `err`'s chain is a full disk or quota (the client can act on that, and
    /// learns no path), otherwise [`ApiError::internal`]. The detail goes to the log either way.
    pub fn storage(what: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        if disk_full(err) {
            tracing::error!(error = %err, "{what}: out of disk space");
            return Self::new(ErrorCode::InsufficientStorage);
        }
        Self::internal(format_args!("{what}: {err}"))
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
    }
}

impl std::error::Error for ApiError {}

/// Whether an error (or any error it wraps) is `ENOSPC` or `EDQUOT`.
fn disk_full(err: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(err), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        })
    })
}

impl From<ErrorCode> for ApiError {
    fn from(code: ErrorCode) -> Self {
        Self::new(code)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let body = ErrorBody {
            code: self.code.as_str().to_string(),
            message: self.message,
            gate_id: self.gate_id,
        };
        let mut response = (status, Json(body)).into_response();
        if self.code == ErrorCode::Unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Store errors: not-found and conflicts keep their (id-only) message; everything else is
/// internal and only logged.
impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Conflict { message, .. } => {
                ApiError::with_message(ErrorCode::Conflict, message)
            }
            StoreError::NotFound { what, id } => {
                ApiError::with_message(ErrorCode::NotFound, format!("{what} {id} not found"))
            }
            StoreError::Full => ApiError::new(ErrorCode::InsufficientStorage),
            other => ApiError::internal(other),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(ErrorCode::PayloadTooLarge)
        } else {
            ApiError::with_message(
                ErrorCode::InvalidJson,
                format!("cannot read the request body: {}", rejection.body_text()),
            )
        }
    }
}

/// A path that does not parse names nothing that exists.
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        tracing::debug!(rejection = %rejection.body_text(), "path rejected");
        ApiError::new(ErrorCode::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_errors_are_4xx_or_5xx() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(
                seen.insert(code.as_str()),
                "duplicate code {}",
                code.as_str()
            );
            assert!(code
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert!(code.status().is_client_error() || code.status().is_server_error());
            assert!(!code.default_message().is_empty());
        }
        assert_eq!(
            ErrorCode::Internal.status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert!(
            ErrorCode::ALL
                .iter()
                .filter(|c| c.status().is_server_error())
                .count()
                == 3
        );
    }

    /// A full disk is something the client can act on (and is told so, without a path); any
    /// other storage failure stays internal.
    #[test]
    fn a_full_disk_anywhere_in_the_chain_is_insufficient_storage() {
        #[derive(Debug, thiserror::Error)]
        #[error("staging the upload in /srv/data failed")]
        struct Staging(#[source] std::io::Error);

        let full = Staging(std::io::Error::from_raw_os_error(28));
        let err = ApiError::storage("storing the upload failed", &full);
        assert_eq!(err.code, ErrorCode::InsufficientStorage);
        assert_eq!(err.status(), StatusCode::INSUFFICIENT_STORAGE);
        assert!(!err.message.contains("/srv"), "{}", err.message);
        let quota = Staging(std::io::Error::from_raw_os_error(122));
        assert_eq!(
            ApiError::storage("x", &quota).code,
            ErrorCode::InsufficientStorage
        );

        let other = Staging(std::io::Error::from_raw_os_error(5));
        let err = ApiError::storage("storing the upload failed", &other);
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(!err.message.contains("/srv"), "{}", err.message);

        let err: ApiError = StoreError::Full.into();
        assert_eq!(err.code, ErrorCode::InsufficientStorage);
    }

    #[test]
    fn internal_store_errors_do_not_leak() {
        let err: ApiError =
            StoreError::Database("no such table: specs at /var/lib/x.db".into()).into();
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(!err.message.contains("specs"));
    }
}
