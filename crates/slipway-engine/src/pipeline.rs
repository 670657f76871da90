//! One run's pipeline, from `queued` to `ready` or `failed`.

use std::sync::Arc;

use slipway_core::{DeploymentStatus, DeploymentTarget};
use slipway_router::Route;
use slipway_sandbox::{EgressConfig, ExecRequest, ExitStatus, SandboxHandle, SandboxSpec};
use slipway_store::{RunPatch, RunRecord};
use tokio_util::sync::CancellationToken;

use crate::logs::RunLog;
use crate::upstream::SandboxUpstream;
use crate::{failed_route, lock, Engine, Source};

/// Why the pipeline stopped short of `ready`. The message becomes the run's `error`, prefixed
/// with the phase.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

/// Runs `fut` unless the run is cancelled first.
async fn or_cancel<T>(
    cancel: &CancellationToken,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Failure> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Failure("cancelled".into())),
        v = fut => Ok(v),
    }
}

fn describe_exit(what: &str, status: &ExitStatus) -> String {
    if let Some(reason) = &status.reason {
        return format!("{what} {reason}");
    }
    match (status.code, status.signal) {
        (Some(code), _) => format!("{what} exited with code {code}"),
        (None, Some(sig)) => format!("{what} was killed by signal {sig}"),
        (None, None) => format!("{what} ended without an exit status"),
    }
}

pub(crate) async fn run(
    engine: Engine,
    run: RunRecord,
    source: Source,
    operator: Option<String>,
    cancel: CancellationToken,
) {
    let inner = engine.inner.clone();
    let (log, writer) = RunLog::start(
        inner.store.clone(),
        inner.events.clone(),
        run.agent_id.clone(),
        run.id.clone(),
        inner.config.log_limits,
        inner.clock.clone(),
    );
    let mut current = run.clone();
    let outcome = drive(&engine, &mut current, source, operator, &cancel, &log).await;
    if let Err(Failure(reason)) = outcome {
        let phase = current.status;
        let error = if reason == "cancelled" {
            reason
        } else {
            format!("{phase}: {reason}")
        };
        log.system(format!("> failed: {error}")).await;
        log.flush().await;
        // The run failed: nothing else changes. Free its sandbox; keep the error and the log.
        engine.teardown(&current.id).await;
        if current.status == DeploymentStatus::Queued {
            if let Ok(r) = engine
                .transition(&current, DeploymentStatus::Capturing, RunPatch::default())
                .await
            {
                current = r;
            }
        }
        let patch = RunPatch {
            error: Some(error.clone()),
            ..Default::default()
        };
        match engine
            .transition(&current, DeploymentStatus::Failed, patch)
            .await
        {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(run = %current.id, error = %e, "could not record run failure")
            }
        }
        inner
            .router
            .set(&inner.config.preview_host(&current.id), failed_route())
            .ok();
    }
    drop(log);
    let _ = writer.await;
}

