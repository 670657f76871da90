//! Versioned schema migrations, applied in order at start-up inside one transaction each.
//!
//! A migration is never edited once released; changes go in a new one.

pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE agents (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('operator', 'agent')),
    agent_id    TEXT REFERENCES agents(id),
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    CHECK ((kind = 'agent') = (agent_id IS NOT NULL))
);

CREATE TABLE specs (
    id               TEXT PRIMARY KEY,
    agent_id         TEXT NOT NULL UNIQUE REFERENCES agents(id),
    name             TEXT NOT NULL,
    source_dir       TEXT NOT NULL,
    install_command  TEXT NOT NULL,
    build_command    TEXT NOT NULL,
    start_command    TEXT NOT NULL,
    runtime_port     INTEGER NOT NULL,
    env_json         TEXT NOT NULL,
    target_default   TEXT NOT NULL,
    kind             TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);

CREATE TABLE snapshots (
    id             TEXT PRIMARY KEY,
    agent_id       TEXT NOT NULL REFERENCES agents(id),
    spec_id        TEXT,
    source_dir     TEXT NOT NULL,
    artifact_path  TEXT NOT NULL,
    content_hash   TEXT NOT NULL,
    file_count     INTEGER NOT NULL,
    size_bytes     INTEGER NOT NULL,
    created_at     INTEGER NOT NULL
);
CREATE INDEX snapshots_by_agent_hash ON snapshots (agent_id, content_hash, created_at);
CREATE INDEX snapshots_by_agent_time ON snapshots (agent_id, created_at);

CREATE TABLE runs (
    id             TEXT PRIMARY KEY,
    agent_id       TEXT NOT NULL REFERENCES agents(id),
    spec_id        TEXT NOT NULL,
    spec_json      TEXT NOT NULL,
    snapshot_id    TEXT REFERENCES snapshots(id),
    sandbox_id     TEXT NOT NULL UNIQUE,
    status         TEXT NOT NULL,
    target         TEXT NOT NULL,
    url            TEXT,
    note           TEXT,
    error          TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    stopped_at     INTEGER
);
CREATE INDEX runs_by_agent_time ON runs (agent_id, created_at);
CREATE INDEX runs_by_status ON runs (status);

CREATE TABLE run_logs (
    run_id   TEXT NOT NULL REFERENCES runs(id),
    line_no  INTEGER NOT NULL,
    ts       INTEGER NOT NULL,
    stream   TEXT NOT NULL,
    text     TEXT NOT NULL,
    PRIMARY KEY (run_id, line_no)
) WITHOUT ROWID;
"#,
    ),
    (2, crate::versions::MIGRATION),
    (3, crate::trust::MIGRATION),
    // The spec's runtimeEgressAllow (issue 4): a JSON array of host names.
    (
        4,
        "ALTER TABLE specs ADD COLUMN runtime_egress_json TEXT NOT NULL DEFAULT '[]';",
    ),
];
