//! `GET /api/openapi.json` and the document's fixed parts (info, security scheme). Paths are
//! added by the route modules themselves (see [`super::api_router`]).

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "slipway", description = "Control-plane API of slipway: agents, deployment specs, runs."),
    modifiers(&BearerScheme),
    tags(
        (name = "meta", description = "Health, identity and this document"),
        (name = "agents", description = "Agents and their tokens"),
        (name = "deployments", description = "Deployment spec, runs, logs and snapshots of an agent"),
        (name = "events", description = "Live events over a WebSocket"),
    ),
)]
pub struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("slw_op_… or slw_ag_…")
                    .build(),
            ),
        );
    }
}

/// The finished document, shared with the handler.
#[derive(Clone)]
pub struct OpenApiDoc(pub Arc<utoipa::openapi::OpenApi>);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get, path = "/api/openapi.json", tag = "meta",
    responses((status = 200, description = "the OpenAPI document", content_type = "application/json")),
)]
pub async fn openapi_json(Extension(doc): Extension<OpenApiDoc>) -> Response {
    Json(doc.0.as_ref()).into_response()
}
