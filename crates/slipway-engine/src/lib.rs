//! The run engine: turns a start request into a ready, routed app in a fresh sandbox.
//!
//! ```text
//! start ─► queued ─► capturing ─► provisioning ─► building ─► starting ─► ready ─► stopping ─► stopped
//! ```
//!
//! - Every state change goes through [`slipway_store::Store::transition_run`], which checks the
//!   core state machine and compares-and-sets in the database, *then* is published as an event.
//! - A run is never restarted in place: a failed or stopped run stays so; a new start makes a
//!   new run with a new sandbox.
//! - One active pipeline per agent (queued..starting), enforced atomically by the store.
//! - A stop during the pipeline cancels it (`failed`, `cancelled`), then `stopping → stopped`.
//! - On start-up [`Engine::reconcile`] leaves no run in a non-terminal state and no sandbox
//!   leftovers.
//!
//! Invariants: the engine knows nothing of HTTP requests or JSON; it never runs a workload
//! outside a sandbox (when sandboxes are unavailable, runs fail and say why); it holds sandboxes
//! only through the driver interface (`slipway_sandbox::SandboxDriver` / `SandboxHandle`), never
//! a concrete driver type; a running app's only way out is the run-time egress proxy of its
//! spec's `runtimeEgressAllow` (see `egress.rs`), and with an empty list there is none.

mod app;
mod egress;
pub mod events;
pub mod logs;
mod pipeline;
pub mod production;
pub mod readiness;
pub mod release;
mod snapshots;
pub mod trust;
mod upstream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slipway_artifacts::LocalArtifactStore;
use slipway_core::{AgentRootTemplate, DeploymentStatus, DeploymentTarget, IdKind};
use slipway_router::{Route, Router, Unavailable, UnavailableKind};
use slipway_sandbox::{EgressProxy, Limits, LinuxDriver, SandboxDriver, SandboxHandle};
use slipway_store::{RunPatch, RunRecord, Store, StoreError};
use tokio_util::sync::CancellationToken;

pub use events::{Event, EventBus};
pub use logs::LogLimits;
pub use production::{slugify, ProductionError, RollbackOutcome};
pub use release::GcReport;
pub use snapshots::SnapshotError;

/// The current time in milliseconds; injected so tests can control it.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    })
}

/// Engine settings. Paths are host paths.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where extracted snapshots are cached (one directory per content hash).
    pub cache_dir: PathBuf,
    /// Maps agents' sandbox paths (the spec's `sourceDir`) to host paths.
    pub agent_root: AgentRootTemplate,
    /// Preview URLs are `http://<run-id>.preview.<base_domain>[:<app_port>]`.
    pub base_domain: String,
    /// The port of the app-traffic listener, for URLs. 80 is left out of URLs.
    pub app_port: u16,
    /// How long a started app has to become ready.
    pub readiness_timeout: Duration,
    /// The HTTP path probed for readiness.
    pub readiness_path: String,
    /// Wall-clock limit of each install/build command.
    pub command_timeout: Duration,
    /// Grace period between SIGTERM and SIGKILL when stopping an app.
    pub stop_grace: Duration,
    pub limits: Limits,
    pub log_limits: LogLimits,
    /// Hosts builds may reach through the egress proxy.
    pub egress_allow: Vec<String>,
    /// Extra environment for builds that the egress set-up needs (registry, CA bundle).
    pub egress_env: Vec<(String, String)>,
    /// Operator pins for run-time egress: a host name a spec allow-lists connects to this
    /// address instead of what DNS says, and may be private (an internal API, or a test
    /// upstream on loopback). Never taken from a spec.
    pub runtime_egress_pins: Vec<(String, std::net::IpAddr)>,
    /// Extra host toolchain directories bound read-only into every sandbox.
    pub toolchain_paths: Vec<PathBuf>,
    /// Limits for captures and extractions.
    pub max_snapshot_files: u64,
    pub max_snapshot_bytes: u64,
    /// How long a replaced production instance stays running for instant rollback (after its
    /// in-flight requests finished).
    pub warm_time: Duration,
    /// How long a replaced production instance may take to finish its in-flight requests.
    pub drain_timeout: Duration,
    /// Preview runs an agent keeps ready at once (0: no limit). When a new preview becomes
    /// ready beyond it, the agent's oldest ready previews are stopped, except any run serving
    /// production. Each ready preview may be a running app, so this bounds what one agent can
    /// keep running on the server.
    pub max_ready_previews: usize,
}

