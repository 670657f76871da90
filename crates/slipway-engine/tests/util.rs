//! Test harness: a real store, artifact store, sandbox driver and router on a real socket, each
//! in its own temp dir.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use slipway_core::{AgentRootTemplate, DeploymentStatus, SpecDraft, SpecPolicy};
use slipway_engine::{Engine, EngineConfig, EventBus, Source, StartRequest};
use slipway_store::{Agent, LogQuery, RunRecord, SqliteStore, Store};

/// Whether sandboxes work here. Without them, skip loudly — or fail when CI is set.
pub fn sandboxes_available() -> bool {
    match slipway_sandbox::check_support() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("sandboxes are required in CI but unavailable: {e}");
            }
            eprintln!("SKIPPED (needs root, namespaces and cgroups): {e}");
            false
        }
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub engine: Engine,
    pub store: Arc<SqliteStore>,
    pub app_addr: SocketAddr,
    pub agent: String,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

pub struct Options {
    pub readiness_timeout: Duration,
    pub max_log_lines: u64,
    pub tail_lines: u64,
    /// How long a replaced production instance stays warm (`None`: the engine's default).
    pub warm_time: Option<Duration>,
    /// How long a replaced instance may finish in-flight requests (`None`: the default).
    pub drain_timeout: Option<Duration>,
    /// Operator pins for run-time egress (host name → address).
    pub runtime_egress_pins: Vec<(String, std::net::IpAddr)>,
    /// Wraps the real Linux driver (e.g. to count calls); `None`: the driver as is.
    pub wrap_driver: Option<WrapDriver>,
}

/// Turns the harness's real driver into the one the engine gets.
pub type WrapDriver =
    Box<dyn FnOnce(slipway_sandbox::LinuxDriver) -> Arc<dyn slipway_sandbox::SandboxDriver>>;

impl Default for Options {
    fn default() -> Self {
        Self {
            readiness_timeout: Duration::from_secs(30),
            max_log_lines: 100_000,
            tail_lines: 2_000,
            warm_time: None,
            drain_timeout: None,
            runtime_egress_pins: Vec::new(),
            wrap_driver: None,
        }
    }
}

pub async fn harness() -> Option<Harness> {
    harness_with(Options::default()).await
}