async fn drive(
    engine: &Engine,
    current: &mut RunRecord,
    source: Source,
    operator: Option<String>,
    cancel: &CancellationToken,
    log: &RunLog,
) -> Result<(), Failure> {
    let inner = engine.inner.clone();
    let cfg = &inner.config;
    let spec = current.spec_snapshot.clone();

    // capturing
    *current = engine
        .transition(current, DeploymentStatus::Capturing, RunPatch::default())
        .await?;
    log.system("> capturing source...").await;
    let snapshot = or_cancel(cancel, crate::snapshots::resolve(engine, current, &source)).await??;
    log.system(format!(
        "> snapshot {} ({} files, {} bytes)",
        &snapshot.content_hash[..12],
        snapshot.file_count,
        snapshot.size_bytes
    ))
    .await;

    // Nothing runs from an artifact whose hash or signature does not verify (issue 7).
    crate::trust::verify(
        engine,
        crate::trust::ArtifactKind::Snapshot,
        &current.agent_id,
        &snapshot.content_hash,
        Some(&current.id),
    )
    .await
    .map_err(Failure)?;

    // provisioning
    let patch = RunPatch {
        snapshot_id: Some(snapshot.id.clone()),
        ..Default::default()
    };
    *current = engine
        .transition(current, DeploymentStatus::Provisioning, patch)
        .await?;
    log.system(format!("> provisioning sandbox {}...", current.sandbox_id))
        .await;
    let driver = inner
        .driver
        .as_ref()
        .map_err(|reason| Failure(format!("sandboxes are unavailable: {reason}")))?;
    let workload_uid = SandboxSpec::new("probe", "/").uid;
    let lower = or_cancel(
        cancel,
        crate::snapshots::extracted(engine, &snapshot, workload_uid),
    )
    .await??;
    let mut sspec = SandboxSpec::new(current.sandbox_id.clone(), lower);
    sspec.limits = cfg.limits;
    sspec.toolchain_paths = cfg.toolchain_paths.clone();
    let mut egress = EgressConfig::new(cfg.egress_allow.clone());
    egress.env = cfg.egress_env.clone();
    sspec.egress = Some(egress);
    let sandbox = or_cancel(cancel, driver.create(sspec)).await??;
    let registered = {
        let mut active = lock(&inner.active);
        match active.get_mut(&current.id) {
            Some(a) => {
                a.sandbox = Some(sandbox.clone());
                true
            }
            None => false,
        }
    };
    if !registered {
        // Stopped while the sandbox was being created: nobody else will destroy it.
        let _ = sandbox.destroy().await;
        return Err(Failure("cancelled".into()));
    }

    // building
    *current = engine
        .transition(current, DeploymentStatus::Building, RunPatch::default())
        .await?;
    let env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (what, command) in [
        ("install command", &spec.install_command),
        ("build command", &spec.build_command),
    ] {
        if command.trim().is_empty() {
            continue;
        }
        log.system(format!("> {command}")).await;
        let mut req = ExecRequest::new(command.clone()).timeout(cfg.command_timeout);
        for (k, v) in &env {
            req = req.env(k.clone(), v.clone());
        }
        let status = run_command(sandbox.as_ref(), req, log, cancel).await?;
        if !status.success() {
            return Err(Failure(describe_exit(what, &status)));
        }
    }

    // The build's output becomes the release (before the app can change the workspace).
    log.system("> storing the release...").await;
    let release = or_cancel(
        cancel,
        crate::release::make_release(engine, current, sandbox.as_ref()),
    )
    .await??;
    crate::trust::sign(
        engine,
        crate::trust::ArtifactKind::Release,
        &release.agent_id,
        &release.content_hash,
    )
    .await
    .map_err(Failure)?;
    log.system(format!(
        "> release {} ({}, {} files, {} bytes)",
        &release.content_hash[..12],
        release.kind.as_str(),
        release.file_count,
        release.size_bytes
    ))
    .await;

    // starting: the build is over, so is its way out. The app runs with no outbound network.
    sandbox.close_egress();
    *current = engine
        .transition(current, DeploymentStatus::Starting, RunPatch::default())
        .await?;
    if release.kind == slipway_store::ReleaseKind::Static {
        return finish_static(engine, current, &release, operator, log).await;
    }
    // Run-time egress: only the spec's hosts, through a proxy of their own (none when empty).
    let runtime_egress = crate::egress::open(
        &sandbox,
        &spec.runtime_egress_allow,
        spec.runtime_port,
        &cfg.runtime_egress_pins,
        crate::egress::DenialLog::Run(log.clone()),
    )
    .await
    .map_err(Failure)?;
    let mut req =
        ExecRequest::new(spec.start_command.clone()).env("PORT", spec.runtime_port.to_string());
    if let Some(proxy) = &runtime_egress {
        log.system(format!(
            "> run-time egress to {} through the proxy at 127.0.0.1:{}",
            spec.runtime_egress_allow.join(", "),
            proxy.port()
        ))
        .await;
        for (k, v) in proxy.env() {
            req = req.env(k, v);
        }
    }
    if let Some(a) = lock(&inner.active).get_mut(&current.id) {
        a.egress = runtime_egress;
    }
    log.system(format!("> {}", spec.start_command)).await;
    for (k, v) in &env {
        req = req.env(k.clone(), v.clone());
    }
    let (sink, _forward) = log.output_sink();
    let process = sandbox.spawn(req, Some(sink)).await?;
    let app = Arc::new(crate::app::AppHandle::watch(process));
    if let Some(a) = lock(&inner.active).get_mut(&current.id) {
        a.app = Some(app.clone());
    }
    let deadline = tokio::time::Instant::now() + cfg.readiness_timeout;
    let port = spec.runtime_port;
    let host = cfg.preview_host(&current.id);
    let probe_sandbox = sandbox.clone();
    let ready = crate::readiness::wait_ready(
        move || {
            let s = probe_sandbox.clone();
            async move {
                s.connect(port).await.map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string())
                })
            }
        },
        &host,
        &cfg.readiness_path,
        deadline,
    );
    // An app that exits while we wait fails the run at once, with its exit status.
    let exited = app.exited();
    tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(Failure("cancelled".into())),
        status = exited => {
            return Err(Failure(match status {
                Ok(status) => describe_exit("the app", &status),
                Err(e) => e,
            }));
        }
        result = ready => {
            if let Err(e) = result {
                return Err(Failure(format!(
                    "the app did not become ready on port {port} within {} s (last check: {e})",
                    cfg.readiness_timeout.as_secs()
                )));
            }
        }
    }

    // ready: route first, then record, so the URL works the moment the run says ready.
    let url = cfg.preview_url(&current.id);
    let upstream = SandboxUpstream {
        sandbox: sandbox.clone(),
        port,
        name: current.id.clone(),
    };
    inner
        .router
        .set(&host, Route::Upstream(Arc::new(upstream)))
        .ok();
    if current.target == DeploymentTarget::Production {
        // The production route switches only now that the instance is ready; a failure here
        // fails the run and leaves production as it was.
        let upstream = SandboxUpstream {
            sandbox: sandbox.clone(),
            port,
            name: format!("{}-production", current.id),
        };
        let version = engine
            .deploy_ready(
                current,
                &release,
                Route::Upstream(Arc::new(upstream)),
                operator,
            )
            .await?;
        log.system(format!(
            "> production version {} is live",
            version.version_number
        ))
        .await;
    }
    make_room(engine, current, log).await;
    // The log first (flushed, with any held-back tail): a reader that sees `ready` finds the
    // whole pipeline log stored (the SSE log stream ends there).
    log.system(format!("> ready at {url}")).await;
    log.flush().await;
    let patch = RunPatch {
        url: Some(url.clone()),
        ..Default::default()
    };
    *current = engine
        .transition(current, DeploymentStatus::Ready, patch)
        .await?;
    Ok(())
}

