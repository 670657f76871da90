//! Deployments, releases, versions and the production route's history (issue 6).
//!
//! - A **deployment** is one per agent: its name and slug are fixed when it is created, so the
//!   production URL never changes.
//! - A **release** is the immutable output of one successful build (a content-addressed
//!   artifact plus how to start it).
//! - A **version** is a numbered row of a deployment's history pointing at a release. Numbers
//!   come from a per-deployment counter that only ever grows, so a number is never reused.
//! - Every change of the production route (deploy, promote, rollback) is one row of the route
//!   history, written in the same transaction that moves `active_version`.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use slipway_core::{DeploymentSpec, Millis};

use crate::sqlite::{spec_from_json, spec_to_json};
use crate::{Result, SqliteStore, StoreError};

/// The stable product object of one agent: "the live app".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRecord {
    pub id: String,
    pub agent_id: String,
    pub name: String,
    /// URL-safe, unique among deployments; the first label of the production host name.
    pub slug: String,
    /// The version the production route points at; `None` before the first production version.
    pub active_version: Option<i64>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// How a release is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReleaseKind {
    /// Files served by the router, no process.
    Static,
    /// The built workspace plus a start command, run in a sandbox.
    Dynamic,
}

impl ReleaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseKind::Static => "static",
            ReleaseKind::Dynamic => "dynamic",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "static" => Some(ReleaseKind::Static),
            "dynamic" => Some(ReleaseKind::Dynamic),
            _ => None,
        }
    }
}

/// The immutable output of a successful build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRecord {
    pub id: String,
    pub agent_id: String,
    /// The run whose build produced it.
    pub run_id: Option<String>,
    /// Canonical content hash of the release tree (same definition as snapshots).
    pub content_hash: String,
    /// sha256 of the archive bytes.
    pub artifact_sha256: String,
    pub artifact_path: String,
    pub kind: ReleaseKind,
    /// For static releases: the served directory, relative to the release root (`.` for the root).
    pub static_dir: Option<String>,
    /// SPA fallback for static releases.
    pub spa_fallback: bool,
    pub start_command: String,
    pub runtime_port: u16,
    pub file_count: u64,
    pub size_bytes: u64,
    pub created_at: Millis,
}

/// One numbered row of a deployment's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    pub deployment_id: String,
    pub agent_id: String,
    pub version_number: i64,
    pub release_id: String,
    /// The run that produced (deploy) or was promoted into (promote) this version.
    pub run_id: Option<String>,
    /// `contentHash` of the source snapshot.
    pub snapshot_hash: Option<String>,
    /// The release's content hash (denormalised for listings).
    pub release_hash: String,
    /// The spec the run used.
    pub spec: DeploymentSpec,
    /// The token that asked for it.
    pub operator: Option<String>,
    pub note: Option<String>,
    /// `deploy` or `promote`.
    pub origin: String,
    pub created_at: Millis,
}

/// A version to create; the store assigns the number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVersion {
    pub release_id: String,
    pub run_id: Option<String>,
    pub snapshot_hash: Option<String>,
    pub release_hash: String,
    pub spec: DeploymentSpec,
    pub operator: Option<String>,
    pub note: Option<String>,
    pub origin: String,
}

/// One change of the production route: who, when, why, from → to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    pub id: i64,
    pub deployment_id: String,
    pub agent_id: String,
    pub host: String,
    pub from_version: Option<i64>,
    pub to_version: Option<i64>,
    /// `deploy`, `promote`, `rollback` or `stopped`.
    pub reason: String,
    pub operator: Option<String>,
    pub note: Option<String>,
    pub created_at: Millis,
}

/// Why the route changed, and who asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSwitch {
    pub host: String,
    pub reason: String,
    pub operator: Option<String>,
    pub note: Option<String>,
}

/// Artifacts some row still points at, per agent (see [`VersionStore::referenced_artifacts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReferencedArtifacts {
    /// agent id → snapshot content hashes referenced by a snapshot row, a run or a version.
    pub snapshots: BTreeMap<String, BTreeSet<String>>,
    /// agent id → release content hashes referenced by a release row.
    pub releases: BTreeMap<String, BTreeSet<String>>,
}