impl EngineConfig {
    pub fn new(cache_dir: PathBuf, agent_root: AgentRootTemplate) -> Self {
        Self {
            cache_dir,
            agent_root,
            base_domain: "localhost".into(),
            app_port: 8080,
            readiness_timeout: Duration::from_secs(60),
            readiness_path: "/".into(),
            command_timeout: Duration::from_secs(900),
            stop_grace: Duration::from_secs(5),
            limits: Limits::default(),
            log_limits: LogLimits::default(),
            egress_allow: Vec::new(),
            egress_env: Vec::new(),
            runtime_egress_pins: Vec::new(),
            toolchain_paths: Vec::new(),
            max_snapshot_files: 100_000,
            max_snapshot_bytes: 1 << 30,
            max_ready_previews: 10,
            warm_time: Duration::from_secs(600),
            drain_timeout: Duration::from_secs(30),
        }
    }

    /// The preview host name of a run.
    pub fn preview_host(&self, run_id: &str) -> String {
        format!("{run_id}.preview.{}", self.base_domain)
    }

    /// The preview URL of a run.
    pub fn preview_url(&self, run_id: &str) -> String {
        let host = self.preview_host(run_id);
        if self.app_port == 80 {
            format!("http://{host}/")
        } else {
            format!("http://{host}:{}/", self.app_port)
        }
    }
}

/// Where a run's source comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Capture the spec's `sourceDir` through the agent-root mapping.
    SpecSourceDir,
    /// An already uploaded snapshot of this agent, by content hash.
    Snapshot(String),
}

/// A start request, already authorised.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub agent_id: String,
    /// `None`: the spec's `targetDefault`.
    pub target: Option<DeploymentTarget>,
    pub note: Option<String>,
    pub source: Source,
    /// The token that asked (recorded on the version a production run creates).
    pub operator: Option<String>,
}

