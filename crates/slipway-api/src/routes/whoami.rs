//! `GET /api/whoami`: whom the token speaks for.

use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::dto::WhoamiDto;
use crate::error::ErrorBody;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(whoami))
}

/// The caller's token kind, token id and agent.
#[utoipa::path(
    get, path = "/api/whoami", tag = "meta",
    security(("bearer" = [])),
    responses((status = 200, body = WhoamiDto), (status = 401, body = ErrorBody)),
)]
pub async fn whoami(caller: Caller) -> Json<WhoamiDto> {
    Json(caller.into())
}