/// Deployments, releases, versions and route history.
pub trait VersionStore: Send + Sync {
    /// The agent's deployment, created on first call with `name` and a slug made unique from
    /// `base_slug` (`app`, `app-2`, `app-3`, …). Later calls return the stored one unchanged.
    fn ensure_deployment(
        &self,
        agent_id: &str,
        id: &str,
        name: &str,
        base_slug: &str,
        now: Millis,
    ) -> Result<DeploymentRecord>;
    fn get_deployment(&self, agent_id: &str) -> Result<Option<DeploymentRecord>>;
    fn list_deployments(&self) -> Result<Vec<DeploymentRecord>>;

    fn insert_release(&self, release: &ReleaseRecord) -> Result<()>;
    fn get_release(&self, agent_id: &str, id: &str) -> Result<Option<ReleaseRecord>>;
    /// The release built by a run, if its build succeeded.
    fn release_for_run(&self, agent_id: &str, run_id: &str) -> Result<Option<ReleaseRecord>>;

    /// Allocates the next version number, inserts the version, points `active_version` at it
    /// and appends the route change — all in one transaction.
    fn create_version(
        &self,
        deployment_id: &str,
        new: &NewVersion,
        switch: &RouteSwitch,
        now: Millis,
    ) -> Result<VersionRecord>;
    /// Points `active_version` at `to` (an existing version, or `None` when production has
    /// nothing to serve) and appends the route change, in one transaction.
    fn switch_route(
        &self,
        deployment_id: &str,
        to: Option<i64>,
        switch: &RouteSwitch,
        now: Millis,
    ) -> Result<RouteChange>;
    /// Newest first.
    fn list_versions(&self, agent_id: &str, limit: u64) -> Result<Vec<VersionRecord>>;
    fn get_version(&self, agent_id: &str, version_number: i64) -> Result<Option<VersionRecord>>;
    /// run id → version number, for the runs that became versions.
    fn versions_by_run(&self, agent_id: &str) -> Result<BTreeMap<String, i64>>;
    /// Newest first.
    fn route_history(&self, agent_id: &str, limit: u64) -> Result<Vec<RouteChange>>;

    /// Every artifact some row references. Garbage collection may remove only what is absent.
    fn referenced_artifacts(&self) -> Result<ReferencedArtifacts>;
}

const DEPLOYMENT_COLS: &str = "id, agent_id, name, slug, active_version, created_at, updated_at";

fn deployment_from_row(r: &Row<'_>) -> rusqlite::Result<DeploymentRecord> {
    Ok(DeploymentRecord {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        name: r.get(2)?,
        slug: r.get(3)?,
        active_version: r.get(4)?,
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
    })
}

const RELEASE_COLS: &str =
    "id, agent_id, run_id, content_hash, artifact_sha256, artifact_path, kind, static_dir, \
    spa_fallback, start_command, runtime_port, file_count, size_bytes, created_at";

fn release_from_row(r: &Row<'_>) -> rusqlite::Result<(ReleaseRecord, String)> {
    Ok((
        ReleaseRecord {
            id: r.get(0)?,
            agent_id: r.get(1)?,
            run_id: r.get(2)?,
            content_hash: r.get(3)?,
            artifact_sha256: r.get(4)?,
            artifact_path: r.get(5)?,
            kind: ReleaseKind::Dynamic,
            static_dir: r.get(7)?,
            spa_fallback: r.get(8)?,
            start_command: r.get(9)?,
            runtime_port: r.get::<_, i64>(10)? as u16,
            file_count: r.get::<_, i64>(11)? as u64,
            size_bytes: r.get::<_, i64>(12)? as u64,
            created_at: r.get(13)?,
        },
        r.get(6)?,
    ))
}

fn finish_release((mut rel, kind): (ReleaseRecord, String)) -> Result<ReleaseRecord> {
    rel.kind = ReleaseKind::parse(&kind)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown release kind {kind:?}")))?;
    Ok(rel)
}

const VERSION_COLS: &str =
    "deployment_id, agent_id, version_number, release_id, run_id, snapshot_hash, release_hash, \
    spec_json, operator, note, origin, created_at";

fn version_from_row(r: &Row<'_>) -> rusqlite::Result<(VersionRecord, String)> {
    let spec_json: String = r.get(7)?;
    Ok((
        VersionRecord {
            deployment_id: r.get(0)?,
            agent_id: r.get(1)?,
            version_number: r.get(2)?,
            release_id: r.get(3)?,
            run_id: r.get(4)?,
            snapshot_hash: r.get(5)?,
            release_hash: r.get(6)?,
            spec: placeholder_spec(),
            operator: r.get(8)?,
            note: r.get(9)?,
            origin: r.get(10)?,
            created_at: r.get(11)?,
        },
        spec_json,
    ))
}

