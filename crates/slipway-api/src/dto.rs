//! The JSON shapes of the API (camelCase, as in seed 004), converted from core and store
//! types. This module is the only place domain objects become JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use slipway_core::DeploymentSpec;
use slipway_store::Agent;
use utoipa::ToSchema;

use crate::auth::{Caller, Principal};

/// `GET /api/health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthDto {
    /// Always `ok` when the server answers.
    pub status: String,
}

/// An agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentDto {
    pub id: String,
    pub name: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

impl From<Agent> for AgentDto {
    fn from(a: Agent) -> Self {
        Self {
            id: a.id,
            name: a.name,
            created_at: a.created_at,
        }
    }
}

/// `GET /api/agents`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentListDto {
    /// Oldest first.
    pub agents: Vec<AgentDto>,
}

/// `POST /api/agents` request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAgentRequest {
    /// 1–64 characters, no control characters.
    pub name: String,
}

/// `POST /api/agents` response: the agent and its token, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedAgentDto {
    pub id: String,
    pub name: String,
    /// The agent's API token (`slw_ag_…`). Only its hash is stored: it cannot be shown again.
    pub token: String,
    pub created_at: i64,
}

/// `GET /api/whoami`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WhoamiDto {
    /// `operator` or `agent`.
    pub kind: String,
    pub token_id: String,
    /// The agent the token belongs to; `null` for an operator token.
    pub agent_id: Option<String>,
}

impl From<Caller> for WhoamiDto {
    fn from(c: Caller) -> Self {
        let (kind, agent_id) = match c.principal {
            Principal::Operator => ("operator", None),
            Principal::Agent(id) => ("agent", Some(id)),
        };
        Self {
            kind: kind.to_string(),
            token_id: c.token_id,
            agent_id,
        }
    }
}

/// A deployment spec (seed 004 `DeploymentSpec`, plus `kind`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpecDto {
    pub id: String,
    pub agent_id: String,
    pub name: String,
    /// Absolute path inside the agent's sandbox, under an allowed root.
    pub source_dir: String,
    pub install_command: String,
    pub build_command: String,
    pub start_command: String,
    pub runtime_port: u16,
    pub env: BTreeMap<String, String>,
    /// `preview` or `production`.
    pub target_default: String,
    /// `auto`, `static` or `dynamic`.
    pub kind: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<DeploymentSpec> for SpecDto {
    fn from(s: DeploymentSpec) -> Self {
        Self {
            id: s.id,
            agent_id: s.agent_id,
            name: s.name,
            source_dir: s.source_dir,
            install_command: s.install_command,
            build_command: s.build_command,
            start_command: s.start_command,
            runtime_port: s.runtime_port,
            env: s.env,
            target_default: s.target_default.as_str().to_string(),
            kind: s.kind.as_str().to_string(),
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

/// `PUT /api/agents/{id}/deployments/spec` request. Documentation of the accepted body; the
/// handler checks each field's type itself so that every message names its field.
/// `id`, `agentId`, `createdAt` and `updatedAt` are accepted and ignored, so a spec read with
/// GET can be sent back as is. Any other field is refused.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecInput {
    /// Required.
    pub name: String,
    /// Required: absolute, no `..`, under an allowed root.
    pub source_dir: String,
    /// Default `""`.
    pub install_command: Option<String>,
    /// Required (`"true"` for apps with nothing to build).
    pub build_command: String,
    /// Required.
    pub start_command: String,
    /// 1024–65535, default 3000.
    pub runtime_port: Option<i64>,
    /// Names match `[A-Za-z_][A-Za-z0-9_]*`; `PORT` is reserved.
    pub env: Option<BTreeMap<String, String>>,
    /// `preview` (default) or `production`.
    pub target_default: Option<String>,
    /// `auto` (default), `static` or `dynamic`.
    pub kind: Option<String>,
    /// Read-only: ignored.
    pub id: Option<serde_json::Value>,
    /// Read-only: ignored.
    pub agent_id: Option<serde_json::Value>,
    /// Read-only: ignored.
    pub created_at: Option<serde_json::Value>,
    /// Read-only: ignored.
    pub updated_at: Option<serde_json::Value>,
}
