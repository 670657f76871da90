//! The production side: one deployment per agent with a stable URL, versions, and the
//! production route's switches (deploy, promote, rollback).
//!
//! ```text
//!   production run ready ──► create version N (store: number, row, route history, active=N)
//!                         └► router.set(<slug>.<base>, instance N)   ← the atomic switch
//!                         └► old instance: drain (in-flight finish, bounded) → warm for
//!                            `warm_time` → stopped
//!   rollback to M ──► warm instance of M? switch at once
//!                 └► else boot M from its release (extract → sandbox → start command only →
//!                    ready), then switch
//! ```
//!
//! Rules:
//! - The store is written first, then the router: a refused store write changes nothing.
//! - Switches of one agent are serialised by the agent's lock; the request path never waits
//!   on it (the router's table is swapped, not locked).
//! - A failed deploy, promote or cold boot never touches the production route.
//! - An instance is the run's own sandbox when a production run becomes ready (or a preview
//!   run is promoted); every other instance boots from the version's release. Static releases
//!   are files served by the router: no process at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slipway_core::{DeploymentStatus, IdKind};
use slipway_router::{Drain, Route, StaticSite, Unavailable, UnavailableKind};
use slipway_sandbox::{EgressProxy, ExecRequest, SandboxSpec};
use slipway_store::{
    DeploymentRecord, NewVersion, ReleaseKind, ReleaseRecord, RouteChange, RouteSwitch, RunRecord,
    StoreError, VersionRecord,
};
use tokio_util::sync::CancellationToken;

use crate::app::AppHandle;
use crate::events::Event;
use crate::upstream::SandboxUpstream;
use crate::{blocking, lock, random_id, Engine, EngineError, SandboxRef};

/// Why a production action was refused or failed. Nothing changed when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum ProductionError {
    #[error("agent {agent_id} has no production deployment yet; deploy to production first")]
    NoDeployment { agent_id: String },
    #[error("version {version} not found")]
    VersionNotFound { version: i64 },
    #[error("there is no version before {active} to roll back to")]
    NoPrevious { active: i64 },
    #[error("run {run_id} is {status}; only a ready run can be promoted")]
    NotReady {
        run_id: String,
        status: DeploymentStatus,
    },
    #[error("run {run_id} has no release (its build did not finish)")]
    NoRelease { run_id: String },
    #[error("run {run_id} is no longer running; deploy it again")]
    InstanceGone { run_id: String },
    #[error("version {version} could not be started from its release: {reason}")]
    BootFailed { version: i64, reason: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<StoreError> for ProductionError {
    fn from(e: StoreError) -> Self {
        ProductionError::Engine(EngineError::Store(e))
    }
}

/// What a rollback did.
#[derive(Debug, Clone)]
pub struct RollbackOutcome {
    pub version: VersionRecord,
    /// `true` when the target's instance was still warm (no boot).
    pub warm: bool,
    /// `None` when the target was already active (nothing changed).
    pub change: Option<RouteChange>,
}

/// Who owns an instance's process.
enum Owner {
    /// The sandbox of a ready run (the run's own app); stopping the instance stops the run.
    Run { run_id: String },
    /// A sandbox booted from the release for this instance.
    Booted {
        sandbox: SandboxRef,
        app: Arc<AppHandle>,
        /// The app's run-time egress proxy, when its spec allow-lists hosts.
        egress: Option<EgressProxy>,
    },
    /// Files served by the router; nothing to stop.
    Files,
}

struct Instance {
    owner: Owner,
    route: Route,
    /// Set while the instance is retiring (draining, then warm); cancelled on re-activation.
    retiring: Option<(u64, CancellationToken)>,
}

#[derive(Default)]
struct Live {
    active: Option<i64>,
    instances: HashMap<i64, Instance>,
}

/// In-memory production state of every agent.
#[derive(Default)]
pub(crate) struct ProductionState {
    agents: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Live>>>>,
    retire_seq: AtomicU64,
}

impl ProductionState {
    fn agent(&self, agent_id: &str) -> Arc<tokio::sync::Mutex<Live>> {
        lock(&self.agents)
            .entry(agent_id.to_string())
            .or_default()
            .clone()
    }
}

/// A URL-safe slug from a spec name: lower-case ASCII letters and digits, runs of anything else
/// become one `-`, at most 40 characters; `app` when nothing is left; `preview` is reserved.
pub fn slugify(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= 40 {
            break;
        }
    }
    let out = out.trim_matches('-').to_string();
    match out.as_str() {
        "" => "app".into(),
        "preview" => "preview-app".into(),
        _ => out,
    }
}