/// Keeps the agent within [`crate::EngineConfig::max_ready_previews`]: before a preview run
/// turns ready, stops the agent's oldest ready previews so that, with it, no more than the
/// limit are ready. A run whose app serves production is never stopped here. Each stop is
/// said in the new run's log.
async fn make_room(engine: &Engine, current: &RunRecord, log: &RunLog) {
    let limit = engine.inner.config.max_ready_previews;
    if limit == 0 || current.target != DeploymentTarget::Preview {
        return;
    }
    let store = engine.inner.store.clone();
    let ready = match crate::blocking(move || store.runs_in_status(&[DeploymentStatus::Ready]))
        .await
    {
        Ok(runs) => runs,
        Err(e) => {
            tracing::warn!(run = %current.id, error = %e, "cannot count the agent's ready previews");
            return;
        }
    };
    let mut previews: Vec<RunRecord> = ready
        .into_iter()
        .filter(|r| {
            r.agent_id == current.agent_id
                && r.id != current.id
                && r.target == DeploymentTarget::Preview
        })
        .collect();
    // Oldest first.
    previews.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let mut excess = (previews.len() + 1).saturating_sub(limit);
    for old in previews {
        if excess == 0 {
            break;
        }
        if engine.run_serves_production(&old.agent_id, &old.id).await {
            continue;
        }
        log.system(format!(
            "> stopping {}: an agent keeps at most {limit} previews ready, the oldest stop first",
            old.id
        ))
        .await;
        if let Err(e) = engine.stop(&old.agent_id, &old.id).await {
            tracing::warn!(run = %old.id, error = %e, "stopping an old preview failed");
        }
        excess -= 1;
    }
}

/// A static release needs no process: the router serves its files. The build sandbox is
/// destroyed here, so nothing of the run keeps running.
async fn finish_static(
    engine: &Engine,
    current: &mut RunRecord,
    release: &slipway_store::ReleaseRecord,
    operator: Option<String>,
    log: &RunLog,
) -> Result<(), Failure> {
    let inner = engine.inner.clone();
    let cfg = &inner.config;
    let route = engine.static_route(release).await.map_err(Failure)?;
    let sandbox = lock(&inner.active)
        .get_mut(&current.id)
        .and_then(|a| a.sandbox.take());
    if let Some(sandbox) = sandbox {
        if let Err(e) = sandbox.destroy().await {
            tracing::warn!(run = %current.id, error = %e, "sandbox destroy failed; start-up cleanup will retry");
        }
    }
    log.system(format!(
        "> static site: serving {}/ without a process",
        release.static_dir.as_deref().unwrap_or(".")
    ))
    .await;
    let url = cfg.preview_url(&current.id);
    inner
        .router
        .set(&cfg.preview_host(&current.id), route.clone())
        .ok();
    if current.target == DeploymentTarget::Production {
        let version = engine
            .deploy_ready(current, release, route, operator)
            .await?;
        log.system(format!(
            "> production version {} is live",
            version.version_number
        ))
        .await;
    }
    make_room(engine, current, log).await;
    log.system(format!("> ready at {url}")).await;
    log.flush().await;
    let patch = RunPatch {
        url: Some(url),
        ..Default::default()
    };
    *current = engine
        .transition(current, DeploymentStatus::Ready, patch)
        .await?;
    Ok(())
}

/// Runs one command to its end, streaming its output into the run's log.
async fn run_command(
    sandbox: &dyn SandboxHandle,
    req: ExecRequest,
    log: &RunLog,
    cancel: &CancellationToken,
) -> Result<ExitStatus, Failure> {
    let (sink, forward) = log.output_sink();
    let mut process = sandbox.spawn(req, Some(sink)).await?;
    let outcome = tokio::select! {
        biased;
        _ = cancel.cancelled() => {
            let _ = process.kill(std::time::Duration::from_millis(500)).await;
            Err(Failure("cancelled".into()))
        }
        status = process.wait() => Ok(status?),
    };
    // The command's output is fully in the log before its exit is reported.
    drop(process);
    let _ = forward.await;
    outcome
}
