//! The run pipeline end to end: real sandboxes, real HTTP through the router.

use std::time::Duration;

use slipway_core::DeploymentStatus;
use slipway_engine::{EngineError, Source, StartRequest};
use slipway_store::{RunPatch, RunRecord, Store};

use crate::util::*;

const NODE_SERVER: &str = r#"
const http = require('http');
http.createServer((req, res) => {
  res.setHeader('content-type', 'text/plain');
  res.end('hello from node ' + req.url + ' host=' + req.headers['host']);
}).listen(Number(process.env.PORT), '127.0.0.1');
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_site_served_by_python_http_server() {
    let Some(h) = harness().await else { return };
    h.write(&[("index.html", "<h1>hello static</h1>")]);
    h.set_spec(
        "",
        "true",
        "python3 -m http.server $PORT --bind 127.0.0.1",
        3000,
    );
    let run = h.start().await;
    assert_eq!(run.status, DeploymentStatus::Queued);
    let ready = h
        .wait_for(&run.id, DeploymentStatus::Ready, Duration::from_secs(60))
        .await;
    let url = ready.url.clone().unwrap();
    assert_eq!(
        url,
        format!("http://{}:{}/", h.preview_host(&run.id), h.app_addr.port())
    );
    assert!(ready.snapshot_id.is_some());
    let (status, body) = h.get(&h.preview_host(&run.id), "/").await;
    assert_eq!(status, 200);
    assert!(body.contains("hello static"), "{body}");
    let log = h.log_text(&run.id);
    for line in [
        "> capturing source...",
        "> provisioning sandbox",
        "> python3 -m http.server",
        "> ready at",
    ] {
        assert!(log.contains(line), "missing {line:?} in log:\n{log}");
    }
    h.engine.stop(&h.agent, &run.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_server_with_build_step_and_env() {
    let Some(h) = harness().await else { return };
    h.write(&[("server.js", NODE_SERVER)]);
    // The build writes a file the app does not need, proving the build ran in the workspace.
    h.set_spec(
        "",
        "echo built > build-marker && ls",
        "node server.js",
        4321,
    );
    let run = h.start().await;
    h.wait_for(&run.id, DeploymentStatus::Ready, Duration::from_secs(60))
        .await;
    let (status, body) = h.get(&h.preview_host(&run.id), "/x?y=1").await;
    assert_eq!(status, 200);
    assert!(body.contains("hello from node /x?y=1"), "{body}");
    let log = h.log_text(&run.id);
    assert!(log.contains("build-marker"), "build output missing:\n{log}");
    let stopped = h.engine.stop(&h.agent, &run.id).await.unwrap();
    assert_eq!(stopped.status, DeploymentStatus::Stopped);
    assert!(stopped.stopped_at.is_some());
    let (status, _) = h.get(&h.preview_host(&run.id), "/").await;
    assert_eq!(status, 410, "a stopped run's URL answers 410");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_build_fails_the_run_and_keeps_the_log() {
    let Some(h) = harness().await else { return };
    h.write(&[("index.html", "x")]);
    h.set_spec(
        "",
        "echo compiling; echo 'syntax error' >&2; exit 3",
        "python3 -m http.server $PORT",
        3000,
    );
    let run = h.start().await;
    let failed = h
        .wait_for(&run.id, DeploymentStatus::Failed, Duration::from_secs(60))
        .await;
    let error = failed.error.unwrap();
    assert_eq!(error, "building: build command exited with code 3");
    let log = h
        .wait_log_contains(&run.id, "> failed:", Duration::from_secs(10))
        .await;
    assert!(
        log.contains("compiling") && log.contains("syntax error"),
        "{log}"
    );
    let (status, _) = h.get(&h.preview_host(&run.id), "/").await;
    assert_eq!(status, 503, "a failed run's URL answers 503");
    // A failed run can be stopped: failed → stopping → stopped.
    let stopped = h.engine.stop(&h.agent, &run.id).await.unwrap();
    assert_eq!(stopped.status, DeploymentStatus::Stopped);
    assert_eq!(
        stopped.error.as_deref(),
        Some("building: build command exited with code 3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_that_never_listens_times_out() {
    let Some(h) = harness_with(Options {
        readiness_timeout: Duration::from_secs(3),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    h.write(&[("index.html", "x")]);
    h.set_spec("", "true", "sleep 600", 3000);
    let run = h.start().await;
    let failed = h
        .wait_for(&run.id, DeploymentStatus::Failed, Duration::from_secs(30))
        .await;
    let error = failed.error.unwrap();
    assert!(
        error.starts_with("starting: the app did not become ready on port 3000 within 3 s"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_exiting_during_start_fails_at_once_with_its_code() {
    let Some(h) = harness_with(Options {
        readiness_timeout: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    h.write(&[("index.html", "x")]);
    h.set_spec("", "true", "echo starting; exit 7", 3000);
    let run = h.start().await;
    let started = tokio::time::Instant::now();
    let failed = h
        .wait_for(&run.id, DeploymentStatus::Failed, Duration::from_secs(60))
        .await;
    assert_eq!(
        failed.error.as_deref(),
        Some("starting: the app exited with code 7")
    );
    // Far sooner than the 120 s readiness timeout: the exit itself ended the wait.
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_build_cancels_within_seconds() {
    let Some(h) = harness().await else { return };
    h.write(&[("index.html", "x")]);
    h.set_spec(
        "",
        "echo build-started; sleep 120",
        "python3 -m http.server $PORT",
        3000,
    );
    let run = h.start().await;
    h.wait_log_contains(&run.id, "build-started", Duration::from_secs(60))
        .await;
    let stopped = tokio::time::timeout(Duration::from_secs(15), h.engine.stop(&h.agent, &run.id))
        .await
        .expect("stop finishes within seconds")
        .unwrap();
    assert_eq!(stopped.status, DeploymentStatus::Stopped);
    assert_eq!(stopped.error.as_deref(), Some("cancelled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_active_pipeline_per_agent() {
    let Some(h) = harness().await else { return };
    h.write(&[("index.html", "x")]);
    h.set_spec("", "sleep 120", "python3 -m http.server $PORT", 3000);
    let first = h.start().await;
    let second = h
        .engine
        .start(StartRequest {
            agent_id: h.agent.clone(),
            target: None,
            note: None,
            source: Source::SpecSourceDir,
            operator: None,
        })
        .await;
    match second {
        Err(EngineError::Busy { run_id }) => assert_eq!(run_id, first.id),
        other => panic!("expected Busy, got {other:?}"),
    }
    h.engine.stop(&h.agent, &first.id).await.unwrap();
    // Once stopped, a new start is accepted.
    h.set_spec("", "true", "python3 -m http.server $PORT", 3000);
    let third = h.start().await;
    assert_ne!(third.id, first.id);
    assert_ne!(
        third.sandbox_id, first.sandbox_id,
        "every run gets a new sandbox"
    );
    h.engine.stop(&h.agent, &third.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_dir_symlink_out_of_agent_root_is_refused() {
    let Some(h) = harness().await else { return };
    let outside = h.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("index.html"), "secret").unwrap();
    let parent = h.app_dir().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&parent).unwrap();
    std::os::unix::fs::symlink(&outside, h.app_dir()).unwrap();
    h.set_spec("", "true", "python3 -m http.server $PORT", 3000);
    let run = h.start().await;
    let failed = h
        .wait_for(&run.id, DeploymentStatus::Failed, Duration::from_secs(30))
        .await;
    let error = failed.error.unwrap();
    assert!(error.contains("leads outside the agent's root"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_settles_runs_left_by_a_dead_process() {
    let Some(h) = harness().await else { return };
    h.set_spec("", "true", "true", 3000);
    let spec = h.store.get_spec(&h.agent).unwrap().unwrap();
    let mk = |id: &str, status: DeploymentStatus| {
        RunRecord {
            id: id.into(),
            agent_id: h.agent.clone(),
            spec_id: spec.id.clone(),
            spec_snapshot: spec.clone(),
            snapshot_id: None,
            sandbox_id: format!("sbx-{id}"),
            status: DeploymentStatus::Queued,
            target: slipway_core::DeploymentTarget::Preview,
            url: None,
            note: None,
            error: None,
            created_at: 1,
            updated_at: 1,
            stopped_at: None,
        }
        .with_status(&*h.store, status)
    };
    mk("run-building", DeploymentStatus::Building);
    // Another agent's row would be rejected by the idle rule, so settle each before the next.
    let report = h.engine.reconcile().await.unwrap();
    assert_eq!(report.runs_failed, 1);
    let r = h.run("run-building").await;
    assert_eq!(r.status, DeploymentStatus::Failed);
    assert_eq!(r.error.as_deref(), Some("interrupted: server restarted"));
    mk("run-ready", DeploymentStatus::Ready);
    let report = h.engine.reconcile().await.unwrap();
    assert_eq!(report.runs_stopped, 1);
    let r = h.run("run-ready").await;
    assert_eq!(r.status, DeploymentStatus::Stopped);
    assert_eq!(r.error.as_deref(), Some("interrupted: server restarted"));
    mk("run-queued", DeploymentStatus::Queued);
    h.engine.reconcile().await.unwrap();
    assert_eq!(h.run("run-queued").await.status, DeploymentStatus::Failed);
}

trait WithStatus {
    fn with_status(self, store: &dyn Store, status: DeploymentStatus);
}

impl WithStatus for RunRecord {
    /// Inserts the run and walks it along the happy path to `status`.
    fn with_status(self, store: &dyn Store, status: DeploymentStatus) {
        store.insert_run_if_idle(&self).unwrap();
        let mut s = DeploymentStatus::Queued;
        let mut now = 2;
        while s != status {
            let next = s.next_in_pipeline().unwrap();
            store
                .transition_run(&self.id, s, next, RunPatch::default(), now)
                .unwrap();
            s = next;
            now += 1;
        }
    }
}