fn placeholder_spec() -> DeploymentSpec {
    DeploymentSpec {
        id: String::new(),
        agent_id: String::new(),
        name: String::new(),
        source_dir: String::new(),
        install_command: String::new(),
        build_command: String::new(),
        start_command: String::new(),
        runtime_port: 0,
        env: BTreeMap::new(),
        target_default: slipway_core::DeploymentTarget::Preview,
        kind: slipway_core::DeploymentKind::Auto,
        runtime_egress_allow: Vec::new(),
        created_at: 0,
        updated_at: 0,
    }
}

fn finish_version((mut v, spec): (VersionRecord, String)) -> Result<VersionRecord> {
    v.spec = spec_from_json(&spec)?;
    Ok(v)
}

const ROUTE_COLS: &str =
    "id, deployment_id, agent_id, host, from_version, to_version, reason, operator, note, created_at";

fn route_from_row(r: &Row<'_>) -> rusqlite::Result<RouteChange> {
    Ok(RouteChange {
        id: r.get(0)?,
        deployment_id: r.get(1)?,
        agent_id: r.get(2)?,
        host: r.get(3)?,
        from_version: r.get(4)?,
        to_version: r.get(5)?,
        reason: r.get(6)?,
        operator: r.get(7)?,
        note: r.get(8)?,
        created_at: r.get(9)?,
    })
}

fn not_found(what: &'static str, id: &str) -> StoreError {
    StoreError::NotFound {
        what,
        id: id.to_string(),
    }
}

fn insert_route_change(
    tx: &rusqlite::Transaction<'_>,
    dep: &DeploymentRecord,
    to: Option<i64>,
    switch: &RouteSwitch,
    now: Millis,
) -> Result<RouteChange> {
    tx.execute(
        "UPDATE deployments SET active_version = ?2, updated_at = ?3 WHERE id = ?1",
        params![dep.id, to, now],
    )?;
    tx.execute(
        "INSERT INTO route_changes (deployment_id, agent_id, host, from_version, to_version, reason, operator, note, \
         created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            dep.id,
            dep.agent_id,
            switch.host,
            dep.active_version,
            to,
            switch.reason,
            switch.operator,
            switch.note,
            now
        ],
    )?;
    let id = tx.last_insert_rowid();
    Ok(RouteChange {
        id,
        deployment_id: dep.id.clone(),
        agent_id: dep.agent_id.clone(),
        host: switch.host.clone(),
        from_version: dep.active_version,
        to_version: to,
        reason: switch.reason.clone(),
        operator: switch.operator.clone(),
        note: switch.note.clone(),
        created_at: now,
    })
}

