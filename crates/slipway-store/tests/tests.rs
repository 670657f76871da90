//! Store tests: every test gets a fresh database file in its own temp dir.

use std::collections::BTreeMap;

use slipway_core::{DeploymentKind, DeploymentSpec, DeploymentStatus, DeploymentTarget};
use slipway_store::*;

fn fresh() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("slipway.db")).unwrap();
    (dir, store)
}

fn agent(store: &SqliteStore, id: &str) {
    store
        .insert_agent(&Agent {
            id: id.into(),
            name: format!("name of {id}"),
            created_at: 1,
        })
        .unwrap();
}

fn spec(agent_id: &str, now: i64) -> DeploymentSpec {
    DeploymentSpec {
        id: format!("spc-{agent_id}"),
        agent_id: agent_id.into(),
        name: "app".into(),
        source_dir: "/config/miniapps/app".into(),
        install_command: "".into(),
        build_command: "true".into(),
        start_command: "python3 -m http.server $PORT".into(),
        runtime_port: 3000,
        env: BTreeMap::from([("A".to_string(), "1".to_string())]),
        target_default: DeploymentTarget::Preview,
        kind: DeploymentKind::Auto,
        runtime_egress_allow: vec!["api.example.com".into()],
        created_at: now,
        updated_at: now,
    }
}

fn run(agent_id: &str, id: &str, status: DeploymentStatus, created_at: i64) -> RunRecord {
    RunRecord {
        id: id.into(),
        agent_id: agent_id.into(),
        spec_id: format!("spc-{agent_id}"),
        spec_snapshot: spec(agent_id, 5),
        snapshot_id: None,
        sandbox_id: format!("sbx-{id}"),
        status,
        target: DeploymentTarget::Preview,
        url: None,
        note: Some("first".into()),
        error: None,
        created_at,
        updated_at: created_at,
        stopped_at: None,
    }
}

#[test]
fn reopen_keeps_data_and_migrations_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slipway.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        agent(&s, "agt-a");
        s.upsert_spec(&spec("agt-a", 10)).unwrap();
        s.insert_run_if_idle(&run("agt-a", "run-1", DeploymentStatus::Queued, 20))
            .unwrap();
        s.append_logs(
            "run-1",
            &[LogLine::new(21, "system", "> capturing source...")],
        )
        .unwrap();
        assert_eq!(
            s.schema_version().unwrap(),
            slipway_store::latest_schema_version()
        );
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(
        s.schema_version().unwrap(),
        slipway_store::latest_schema_version()
    );
    assert_eq!(s.get_agent("agt-a").unwrap().unwrap().name, "name of agt-a");
    assert_eq!(s.get_spec("agt-a").unwrap().unwrap(), spec("agt-a", 10));
    let r = s.get_run("agt-a", "run-1").unwrap().unwrap();
    assert_eq!(r, run("agt-a", "run-1", DeploymentStatus::Queued, 20));
    assert_eq!(
        s.read_logs("run-1", LogQuery::default()).unwrap()[0].text,
        "> capturing source..."
    );
}

#[test]
fn upsert_keeps_id_and_created_at() {
    let (_d, s) = fresh();
    agent(&s, "agt-a");
    let first = s.upsert_spec(&spec("agt-a", 10)).unwrap();
    let mut changed = spec("agt-a", 99);
    changed.id = "spc-other".into();
    changed.name = "renamed".into();
    let second = s.upsert_spec(&changed).unwrap();
    assert_eq!(second.id, first.id);
    assert_eq!(second.created_at, 10);
    assert_eq!(second.updated_at, 99);
    assert_eq!(second.name, "renamed");
    assert!(s.get_spec("agt-b").unwrap().is_none());
}