pub async fn harness_with(opts: Options) -> Option<Harness> {
    if !sandboxes_available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("slipway.db")).unwrap());
    let artifacts =
        Arc::new(slipway_artifacts::LocalArtifactStore::new(dir.path().join("artifacts")).unwrap());
    let helper = PathBuf::from(env!("CARGO_BIN_EXE_slipway-engine-helper"));
    let mut driver_cfg = slipway_sandbox::DriverConfig::new(helper, dir.path().join("sandboxes"));
    // Tests run side by side and reconcile kills everything under the cgroup parent.
    driver_cfg.cgroup_parent = format!(
        "slipway-test-{}",
        slipway_core::IdKind::Sandbox.make(rand::random::<[u8; 10]>())
    );
    // Unique to this test: removed with the driver, so test runs leave no cgroups behind.
    driver_cfg.remove_cgroup_parent_on_drop = true;
    let linux = slipway_sandbox::LinuxDriver::new(driver_cfg).map_err(|e| e.to_string());
    let driver = match opts.wrap_driver {
        Some(wrap) => linux.map(wrap),
        None => linux.map(|d| Arc::new(d) as Arc<dyn slipway_sandbox::SandboxDriver>),
    };
    let router = Arc::new(slipway_router::Router::new(
        slipway_router::RouterConfig::default(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(slipway_router::serve(
        listener,
        router.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    let template = format!("{}/agents/{{agentId}}", dir.path().display());
    let mut config = EngineConfig::new(
        dir.path().join("cache"),
        AgentRootTemplate::parse(&template).unwrap(),
    );
    config.app_port = app_addr.port();
    config.readiness_timeout = opts.readiness_timeout;
    config.log_limits = slipway_engine::LogLimits {
        max_lines: opts.max_log_lines,
        tail_lines: opts.tail_lines,
    };
    config.stop_grace = Duration::from_secs(2);
    if let Some(warm) = opts.warm_time {
        config.warm_time = warm;
    }
    if let Some(drain) = opts.drain_timeout {
        config.drain_timeout = drain;
    }
    config.runtime_egress_pins = opts.runtime_egress_pins;
    let registry = slipway_sandbox::RegistryConfig::derive();
    config.egress_allow = registry.egress_config(&[]).allow_hosts;
    config.egress_env = registry.sandbox_env();
    let engine = Engine::with_driver(
        store.clone(),
        artifacts,
        driver,
        router,
        config,
        EventBus::default(),
        slipway_engine::system_clock(),
    );
    let agent = slipway_core::IdKind::Agent.make(rand_bytes());
    store
        .insert_agent(&Agent {
            id: agent.clone(),
            name: "test".into(),
            created_at: 1,
        })
        .unwrap();
    Some(Harness {
        dir,
        engine,
        store,
        app_addr,
        agent,
        _shutdown: tx,
    })
}

fn rand_bytes() -> [u8; 10] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut b = [0u8; 10];
    b.copy_from_slice(&nanos.to_le_bytes()[..10]);
    b
}

impl Harness {
    /// Host directory of the agent's `/config/miniapps/app`.
    pub fn app_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join("agents")
            .join(&self.agent)
            .join("config/miniapps/app")
    }

    pub fn write(&self, files: &[(&str, &str)]) {
        for (name, body) in files {
            let p = self.app_dir().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
    }

    pub fn set_spec(&self, install: &str, build: &str, start: &str, port: u16) {
        self.set_spec_with(install, build, start, port, |_| {});
    }

    /// [`Harness::set_spec`] with more fields set by `more`.
    pub fn set_spec_with(
        &self,
        install: &str,
        build: &str,
        start: &str,
        port: u16,
        more: impl FnOnce(&mut SpecDraft),
    ) {
        let mut draft = SpecDraft {
            name: Some("app".into()),
            source_dir: Some("/config/miniapps/app".into()),
            install_command: Some(install.into()),
            build_command: Some(build.into()),
            start_command: Some(start.into()),
            runtime_port: Some(port.into()),
            ..Default::default()
        };
        more(&mut draft);
        let valid = draft.validate(&SpecPolicy::default()).unwrap();
        let spec = valid.into_spec(
            format!("spc-{}", &self.agent[4..]),
            self.agent.clone(),
            1,
            1,
        );
        self.store.upsert_spec(&spec).unwrap();
    }

    pub async fn start(&self) -> RunRecord {
        self.engine
            .start(StartRequest {
                agent_id: self.agent.clone(),
                target: None,
                note: None,
                source: Source::SpecSourceDir,
                operator: None,
            })
            .await
            .unwrap()
    }

    pub async fn run(&self, id: &str) -> RunRecord {
        self.engine.get_run(&self.agent, id).await.unwrap()
    }

    /// Polls until the run reaches `want` (or any settled state), with a deadline.
    pub async fn wait_for(&self, id: &str, want: DeploymentStatus, within: Duration) -> RunRecord {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let r = self.run(id).await;
            if r.status == want {
                return r;
            }
            if tokio::time::Instant::now() > deadline || (r.status.is_settled() && r.status != want)
            {
                panic!(
                    "run {id} is {} (error: {:?}), wanted {want}\n--- log ---\n{}",
                    r.status,
                    r.error,
                    self.log_text(id)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self, id: &str) -> String {
        self.store
            .read_logs(id, LogQuery::default())
            .unwrap()
            .into_iter()
            .map(|l| format!("{:>5} {:<6} {}", l.line_no, l.stream, l.text))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the run's pipeline has written its last log line (the writer ends after the
    /// pipeline does).
    pub async fn wait_log_contains(&self, id: &str, needle: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let text = self.log_text(id);
            if text.contains(needle) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "log of {id} never contained {needle:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A plain HTTP/1.1 GET through the router with the given Host.
    pub async fn get(&self, host: &str, path: &str) -> (u16, String) {
        http_get(self.app_addr, host, path).await
    }

    pub fn preview_host(&self, run_id: &str) -> String {
        self.engine.config().preview_host(run_id)
    }
}

pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
