//! The SQLite implementation of [`Store`]: one connection behind a mutex, WAL mode.
//!
//! One connection is enough for slipway's write rate (a few rows per second per run, log lines
//! in batches) and makes every method trivially atomic with respect to the others.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use slipway_core::{DeploymentKind, DeploymentSpec, DeploymentStatus, DeploymentTarget};

use crate::migrations::MIGRATIONS;
use crate::{
    env_to_json, Agent, LogLine, LogQuery, Result, RunPatch, RunRecord, SnapshotRecord, Store,
    StoreError, TokenKind, TokenRecord,
};

/// SQLite-backed store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies pending migrations.
    ///
    /// # Errors
    /// The file cannot be opened, or a migration fails.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// A private in-memory database (tests).
    ///
    /// # Errors
    /// A migration fails.
    pub fn open_in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self> {
        conn.busy_timeout(Duration::from_secs(5))?;
        // journal_mode answers with a row, so it is read rather than executed.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// The schema version after migrations.
    ///
    /// # Errors
    /// A database error.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self.conn().query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?)
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back on drop), so the connection stays usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )?;
    for (version, sql) in MIGRATIONS {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let done: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM schema_migrations WHERE version = ?1)",
            [version],
            |r| r.get(0),
        )?;
        if !done {
            tx.execute_batch(sql)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![version, now],
            )?;
            tracing::info!(version, "applied database migration");
        }
        tx.commit()?;
    }
    Ok(())
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("unknown {what} {value:?}"))
}

fn parse_status(s: &str) -> Result<DeploymentStatus> {
    DeploymentStatus::parse(s).ok_or_else(|| corrupt("run status", s))
}

fn parse_target(s: &str) -> Result<DeploymentTarget> {
    DeploymentTarget::parse(s).ok_or_else(|| corrupt("target", s))
}

fn parse_kind(s: &str) -> Result<DeploymentKind> {
    DeploymentKind::parse(s).ok_or_else(|| corrupt("kind", s))
}

const SPEC_COLS: &str =
    "id, agent_id, name, source_dir, install_command, build_command, start_command, \
    runtime_port, env_json, target_default, kind, created_at, updated_at, runtime_egress_json";

fn spec_from_row(
    r: &Row<'_>,
) -> rusqlite::Result<(DeploymentSpec, String, String, String, String)> {
    let spec = DeploymentSpec {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        name: r.get(2)?,
        source_dir: r.get(3)?,
        install_command: r.get(4)?,
        build_command: r.get(5)?,
        start_command: r.get(6)?,
        runtime_port: r.get(7)?,
        env: Default::default(),
        target_default: DeploymentTarget::Preview,
        kind: DeploymentKind::Auto,
        runtime_egress_allow: Vec::new(),
        created_at: r.get(11)?,
        updated_at: r.get(12)?,
    };
    Ok((spec, r.get(8)?, r.get(9)?, r.get(10)?, r.get(13)?))
}

fn finish_spec(
    (mut spec, env, target, kind, egress): (DeploymentSpec, String, String, String, String),
) -> Result<DeploymentSpec> {
    spec.runtime_egress_allow = serde_json::from_str(&egress)
        .map_err(|e| StoreError::Corrupt(format!("spec runtimeEgressAllow: {e}")))?;
    spec.env =
        serde_json::from_str(&env).map_err(|e| StoreError::Corrupt(format!("spec env: {e}")))?;
    spec.target_default = parse_target(&target)?;
    spec.kind = parse_kind(&kind)?;
    Ok(spec)
}

/// The frozen spec of a run, as JSON text.
pub(crate) fn spec_to_json(s: &DeploymentSpec) -> String {
    serde_json::json!({
        "id": s.id, "agentId": s.agent_id, "name": s.name, "sourceDir": s.source_dir,
        "installCommand": s.install_command, "buildCommand": s.build_command,
        "startCommand": s.start_command, "runtimePort": s.runtime_port, "env": s.env,
        "targetDefault": s.target_default.as_str(), "kind": s.kind.as_str(),
        "runtimeEgressAllow": s.runtime_egress_allow,
        "createdAt": s.created_at, "updatedAt": s.updated_at,
    })
    .to_string()
}

