//! Gates and the audit log (issue 7).
//!
//! - A gate's state only moves by conditional `UPDATE`s (`… WHERE state = 'approved' AND …`):
//!   whoever changes the row wins, everyone else sees zero rows changed. That is what makes a
//!   token single-use even with two consumers racing.
//! - Audit entries are only ever inserted. Each append reads the chain's head and inserts the
//!   next entry in one immediate transaction, so the chain has no forks; the head is also kept
//!   in `audit_head`, so entries deleted from the end are detectable.

use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use slipway_core::Millis;
use slipway_trust::{AuditEntry, Binding, GateRecord, GateState, GatedAction, NewAuditEntry};

use crate::{Result, SqliteStore, StoreError};

pub(crate) const MIGRATION: &str = r#"
CREATE TABLE gates (
    id                 TEXT PRIMARY KEY,
    agent_id           TEXT NOT NULL REFERENCES agents(id),
    action             TEXT NOT NULL,
    subject            TEXT NOT NULL,
    target             TEXT NOT NULL,
    framework          TEXT,
    build_command      TEXT,
    warning            TEXT NOT NULL,
    requested_by       TEXT NOT NULL,
    requested_by_kind  TEXT NOT NULL,
    requested_at       INTEGER NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('pending','approved','denied','expired','consumed','invalidated')),
    decided_by         TEXT,
    decided_at         INTEGER,
    reason             TEXT,
    expires_at         INTEGER NOT NULL,
    token_hash         TEXT UNIQUE,
    token_issued_at    INTEGER,
    consumed_at        INTEGER,
    used_for           TEXT
);
CREATE INDEX gates_by_agent_time ON gates (agent_id, requested_at);
CREATE INDEX gates_by_state ON gates (state);

CREATE TABLE audit_log (
    seq            INTEGER PRIMARY KEY,
    ts             INTEGER NOT NULL,
    actor_kind     TEXT NOT NULL,
    actor_id       TEXT,
    agent_id       TEXT,
    action         TEXT NOT NULL,
    target         TEXT,
    snapshot_hash  TEXT,
    outcome        TEXT NOT NULL,
    reason         TEXT,
    gate_id        TEXT,
    run_id         TEXT,
    prev_hash      TEXT NOT NULL,
    hash           TEXT NOT NULL
);
CREATE INDEX audit_by_agent ON audit_log (agent_id, seq);
CREATE INDEX audit_by_ts ON audit_log (ts);

CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   INTEGER NOT NULL,
    hash  TEXT NOT NULL
);
"#;

/// Which audit entries to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub agent_id: Option<String>,
    /// Exact action, or a prefix ending in `.` (`gate.` matches `gate.approve`).
    pub action: Option<String>,
    /// `ts >= since`.
    pub since: Option<Millis>,
    /// `ts < until`.
    pub until: Option<Millis>,
    /// Entries with `seq < before` (paging backwards from the newest).
    pub before: Option<u64>,
    pub limit: u64,
}

/// Every audit entry in chain order, and the head `(seq, hash)` recorded on append.
pub type AuditChain = (Vec<AuditEntry>, Option<(u64, String)>);

