//! `GET /api/health`: liveness, without authentication.

use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::dto::HealthDto;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(health))
}

/// The server is up.
#[utoipa::path(get, path = "/api/health", tag = "meta", responses((status = 200, body = HealthDto)))]
pub async fn health() -> Json<HealthDto> {
    Json(HealthDto {
        status: "ok".to_string(),
    })
}