/// Why the engine refused a request. Pipeline failures are not errors: they are `failed` runs.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("agent {agent_id} has no deployment spec; set one first")]
    NoSpec { agent_id: String },
    #[error(
        "run {run_id} is still in its start pipeline; stop it or wait until it is ready or failed"
    )]
    Busy { run_id: String },
    #[error("run {run_id} not found")]
    RunNotFound { run_id: String },
    #[error("snapshot {content_hash} not found for this agent; upload it first")]
    SnapshotNotFound { content_hash: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// A live sandbox, held through the driver interface.
pub(crate) type SandboxRef = Arc<dyn SandboxHandle>;

/// Live resources of a run that has not finished: its cancel switch, sandbox, app process and
/// the app's run-time egress proxy.
struct Active {
    cancel: CancellationToken,
    sandbox: Option<SandboxRef>,
    app: Option<Arc<app::AppHandle>>,
    egress: Option<EgressProxy>,
    /// Resolved when the pipeline task has finished (ready or failed).
    pipeline_done: tokio::sync::watch::Receiver<bool>,
}

pub(crate) struct Inner {
    store: Arc<dyn Store>,
    artifacts: Arc<LocalArtifactStore>,
    /// `Err` carries the reason sandboxes cannot be created here.
    driver: Result<Arc<dyn SandboxDriver>, String>,
    router: Arc<Router>,
    config: EngineConfig,
    events: EventBus,
    clock: Clock,
    active: Mutex<HashMap<String, Active>>,
    /// One extraction at a time per content hash.
    extracting: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Production instances and the active version of every agent.
    production: production::ProductionState,
    /// Signs stored artifacts and verifies them before use (see `trust.rs`); unset: neither.
    signer: std::sync::OnceLock<Arc<slipway_trust::Signer>>,
}

/// The engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

fn random_id(kind: IdKind) -> String {
    kind.make(rand::random())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic while holding it; the maps stay usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// An engine with the default sandbox driver (`Err`: why sandboxes are unavailable).
    pub fn new(
        store: Arc<dyn Store>,
        artifacts: Arc<LocalArtifactStore>,
        driver: Result<LinuxDriver, String>,
        router: Arc<Router>,
        config: EngineConfig,
        events: EventBus,
        clock: Clock,
    ) -> Self {
        let driver = driver.map(|d| Arc::new(d) as Arc<dyn SandboxDriver>);
        Self::with_driver(store, artifacts, driver, router, config, events, clock)
    }

    /// An engine with any sandbox driver.
    pub fn with_driver(
        store: Arc<dyn Store>,
        artifacts: Arc<LocalArtifactStore>,
        driver: Result<Arc<dyn SandboxDriver>, String>,
        router: Arc<Router>,
        config: EngineConfig,
        events: EventBus,
        clock: Clock,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                artifacts,
                driver,
                router,
                config,
                events,
                clock,
                active: Mutex::new(HashMap::new()),
                extracting: tokio::sync::Mutex::new(HashMap::new()),
                production: production::ProductionState::default(),
                signer: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn events(&self) -> &EventBus {
        &self.inner.events
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.inner.router
    }

    /// Creates a run and starts its pipeline in the background. Returns the `queued` run.
    ///
    /// # Errors
    /// No spec, another active pipeline for the agent ([`EngineError::Busy`]), an unknown
    /// uploaded snapshot, or a store failure.
    pub async fn start(&self, req: StartRequest) -> Result<RunRecord, EngineError> {
        let inner = &self.inner;
        let store = inner.store.clone();
        let agent = req.agent_id.clone();
        let spec = blocking(move || store.get_spec(&agent))
            .await?
            .ok_or_else(|| EngineError::NoSpec {
                agent_id: req.agent_id.clone(),
            })?;
        if let Source::Snapshot(hash) = &req.source {
            let store = inner.store.clone();
            let (agent, h) = (req.agent_id.clone(), hash.clone());
            if blocking(move || store.find_snapshot_by_hash(&agent, &h))
                .await?
                .is_none()
            {
                return Err(EngineError::SnapshotNotFound {
                    content_hash: hash.clone(),
                });
            }
        }
        let now = (inner.clock)();
        let run = RunRecord {
            id: random_id(IdKind::Run),
            agent_id: req.agent_id.clone(),
            spec_id: spec.id.clone(),
            target: req.target.unwrap_or(spec.target_default),
            spec_snapshot: spec,
            snapshot_id: None,
            sandbox_id: random_id(IdKind::Sandbox),
            status: DeploymentStatus::Queued,
            url: None,
            note: req.note.clone(),
            error: None,
            created_at: now,
            updated_at: now,
            stopped_at: None,
        };
        let store = inner.store.clone();
        let new = run.clone();
        match blocking(move || store.insert_run_if_idle(&new)).await {
            Ok(()) => {}
            Err(StoreError::Conflict { id, .. }) => return Err(EngineError::Busy { run_id: id }),
            Err(e) => return Err(e.into()),
        }
        inner.events.publish(Event::RunNew(run.clone()));
        inner
            .router
            .set(&inner.config.preview_host(&run.id), not_ready_route())
            .ok();

        let cancel = CancellationToken::new();
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        lock(&inner.active).insert(
            run.id.clone(),
            Active {
                cancel: cancel.clone(),
                sandbox: None,
                app: None,
                egress: None,
                pipeline_done: done_rx,
            },
        );
        let engine = self.clone();
        let started = run.clone();
        tokio::spawn(async move {
            pipeline::run(engine, started, req.source, req.operator, cancel).await;
            let _ = done_tx.send(true);
        });
        Ok(run)
    }

    /// Stops one run: cancels its pipeline if it is still in one, stops its app, destroys its
    /// sandbox, and leaves it `stopped`. Stopping a stopped run returns it unchanged.
    ///
    /// # Errors
    /// Unknown run (for this agent) or a store failure.
    pub async fn stop(&self, agent_id: &str, run_id: &str) -> Result<RunRecord, EngineError> {
        let inner = &self.inner;
        let mut run = self.get_run(agent_id, run_id).await?;
        if run.status.is_active_pipeline() {
            let waiter = {
                let active = lock(&inner.active);
                active.get(run_id).map(|a| {
                    a.cancel.cancel();
                    a.pipeline_done.clone()
                })
            };
            if let Some(mut done) = waiter {
                let _ = done.wait_for(|d| *d).await;
            }
            run = self.get_run(agent_id, run_id).await?;
        }
        match run.status {
            DeploymentStatus::Ready | DeploymentStatus::Failed => {
                run = self
                    .transition(&run, DeploymentStatus::Stopping, RunPatch::default())
                    .await?;
                self.production_run_stopping(agent_id, run_id).await;
                inner
                    .router
                    .set(&inner.config.preview_host(run_id), stopped_route())
                    .ok();
                self.teardown(run_id).await;
                let patch = RunPatch {
                    stopped_at: Some((inner.clock)()),
                    ..Default::default()
                };
                run = self
                    .transition(&run, DeploymentStatus::Stopped, patch)
                    .await?;
            }
            DeploymentStatus::Stopping => {
                // Another stop is under way; finish it if it was interrupted.
                self.teardown(run_id).await;
                let patch = RunPatch {
                    stopped_at: Some((inner.clock)()),
                    ..Default::default()
                };
                if let Ok(r) = self
                    .transition(&run, DeploymentStatus::Stopped, patch)
                    .await
                {
                    run = r;
                }
            }
            _ => {}
        }
        Ok(run)
    }

    /// Reads one run of one agent.
    ///
    /// # Errors
    /// [`EngineError::RunNotFound`] when the run does not exist or belongs to another agent.
    pub async fn get_run(&self, agent_id: &str, run_id: &str) -> Result<RunRecord, EngineError> {
        let store = self.inner.store.clone();
        let (a, r) = (agent_id.to_string(), run_id.to_string());
        blocking(move || store.get_run(&a, &r))
            .await?
            .ok_or_else(|| EngineError::RunNotFound {
                run_id: run_id.to_string(),
            })
    }

    /// Finds what a previous process left behind: sandbox leftovers are destroyed, runs caught
    /// in the pipeline are failed with `interrupted: server restarted`, and ready runs (whose
    /// sandboxes died with that process) are stopped with the same reason. Call once at start-up,
    /// before serving.
    ///
    /// # Errors
    /// A store failure.
    pub async fn reconcile(&self) -> Result<ReconcileReport, EngineError> {
        let inner = &self.inner;
        let mut report = ReconcileReport::default();
        if let Ok(driver) = &inner.driver {
            let cleaned = driver.cleanup_leftovers();
            report.sandboxes_cleaned = cleaned.sandboxes.len();
        }
        let store = inner.store.clone();
        let leftover = blocking(move || {
            store.runs_in_status(&[
                DeploymentStatus::Queued,
                DeploymentStatus::Capturing,
                DeploymentStatus::Provisioning,
                DeploymentStatus::Building,
                DeploymentStatus::Starting,
                DeploymentStatus::Ready,
                DeploymentStatus::Stopping,
            ])
        })
        .await?;
        const REASON: &str = "interrupted: server restarted";
        for mut run in leftover {
            let host = inner.config.preview_host(&run.id);
            if run.status == DeploymentStatus::Queued {
                run = self
                    .transition(&run, DeploymentStatus::Capturing, RunPatch::default())
                    .await?;
            }
            if run.status.is_active_pipeline() {
                let patch = RunPatch {
                    error: Some(REASON.into()),
                    ..Default::default()
                };
                self.transition(&run, DeploymentStatus::Failed, patch)
                    .await?;
                inner.router.set(&host, failed_route()).ok();
                report.runs_failed += 1;
                continue;
            }
            if run.status == DeploymentStatus::Ready {
                let patch = RunPatch {
                    error: Some(REASON.into()),
                    ..Default::default()
                };
                run = self
                    .transition(&run, DeploymentStatus::Stopping, patch)
                    .await?;
            }
            if run.status == DeploymentStatus::Stopping {
                let patch = RunPatch {
                    stopped_at: Some((inner.clock)()),
                    ..Default::default()
                };
                self.transition(&run, DeploymentStatus::Stopped, patch)
                    .await?;
                inner.router.set(&host, stopped_route()).ok();
                report.runs_stopped += 1;
            }
        }
        self.restore_production().await?;
        Ok(report)
    }

    /// Stops every app and destroys every sandbox this engine owns (graceful server shutdown).
    /// Runs are left as they are; the next start-up's reconcile settles them.
    pub async fn shutdown(&self) {
        self.production_shutdown().await;
        let ids: Vec<String> = lock(&self.inner.active).keys().cloned().collect();
        for id in ids {
            if let Some(a) = lock(&self.inner.active).get(&id) {
                a.cancel.cancel();
            }
            self.teardown(&id).await;
        }
    }

    /// Kills the app and destroys the sandbox of a run, if it has them.
    async fn teardown(&self, run_id: &str) {
        let taken = lock(&self.inner.active).remove(run_id);
        let Some(active) = taken else { return };
        active.cancel.cancel();
        // The app's way out closes before the app stops.
        drop(active.egress);
        if let Some(app) = active.app {
            let _ = app.stop(self.inner.config.stop_grace).await;
        }
        if let Some(sandbox) = active.sandbox {
            if let Err(e) = sandbox.destroy().await {
                tracing::warn!(run = run_id, error = %e, "sandbox destroy failed; start-up cleanup will retry");
            }
        }
    }

    /// Applies one state-machine edge and publishes the updated run.
    async fn transition(
        &self,
        run: &RunRecord,
        to: DeploymentStatus,
        patch: RunPatch,
    ) -> Result<RunRecord, EngineError> {
        let store = self.inner.store.clone();
        let (id, from, now) = (run.id.clone(), run.status, (self.inner.clock)());
        let updated = blocking(move || store.transition_run(&id, from, to, patch, now)).await?;
        self.inner.events.publish(Event::RunUpdate(updated.clone()));
        Ok(updated)
    }
}

/// What [`Engine::reconcile`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub runs_failed: usize,
    pub runs_stopped: usize,
    pub sandboxes_cleaned: usize,
}

fn not_ready_route() -> Route {
    Route::Unavailable(
        Unavailable::new(UnavailableKind::NotReady)
            .with_detail("This deployment is still being built or started."),
    )
}

fn stopped_route() -> Route {
    Route::Unavailable(
        Unavailable::new(UnavailableKind::Stopped).with_detail("This deployment run was stopped."),
    )
}

fn failed_route() -> Route {
    Route::Unavailable(
        Unavailable::new(UnavailableKind::Failed)
            .with_detail("This deployment run failed; its log says why."),
    )
}

/// Runs a store call on the blocking pool (SQLite calls block).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