/// Gates: requests for privileged actions and their single-use tokens.
pub trait GateStore {
    fn insert_gate(&self, gate: &GateRecord) -> Result<()>;
    fn get_gate(&self, id: &str) -> Result<Option<GateRecord>>;
    fn find_gate_by_token_hash(&self, token_hash: &str) -> Result<Option<GateRecord>>;
    /// A pending gate for exactly this binding that has not lapsed at `now`.
    fn find_pending_gate(&self, binding: &Binding, now: Millis) -> Result<Option<GateRecord>>;
    /// Pending first, then newest first; only `agent_id`'s when given.
    fn list_gates(&self, agent_id: Option<&str>, limit: u64) -> Result<Vec<GateRecord>>;
    /// `pending → approved|denied` if the gate is still pending and has not lapsed at `now`.
    /// On approval `expires_at` becomes the token's expiry. Returns whether this call decided it.
    fn decide_gate(
        &self,
        id: &str,
        to: GateState,
        decided_by: &str,
        reason: Option<&str>,
        expires_at: Millis,
        now: Millis,
    ) -> Result<bool>;
    /// Records the token's hash the first time the requester reads an approved gate.
    /// Returns whether this call issued it (so the token is shown at most once).
    fn issue_gate_token(&self, id: &str, token_hash: &str, now: Millis) -> Result<bool>;
    /// `approved → consumed` if the token hash matches and it has not expired. Atomic: of two
    /// concurrent consumers exactly one gets `true`.
    fn consume_gate(&self, id: &str, token_hash: &str, now: Millis) -> Result<bool>;
    /// Records what the consumed token was used for (a run id).
    fn set_gate_use(&self, id: &str, used_for: &str) -> Result<()>;
    /// `approved|consumed → invalidated` (the action failed or was cancelled).
    fn invalidate_gate(&self, id: &str, reason: &str, now: Millis) -> Result<bool>;
    /// `pending|approved → expired` when its time has passed at `now`.
    fn expire_gate(&self, id: &str, now: Millis) -> Result<bool>;
}

/// The append-only audit log.
pub trait AuditStore {
    /// Appends one entry at the end of the chain and returns it with its seq and hashes.
    fn append_audit(&self, entry: &NewAuditEntry) -> Result<AuditEntry>;
    /// Newest first.
    fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>>;
    /// Every entry in chain order, and the recorded head `(seq, hash)`.
    fn audit_chain(&self) -> Result<AuditChain>;
}

const GATE_COLS: &str = "id, agent_id, action, subject, target, framework, build_command, warning, requested_by, \
    requested_by_kind, requested_at, state, decided_by, decided_at, reason, expires_at, token_hash, token_issued_at, \
    consumed_at, used_for";

type GateRow = (GateRecord, String, String);

fn gate_from_row(r: &Row<'_>) -> rusqlite::Result<GateRow> {
    let action: String = r.get(2)?;
    let state: String = r.get(11)?;
    Ok((
        GateRecord {
            id: r.get(0)?,
            binding: Binding {
                agent_id: r.get(1)?,
                action: GatedAction::ProductionDeploy,
                subject: r.get(3)?,
                target: r.get(4)?,
            },
            framework: r.get(5)?,
            build_command: r.get(6)?,
            warning: r.get(7)?,
            requested_by: r.get(8)?,
            requested_by_kind: r.get(9)?,
            requested_at: r.get(10)?,
            state: GateState::Pending,
            decided_by: r.get(12)?,
            decided_at: r.get(13)?,
            reason: r.get(14)?,
            expires_at: r.get(15)?,
            token_hash: r.get(16)?,
            token_issued_at: r.get(17)?,
            consumed_at: r.get(18)?,
            used_for: r.get(19)?,
        },
        action,
        state,
    ))
}

fn finish_gate((mut g, action, state): GateRow) -> Result<GateRecord> {
    g.binding.action = GatedAction::parse(&action)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown gate action {action:?}")))?;
    g.state = GateState::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown gate state {state:?}")))?;
    Ok(g)
}

const AUDIT_COLS: &str =
    "seq, ts, actor_kind, actor_id, agent_id, action, target, snapshot_hash, outcome, reason, gate_id, run_id, prev_hash, hash";

fn audit_from_row(r: &Row<'_>) -> rusqlite::Result<AuditEntry> {
    let seq: i64 = r.get(0)?;
    Ok(AuditEntry {
        seq: u64::try_from(seq).unwrap_or(0),
        entry: NewAuditEntry {
            ts: r.get(1)?,
            actor_kind: r.get(2)?,
            actor_id: r.get(3)?,
            agent_id: r.get(4)?,
            action: r.get(5)?,
            target: r.get(6)?,
            snapshot_hash: r.get(7)?,
            outcome: r.get(8)?,
            reason: r.get(9)?,
            gate_id: r.get(10)?,
            run_id: r.get(11)?,
        },
        prev_hash: r.get(12)?,
        hash: r.get(13)?,
    })
}