fn stopped_prod_route() -> Route {
    Route::Unavailable(
        Unavailable::new(UnavailableKind::Stopped)
            .with_detail("The production instance of this app was stopped."),
    )
}

impl Engine {
    /// `<slug>.<base_domain>`, the production host name of a deployment.
    pub fn production_host(&self, slug: &str) -> String {
        format!("{slug}.{}", self.inner.config.base_domain)
    }

    /// `http://<slug>.<base_domain>:<app_port>/` (port left out when 80).
    pub fn production_url(&self, slug: &str) -> String {
        let host = self.production_host(slug);
        if self.inner.config.app_port == 80 {
            format!("http://{host}/")
        } else {
            format!("http://{host}:{}/", self.inner.config.app_port)
        }
    }

    /// The agent's deployment, if it has one.
    ///
    /// # Errors
    /// A store failure.
    pub async fn deployment(
        &self,
        agent_id: &str,
    ) -> Result<Option<DeploymentRecord>, EngineError> {
        let store = self.inner.store.clone();
        let a = agent_id.to_string();
        Ok(blocking(move || store.get_deployment(&a)).await?)
    }

    /// Versions whose instance is running now (active or warm), ascending.
    pub async fn live_versions(&self, agent_id: &str) -> Vec<i64> {
        let live = self.inner.production.agent(agent_id);
        let live = live.lock().await;
        let mut v: Vec<i64> = live.instances.keys().copied().collect();
        v.sort_unstable();
        v
    }

    async fn ensure_deployment(
        &self,
        agent_id: &str,
        name: &str,
    ) -> Result<DeploymentRecord, EngineError> {
        let store = self.inner.store.clone();
        let (a, n, id, now) = (
            agent_id.to_string(),
            name.to_string(),
            random_id(IdKind::Deployment),
            (self.inner.clock)(),
        );
        let slug = slugify(name);
        Ok(blocking(move || store.ensure_deployment(&a, &id, &n, &slug, now)).await?)
    }

