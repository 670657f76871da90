//! slipway's metadata store: the [`Store`] trait and its SQLite implementation.
//!
//! Invariants:
//! - the store is the only code that knows SQL; callers see records and [`StoreError`], never a
//!   SQLite type, so a Postgres implementation can replace [`SqliteStore`];
//! - the store reads no clock: every timestamp (integer milliseconds) is passed in;
//! - every run status change is a compare-and-set checked against the core state machine.
//!
//! The trait is synchronous on purpose: SQLite calls are short and local, and callers on an
//! async runtime wrap them in `spawn_blocking`. A networked implementation would keep the same
//! shape and use its own pool.

mod migrations;
mod sqlite;
mod trust;
mod versions;

use std::collections::BTreeMap;

use slipway_core::{DeploymentSpec, DeploymentStatus, DeploymentTarget, Millis, TransitionError};

pub use sqlite::SqliteStore;

/// The schema version a freshly migrated database has (the last migration's number).
pub fn latest_schema_version() -> i64 {
    migrations::MIGRATIONS.last().map_or(0, |(v, _)| *v)
}
pub use trust::{AuditChain, AuditQuery, AuditStore, GateStore};
pub use versions::{
    DeploymentRecord, NewVersion, ReferencedArtifacts, ReleaseKind, ReleaseRecord, RouteChange,
    RouteSwitch, VersionRecord, VersionStore,
};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    /// A uniqueness or concurrency rule refused the write; `id` names the object in the way.
    #[error("{message}")]
    Conflict { id: String, message: String },
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("run {id} is {actual}, not {expected}")]
    StaleStatus {
        id: String,
        expected: DeploymentStatus,
        actual: DeploymentStatus,
    },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(String),
    /// The disk holding the database is full: the write was not made.
    #[error("database error: the disk is full")]
    Full,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full,
            _ => StoreError::Database(e.to_string()),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An agent: the owner of every other resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub id: String,
    pub name: String,
    pub created_at: Millis,
}

/// Who a token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Operator,
    Agent,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Operator => "operator",
            TokenKind::Agent => "agent",
        }
    }
}

/// A stored API token. Only the hash of the secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub kind: TokenKind,
    pub agent_id: Option<String>,
    /// Lower-case hex sha256 of the secret.
    pub token_hash: String,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
}

/// A captured source tree (seed 004 `SourceSnapshot`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub id: String,
    pub agent_id: String,
    /// `None` for an upload made before the agent had a spec.
    pub spec_id: Option<String>,
    pub source_dir: String,
    pub artifact_path: String,
    pub content_hash: String,
    pub file_count: u64,
    pub size_bytes: u64,
    pub created_at: Millis,
}

/// One attempt to build and start one snapshot (seed 004 `DeploymentRun`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub id: String,
    pub agent_id: String,
    pub spec_id: String,
    /// The spec as it was when the run started; later spec edits do not change it.
    pub spec_snapshot: DeploymentSpec,
    pub snapshot_id: Option<String>,
    pub sandbox_id: String,
    pub status: DeploymentStatus,
    pub target: DeploymentTarget,
    pub url: Option<String>,
    pub note: Option<String>,
    pub error: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub stopped_at: Option<Millis>,
}

/// Fields a transition may set alongside the status. `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunPatch {
    pub snapshot_id: Option<String>,
    pub url: Option<String>,
    pub error: Option<String>,
    pub stopped_at: Option<Millis>,
}

/// One persisted log line. `line_no` is assigned by the store, from 1, contiguous per run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub line_no: u64,
    pub ts: Millis,
    /// `stdout`, `stderr` or `system`.
    pub stream: String,
    pub text: String,
}

impl LogLine {
    /// A line to append (its number is assigned on write).
    pub fn new(ts: Millis, stream: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            line_no: 0,
            ts,
            stream: stream.into(),
            text: text.into(),
        }
    }
}

/// Which part of a run's log to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogQuery {
    /// Only lines with `line_no > since`.
    pub since: Option<u64>,
    /// Only the last `tail` lines (after `since`).
    pub tail: Option<u64>,
    /// At most this many lines.
    pub limit: Option<u64>,
    /// Only lines whose text contains this string (case-sensitive, taken literally).
    pub q: Option<String>,
}

/// Everything slipway keeps about agents, tokens, specs, snapshots, runs and logs.
pub trait Store: Send + Sync + VersionStore + GateStore + AuditStore {
    // agents and tokens
    fn insert_agent(&self, agent: &Agent) -> Result<()>;
    fn get_agent(&self, id: &str) -> Result<Option<Agent>>;
    fn list_agents(&self) -> Result<Vec<Agent>>;
    fn insert_token(&self, token: &TokenRecord) -> Result<()>;
    fn find_token_by_hash(&self, token_hash: &str) -> Result<Option<TokenRecord>>;
    fn has_operator_token(&self) -> Result<bool>;
    /// Revokes every operator token (used when the admin token is rotated).
    fn revoke_operator_tokens(&self, now: Millis) -> Result<u64>;

    // specs
    fn get_spec(&self, agent_id: &str) -> Result<Option<DeploymentSpec>>;
    /// Inserts or replaces the agent's one spec. On replace, `id` and `created_at` of the
    /// stored spec are kept whatever `spec` says. Returns the stored spec.
    fn upsert_spec(&self, spec: &DeploymentSpec) -> Result<DeploymentSpec>;

    // snapshots
    fn insert_snapshot(&self, snapshot: &SnapshotRecord) -> Result<()>;
    fn get_snapshot(&self, agent_id: &str, id: &str) -> Result<Option<SnapshotRecord>>;
    /// The newest snapshot record of the agent with that content hash.
    fn find_snapshot_by_hash(
        &self,
        agent_id: &str,
        content_hash: &str,
    ) -> Result<Option<SnapshotRecord>>;
    /// Newest first.
    fn list_snapshots(&self, agent_id: &str, limit: u64) -> Result<Vec<SnapshotRecord>>;

    // runs
    /// Inserts a new run unless the agent already has one in its start pipeline
    /// (`queued..starting`), in which case [`StoreError::Conflict`] names that run. Atomic.
    fn insert_run_if_idle(&self, run: &RunRecord) -> Result<()>;
    fn get_run(&self, agent_id: &str, run_id: &str) -> Result<Option<RunRecord>>;
    /// Newest first.
    fn list_runs(&self, agent_id: &str, limit: u64) -> Result<Vec<RunRecord>>;
    /// Moves a run from `from` to `to` if the state machine allows it and the run is still in
    /// `from` (compare-and-set); applies `patch`; sets `updated_at = now`.
    fn transition_run(
        &self,
        run_id: &str,
        from: DeploymentStatus,
        to: DeploymentStatus,
        patch: RunPatch,
        now: Millis,
    ) -> Result<RunRecord>;
    fn runs_in_status(&self, statuses: &[DeploymentStatus]) -> Result<Vec<RunRecord>>;

    // logs
    /// Appends lines after the run's last one; returns the number given to the first.
    fn append_logs(&self, run_id: &str, lines: &[LogLine]) -> Result<u64>;
    fn read_logs(&self, run_id: &str, query: LogQuery) -> Result<Vec<LogLine>>;
    fn log_count(&self, run_id: &str) -> Result<u64>;
}

/// Helper for implementations: the env map of a spec as stored text.
pub(crate) fn env_to_json(env: &BTreeMap<String, String>) -> String {
    serde_json::to_string(env).expect("a string map always serializes")
}