impl GateStore for SqliteStore {
    fn insert_gate(&self, g: &GateRecord) -> Result<()> {
        self.conn().execute(
            &format!("INSERT INTO gates ({GATE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"),
            params![
                g.id,
                g.binding.agent_id,
                g.binding.action.as_str(),
                g.binding.subject,
                g.binding.target,
                g.framework,
                g.build_command,
                g.warning,
                g.requested_by,
                g.requested_by_kind,
                g.requested_at,
                g.state.as_str(),
                g.decided_by,
                g.decided_at,
                g.reason,
                g.expires_at,
                g.token_hash,
                g.token_issued_at,
                g.consumed_at,
                g.used_for,
            ],
        )?;
        Ok(())
    }

    fn get_gate(&self, id: &str) -> Result<Option<GateRecord>> {
        let row = self
            .conn()
            .query_row(
                &format!("SELECT {GATE_COLS} FROM gates WHERE id = ?1"),
                [id],
                gate_from_row,
            )
            .optional()?;
        row.map(finish_gate).transpose()
    }

    fn find_gate_by_token_hash(&self, token_hash: &str) -> Result<Option<GateRecord>> {
        let row = self
            .conn()
            .query_row(
                &format!("SELECT {GATE_COLS} FROM gates WHERE token_hash = ?1"),
                [token_hash],
                gate_from_row,
            )
            .optional()?;
        row.map(finish_gate).transpose()
    }

    fn find_pending_gate(&self, b: &Binding, now: Millis) -> Result<Option<GateRecord>> {
        let row = self
            .conn()
            .query_row(
                &format!(
                    "SELECT {GATE_COLS} FROM gates WHERE agent_id = ?1 AND action = ?2 AND subject = ?3 AND target = ?4 \
                     AND state = 'pending' AND expires_at > ?5 ORDER BY requested_at DESC LIMIT 1"
                ),
                params![b.agent_id, b.action.as_str(), b.subject, b.target, now],
                gate_from_row,
            )
            .optional()?;
        row.map(finish_gate).transpose()
    }

    fn list_gates(&self, agent_id: Option<&str>, limit: u64) -> Result<Vec<GateRecord>> {
        let conn = self.conn();
        let order = "ORDER BY (state = 'pending') DESC, requested_at DESC, id LIMIT ?2";
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = conn.prepare(&format!(
            "SELECT {GATE_COLS} FROM gates WHERE (?1 IS NULL OR agent_id = ?1) {order}"
        ))?;
        let rows = stmt
            .query_map(params![agent_id, limit], gate_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(finish_gate).collect()
    }

    fn decide_gate(
        &self,
        id: &str,
        to: GateState,
        decided_by: &str,
        reason: Option<&str>,
        expires_at: Millis,
        now: Millis,
    ) -> Result<bool> {
        if !matches!(to, GateState::Approved | GateState::Denied) {
            return Err(StoreError::Conflict {
                id: id.into(),
                message: format!("a gate cannot be decided as {to}"),
            });
        }
        let n = self.conn().execute(
            "UPDATE gates SET state = ?2, decided_by = ?3, decided_at = ?4, reason = ?5, expires_at = ?6 \
             WHERE id = ?1 AND state = 'pending' AND expires_at > ?4",
            params![id, to.as_str(), decided_by, now, reason, expires_at],
        )?;
        Ok(n == 1)
    }

    fn issue_gate_token(&self, id: &str, token_hash: &str, now: Millis) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE gates SET token_hash = ?2, token_issued_at = ?3 \
             WHERE id = ?1 AND state = 'approved' AND token_hash IS NULL AND expires_at > ?3",
            params![id, token_hash, now],
        )?;
        Ok(n == 1)
    }

    fn consume_gate(&self, id: &str, token_hash: &str, now: Millis) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE gates SET state = 'consumed', consumed_at = ?3 \
             WHERE id = ?1 AND state = 'approved' AND token_hash = ?2 AND expires_at > ?3",
            params![id, token_hash, now],
        )?;
        Ok(n == 1)
    }

    fn set_gate_use(&self, id: &str, used_for: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE gates SET used_for = ?2 WHERE id = ?1",
            params![id, used_for],
        )?;
        Ok(())
    }

    fn invalidate_gate(&self, id: &str, reason: &str, now: Millis) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE gates SET state = 'invalidated', reason = ?2, consumed_at = COALESCE(consumed_at, ?3) \
             WHERE id = ?1 AND state IN ('approved', 'consumed')",
            params![id, reason, now],
        )?;
        Ok(n == 1)
    }

    fn expire_gate(&self, id: &str, now: Millis) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE gates SET state = 'expired' WHERE id = ?1 AND state IN ('pending', 'approved') AND expires_at <= ?2",
            params![id, now],
        )?;
        Ok(n == 1)
    }
}