    /// Rolls production back to `to` (default: the newest version older than the active one).
    /// A warm target switches at once; a cold one boots from its release first.
    ///
    /// # Errors
    /// No deployment, an unknown version, nothing older to roll back to, or a failed boot — in
    /// every case the production route is unchanged.
    pub async fn rollback(
        &self,
        agent_id: &str,
        to: Option<i64>,
        operator: Option<String>,
        note: Option<String>,
    ) -> Result<RollbackOutcome, ProductionError> {
        let dep =
            self.deployment(agent_id)
                .await?
                .ok_or_else(|| ProductionError::NoDeployment {
                    agent_id: agent_id.to_string(),
                })?;
        let live_arc = self.inner.production.agent(agent_id);
        let mut live = live_arc.lock().await;
        // Re-read under the lock: another switch may have happened meanwhile.
        let dep = self.deployment(agent_id).await?.unwrap_or(dep);
        let target = match to {
            Some(n) => n,
            None => {
                let active = dep
                    .active_version
                    .ok_or(ProductionError::VersionNotFound { version: 0 })?;
                let store = self.inner.store.clone();
                let a = agent_id.to_string();
                let all = blocking(move || store.list_versions(&a, u64::MAX)).await?;
                all.iter()
                    .map(|v| v.version_number)
                    .find(|n| *n < active)
                    .ok_or(ProductionError::NoPrevious { active })?
            }
        };
        let store = self.inner.store.clone();
        let a = agent_id.to_string();
        let version = blocking(move || store.get_version(&a, target))
            .await?
            .ok_or(ProductionError::VersionNotFound { version: target })?;
        if dep.active_version == Some(target) && live.instances.contains_key(&target) {
            return Ok(RollbackOutcome {
                version,
                warm: true,
                change: None,
            });
        }
        // Warm or cold, the release must still verify (issue 7); production is untouched if not.
        crate::trust::verify_version(self, &version)
            .await
            .map_err(|reason| ProductionError::BootFailed {
                version: target,
                reason,
            })?;
        let host = self.production_host(&dep.slug);
        let (instance, warm) = match live.instances.remove(&target) {
            Some(i) => (i, true),
            None => (self.boot(&version, &host).await?, false),
        };
        let switch = RouteSwitch {
            host: host.clone(),
            reason: "rollback".into(),
            operator,
            note,
        };
        let store = self.inner.store.clone();
        let (dep_id, now) = (dep.id.clone(), (self.inner.clock)());
        let recorded =
            blocking(move || store.switch_route(&dep_id, Some(target), &switch, now)).await;
        let change = match recorded {
            Ok(c) => c,
            Err(e) => {
                // Nothing switched: put a warm instance back, free a booted one.
                if warm {
                    live.instances.insert(target, instance);
                } else {
                    self.stop_instance(agent_id, instance).await;
                }
                return Err(e.into());
            }
        };
        self.activate(agent_id, &mut live, &host, target, instance);
        drop(live);
        self.publish_route_change(&change);
        Ok(RollbackOutcome {
            version,
            warm,
            change: Some(change),
        })
    }

    /// Makes a ready run a new production version without rebuilding (same release, same
    /// instance).
    ///
    /// # Errors
    /// Unknown run, a run that is not ready or has no release, or a store failure; the
    /// production route is unchanged.
    pub async fn promote(
        &self,
        agent_id: &str,
        run_id: &str,
        operator: Option<String>,
        note: Option<String>,
    ) -> Result<VersionRecord, ProductionError> {
        let run = self.get_run(agent_id, run_id).await?;
        if run.status != DeploymentStatus::Ready {
            return Err(ProductionError::NotReady {
                run_id: run.id,
                status: run.status,
            });
        }
        let store = self.inner.store.clone();
        let (a, r) = (agent_id.to_string(), run_id.to_string());
        let release = blocking(move || store.release_for_run(&a, &r))
            .await?
            .ok_or_else(|| ProductionError::NoRelease {
                run_id: run_id.to_string(),
            })?;
        crate::trust::verify(
            self,
            crate::trust::ArtifactKind::Release,
            agent_id,
            &release.content_hash,
            Some(run_id),
        )
        .await
        .map_err(|reason| ProductionError::BootFailed { version: 0, reason })?;
        let route = match release.kind {
            ReleaseKind::Static => self
                .static_route(&release)
                .await
                .map_err(|reason| ProductionError::BootFailed { version: 0, reason })?,
            ReleaseKind::Dynamic => {
                let sandbox = lock(&self.inner.active)
                    .get(run_id)
                    .and_then(|a| a.sandbox.clone())
                    .ok_or_else(|| ProductionError::InstanceGone {
                        run_id: run_id.to_string(),
                    })?;
                let upstream = SandboxUpstream {
                    sandbox,
                    port: release.runtime_port,
                    name: format!("{run_id}-production"),
                };
                Route::Upstream(Arc::new(upstream))
            }
        };
        let owner = match release.kind {
            ReleaseKind::Static => Owner::Files,
            ReleaseKind::Dynamic => Owner::Run {
                run_id: run_id.to_string(),
            },
        };
        let note = note.or_else(|| run.note.clone());
        Ok(self
            .create_version(
                &run,
                &release,
                Instance {
                    owner,
                    route,
                    retiring: None,
                },
                "promote",
                operator,
                note,
            )
            .await?)
    }

