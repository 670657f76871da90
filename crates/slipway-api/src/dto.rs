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
    /// Hosts (`host` or `host:port`) the running app may reach through its egress proxy;
    /// empty: no outbound network at run time.
    pub runtime_egress_allow: Vec<String>,
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
            runtime_egress_allow: s.runtime_egress_allow,
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
    /// Default `[]` (no outbound network at run time). Up to 32 host names, each `host` (ports
    /// 80 and 443) or `host:port`; no URLs, wildcards or IP addresses. The running app reaches
    /// them through the proxy named by its `HTTP_PROXY`/`HTTPS_PROXY`.
    pub runtime_egress_allow: Option<Vec<String>>,
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
    /// The production version this run became (deploy or promote); set in run listings.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version_number: Option<i64>,
    pub links: RunLinksDto,
}

/// Where to read more about a run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunLinksDto {
    #[serde(rename = "self")]
    pub self_: String,
    pub logs: String,
    /// The log as server-sent events (`Accept: text/event-stream`): replay, then live lines
    /// until the run is settled.
    pub stream: String,
}

impl From<slipway_store::RunRecord> for RunDto {
    fn from(r: slipway_store::RunRecord) -> Self {
        let base = format!("/api/agents/{}/deployments/{}", r.agent_id, r.id);
        Self {
            links: RunLinksDto {
                logs: format!("{base}/logs"),
                stream: format!("{base}/logs/stream"),
                self_: base,
            },
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
            version_number: None,
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
        Self {
            line: l.line_no,
            ts: l.ts,
            stream: l.stream,
            text: l.text,
        }
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

// ---- trust: gates, audit, keys (issue 7) ----

/// A gate: an approval request for one privileged action.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateDto {
    pub id: String,
    pub agent_id: String,
    /// `production_deploy`, `promote`, `rollback`, `secret_env` or `preview_deploy`.
    pub action: String,
    /// What the action is about: `snapshot:<contentHash>`, `source:<sourceDir>`, `run:<runId>`,
    /// `version:<n>`.
    pub subject: String,
    /// The domain the action changes.
    pub target: String,
    /// The framework detected for the app, when known.
    pub framework: Option<String>,
    /// The build command that will run.
    pub build_command: Option<String>,
    /// The high-risk warning shown to whoever decides.
    pub warning: String,
    /// Token id of the requester.
    pub requested_by: String,
    /// `operator` or `agent`.
    pub requested_by_kind: String,
    pub requested_at: i64,
    /// `pending`, `approved`, `denied`, `expired`, `consumed` or `invalidated`.
    pub state: String,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
    /// Why it was denied or invalidated.
    pub reason: Option<String>,
    /// Pending: when the request lapses. Approved: when the token expires.
    pub expires_at: i64,
    /// Whether the single-use token has been handed to the requester.
    pub token_issued: bool,
    pub consumed_at: Option<i64>,
    /// What the token was used for (a run id).
    pub used_for: Option<String>,
    /// The single-use token: present exactly once, in the requester's first read after approval.
    /// Send it in `X-Slipway-Gate-Token` with the action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl GateDto {
    /// The gate as seen at `now` (a lapsed gate reads as `expired`).
    pub fn at(g: slipway_trust::GateRecord, now: i64) -> Self {
        Self {
            state: g.effective_state(now).as_str().to_string(),
            id: g.id,
            agent_id: g.binding.agent_id,
            action: g.binding.action.as_str().to_string(),
            subject: g.binding.subject,
            target: g.binding.target,
            framework: g.framework,
            build_command: g.build_command,
            warning: g.warning,
            requested_by: g.requested_by,
            requested_by_kind: g.requested_by_kind,
            requested_at: g.requested_at,
            decided_by: g.decided_by,
            decided_at: g.decided_at,
            reason: g.reason,
            expires_at: g.expires_at,
            token_issued: g.token_hash.is_some(),
            consumed_at: g.consumed_at,
            used_for: g.used_for,
            token: None,
        }
    }
}

/// `GET /api/gates`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GateListDto {
    pub gates: Vec<GateDto>,
}

/// Body of `POST /api/agents/{id}/gates`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GateRequestInput {
    /// The action to approve: `production_deploy`, `promote`, `rollback`, `secret_env`,
    /// `preview_deploy`.
    pub action: String,
    /// What it is about; default for a deploy: `source:<the spec's sourceDir>`.
    pub subject: Option<String>,
    /// The domain it changes; default: the agent's production domain.
    pub target: Option<String>,
    /// The framework the requester detected, shown to the approver.
    pub framework: Option<String>,
}

/// Body of `POST /api/gates/{gateId}/deny` (and, optionally, approve).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GateDecisionInput {
    /// Why; kept with the gate and in the audit log.
    pub reason: Option<String>,
}