impl VersionStore for SqliteStore {
    fn ensure_deployment(
        &self,
        agent_id: &str,
        id: &str,
        name: &str,
        base_slug: &str,
        now: Millis,
    ) -> Result<DeploymentRecord> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing = tx
            .query_row(
                &format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE agent_id = ?1"),
                [agent_id],
                deployment_from_row,
            )
            .optional()?;
        if let Some(d) = existing {
            return Ok(d);
        }
        let mut slug = base_slug.to_string();
        let mut n = 1;
        loop {
            let taken: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM deployments WHERE slug = ?1)",
                [&slug],
                |r| r.get(0),
            )?;
            if !taken {
                break;
            }
            n += 1;
            slug = format!("{base_slug}-{n}");
        }
        tx.execute(
            "INSERT INTO deployments (id, agent_id, name, slug, active_version, next_version, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, NULL, 1, ?5, ?5)",
            params![id, agent_id, name, slug, now],
        )?;
        tx.commit()?;
        Ok(DeploymentRecord {
            id: id.to_string(),
            agent_id: agent_id.to_string(),
            name: name.to_string(),
            slug,
            active_version: None,
            created_at: now,
            updated_at: now,
        })
    }

    fn get_deployment(&self, agent_id: &str) -> Result<Option<DeploymentRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE agent_id = ?1"),
                [agent_id],
                deployment_from_row,
            )
            .optional()?)
    }

    fn list_deployments(&self) -> Result<Vec<DeploymentRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {DEPLOYMENT_COLS} FROM deployments ORDER BY created_at, id"
        ))?;
        let rows = stmt
            .query_map([], deployment_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn insert_release(&self, r: &ReleaseRecord) -> Result<()> {
        self.conn().execute(
            &format!("INSERT INTO releases ({RELEASE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
            params![
                r.id,
                r.agent_id,
                r.run_id,
                r.content_hash,
                r.artifact_sha256,
                r.artifact_path,
                r.kind.as_str(),
                r.static_dir,
                r.spa_fallback,
                r.start_command,
                i64::from(r.runtime_port),
                r.file_count as i64,
                r.size_bytes as i64,
                r.created_at
            ],
        )?;
        Ok(())
    }

    fn get_release(&self, agent_id: &str, id: &str) -> Result<Option<ReleaseRecord>> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {RELEASE_COLS} FROM releases WHERE agent_id = ?1 AND id = ?2"),
                [agent_id, id],
                release_from_row,
            )
            .optional()?;
        raw.map(finish_release).transpose()
    }

    fn release_for_run(&self, agent_id: &str, run_id: &str) -> Result<Option<ReleaseRecord>> {
        let raw = self
            .conn()
            .query_row(
                &format!(
                    "SELECT {RELEASE_COLS} FROM releases WHERE agent_id = ?1 AND run_id = ?2 ORDER BY created_at DESC LIMIT 1"
                ),
                [agent_id, run_id],
                release_from_row,
            )
            .optional()?;
        raw.map(finish_release).transpose()
    }

    fn create_version(
        &self,
        deployment_id: &str,
        new: &NewVersion,
        switch: &RouteSwitch,
        now: Millis,
    ) -> Result<VersionRecord> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (dep, next): (DeploymentRecord, i64) = tx
            .query_row(
                &format!("SELECT {DEPLOYMENT_COLS}, next_version FROM deployments WHERE id = ?1"),
                [deployment_id],
                |r| Ok((deployment_from_row(r)?, r.get(7)?)),
            )
            .optional()?
            .ok_or_else(|| not_found("deployment", deployment_id))?;
        // The counter moves first and never back: a number is never handed out twice, even if
        // this version were later lost.
        tx.execute(
            "UPDATE deployments SET next_version = ?2 WHERE id = ?1",
            params![deployment_id, next + 1],
        )?;
        tx.execute(
            &format!(
                "INSERT INTO versions ({VERSION_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ),
            params![
                deployment_id,
                dep.agent_id,
                next,
                new.release_id,
                new.run_id,
                new.snapshot_hash,
                new.release_hash,
                spec_to_json(&new.spec),
                new.operator,
                new.note,
                new.origin,
                now
            ],
        )?;
        insert_route_change(&tx, &dep, Some(next), switch, now)?;
        tx.commit()?;
        Ok(VersionRecord {
            deployment_id: deployment_id.to_string(),
            agent_id: dep.agent_id,
            version_number: next,
            release_id: new.release_id.clone(),
            run_id: new.run_id.clone(),
            snapshot_hash: new.snapshot_hash.clone(),
            release_hash: new.release_hash.clone(),
            spec: new.spec.clone(),
            operator: new.operator.clone(),
            note: new.note.clone(),
            origin: new.origin.clone(),
            created_at: now,
        })
    }

    fn switch_route(
        &self,
        deployment_id: &str,
        to: Option<i64>,
        switch: &RouteSwitch,
        now: Millis,
    ) -> Result<RouteChange> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let dep = tx
            .query_row(
                &format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE id = ?1"),
                [deployment_id],
                deployment_from_row,
            )
            .optional()?
            .ok_or_else(|| not_found("deployment", deployment_id))?;
        if let Some(n) = to {
            let exists: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM versions WHERE deployment_id = ?1 AND version_number = ?2)",
                params![deployment_id, n],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(not_found("version", &n.to_string()));
            }
        }
        let change = insert_route_change(&tx, &dep, to, switch, now)?;
        tx.commit()?;
        Ok(change)
    }

    fn list_versions(&self, agent_id: &str, limit: u64) -> Result<Vec<VersionRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {VERSION_COLS} FROM versions WHERE agent_id = ?1 ORDER BY version_number DESC LIMIT ?2"
        ))?;
        let raw = stmt
            .query_map(
                params![agent_id, limit.min(i64::MAX as u64) as i64],
                version_from_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raw.into_iter().map(finish_version).collect()
    }

    fn get_version(&self, agent_id: &str, version_number: i64) -> Result<Option<VersionRecord>> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {VERSION_COLS} FROM versions WHERE agent_id = ?1 AND version_number = ?2"),
                params![agent_id, version_number],
                version_from_row,
            )
            .optional()?;
        raw.map(finish_version).transpose()
    }

    fn versions_by_run(&self, agent_id: &str) -> Result<BTreeMap<String, i64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT run_id, version_number FROM versions WHERE agent_id = ?1 AND run_id IS NOT NULL ORDER BY version_number",
        )?;
        let rows = stmt
            .query_map([agent_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        // A run promoted twice keeps its first number.
        let mut map = BTreeMap::new();
        for (run, n) in rows {
            map.entry(run).or_insert(n);
        }
        Ok(map)
    }

    fn route_history(&self, agent_id: &str, limit: u64) -> Result<Vec<RouteChange>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ROUTE_COLS} FROM route_changes WHERE agent_id = ?1 ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = stmt
            .query_map(
                params![agent_id, limit.min(i64::MAX as u64) as i64],
                route_from_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn referenced_artifacts(&self) -> Result<ReferencedArtifacts> {
        let conn = self.conn();
        let mut out = ReferencedArtifacts::default();
        let mut stmt = conn.prepare(
            "SELECT agent_id, content_hash FROM snapshots \
             UNION SELECT r.agent_id, s.content_hash FROM runs r JOIN snapshots s ON s.id = r.snapshot_id \
             UNION SELECT agent_id, snapshot_hash FROM versions WHERE snapshot_hash IS NOT NULL",
        )?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (agent, hash) = row?;
            out.snapshots.entry(agent).or_default().insert(hash);
        }
        let mut stmt = conn.prepare(
            "SELECT agent_id, content_hash FROM releases \
             UNION SELECT agent_id, release_hash FROM versions",
        )?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (agent, hash) = row?;
            out.releases.entry(agent).or_default().insert(hash);
        }
        Ok(out)
    }
}