    /// Called by the pipeline when a production run passed readiness, before it is marked
    /// ready: records a version and switches the production route to the run's instance.
    pub(crate) async fn deploy_ready(
        &self,
        run: &RunRecord,
        release: &ReleaseRecord,
        route: Route,
        operator: Option<String>,
    ) -> Result<VersionRecord, EngineError> {
        let owner = match release.kind {
            ReleaseKind::Static => Owner::Files,
            ReleaseKind::Dynamic => Owner::Run {
                run_id: run.id.clone(),
            },
        };
        self.create_version(
            run,
            release,
            Instance {
                owner,
                route,
                retiring: None,
            },
            "deploy",
            operator,
            run.note.clone(),
        )
        .await
    }

    async fn create_version(
        &self,
        run: &RunRecord,
        release: &ReleaseRecord,
        instance: Instance,
        origin: &str,
        operator: Option<String>,
        note: Option<String>,
    ) -> Result<VersionRecord, EngineError> {
        let dep = self
            .ensure_deployment(&run.agent_id, &run.spec_snapshot.name)
            .await?;
        let live_arc = self.inner.production.agent(&run.agent_id);
        let mut live = live_arc.lock().await;
        let snapshot_hash = match &run.snapshot_id {
            Some(id) => {
                let store = self.inner.store.clone();
                let (a, s) = (run.agent_id.clone(), id.clone());
                blocking(move || store.get_snapshot(&a, &s))
                    .await?
                    .map(|s| s.content_hash)
            }
            None => None,
        };
        let host = self.production_host(&dep.slug);
        let new = NewVersion {
            release_id: release.id.clone(),
            run_id: Some(run.id.clone()),
            snapshot_hash,
            release_hash: release.content_hash.clone(),
            spec: run.spec_snapshot.clone(),
            operator: operator.clone(),
            note: note.clone(),
            origin: origin.to_string(),
        };
        let switch = RouteSwitch {
            host: host.clone(),
            reason: origin.to_string(),
            operator,
            note,
        };
        let store = self.inner.store.clone();
        let (dep_id, now) = (dep.id.clone(), (self.inner.clock)());
        let version = blocking(move || store.create_version(&dep_id, &new, &switch, now)).await?;
        self.activate(
            &run.agent_id,
            &mut live,
            &host,
            version.version_number,
            instance,
        );
        drop(live);
        let change = RouteChange {
            id: 0,
            deployment_id: dep.id.clone(),
            agent_id: run.agent_id.clone(),
            host,
            from_version: dep.active_version,
            to_version: Some(version.version_number),
            reason: origin.to_string(),
            operator: version.operator.clone(),
            note: version.note.clone(),
            created_at: now,
        };
        self.inner
            .events
            .publish(Event::VersionCreated(version.clone()));
        self.publish_route_change(&change);
        Ok(version)
    }

    fn publish_route_change(&self, change: &RouteChange) {
        self.inner
            .events
            .publish(Event::RouteChanged(change.clone()));
    }

    /// Points the production host at `instance` (the switch: one table swap) and retires the
    /// previously active instance. Runs under the agent's lock.
    fn activate(
        &self,
        agent_id: &str,
        live: &mut Live,
        host: &str,
        version: i64,
        mut instance: Instance,
    ) {
        if let Some((_, token)) = instance.retiring.take() {
            token.cancel();
        }
        let drain = self
            .inner
            .router
            .set(host, instance.route.clone())
            .ok()
            .flatten();
        let previous = live.active.replace(version);
        if let Some(old) = live.instances.insert(version, instance) {
            // The same version re-deployed over itself: nothing to keep warm.
            let engine = self.clone();
            let agent = agent_id.to_string();
            tokio::spawn(async move { engine.stop_instance(&agent, old).await });
        }
        if let Some(prev) = previous.filter(|p| *p != version) {
            if let Some(inst) = live.instances.get_mut(&prev) {
                let seq = self
                    .inner
                    .production
                    .retire_seq
                    .fetch_add(1, Ordering::Relaxed);
                let token = CancellationToken::new();
                inst.retiring = Some((seq, token.clone()));
                let engine = self.clone();
                let agent = agent_id.to_string();
                tokio::spawn(async move { engine.retire(agent, prev, seq, token, drain).await });
            }
        }
    }

