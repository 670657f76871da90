//! One module per resource. Each exposes `router() -> OpenApiRouter<AppState>` registering its
//! handlers with `routes!`, which adds them to axum and to the OpenAPI document in one call, so
//! a route cannot be served without being documented.
//!
//! To add a resource: write `routes/<name>.rs` with `#[utoipa::path]` handlers and a
//! `router()`, then add one `.merge(<name>::router())` line to [`api_router`].

pub mod agents;
pub mod audit;
pub mod deployments;
pub mod events;
pub mod gates;
pub mod health;
pub mod keys;
pub mod openapi;
pub mod snapshots;
pub mod spec;
pub mod stream;
pub mod versions;
pub mod whoami;

use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::state::AppState;

/// Every route of the API with its OpenAPI description.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(health::router())
        .merge(whoami::router())
        .merge(agents::router())
        .merge(spec::router())
        .merge(snapshots::router())
        .merge(deployments::router())
        .merge(versions::router())
        .merge(stream::router())
        .merge(events::router())
        .merge(gates::router())
        .merge(audit::router())
        .merge(keys::router())
        .merge(openapi::router())
}