/// The schema of this module (migration 2).
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE deployments (
    id              TEXT PRIMARY KEY,
    agent_id        TEXT NOT NULL UNIQUE REFERENCES agents(id),
    name            TEXT NOT NULL,
    slug            TEXT NOT NULL UNIQUE,
    active_version  INTEGER,
    next_version    INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

CREATE TABLE releases (
    id               TEXT PRIMARY KEY,
    agent_id         TEXT NOT NULL REFERENCES agents(id),
    run_id           TEXT REFERENCES runs(id),
    content_hash     TEXT NOT NULL,
    artifact_sha256  TEXT NOT NULL,
    artifact_path    TEXT NOT NULL,
    kind             TEXT NOT NULL CHECK (kind IN ('static', 'dynamic')),
    static_dir       TEXT,
    spa_fallback     INTEGER NOT NULL,
    start_command    TEXT NOT NULL,
    runtime_port     INTEGER NOT NULL,
    file_count       INTEGER NOT NULL,
    size_bytes       INTEGER NOT NULL,
    created_at       INTEGER NOT NULL
);
CREATE INDEX releases_by_run ON releases (agent_id, run_id);

CREATE TABLE versions (
    deployment_id   TEXT NOT NULL REFERENCES deployments(id),
    agent_id        TEXT NOT NULL REFERENCES agents(id),
    version_number  INTEGER NOT NULL,
    release_id      TEXT NOT NULL REFERENCES releases(id),
    run_id          TEXT REFERENCES runs(id),
    snapshot_hash   TEXT,
    release_hash    TEXT NOT NULL,
    spec_json       TEXT NOT NULL,
    operator        TEXT,
    note            TEXT,
    origin          TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (deployment_id, version_number)
);
CREATE INDEX versions_by_agent ON versions (agent_id, version_number);

CREATE TABLE route_changes (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment_id   TEXT NOT NULL REFERENCES deployments(id),
    agent_id        TEXT NOT NULL REFERENCES agents(id),
    host            TEXT NOT NULL,
    from_version    INTEGER,
    to_version      INTEGER,
    reason          TEXT NOT NULL,
    operator        TEXT,
    note            TEXT,
    created_at      INTEGER NOT NULL
);
CREATE INDEX route_changes_by_agent ON route_changes (agent_id, id);
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Agent, Store};

    fn spec(agent: &str) -> DeploymentSpec {
        DeploymentSpec {
            agent_id: agent.into(),
            name: "shop".into(),
            ..placeholder_spec()
        }
    }

    fn release(agent: &str, id: &str) -> ReleaseRecord {
        ReleaseRecord {
            id: id.into(),
            agent_id: agent.into(),
            run_id: None,
            content_hash: "c".repeat(64),
            artifact_sha256: "d".repeat(64),
            artifact_path: "x".into(),
            kind: ReleaseKind::Static,
            static_dir: Some("dist".into()),
            spa_fallback: true,
            start_command: "true".into(),
            runtime_port: 3000,
            file_count: 2,
            size_bytes: 10,
            created_at: 1,
        }
    }

    #[test]
    fn slugs_are_unique_numbers_monotonic_and_history_kept() {
        let s = SqliteStore::open_in_memory().unwrap();
        for a in ["agt-a", "agt-b"] {
            s.insert_agent(&Agent {
                id: a.into(),
                name: a.into(),
                created_at: 1,
            })
            .unwrap();
        }
        let a = s
            .ensure_deployment("agt-a", "dep-a", "Shop", "shop", 1)
            .unwrap();
        let b = s
            .ensure_deployment("agt-b", "dep-b", "Shop", "shop", 1)
            .unwrap();
        assert_eq!((a.slug.as_str(), b.slug.as_str()), ("shop", "shop-2"));
        // Fixed once created.
        assert_eq!(
            s.ensure_deployment("agt-a", "dep-x", "Other", "other", 2)
                .unwrap(),
            a
        );

        s.insert_release(&release("agt-a", "rel-1")).unwrap();
        assert_eq!(
            s.get_release("agt-a", "rel-1").unwrap().unwrap(),
            release("agt-a", "rel-1")
        );
        let new = NewVersion {
            release_id: "rel-1".into(),
            run_id: None,
            snapshot_hash: None,
            release_hash: "c".repeat(64),
            spec: spec("agt-a"),
            operator: Some("tok-1".into()),
            note: None,
            origin: "deploy".into(),
        };
        let sw = |reason: &str| RouteSwitch {
            host: "shop.localhost".into(),
            reason: reason.into(),
            operator: None,
            note: None,
        };
        let v1 = s.create_version("dep-a", &new, &sw("deploy"), 10).unwrap();
        let v2 = s.create_version("dep-a", &new, &sw("deploy"), 11).unwrap();
        assert_eq!((v1.version_number, v2.version_number), (1, 2));
        assert_eq!(
            s.get_version("agt-a", 1).unwrap().unwrap().spec.name,
            "shop"
        );
        assert!(
            s.get_version("agt-b", 1).unwrap().is_none(),
            "another agent's versions are not visible"
        );
        s.switch_route("dep-a", Some(1), &sw("rollback"), 12)
            .unwrap();
        assert!(matches!(
            s.switch_route("dep-a", Some(9), &sw("rollback"), 13),
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(
            s.get_deployment("agt-a").unwrap().unwrap().active_version,
            Some(1)
        );
        let v3 = s.create_version("dep-a", &new, &sw("promote"), 14).unwrap();
        assert_eq!(v3.version_number, 3);
        let listed: Vec<i64> = s
            .list_versions("agt-a", 10)
            .unwrap()
            .iter()
            .map(|v| v.version_number)
            .collect();
        assert_eq!(listed, [3, 2, 1]);
        let moves: Vec<_> = s
            .route_history("agt-a", 10)
            .unwrap()
            .into_iter()
            .map(|c| (c.from_version, c.to_version, c.reason))
            .collect();
        assert_eq!(
            moves,
            [
                (Some(1), Some(3), "promote".to_string()),
                (Some(2), Some(1), "rollback".to_string()),
                (Some(1), Some(2), "deploy".to_string()),
                (None, Some(1), "deploy".to_string()),
            ]
        );
        let refs = s.referenced_artifacts().unwrap();
        assert!(refs.releases["agt-a"].contains(&"c".repeat(64)));
        assert!(s.schema_version().unwrap() >= 2);
    }
}