#[test]
fn one_active_pipeline_per_agent() {
    let (_d, s) = fresh();
    agent(&s, "agt-a");
    agent(&s, "agt-b");
    s.insert_run_if_idle(&run("agt-a", "run-1", DeploymentStatus::Queued, 1))
        .unwrap();
    match s.insert_run_if_idle(&run("agt-a", "run-2", DeploymentStatus::Queued, 2)) {
        Err(StoreError::Conflict { id, .. }) => assert_eq!(id, "run-1"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Another agent is not affected.
    s.insert_run_if_idle(&run("agt-b", "run-3", DeploymentStatus::Queued, 3))
        .unwrap();
    // Once the first run fails, a new one may start.
    s.transition_run(
        "run-1",
        DeploymentStatus::Queued,
        DeploymentStatus::Capturing,
        RunPatch::default(),
        4,
    )
    .unwrap();
    s.transition_run(
        "run-1",
        DeploymentStatus::Capturing,
        DeploymentStatus::Failed,
        RunPatch::default(),
        5,
    )
    .unwrap();
    s.insert_run_if_idle(&run("agt-a", "run-2", DeploymentStatus::Queued, 6))
        .unwrap();
    let ids: Vec<_> = s
        .list_runs("agt-a", 10)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, vec!["run-2", "run-1"]);
}

#[test]
fn transitions_are_checked_and_compare_and_set() {
    let (_d, s) = fresh();
    agent(&s, "agt-a");
    s.insert_run_if_idle(&run("agt-a", "run-1", DeploymentStatus::Queued, 1))
        .unwrap();
    // Illegal edge: refused by the state machine, nothing written.
    let e = s.transition_run(
        "run-1",
        DeploymentStatus::Queued,
        DeploymentStatus::Ready,
        RunPatch::default(),
        2,
    );
    assert!(matches!(e, Err(StoreError::Transition(_))), "{e:?}");
    // Legal edge but stale `from`: refused by the compare-and-set.
    let e = s.transition_run(
        "run-1",
        DeploymentStatus::Capturing,
        DeploymentStatus::Provisioning,
        RunPatch::default(),
        2,
    );
    assert!(
        matches!(
            e,
            Err(StoreError::StaleStatus {
                actual: DeploymentStatus::Queued,
                ..
            })
        ),
        "{e:?}"
    );
    let r = s
        .transition_run(
            "run-1",
            DeploymentStatus::Queued,
            DeploymentStatus::Capturing,
            RunPatch::default(),
            3,
        )
        .unwrap();
    assert_eq!((r.status, r.updated_at), (DeploymentStatus::Capturing, 3));
    let patch = RunPatch {
        error: Some("capturing: boom".into()),
        ..Default::default()
    };
    let r = s
        .transition_run(
            "run-1",
            DeploymentStatus::Capturing,
            DeploymentStatus::Failed,
            patch,
            4,
        )
        .unwrap();
    assert_eq!(r.error.as_deref(), Some("capturing: boom"));
    // A patch without an error keeps the stored one.
    let r = s
        .transition_run(
            "run-1",
            DeploymentStatus::Failed,
            DeploymentStatus::Stopping,
            RunPatch::default(),
            5,
        )
        .unwrap();
    assert_eq!(r.error.as_deref(), Some("capturing: boom"));
    let patch = RunPatch {
        stopped_at: Some(6),
        ..Default::default()
    };
    let r = s
        .transition_run(
            "run-1",
            DeploymentStatus::Stopping,
            DeploymentStatus::Stopped,
            patch,
            6,
        )
        .unwrap();
    assert_eq!(r.stopped_at, Some(6));
    let e = s.transition_run(
        "nope",
        DeploymentStatus::Queued,
        DeploymentStatus::Capturing,
        RunPatch::default(),
        7,
    );
    assert!(matches!(e, Err(StoreError::NotFound { .. })), "{e:?}");
}

#[test]
fn concurrent_transitions_have_one_winner() {
    let (_d, s) = fresh();
    agent(&s, "agt-a");
    s.insert_run_if_idle(&run("agt-a", "run-1", DeploymentStatus::Queued, 1))
        .unwrap();
    let s = std::sync::Arc::new(s);
    let winners: usize = (0..8)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                s.transition_run(
                    "run-1",
                    DeploymentStatus::Queued,
                    DeploymentStatus::Capturing,
                    RunPatch::default(),
                    i,
                )
                .is_ok() as usize
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    assert_eq!(winners, 1);
}

#[test]
fn logs_are_numbered_and_queryable() {
    let (_d, s) = fresh();
    agent(&s, "agt-a");
    s.insert_run_if_idle(&run("agt-a", "run-1", DeploymentStatus::Queued, 1))
        .unwrap();
    let batch: Vec<_> = (1..=5)
        .map(|i| LogLine::new(i, "stdout", format!("line {i}")))
        .collect();
    assert_eq!(s.append_logs("run-1", &batch).unwrap(), 1);
    let batch: Vec<_> = (6..=10)
        .map(|i| LogLine::new(i, "stderr", format!("line {i}")))
        .collect();
    assert_eq!(s.append_logs("run-1", &batch).unwrap(), 6);
    assert_eq!(s.log_count("run-1").unwrap(), 10);
    let all = s.read_logs("run-1", LogQuery::default()).unwrap();
    assert_eq!(
        all.iter().map(|l| l.line_no).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    let since = s
        .read_logs(
            "run-1",
            LogQuery {
                since: Some(7),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        since.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
        ["line 8", "line 9", "line 10"]
    );
    let tail = s
        .read_logs(
            "run-1",
            LogQuery {
                tail: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(tail.iter().map(|l| l.line_no).collect::<Vec<_>>(), [9, 10]);
    let limited = s
        .read_logs(
            "run-1",
            LogQuery {
                since: Some(2),
                limit: Some(3),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        limited.iter().map(|l| l.line_no).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert!(s
        .read_logs("run-other", LogQuery::default())
        .unwrap()
        .is_empty());
}

#[test]
fn snapshots_newest_first_and_by_hash() {
    let (_d, s) = fresh();
    agent(&s, "agt-a");
    agent(&s, "agt-b");
    let snap = |id: &str, agent: &str, hash: &str, t: i64| SnapshotRecord {
        id: id.into(),
        agent_id: agent.into(),
        spec_id: None,
        source_dir: "/config/miniapps/app".into(),
        artifact_path: format!("artifacts/{agent}/{hash}.tar.zst"),
        content_hash: hash.into(),
        file_count: 3,
        size_bytes: 100,
        created_at: t,
    };
    s.insert_snapshot(&snap("snp-1", "agt-a", "aa", 1)).unwrap();
    s.insert_snapshot(&snap("snp-2", "agt-a", "bb", 2)).unwrap();
    s.insert_snapshot(&snap("snp-3", "agt-a", "aa", 3)).unwrap();
    s.insert_snapshot(&snap("snp-4", "agt-b", "cc", 4)).unwrap();
    let ids: Vec<_> = s
        .list_snapshots("agt-a", 10)
        .unwrap()
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(ids, ["snp-3", "snp-2", "snp-1"]);
    assert_eq!(
        s.find_snapshot_by_hash("agt-a", "aa").unwrap().unwrap().id,
        "snp-3"
    );
    // Another agent's snapshot is invisible.
    assert!(s.find_snapshot_by_hash("agt-a", "cc").unwrap().is_none());
    assert!(s.get_snapshot("agt-a", "snp-4").unwrap().is_none());
}

#[test]
fn tokens_by_hash() {
    let (_d, s) = fresh();
    agent(&s, "agt-a");
    assert!(!s.has_operator_token().unwrap());
    s.insert_token(&TokenRecord {
        id: "tok-1".into(),
        kind: TokenKind::Operator,
        agent_id: None,
        token_hash: "h1".into(),
        created_at: 1,
        revoked_at: None,
    })
    .unwrap();
    s.insert_token(&TokenRecord {
        id: "tok-2".into(),
        kind: TokenKind::Agent,
        agent_id: Some("agt-a".into()),
        token_hash: "h2".into(),
        created_at: 1,
        revoked_at: None,
    })
    .unwrap();
    assert!(s.has_operator_token().unwrap());
    assert_eq!(
        s.find_token_by_hash("h2")
            .unwrap()
            .unwrap()
            .agent_id
            .as_deref(),
        Some("agt-a")
    );
    assert!(s.find_token_by_hash("nope").unwrap().is_none());
    // A duplicate hash is refused by the schema.
    let dup = TokenRecord {
        id: "tok-3".into(),
        ..s.find_token_by_hash("h1").unwrap().unwrap()
    };
    assert!(s.insert_token(&dup).is_err());
    assert_eq!(s.revoke_operator_tokens(9).unwrap(), 1);
    assert!(!s.has_operator_token().unwrap());
}
