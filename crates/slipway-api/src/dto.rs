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

/// One run (seed 004 `DeploymentRun`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunDto {
    pub id: String,
    pub agent_id: String,
    pub spec_id: String,
    /// The spec as it was when the run started.
    pub spec_snapshot: SpecDto,
    /// Set once the source is captured.
    pub snapshot_id: Option<String>,
    pub sandbox_id: String,
    /// `queued|capturing|provisioning|building|starting|ready|failed|stopping|stopped`.
    pub status: String,
    /// `preview` or `production`.
    pub target: String,
    /// The preview URL once the run is ready.
    pub url: Option<String>,
    pub note: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<i64>,
    /// Why the run failed: the phase, then the reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub links: RunLinksDto,
}

/// Where to read more about a run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunLinksDto {
    #[serde(rename = "self")]
    pub self_: String,
    pub logs: String,
}

impl From<slipway_store::RunRecord> for RunDto {
    fn from(r: slipway_store::RunRecord) -> Self {
        let base = format!("/api/agents/{}/deployments/{}", r.agent_id, r.id);
        Self {
            links: RunLinksDto { logs: format!("{base}/logs"), self_: base },
            id: r.id,
            agent_id: r.agent_id,
            spec_id: r.spec_id,
            spec_snapshot: r.spec_snapshot.into(),
            snapshot_id: r.snapshot_id,
            sandbox_id: r.sandbox_id,
            status: r.status.as_str().to_string(),
            target: r.target.as_str().to_string(),
            url: r.url,
            note: r.note,
            created_at: r.created_at,
            updated_at: r.updated_at,
            stopped_at: r.stopped_at,
            error: r.error,
        }
    }
}

/// `GET /api/agents/{id}/deployments`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunListDto {
    /// Newest first.
    pub runs: Vec<RunDto>,
}

/// One log line.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogLineDto {
    /// Line number, from 1.
    pub line: u64,
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
    /// `system`, `stdout` or `stderr`.
    pub stream: String,
    pub text: String,
}

impl From<slipway_store::LogLine> for LogLineDto {
    fn from(l: slipway_store::LogLine) -> Self {
        Self { line: l.line_no, ts: l.ts, stream: l.stream, text: l.text }
    }
}

/// `GET …/deployments/{runId}/logs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogsDto {
    pub run_id: String,
    /// The run's status when the lines were read; a settled run writes no more lines once its
    /// pipeline has ended.
    pub status: String,
    /// Lines stored for the run so far.
    pub total_lines: u64,
    /// Pass as `since` to read only newer lines.
    pub next_since: u64,
    pub lines: Vec<LogLineDto>,
}

/// A captured source tree (seed 004 `SourceSnapshot`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotDto {
    pub id: String,
    pub agent_id: String,
    pub spec_id: Option<String>,
    pub source_dir: String,
    /// Where the artifact lives in the artifact store, relative to the store's root.
    pub artifact_path: String,
    /// sha256 of the canonical tree (see docs/snapshots.md).
    pub content_hash: String,
    pub file_count: u64,
    /// Compressed artifact size.
    pub size_bytes: u64,
    pub created_at: i64,
}

impl From<slipway_store::SnapshotRecord> for SnapshotDto {
    fn from(s: slipway_store::SnapshotRecord) -> Self {
        Self {
            id: s.id,
            agent_id: s.agent_id,
            spec_id: s.spec_id,
            source_dir: s.source_dir,
            artifact_path: s.artifact_path,
            content_hash: s.content_hash,
            file_count: s.file_count,
            size_bytes: s.size_bytes,
            created_at: s.created_at,
        }
    }
}

/// `GET /api/agents/{id}/deployments/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotListDto {
    /// Newest first.
    pub snapshots: Vec<SnapshotDto>,
}
