//! The agent's one deployment spec (seed 004): read it, upsert it.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde_json::{Map, Value};
use slipway_core::{IdKind, SpecDraft};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{new_id, AgentAccess};
use crate::dto::{SpecDto, SpecInput};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::json::JsonObject;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_spec, put_spec))
}

/// Fields a client sets.
pub const SPEC_FIELDS: [&str; 10] = [
    "name",
    "sourceDir",
    "installCommand",
    "buildCommand",
    "startCommand",
    "runtimePort",
    "env",
    "targetDefault",
    "kind",
    "runtimeEgressAllow",
];

/// Fields the server sets; accepted in a PUT body and ignored, so a GET result can be sent back.
pub const SPEC_READ_ONLY_FIELDS: [&str; 4] = ["id", "agentId", "createdAt", "updatedAt"];

/// The agent's deployment spec.
#[utoipa::path(
    get, path = "/api/agents/{id}/deployments/spec", tag = "deployments",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id")),
    responses(
        (status = 200, body = SpecDto),
        (status = 401, body = ErrorBody),
        (status = 404, description = "agent_not_found or spec_not_found", body = ErrorBody),
    ),
)]
pub async fn get_spec(
    State(state): State<AppState>,
    access: AgentAccess,
) -> Result<Json<SpecDto>, ApiError> {
    let agent_id = access.agent.id;
    let spec = state
        .store(move |s| s.get_spec(&agent_id))
        .await?
        .ok_or(ErrorCode::SpecNotFound)?;
    Ok(Json(spec.into()))
}

/// Creates or replaces the agent's deployment spec. On replace, `id` and `createdAt` are kept
/// and `updatedAt` moves.
#[utoipa::path(
    put, path = "/api/agents/{id}/deployments/spec", tag = "deployments",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id")),
    request_body = SpecInput,
    responses(
        (status = 200, body = SpecDto),
        (status = 400, description = "invalid_json", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody),
        (status = 422, description = "invalid_spec: the message names the field and the rule", body = ErrorBody),
    ),
)]
pub async fn put_spec(
    State(state): State<AppState>,
    access: AgentAccess,
    JsonObject(body): JsonObject,
) -> Result<Json<SpecDto>, ApiError> {
    let draft = draft_from_json(&body)?;
    let valid = draft
        .validate(&state.config.spec_policy)
        .map_err(|e| invalid(e.to_string()))?;
    let now = state.now();
    // A new id is only used when the agent has no spec yet: the store keeps the existing one.
    let spec = valid.into_spec(new_id(IdKind::Spec), access.agent.id, now, now);
    let stored = state.store(move |s| s.upsert_spec(&spec)).await?;
    tracing::info!(agent_id = %stored.agent_id, spec_id = %stored.id, "spec saved");
    let entry = slipway_trust::NewAuditEntry {
        agent_id: Some(stored.agent_id.clone()),
        target: Some(stored.id.clone()),
        reason: Some(format!(
            "name {:?}, sourceDir {:?}, install {:?}, build {:?}, start {:?}, port {}, target {}, env keys [{}]",
            stored.name, stored.source_dir, stored.install_command, stored.build_command, stored.start_command,
            stored.runtime_port, stored.target_default.as_str(), stored.env.keys().cloned().collect::<Vec<_>>().join(",")
        ) + &format!(", runtime egress [{}]", stored.runtime_egress_allow.join(","))),
        ..crate::routes::audit::by(&access.caller, now, "spec.update", "ok")
    };
    crate::routes::audit::record(&state, entry).await?;
    Ok(Json(stored.into()))
}

fn invalid(message: String) -> ApiError {
    ApiError::with_message(ErrorCode::InvalidSpec, message)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string_field(body: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!(
            "{field} must be a string, got {}",
            type_name(other)
        ))),
    }
}

/// Turns a JSON object into a draft, checking each field's type and refusing unknown fields;
/// the rules themselves are the core's ([`SpecDraft::validate`]). `null` counts as absent.
///
/// # Errors
/// `invalid_spec` naming the field.
pub fn draft_from_json(body: &Map<String, Value>) -> Result<SpecDraft, ApiError> {
    if let Some(unknown) = body.keys().find(|k| {
        !SPEC_FIELDS.contains(&k.as_str()) && !SPEC_READ_ONLY_FIELDS.contains(&k.as_str())
    }) {
        return Err(invalid(format!(
            "unknown field {unknown:?}: a spec has the fields {}",
            SPEC_FIELDS.join(", ")
        )));
    }
    let runtime_port = match body.get("runtimePort") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
            (Some(p), _) => Some(p),
            // Larger than i64: certainly out of range, reported as such.
            (None, Some(_)) => {
                return Err(invalid(format!(
                    "runtimePort must be between 1024 and 65535, got {n}"
                )))
            }
            (None, None) => {
                return Err(invalid(format!("runtimePort must be an integer, got {n}")))
            }
        },
        Some(other) => {
            return Err(invalid(format!(
                "runtimePort must be an integer, got {}",
                type_name(other)
            )))
        }
    };
    let env = match body.get("env") {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => {
            let mut env = BTreeMap::new();
            for (k, v) in map {
                match v {
                    Value::String(s) => env.insert(k.clone(), s.clone()),
                    other => {
                        return Err(invalid(format!(
                            "env value of {k} must be a string, got {}",
                            type_name(other)
                        )))
                    }
                };
            }
            Some(env)
        }
        Some(other) => {
            return Err(invalid(format!(
                "env must be an object of strings, got {}",
                type_name(other)
            )))
        }
    };
    let runtime_egress_allow = match body.get("runtimeEgressAllow") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let mut hosts = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => hosts.push(s.clone()),
                    other => {
                        return Err(invalid(format!(
                            "runtimeEgressAllow[{i}] must be a string, got {}",
                            type_name(other)
                        )))
                    }
                }
            }
            Some(hosts)
        }
        Some(other) => {
            return Err(invalid(format!(
                "runtimeEgressAllow must be an array of host names, got {}",
                type_name(other)
            )))
        }
    };
    Ok(SpecDraft {
        name: string_field(body, "name")?,
        source_dir: string_field(body, "sourceDir")?,
        install_command: string_field(body, "installCommand")?,
        build_command: string_field(body, "buildCommand")?,
        start_command: string_field(body, "startCommand")?,
        runtime_port,
        env,
        target_default: string_field(body, "targetDefault")?,
        kind: string_field(body, "kind")?,
        runtime_egress_allow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::PartialSchema;

    /// The documented body and the accepted fields are the same list.
    #[test]
    fn spec_input_schema_lists_exactly_the_accepted_fields() {
        let utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(obj)) =
            SpecInput::schema()
        else {
            panic!("SpecInput is not an object schema");
        };
        let mut documented: Vec<&str> = obj.properties.keys().map(String::as_str).collect();
        let mut accepted: Vec<&str> = SPEC_FIELDS
            .iter()
            .chain(SPEC_READ_ONLY_FIELDS.iter())
            .copied()
            .collect();
        documented.sort_unstable();
        accepted.sort_unstable();
        assert_eq!(documented, accepted);
    }

    #[test]
    fn null_is_absent() {
        let body = serde_json::json!({"name": null, "env": null, "runtimePort": null});
        let draft = draft_from_json(body.as_object().unwrap()).unwrap();
        assert_eq!(draft, SpecDraft::default());
    }
}