    /// Drain (bounded), stay warm, then stop — unless re-activated meanwhile.
    async fn retire(
        self,
        agent_id: String,
        version: i64,
        seq: u64,
        token: CancellationToken,
        drain: Option<Drain>,
    ) {
        let cfg = &self.inner.config;
        let wait = async {
            if let Some(d) = drain {
                let _ = tokio::time::timeout(cfg.drain_timeout, d.wait()).await;
            }
            tokio::time::sleep(cfg.warm_time).await;
        };
        tokio::select! {
            _ = token.cancelled() => return,
            _ = wait => {}
        }
        let live_arc = self.inner.production.agent(&agent_id);
        let mut live = live_arc.lock().await;
        let still_ours = live
            .instances
            .get(&version)
            .is_some_and(|i| i.retiring.as_ref().is_some_and(|(s, _)| *s == seq));
        if !still_ours || live.active == Some(version) {
            return;
        }
        let Some(instance) = live.instances.remove(&version) else {
            return;
        };
        drop(live);
        self.stop_instance(&agent_id, instance).await;
    }

    /// Stops what an instance owns. A run-owned instance stops its run unless another live
    /// instance (say, the same run promoted again) still uses it.
    async fn stop_instance(&self, agent_id: &str, instance: Instance) {
        match instance.owner {
            Owner::Files => {}
            Owner::Booted {
                sandbox,
                app,
                egress,
            } => {
                drop(egress);
                let _ = app.stop(self.inner.config.stop_grace).await;
                if let Err(e) = sandbox.destroy().await {
                    tracing::warn!(agent = agent_id, error = %e, "instance sandbox destroy failed; start-up cleanup will retry");
                }
            }
            Owner::Run { run_id } => {
                let shared = {
                    let live_arc = self.inner.production.agent(agent_id);
                    let live = live_arc.lock().await;
                    live.instances
                        .values()
                        .any(|i| matches!(&i.owner, Owner::Run { run_id: r } if *r == run_id))
                };
                if !shared {
                    if let Err(e) = self.stop(agent_id, &run_id).await {
                        tracing::warn!(run = %run_id, error = %e, "stopping a retired production run failed");
                    }
                }
            }
        }
    }

    /// Hook of [`Engine::stop`]: a run that is stopped takes its instances with it. When it was
    /// serving production, the production host says so (and the route history records it).
    /// Whether the run's own app serves a production version (promoted, or a production run).
    pub(crate) async fn run_serves_production(&self, agent_id: &str, run_id: &str) -> bool {
        let live_arc = self.inner.production.agent(agent_id);
        let live = live_arc.lock().await;
        live.instances
            .values()
            .any(|i| matches!(&i.owner, Owner::Run { run_id: r } if r == run_id))
    }

    pub(crate) async fn production_run_stopping(&self, agent_id: &str, run_id: &str) {
        let live_arc = self.inner.production.agent(agent_id);
        let mut live = live_arc.lock().await;
        let gone: Vec<i64> = live
            .instances
            .iter()
            .filter(|(_, i)| matches!(&i.owner, Owner::Run { run_id: r } if r == run_id))
            .map(|(v, _)| *v)
            .collect();
        for v in &gone {
            if let Some(i) = live.instances.remove(v) {
                if let Some((_, t)) = i.retiring {
                    t.cancel();
                }
            }
        }
        let Some(active) = live.active.filter(|a| gone.contains(a)) else {
            return;
        };
        live.active = None;
        let Ok(Some(dep)) = self.deployment(agent_id).await else {
            return;
        };
        let host = self.production_host(&dep.slug);
        self.inner.router.set(&host, stopped_prod_route()).ok();
        let switch = RouteSwitch {
            host,
            reason: "stopped".into(),
            operator: None,
            note: Some(format!("run {run_id} serving version {active} was stopped")),
        };
        let store = self.inner.store.clone();
        let now = (self.inner.clock)();
        if let Ok(change) = blocking(move || store.switch_route(&dep.id, None, &switch, now)).await
        {
            self.publish_route_change(&change);
        }
    }