impl AuditStore for SqliteStore {
    fn append_audit(&self, entry: &NewAuditEntry) -> Result<AuditEntry> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let head: Option<(i64, String)> = tx
            .query_row("SELECT seq, hash FROM audit_head WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let prev = head
            .as_ref()
            .map(|(s, h)| (u64::try_from(*s).unwrap_or(0), h.as_str()));
        let e = AuditEntry::chain(prev, entry.clone());
        let seq = i64::try_from(e.seq)
            .map_err(|_| StoreError::Corrupt("audit sequence overflow".into()))?;
        let n = &e.entry;
        tx.execute(
            &format!("INSERT INTO audit_log ({AUDIT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
            params![
                seq,
                n.ts,
                n.actor_kind,
                n.actor_id,
                n.agent_id,
                n.action,
                n.target,
                n.snapshot_hash,
                n.outcome,
                n.reason,
                n.gate_id,
                n.run_id,
                e.prev_hash,
                e.hash
            ],
        )?;
        tx.execute(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2) ON CONFLICT (id) DO UPDATE SET seq = ?1, hash = ?2",
            params![seq, e.hash],
        )?;
        tx.commit()?;
        Ok(e)
    }

    fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
        let conn = self.conn();
        let (action_exact, action_prefix) = match &q.action {
            Some(a) if a.ends_with('.') => (None, Some(format!("{a}%"))),
            Some(a) => (Some(a.clone()), None),
            None => (None, None),
        };
        let before = q.before.map(|b| i64::try_from(b).unwrap_or(i64::MAX));
        let mut stmt = conn.prepare(&format!(
            "SELECT {AUDIT_COLS} FROM audit_log \
             WHERE (?1 IS NULL OR agent_id = ?1) AND (?2 IS NULL OR action = ?2) AND (?3 IS NULL OR action LIKE ?3) \
             AND (?4 IS NULL OR ts >= ?4) AND (?5 IS NULL OR ts < ?5) AND (?6 IS NULL OR seq < ?6) \
             ORDER BY seq DESC LIMIT ?7"
        ))?;
        let rows = stmt
            .query_map(
                params![
                    q.agent_id,
                    action_exact,
                    action_prefix,
                    q.since,
                    q.until,
                    before,
                    i64::try_from(q.limit).unwrap_or(i64::MAX)
                ],
                audit_from_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn audit_chain(&self) -> Result<AuditChain> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {AUDIT_COLS} FROM audit_log ORDER BY seq"))?;
        let rows = stmt
            .query_map([], audit_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let head: Option<(i64, String)> = conn
            .query_row("SELECT seq, hash FROM audit_head WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        Ok((rows, head.map(|(s, h)| (u64::try_from(s).unwrap_or(0), h))))
    }
}