/// One audit entry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntryDto {
    pub seq: u64,
    pub ts: i64,
    /// `operator`, `agent` or `system`.
    pub actor_kind: String,
    /// Token id of the actor.
    pub actor_id: Option<String>,
    pub agent_id: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub snapshot_hash: Option<String>,
    pub outcome: String,
    pub reason: Option<String>,
    pub gate_id: Option<String>,
    pub run_id: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

impl From<slipway_trust::AuditEntry> for AuditEntryDto {
    fn from(a: slipway_trust::AuditEntry) -> Self {
        let e = a.entry;
        Self {
            seq: a.seq,
            ts: e.ts,
            actor_kind: e.actor_kind,
            actor_id: e.actor_id,
            agent_id: e.agent_id,
            action: e.action,
            target: e.target,
            snapshot_hash: e.snapshot_hash,
            outcome: e.outcome,
            reason: e.reason,
            gate_id: e.gate_id,
            run_id: e.run_id,
            prev_hash: a.prev_hash,
            hash: a.hash,
        }
    }
}

/// `GET /api/audit`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditListDto {
    pub entries: Vec<AuditEntryDto>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    pub next_before: Option<u64>,
}

/// The first entry at which the audit chain breaks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditBadEntryDto {
    pub seq: u64,
    pub reason: String,
}

/// `GET /api/audit/verify`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditVerifyDto {
    /// Whether the whole chain verified.
    pub ok: bool,
    /// Entries checked.
    pub entries: u64,
    /// The hash of the last entry (keep a copy elsewhere to detect rewrites of the whole tail).
    pub head_hash: Option<String>,
    pub first_bad: Option<AuditBadEntryDto>,
}

/// A public key that verifies slipway's artifact signatures.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublicKeyDto {
    /// `ed25519`.
    pub algorithm: String,
    pub key_id: String,
    /// 32 bytes, hex.
    pub public_key: String,
}

/// `GET /api/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeysDto {
    pub keys: Vec<PublicKeyDto>,
}

// ---- deployments, versions, route history (issue 6) ----

/// The agent's deployment: the stable product object behind the production URL.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentDto {
    pub id: String,
    pub agent_id: String,
    pub name: String,
    pub slug: String,
    /// `http://<slug>.<base-domain>:<app-port>/`; never changes.
    pub production_url: String,
    /// The version the production URL serves; absent when nothing is live.
    pub active_version: Option<i64>,
    pub created_at: i64,
}

/// One production version.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionDto {
    pub version_number: i64,
    /// The production URL serves this version now.
    pub active: bool,
    /// Its instance is running (active, or warm for an instant rollback).
    pub warm: bool,
    /// The run that built (`deploy`) or was promoted into (`promote`) it.
    pub run_id: Option<String>,
    /// `deploy` or `promote`.
    pub origin: String,
    pub release_id: String,
    /// Content hash of the release.
    pub release_hash: String,
    /// Content hash of the source snapshot.
    pub snapshot_hash: Option<String>,
    /// Token id of whoever asked for it.
    pub operator: Option<String>,
    pub note: Option<String>,
    /// The spec the run used.
    pub spec: SpecDto,
    pub created_at: i64,
}

/// `GET /api/agents/{id}/deployments/versions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionListDto {
    /// Absent until the first production version.
    pub deployment: Option<DeploymentDto>,
    /// Newest first.
    pub versions: Vec<VersionDto>,
}

/// Body of rollback and promote (both optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteChangeInput {
    /// Why; kept in the route history.
    pub note: Option<String>,
}

/// What a rollback did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RollbackDto {
    pub version: VersionDto,
    /// The target's instance was warm: the switch was immediate (no boot).
    pub was_warm: bool,
    /// `false` when the target was already active.
    pub changed: bool,
    pub production_url: String,
}

/// One change of the production route.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteChangeDto {
    pub host: String,
    pub from_version: Option<i64>,
    pub to_version: Option<i64>,
    /// `deploy`, `promote`, `rollback` or `stopped`.
    pub reason: String,
    /// Token id of whoever caused it.
    pub operator: Option<String>,
    pub note: Option<String>,
    pub created_at: i64,
}

impl From<slipway_store::RouteChange> for RouteChangeDto {
    fn from(c: slipway_store::RouteChange) -> Self {
        Self {
            host: c.host,
            from_version: c.from_version,
            to_version: c.to_version,
            reason: c.reason,
            operator: c.operator,
            note: c.note,
            created_at: c.created_at,
        }
    }
}

/// `GET /api/agents/{id}/deployments/routes/history`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteHistoryDto {
    pub changes: Vec<RouteChangeDto>,
}