    /// The route serving a static release: its output directory, straight from the release's
    /// extraction.
    pub(crate) async fn static_route(&self, release: &ReleaseRecord) -> Result<Route, String> {
        let uid = SandboxSpec::new("probe", "/").uid;
        let root = crate::release::extracted(self, release, uid)
            .await
            .map_err(|e| e.to_string())?;
        let dir = release.static_dir.as_deref().unwrap_or(".");
        let site = StaticSite::new(root.join(dir))
            .map_err(|e| e.to_string())?
            .with_spa_fallback(release.spa_fallback);
        Ok(Route::Static(site))
    }

    /// A fresh instance of `version` from its release: extract, new sandbox (no egress), start
    /// command only, readiness. Install and build never run here.
    async fn boot(&self, version: &VersionRecord, host: &str) -> Result<Instance, ProductionError> {
        let failed = |reason: String| ProductionError::BootFailed {
            version: version.version_number,
            reason,
        };
        let store = self.inner.store.clone();
        let (a, r) = (version.agent_id.clone(), version.release_id.clone());
        let release = blocking(move || store.get_release(&a, &r))
            .await?
            .ok_or_else(|| failed(format!("release {} is missing", version.release_id)))?;
        if release.kind == ReleaseKind::Static {
            let route = self.static_route(&release).await.map_err(failed)?;
            return Ok(Instance {
                owner: Owner::Files,
                route,
                retiring: None,
            });
        }
        let cfg = &self.inner.config;
        let driver = self
            .inner
            .driver
            .as_ref()
            .map_err(|e| failed(format!("sandboxes are unavailable: {e}")))?;
        let uid = SandboxSpec::new("probe", "/").uid;
        let lower = crate::release::extracted(self, &release, uid)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut sspec = SandboxSpec::new(random_id(IdKind::Sandbox), lower);
        sspec.limits = cfg.limits;
        sspec.toolchain_paths = cfg.toolchain_paths.clone();
        let sandbox = driver
            .create(sspec)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut req = ExecRequest::new(release.start_command.clone())
            .env("PORT", release.runtime_port.to_string());
        // A booted instance writes to the log of the run that built its version: the boot
        // line, the app's own output and run-time egress denials, so `slipway logs RUN` shows
        // what a rolled-back-to instance is doing.
        let log = version.run_id.as_ref().map(|run_id| {
            crate::logs::RunLog::start(
                self.inner.store.clone(),
                self.inner.events.clone(),
                version.agent_id.clone(),
                run_id.clone(),
                cfg.log_limits,
                self.inner.clock.clone(),
            )
            .0
        });
        if let Some(log) = &log {
            log.system(format!(
                "> booting version {} from release {} (start command only; no install, no build)",
                version.version_number, version.release_hash
            ))
            .await;
        }
        let denials = match &log {
            Some(log) if !version.spec.runtime_egress_allow.is_empty() => {
                crate::egress::DenialLog::Run(log.clone())
            }
            _ => crate::egress::DenialLog::None,
        };
        let egress = match crate::egress::open(
            &sandbox,
            &version.spec.runtime_egress_allow,
            release.runtime_port,
            &cfg.runtime_egress_pins,
            denials,
        )
        .await
        {
            Ok(e) => e,
            Err(e) => {
                let _ = sandbox.destroy().await;
                return Err(failed(e));
            }
        };
        if let Some(proxy) = &egress {
            for (k, v) in proxy.env() {
                req = req.env(k, v);
            }
        }
        for (k, v) in &version.spec.env {
            req = req.env(k.clone(), v.clone());
        }
        let sink = log.as_ref().map(|log| log.output_sink().0);
        let process = match sandbox.spawn(req, sink).await {
            Ok(p) => p,
            Err(e) => {
                let _ = sandbox.destroy().await;
                return Err(failed(e.to_string()));
            }
        };
        let app = Arc::new(AppHandle::watch(process));
        let port = release.runtime_port;
        let probe = sandbox.clone();
        let ready = crate::readiness::wait_ready(
            move || {
                let s = probe.clone();
                async move {
                    s.connect(port).await.map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string())
                    })
                }
            },
            host,
            &cfg.readiness_path,
            tokio::time::Instant::now() + cfg.readiness_timeout,
        );
        let outcome = tokio::select! {
            status = app.exited() => Err(match status {
                Ok(s) => format!("the app exited ({s:?})"),
                Err(e) => e,
            }),
            r = ready => r.map_err(|e| format!("not ready on port {port} within {} s (last check: {e})", cfg.readiness_timeout.as_secs())),
        };
        if let Err(reason) = outcome {
            drop(egress);
            let _ = app.stop(cfg.stop_grace).await;
            let _ = sandbox.destroy().await;
            return Err(failed(reason));
        }
        let upstream = SandboxUpstream {
            sandbox: sandbox.clone(),
            port,
            name: format!("v{}-{}", version.version_number, sandbox.id()),
        };
        Ok(Instance {
            owner: Owner::Booted {
                sandbox,
                app,
                egress,
            },
            route: Route::Upstream(Arc::new(upstream)),
            retiring: None,
        })
    }

    /// After a restart, points every deployment's production host at its active version again,
    /// booting each from its release in the background (the host answers "not ready" until then).
    pub async fn restore_production(&self) -> Result<(), EngineError> {
        let store = self.inner.store.clone();
        let deps = blocking(move || store.list_deployments()).await?;
        for dep in deps {
            let Some(active) = dep.active_version else {
                continue;
            };
            let host = self.production_host(&dep.slug);
            self.inner.router.set(&host, crate::not_ready_route()).ok();
            let engine = self.clone();
            tokio::spawn(async move {
                let store = engine.inner.store.clone();
                let a = dep.agent_id.clone();
                let Ok(Some(version)) = blocking(move || store.get_version(&a, active)).await
                else {
                    return;
                };
                let live_arc = engine.inner.production.agent(&dep.agent_id);
                let mut live = live_arc.lock().await;
                if live.active.is_some() {
                    return;
                }
                match engine.boot(&version, &host).await {
                    Ok(instance) => {
                        engine.activate(&dep.agent_id, &mut live, &host, active, instance)
                    }
                    Err(e) => {
                        tracing::error!(agent = %dep.agent_id, version = active, error = %e, "production could not be restored");
                        engine.inner.router.set(&host, crate::failed_route()).ok();
                    }
                }
            });
        }
        Ok(())
    }

    /// Stops every production instance this engine booted (graceful shutdown). Run-owned ones
    /// go with their runs.
    pub(crate) async fn production_shutdown(&self) {
        let agents: Vec<_> = lock(&self.inner.production.agents)
            .values()
            .cloned()
            .collect();
        for live_arc in agents {
            let mut live = live_arc.lock().await;
            let taken: Vec<Instance> = live.instances.drain().map(|(_, i)| i).collect();
            live.active = None;
            drop(live);
            for i in taken {
                if let Some((_, t)) = &i.retiring {
                    t.cancel();
                }
                if let Owner::Booted {
                    sandbox,
                    app,
                    egress,
                } = i.owner
                {
                    drop(egress);
                    let _ = app.stop(Duration::from_millis(500)).await;
                    let _ = sandbox.destroy().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::slugify;

    #[test]
    fn slugs_are_dns_labels() {
        assert_eq!(slugify("My Shop"), "my-shop");
        assert_eq!(slugify("  --Smile__Dental!! "), "smile-dental");
        assert_eq!(slugify("日本"), "app");
        assert_eq!(slugify("preview"), "preview-app");
        assert_eq!(slugify(&"a".repeat(100)).len(), 40);
        assert!(slugify("x y z 1 2 3")
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    }
}