pub(crate) fn spec_from_json(text: &str) -> Result<DeploymentSpec> {
    let bad = |what: &str| StoreError::Corrupt(format!("run spec snapshot: {what}"));
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let s = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .ok_or_else(|| bad(k))
    };
    let i = |k: &str| v.get(k).and_then(|x| x.as_i64()).ok_or_else(|| bad(k));
    Ok(DeploymentSpec {
        id: s("id")?,
        agent_id: s("agentId")?,
        name: s("name")?,
        source_dir: s("sourceDir")?,
        install_command: s("installCommand")?,
        build_command: s("buildCommand")?,
        start_command: s("startCommand")?,
        runtime_port: u16::try_from(i("runtimePort")?).map_err(|_| bad("runtimePort"))?,
        env: serde_json::from_value(v.get("env").cloned().unwrap_or_default())
            .map_err(|_| bad("env"))?,
        target_default: parse_target(&s("targetDefault")?)?,
        kind: parse_kind(&s("kind")?)?,
        // Absent in snapshots taken before the field existed: no run-time egress.
        runtime_egress_allow: match v.get("runtimeEgressAllow") {
            None => Vec::new(),
            Some(x) => serde_json::from_value(x.clone()).map_err(|_| bad("runtimeEgressAllow"))?,
        },
        created_at: i("createdAt")?,
        updated_at: i("updatedAt")?,
    })
}

const SNAPSHOT_COLS: &str =
    "id, agent_id, spec_id, source_dir, artifact_path, content_hash, file_count, size_bytes, created_at";

fn snapshot_from_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    Ok(SnapshotRecord {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        spec_id: r.get(2)?,
        source_dir: r.get(3)?,
        artifact_path: r.get(4)?,
        content_hash: r.get(5)?,
        file_count: r.get::<_, i64>(6)? as u64,
        size_bytes: r.get::<_, i64>(7)? as u64,
        created_at: r.get(8)?,
    })
}

const RUN_COLS: &str =
    "id, agent_id, spec_id, spec_json, snapshot_id, sandbox_id, status, target, url, note, \
    error, created_at, updated_at, stopped_at";

struct RawRun {
    id: String,
    agent_id: String,
    spec_id: String,
    spec_json: String,
    snapshot_id: Option<String>,
    sandbox_id: String,
    status: String,
    target: String,
    url: Option<String>,
    note: Option<String>,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
    stopped_at: Option<i64>,
}

fn raw_run(r: &Row<'_>) -> rusqlite::Result<RawRun> {
    Ok(RawRun {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        spec_id: r.get(2)?,
        spec_json: r.get(3)?,
        snapshot_id: r.get(4)?,
        sandbox_id: r.get(5)?,
        status: r.get(6)?,
        target: r.get(7)?,
        url: r.get(8)?,
        note: r.get(9)?,
        error: r.get(10)?,
        created_at: r.get(11)?,
        updated_at: r.get(12)?,
        stopped_at: r.get(13)?,
    })
}

fn finish_run(raw: RawRun) -> Result<RunRecord> {
    Ok(RunRecord {
        spec_snapshot: spec_from_json(&raw.spec_json)?,
        status: parse_status(&raw.status)?,
        target: parse_target(&raw.target)?,
        id: raw.id,
        agent_id: raw.agent_id,
        spec_id: raw.spec_id,
        snapshot_id: raw.snapshot_id,
        sandbox_id: raw.sandbox_id,
        url: raw.url,
        note: raw.note,
        error: raw.error,
        created_at: raw.created_at,
        updated_at: raw.updated_at,
        stopped_at: raw.stopped_at,
    })
}

fn active_statuses() -> [&'static str; 5] {
    [
        DeploymentStatus::Queued.as_str(),
        DeploymentStatus::Capturing.as_str(),
        DeploymentStatus::Provisioning.as_str(),
        DeploymentStatus::Building.as_str(),
        DeploymentStatus::Starting.as_str(),
    ]
}

