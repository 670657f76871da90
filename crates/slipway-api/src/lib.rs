//! slipway's control-plane HTTP API: agents, tokens, the deployment spec of seed 004 (and, added
//! by the engine's routes, runs, logs and snapshots), with its OpenAPI document.
//!
//! Entry point: [`app`] builds the axum router from an [`AppState`]; the caller binds the
//! listener and owns shutdown, so tests run it in-process or on `127.0.0.1:0`.
//!
//! Invariants, as absences:
//! - no route decides access itself: authentication is [`auth::Caller`], operator-only routes
//!   take [`auth::Operator`], and every `/api/agents/{id}/…` route takes [`auth::AgentAccess`];
//! - no response leaves without the `{code, message}` shape on error, and no error message
//!   carries a path, SQL or a stack: internal details only go to the log ([`error`]);
//! - no token secret is stored or logged; only its sha256 is;
//! - no domain type is serialized outside [`dto`]: core and store know nothing of JSON shapes;
//! - no route is served without appearing in `/api/openapi.json` (registration in
//!   [`routes::api_router`] does both);
//! - no blocking store call runs on the async runtime ([`AppState::store`]).

pub mod auth;
pub mod dto;
pub mod error;
pub mod extract;
pub mod json;
pub mod routes;
pub mod state;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{middleware, Extension, Router};
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

pub use error::{ApiError, ErrorBody, ErrorCode};
pub use state::{system_clock, ApiConfig, AppState, Clock, DEFAULT_JSON_BODY_LIMIT};

/// The whole API as an axum router, ready for `axum::serve`.
pub fn app(state: AppState) -> Router {
    let (router, doc) = routes::api_router().split_for_parts();
    let json_body_limit = state.config.json_body_limit;
    router
        .fallback(unknown_route)
        .layer(Extension(routes::openapi::OpenApiDoc(std::sync::Arc::new(
            doc,
        ))))
        .layer(DefaultBodyLimit::max(json_body_limit))
        .layer(middleware::map_response(method_not_allowed_as_json))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .with_state(state)
}

async fn unknown_route() -> ApiError {
    ErrorCode::NotFound.into()
}

/// axum answers a known path with an unknown method by an empty 405 (with `Allow`); give it
/// the JSON body every other error has, keeping the headers.
async fn method_not_allowed_as_json(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED
        || response.headers().contains_key(header::CONTENT_TYPE)
    {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let (json_parts, body) = ApiError::new(ErrorCode::MethodNotAllowed)
        .into_response()
        .into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.extend(json_parts.headers);
    Response::from_parts(parts, body)
}
