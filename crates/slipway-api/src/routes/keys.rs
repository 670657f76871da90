//! `GET /api/keys`: the public key that verifies artifact signatures; and the helpers that
//! sign and verify stored artifacts (snapshots now, releases through the same calls).

use std::path::Path;

use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::dto::{KeysDto, PublicKeyDto};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_keys))
}

/// The public key(s) that verify slipway's artifact signatures, for `slipway verify` and any
/// offline check. Public: no token needed.
#[utoipa::path(
    get, path = "/api/keys", tag = "keys",
    responses((status = 200, body = KeysDto), (status = 503, description = "the server has no signing key", body = ErrorBody)),
)]
pub async fn get_keys(State(state): State<AppState>) -> Result<Json<KeysDto>, ApiError> {
    let signer = state.trust.signer.as_ref().ok_or_else(|| {
        ApiError::with_message(
            ErrorCode::Unavailable,
            "this server was started without a signing key",
        )
    })?;
    let k = signer.public();
    Ok(Json(KeysDto {
        keys: vec![PublicKeyDto {
            algorithm: k.algorithm,
            key_id: k.key_id,
            public_key: k.public_key,
        }],
    }))
}

/// Signs a stored artifact once, when it is first written (`kind`: `snapshot` or `release`).
/// Does nothing on a server without a signing key.
///
/// # Errors
/// The artifact cannot be read or its signature cannot be written.
pub async fn sign_artifact(
    state: &AppState,
    kind: &'static str,
    agent_id: &str,
    content_hash: &str,
    artifact: &Path,
) -> Result<(), ApiError> {
    let Some(signer) = state.trust.signer.clone() else {
        return Ok(());
    };
    let (agent, hash, path) = (
        agent_id.to_string(),
        content_hash.to_string(),
        artifact.to_path_buf(),
    );
    tokio::task::spawn_blocking(move || signer.sign_file_once(kind, &agent, &hash, &path))
        .await
        .map_err(|e| ApiError::internal(format!("signing task failed: {e}")))?
        .map_err(|e| ApiError::internal(format!("signing {} failed: {e}", artifact.display())))?;
    Ok(())
}