fn get_run_by_id(conn: &Connection, run_id: &str) -> Result<Option<RunRecord>> {
    let raw = conn
        .query_row(
            &format!("SELECT {RUN_COLS} FROM runs WHERE id = ?1"),
            [run_id],
            raw_run,
        )
        .optional()?;
    raw.map(finish_run).transpose()
}

impl Store for SqliteStore {
    fn insert_agent(&self, agent: &Agent) -> Result<()> {
        self.conn().execute(
            "INSERT INTO agents (id, name, created_at) VALUES (?1, ?2, ?3)",
            params![agent.id, agent.name, agent.created_at],
        )?;
        Ok(())
    }

    fn get_agent(&self, id: &str) -> Result<Option<Agent>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, name, created_at FROM agents WHERE id = ?1",
                [id],
                |r| {
                    Ok(Agent {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    fn list_agents(&self) -> Result<Vec<Agent>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT id, name, created_at FROM agents ORDER BY created_at, rowid")?;
        let rows = stmt.query_map([], |r| {
            Ok(Agent {
                id: r.get(0)?,
                name: r.get(1)?,
                created_at: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        self.conn().execute(
            "INSERT INTO tokens (id, kind, agent_id, token_hash, created_at, revoked_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![t.id, t.kind.as_str(), t.agent_id, t.token_hash, t.created_at, t.revoked_at],
        )?;
        Ok(())
    }

    fn find_token_by_hash(&self, token_hash: &str) -> Result<Option<TokenRecord>> {
        let row = self
            .conn()
            .query_row(
                "SELECT id, kind, agent_id, token_hash, created_at, revoked_at FROM tokens WHERE token_hash = ?1",
                [token_hash],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(id, kind, agent_id, token_hash, created_at, revoked_at)| {
            let kind = match kind.as_str() {
                "operator" => TokenKind::Operator,
                "agent" => TokenKind::Agent,
                other => return Err(corrupt("token kind", other)),
            };
            Ok(TokenRecord {
                id,
                kind,
                agent_id,
                token_hash,
                created_at,
                revoked_at,
            })
        })
        .transpose()
    }

    fn has_operator_token(&self) -> Result<bool> {
        Ok(self.conn().query_row(
            "SELECT EXISTS(SELECT 1 FROM tokens WHERE kind = 'operator' AND revoked_at IS NULL)",
            [],
            |r| r.get(0),
        )?)
    }

    fn revoke_operator_tokens(&self, now: i64) -> Result<u64> {
        Ok(self.conn().execute(
            "UPDATE tokens SET revoked_at = ?1 WHERE kind = 'operator' AND revoked_at IS NULL",
            [now],
        )? as u64)
    }

    fn get_spec(&self, agent_id: &str) -> Result<Option<DeploymentSpec>> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {SPEC_COLS} FROM specs WHERE agent_id = ?1"),
                [agent_id],
                spec_from_row,
            )
            .optional()?;
        raw.map(finish_spec).transpose()
    }

    fn upsert_spec(&self, s: &DeploymentSpec) -> Result<DeploymentSpec> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO specs (id, agent_id, name, source_dir, install_command, build_command, start_command, \
                 runtime_port, env_json, target_default, kind, created_at, updated_at, runtime_egress_json) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
             ON CONFLICT (agent_id) DO UPDATE SET name = excluded.name, source_dir = excluded.source_dir, \
                 install_command = excluded.install_command, build_command = excluded.build_command, \
                 start_command = excluded.start_command, runtime_port = excluded.runtime_port, \
                 env_json = excluded.env_json, target_default = excluded.target_default, kind = excluded.kind, \
                 runtime_egress_json = excluded.runtime_egress_json, updated_at = excluded.updated_at",
            params![
                s.id,
                s.agent_id,
                s.name,
                s.source_dir,
                s.install_command,
                s.build_command,
                s.start_command,
                s.runtime_port,
                env_to_json(&s.env),
                s.target_default.as_str(),
                s.kind.as_str(),
                s.created_at,
                s.updated_at,
                serde_json::to_string(&s.runtime_egress_allow).unwrap_or_else(|_| "[]".into())
            ],
        )?;
        let raw = tx.query_row(
            &format!("SELECT {SPEC_COLS} FROM specs WHERE agent_id = ?1"),
            [&s.agent_id],
            spec_from_row,
        )?;
        tx.commit()?;
        finish_spec(raw)
    }

    fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        self.conn().execute(
            &format!("INSERT INTO snapshots ({SNAPSHOT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
            params![
                s.id,
                s.agent_id,
                s.spec_id,
                s.source_dir,
                s.artifact_path,
                s.content_hash,
                s.file_count as i64,
                s.size_bytes as i64,
                s.created_at
            ],
        )?;
        Ok(())
    }

    fn get_snapshot(&self, agent_id: &str, id: &str) -> Result<Option<SnapshotRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {SNAPSHOT_COLS} FROM snapshots WHERE agent_id = ?1 AND id = ?2"),
                [agent_id, id],
                snapshot_from_row,
            )
            .optional()?)
    }

    fn find_snapshot_by_hash(
        &self,
        agent_id: &str,
        content_hash: &str,
    ) -> Result<Option<SnapshotRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {SNAPSHOT_COLS} FROM snapshots WHERE agent_id = ?1 AND content_hash = ?2 \
                     ORDER BY created_at DESC, rowid DESC LIMIT 1"
                ),
                [agent_id, content_hash],
                snapshot_from_row,
            )
            .optional()?)
    }

    fn list_snapshots(&self, agent_id: &str, limit: u64) -> Result<Vec<SnapshotRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SNAPSHOT_COLS} FROM snapshots WHERE agent_id = ?1 ORDER BY created_at DESC, rowid DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![agent_id, limit as i64], snapshot_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn insert_run_if_idle(&self, run: &RunRecord) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let [a, b, c, d, e] = active_statuses();
        let busy: Option<String> = tx
            .query_row(
                "SELECT id FROM runs WHERE agent_id = ?1 AND status IN (?2, ?3, ?4, ?5, ?6) \
                 ORDER BY created_at DESC LIMIT 1",
                params![run.agent_id, a, b, c, d, e],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = busy {
            return Err(StoreError::Conflict {
                message: format!("run {id} is still in its start pipeline"),
                id,
            });
        }
        tx.execute(
            &format!(
                "INSERT INTO runs ({RUN_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
            ),
            params![
                run.id,
                run.agent_id,
                run.spec_id,
                spec_to_json(&run.spec_snapshot),
                run.snapshot_id,
                run.sandbox_id,
                run.status.as_str(),
                run.target.as_str(),
                run.url,
                run.note,
                run.error,
                run.created_at,
                run.updated_at,
                run.stopped_at
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn get_run(&self, agent_id: &str, run_id: &str) -> Result<Option<RunRecord>> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {RUN_COLS} FROM runs WHERE agent_id = ?1 AND id = ?2"),
                [agent_id, run_id],
                raw_run,
            )
            .optional()?;
        raw.map(finish_run).transpose()
    }

    fn list_runs(&self, agent_id: &str, limit: u64) -> Result<Vec<RunRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE agent_id = ?1 ORDER BY created_at DESC, rowid DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![agent_id, limit as i64], raw_run)?;
        let raws: Vec<RawRun> = rows.collect::<rusqlite::Result<_>>()?;
        raws.into_iter().map(finish_run).collect()
    }

    fn transition_run(
        &self,
        run_id: &str,
        from: DeploymentStatus,
        to: DeploymentStatus,
        patch: RunPatch,
        now: i64,
    ) -> Result<RunRecord> {
        from.transition(to)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE runs SET status = ?1, updated_at = ?2, \
                 snapshot_id = COALESCE(?3, snapshot_id), url = COALESCE(?4, url), \
                 error = COALESCE(?5, error), stopped_at = COALESCE(?6, stopped_at) \
             WHERE id = ?7 AND status = ?8",
            params![
                to.as_str(),
                now,
                patch.snapshot_id,
                patch.url,
                patch.error,
                patch.stopped_at,
                run_id,
                from.as_str()
            ],
        )?;
        let run = get_run_by_id(&tx, run_id)?.ok_or_else(|| StoreError::NotFound {
            what: "run",
            id: run_id.into(),
        })?;
        if changed == 0 {
            return Err(StoreError::StaleStatus {
                id: run_id.into(),
                expected: from,
                actual: run.status,
            });
        }
        tx.commit()?;
        Ok(run)
    }

    fn runs_in_status(&self, statuses: &[DeploymentStatus]) -> Result<Vec<RunRecord>> {
        let conn = self.conn();
        let list: Vec<String> = statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        // The statuses are a closed enum's fixed names, so splicing them is not an injection.
        let mut stmt = conn.prepare(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE status IN ({}) ORDER BY created_at, rowid",
            list.join(", ")
        ))?;
        let raws: Vec<RawRun> = stmt
            .query_map([], raw_run)?
            .collect::<rusqlite::Result<_>>()?;
        raws.into_iter().map(finish_run).collect()
    }

    fn append_logs(&self, run_id: &str, lines: &[LogLine]) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last: i64 = tx.query_row(
            "SELECT COALESCE(MAX(line_no), 0) FROM run_logs WHERE run_id = ?1",
            [run_id],
            |r| r.get(0),
        )?;
        {
            let mut stmt =
                tx.prepare_cached("INSERT INTO run_logs (run_id, line_no, ts, stream, text) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for (i, l) in lines.iter().enumerate() {
                stmt.execute(params![run_id, last + 1 + i as i64, l.ts, l.stream, l.text])?;
            }
        }
        tx.commit()?;
        Ok(last as u64 + 1)
    }

    fn read_logs(&self, run_id: &str, q: LogQuery) -> Result<Vec<LogLine>> {
        let conn = self.conn();
        let since = q.since.unwrap_or(0) as i64;
        let limit = q.limit.map(|l| l as i64).unwrap_or(-1);
        let map = |r: &Row<'_>| {
            Ok(LogLine {
                line_no: r.get::<_, i64>(0)? as u64,
                ts: r.get(1)?,
                stream: r.get(2)?,
                text: r.get(3)?,
            })
        };
        // `instr` rather than LIKE: the search text is taken literally (no `%`/`_` wildcards).
        // An empty or absent search matches every line.
        let needle = q.q.clone().unwrap_or_default();
        let mut lines: Vec<LogLine> = if let Some(tail) = q.tail {
            let mut stmt = conn.prepare(
                "SELECT line_no, ts, stream, text FROM run_logs WHERE run_id = ?1 AND line_no > ?2 \
                 AND (?4 = '' OR instr(text, ?4) > 0) ORDER BY line_no DESC LIMIT ?3",
            )?;
            let mut v: Vec<LogLine> = stmt
                .query_map(params![run_id, since, tail as i64, needle], map)?
                .collect::<rusqlite::Result<_>>()?;
            v.reverse();
            v
        } else {
            let mut stmt = conn.prepare(
                "SELECT line_no, ts, stream, text FROM run_logs WHERE run_id = ?1 AND line_no > ?2 \
                 AND (?4 = '' OR instr(text, ?4) > 0) ORDER BY line_no LIMIT ?3",
            )?;
            let v = stmt
                .query_map(params![run_id, since, limit, needle], map)?
                .collect::<rusqlite::Result<_>>()?;
            v
        };
        if let (Some(_), Some(limit)) = (q.tail, q.limit) {
            lines.truncate(limit as usize);
        }
        Ok(lines)
    }

    fn log_count(&self, run_id: &str) -> Result<u64> {
        Ok(self.conn().query_row(
            "SELECT COALESCE(MAX(line_no), 0) FROM run_logs WHERE run_id = ?1",
            [run_id],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }
}
