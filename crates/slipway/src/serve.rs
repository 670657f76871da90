//! `slipway serve`: configuration (file < environment < flags), the data directory, the admin
//! token, and the two listeners (control-plane API and app traffic).
//!
//! [`build_server`] assembles every shared piece in one place; [`Server::run`] serves until the
//! shutdown token is cancelled.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::Deserialize;
use slipway_api::auth::mint_token;
use slipway_api::{system_clock, ApiConfig, AppState};
use slipway_core::path::normalize_absolute;
use slipway_core::{AgentRootTemplate, SpecPolicy};
use slipway_engine::{Engine, EngineConfig, EventBus};
use slipway_router::{Router, RouterConfig};
use slipway_store::{SqliteStore, Store, TokenKind};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub const DEFAULT_API_ADDR: &str = "127.0.0.1:7070";
pub const DEFAULT_APP_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_BASE_DOMAIN: &str = "localhost";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const DATABASE_FILE: &str = "slipway.db";

/// How log lines look on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per event.
    Json,
}

/// Flags of `slipway serve`. Each has an environment variable and a config-file key.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML config file; its keys are the flags' names in snake_case (data_dir, api_addr, …).
    #[arg(long, env = "SLIPWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where slipway keeps its database, artifacts and admin token [default: the user data
    /// directory + /slipway].
    #[arg(long, env = "SLIPWAY_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Control-plane (API) listener; port 0 picks a free port [default: 127.0.0.1:7070].
    #[arg(long, env = "SLIPWAY_API_ADDR", value_name = "HOST:PORT")]
    pub api_addr: Option<String>,
    /// App-traffic listener, served by the router; port 0 picks a free port
    /// [default: 127.0.0.1:8080].
    #[arg(long, env = "SLIPWAY_APP_ADDR", value_name = "HOST:PORT")]
    pub app_addr: Option<String>,
    /// Host directory standing for an agent's sandbox `/`, with `{agentId}`
    /// [default: <data-dir>/agents/{agentId}].
    #[arg(long, env = "SLIPWAY_AGENT_ROOT", value_name = "TEMPLATE")]
    pub agent_root: Option<String>,
    /// A root a spec's sourceDir must lie under; repeat for several (environment:
    /// comma-separated) [default: /config/miniapps, /config/memory/projects].
    #[arg(
        long = "allowed-root",
        env = "SLIPWAY_ALLOWED_ROOTS",
        value_delimiter = ',',
        value_name = "PATH"
    )]
    pub allowed_roots: Vec<String>,
    /// A host builds may reach through the egress proxy, besides the package registries the
    /// host's npm and pip are configured with; repeat for several (environment:
    /// comma-separated).
    #[arg(
        long = "egress-allow",
        env = "SLIPWAY_EGRESS_ALLOW",
        value_delimiter = ',',
        value_name = "HOST"
    )]
    pub egress_allow: Vec<String>,
    /// Pins a host name a spec's runtimeEgressAllow may name to an address (HOST=IP): it is not
    /// looked up in DNS and may be private, e.g. an internal API. Opens nothing by itself;
    /// repeat for several (environment: comma-separated).
    #[arg(
        long = "egress-pin",
        env = "SLIPWAY_EGRESS_PIN",
        value_delimiter = ',',
        value_name = "HOST=IP"
    )]
    pub egress_pin: Vec<String>,
    /// Domain under which apps get host names [default: localhost].
    #[arg(long, env = "SLIPWAY_BASE_DOMAIN", value_name = "DOMAIN")]
    pub base_domain: Option<String>,
    /// Log line format [default: human].
    #[arg(long, env = "SLIPWAY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `slipway_api=debug` [default: RUST_LOG, else info].
    #[arg(long, env = "SLIPWAY_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Revoke every operator token and write a new one to <data-dir>/admin.token.
    #[arg(long)]
    pub rotate_admin_token: bool,
    /// Actions that need an operator's approval (a gate); repeat for several (environment:
    /// comma-separated), `none` for none [default: production_deploy, promote, rollback,
    /// secret_env]. Also: preview_deploy.
    #[arg(
        long = "gate-action",
        env = "SLIPWAY_GATE_ACTIONS",
        value_delimiter = ',',
        value_name = "ACTION"
    )]
    pub gate_actions: Vec<String>,
    /// How long an approved gate's single-use token stays usable, in seconds [default: 300].
    #[arg(long, env = "SLIPWAY_GATE_TOKEN_TTL", value_name = "SECONDS")]
    pub gate_token_ttl: Option<u64>,
    /// How long a replaced production instance keeps running for an instant rollback, in
    /// seconds (0: stop it once drained) [default: 600].
    #[arg(long, env = "SLIPWAY_WARM_TIME", value_name = "SECONDS")]
    pub warm_time: Option<u64>,
    /// How often unreferenced artifacts are collected, in seconds (0: never) [default: 3600].
    /// Only artifacts no snapshot, run, release or version references and older than an hour
    /// are removed.
    #[arg(long, env = "SLIPWAY_GC_INTERVAL", value_name = "SECONDS")]
    pub gc_interval: Option<u64>,
    /// Memory all static releases together may keep their small files in, in MiB (0: serve
    /// every file from disk) [default: 256].
    #[arg(long, env = "SLIPWAY_STATIC_CACHE_MIB", value_name = "MIB")]
    pub static_cache_mib: Option<u64>,
    /// Largest compressed snapshot accepted, captured or uploaded, in MiB [default: 1024].
    #[arg(long, env = "SLIPWAY_MAX_SNAPSHOT_MIB", value_name = "MIB")]
    pub max_snapshot_mib: Option<u64>,
    /// Most files a snapshot may hold [default: 100000].
    #[arg(long, env = "SLIPWAY_MAX_SNAPSHOT_FILES", value_name = "N")]
    pub max_snapshot_files: Option<u64>,
    /// Client connections each listener (API, app traffic) serves at once, WebSockets
    /// included; more wait in the listen backlog [default: 10000].
    #[arg(long, env = "SLIPWAY_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Of those, how many one client address (an IPv6 /64) may hold; 0: no limit. Behind a
    /// load balancer, raise it or set 0 [default: 256].
    #[arg(long, env = "SLIPWAY_MAX_CONNECTIONS_PER_CLIENT", value_name = "N")]
    pub max_connections_per_client: Option<usize>,
    /// Preview runs each agent keeps ready; a new one beyond it stops the agent's oldest
    /// (never one serving production). 0: no limit [default: 10].
    #[arg(long, env = "SLIPWAY_MAX_READY_PREVIEWS", value_name = "N")]
    pub max_ready_previews: Option<usize>,
}

/// The config file. Unknown keys are refused so that a typo is not silently ignored.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub api_addr: Option<String>,
    pub app_addr: Option<String>,
    pub agent_root: Option<String>,
    pub allowed_roots: Option<Vec<String>>,
    pub egress_allow: Option<Vec<String>>,
    pub egress_pin: Option<Vec<String>>,
    pub base_domain: Option<String>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub gate_actions: Option<Vec<String>>,
    pub gate_token_ttl: Option<u64>,
    pub warm_time: Option<u64>,
    pub gc_interval: Option<u64>,
    pub static_cache_mib: Option<u64>,
    pub max_snapshot_mib: Option<u64>,
    pub max_snapshot_files: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<usize>,
    pub max_ready_previews: Option<usize>,
}

impl FileConfig {
    /// # Errors
    /// The file cannot be read or is not valid TOML with known keys.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// The resolved configuration of a server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The config file that was loaded, if any.
    pub config_file: Option<PathBuf>,
    /// Absolute.
    pub data_dir: PathBuf,
    pub api_addr: String,
    pub app_addr: String,
    pub agent_root: AgentRootTemplate,
    /// Normalised absolute paths.
    pub allowed_roots: Vec<String>,
    /// Extra hosts builds may reach (the registries are derived at start-up).
    pub egress_allow: Vec<String>,
    /// Run-time egress pins: host name → address.
    pub egress_pins: Vec<(String, std::net::IpAddr)>,
    pub base_domain: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub rotate_admin_token: bool,
    /// Which actions need a gate, and how long an approval's token lives.
    pub trust_policy: slipway_trust::TrustPolicy,
    /// How long a replaced production instance stays warm.
    pub warm_time: std::time::Duration,
    /// How often artifact garbage collection runs; `None`: never.
    pub gc_interval: Option<std::time::Duration>,
    /// The memory budget, in bytes, that every static release's file cache shares.
    pub static_cache_bytes: u64,
    /// The snapshot guards: compressed bytes and files.
    pub max_snapshot_bytes: u64,
    pub max_snapshot_files: u64,
    /// Client connections each listener serves at once.
    pub max_connections: usize,
    /// Of those, how many one client may hold (0: no limit).
    pub max_connections_per_client: usize,
    /// Preview runs each agent keeps ready (0: no limit).
    pub max_ready_previews: usize,
}

/// The most `--static-cache-mib` accepts: 64 GiB.
const MAX_STATIC_CACHE_MIB: u64 = 64 * 1024;
/// The most `--max-snapshot-mib` accepts: 64 GiB.
const MAX_SNAPSHOT_MIB: u64 = 64 * 1024;
/// The most `--max-connections` accepts.
const MAX_CONNECTIONS: usize = 1_000_000;

/// `HOST=IP`: a host name as a spec would name it (no port) and an IP address.
fn parse_egress_pin(raw: &str) -> anyhow::Result<(String, std::net::IpAddr)> {
    let Some((host, ip)) = raw.split_once('=') else {
        bail!("invalid egress pin {raw:?}: expected HOST=IP");
    };
    let host = slipway_core::spec::parse_egress_host(host)
        .map_err(|e| anyhow::anyhow!("invalid egress pin {raw:?}: host {host:?}: {e}"))?;
    if host.contains(':') {
        bail!("invalid egress pin {raw:?}: the host takes no port");
    }
    let ip = ip
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid egress pin {raw:?}: {ip:?} is not an IP address"))?;
    Ok((host, ip))
}

impl ServeConfig {
    /// The settings both listeners (API, app traffic) share; the rest are the router's
    /// defaults.
    pub fn listener_config(&self) -> RouterConfig {
        RouterConfig {
            max_connections: self.max_connections,
            max_connections_per_client: self.max_connections_per_client,
            ..RouterConfig::default()
        }
    }

    /// Merges file < environment < flags (clap already put the environment under the flags).
    ///
    /// # Errors
    /// The config file is unreadable, or a value is invalid.
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let data_dir = match args.data_dir.or(file.data_dir) {
            Some(dir) => dir,
            None => default_data_dir(),
        };
        let data_dir = if data_dir.is_absolute() {
            lexical_normalize(&data_dir)
        } else {
            lexical_normalize(
                &std::env::current_dir()
                    .context("cannot read the current directory")?
                    .join(data_dir),
            )
        };
        let agent_root_raw = match args.agent_root.or(file.agent_root) {
            Some(t) => t,
            None => format!("{}/agents/{{agentId}}", data_dir.display()),
        };
        let agent_root = AgentRootTemplate::parse(&agent_root_raw).context("invalid agent root")?;
        let allowed_roots = if !args.allowed_roots.is_empty() {
            args.allowed_roots
        } else {
            file.allowed_roots
                .unwrap_or_else(|| SpecPolicy::default().allowed_roots)
        };
        let allowed_roots = allowed_roots
            .iter()
            .map(|r| match normalize_absolute(r.trim()) {
                Ok(root) if root != "/" => Ok(root),
                Ok(_) => bail!("allowed root must not be /: every path would be allowed"),
                Err(e) => Err(anyhow::anyhow!("invalid allowed root {r:?}: {e}")),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if allowed_roots.is_empty() {
            bail!("at least one allowed root is needed");
        }
        let log_level = args
            .log_level
            .or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()))
            .or(file.log_level)
            .unwrap_or_else(|| "info".to_string());
        let mut trust_policy = slipway_trust::TrustPolicy::default();
        let gate_actions = if args.gate_actions.is_empty() {
            file.gate_actions
        } else {
            Some(args.gate_actions)
        };
        if let Some(actions) = gate_actions {
            trust_policy.gated =
                slipway_trust::TrustPolicy::parse_actions(actions.iter().map(String::as_str))
                    .map_err(|e| anyhow::anyhow!("invalid gate action: {e}"))?;
        }
        if let Some(ttl) = args.gate_token_ttl.or(file.gate_token_ttl) {
            if ttl == 0 || ttl > 24 * 3600 {
                bail!("gate token ttl must be between 1 second and 24 hours, got {ttl}");
            }
            trust_policy.token_ttl_ms = i64::try_from(ttl * 1000).unwrap_or(i64::MAX);
        }
        let warm_time =
            std::time::Duration::from_secs(args.warm_time.or(file.warm_time).unwrap_or(600));
        let gc_interval = match args.gc_interval.or(file.gc_interval).unwrap_or(3600) {
            0 => None,
            secs => Some(std::time::Duration::from_secs(secs)),
        };
        let static_cache_mib = args
            .static_cache_mib
            .or(file.static_cache_mib)
            .unwrap_or(256);
        if static_cache_mib > MAX_STATIC_CACHE_MIB {
            bail!(
                "static cache must be at most {MAX_STATIC_CACHE_MIB} MiB (64 GiB), got {static_cache_mib} MiB"
            );
        }
        let max_snapshot_mib = args
            .max_snapshot_mib
            .or(file.max_snapshot_mib)
            .unwrap_or(1024);
        if !(1..=MAX_SNAPSHOT_MIB).contains(&max_snapshot_mib) {
            bail!(
                "the snapshot size limit must be between 1 and {MAX_SNAPSHOT_MIB} MiB (64 GiB), got {max_snapshot_mib} MiB"
            );
        }
        let max_snapshot_files = args
            .max_snapshot_files
            .or(file.max_snapshot_files)
            .unwrap_or(100_000);
        if max_snapshot_files == 0 {
            bail!("the snapshot file limit must be at least 1, got 0");
        }
        let max_connections = args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(10_000);
        if !(1..=MAX_CONNECTIONS).contains(&max_connections) {
            bail!(
                "the connection limit must be between 1 and {MAX_CONNECTIONS}, got {max_connections}"
            );
        }
        let egress_pins = if args.egress_pin.is_empty() {
            file.egress_pin.unwrap_or_default()
        } else {
            args.egress_pin
        }
        .iter()
        .map(|raw| parse_egress_pin(raw))
        .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            warm_time,
            egress_pins,
            gc_interval,
            static_cache_bytes: static_cache_mib << 20,
            max_snapshot_bytes: max_snapshot_mib << 20,
            max_snapshot_files,
            max_connections,
            max_connections_per_client: args
                .max_connections_per_client
                .or(file.max_connections_per_client)
                .unwrap_or(256),
            max_ready_previews: args
                .max_ready_previews
                .or(file.max_ready_previews)
                .unwrap_or(10),
            trust_policy,
            config_file: args.config,
            data_dir,
            api_addr: args
                .api_addr
                .or(file.api_addr)
                .unwrap_or_else(|| DEFAULT_API_ADDR.to_string()),
            app_addr: args
                .app_addr
                .or(file.app_addr)
                .unwrap_or_else(|| DEFAULT_APP_ADDR.to_string()),
            agent_root,
            allowed_roots,
            egress_allow: if args.egress_allow.is_empty() {
                file.egress_allow.unwrap_or_default()
            } else {
                args.egress_allow
            },
            base_domain: args
                .base_domain
                .or(file.base_domain)
                .unwrap_or_else(|| DEFAULT_BASE_DOMAIN.to_string()),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            log_level,
            rotate_admin_token: args.rotate_admin_token,
        })
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join(ADMIN_TOKEN_FILE)
    }
}

/// Drops `.` and resolves `..` by dropping the previous component, so that the data dir can
/// be the base of the agent-root template (which refuses `..`).
fn lexical_normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn default_data_dir() -> PathBuf {
    dirs::data_dir().map_or_else(|| PathBuf::from("slipway-data"), |d| d.join("slipway"))
}

/// Everything a running server is made of. The engine will be added here.
pub struct Server {
    pub config: ServeConfig,
    pub engine: Engine,
    pub state: AppState,
    pub router: Arc<Router>,
    pub api_listener: TcpListener,
    pub app_listener: TcpListener,
    pub api_addr: SocketAddr,
    pub app_addr: SocketAddr,
    pub admin_token_path: PathBuf,
}

/// Prepares the data directory, the store, the admin token, the API state, the router and
/// both listeners.
///
/// # Errors
/// Any of those steps failing (unwritable data dir, corrupt database, address in use, …).
pub async fn build_server(config: ServeConfig) -> anyhow::Result<Server> {
    prepare_data_dir(&config.data_dir)?;
    let db = config.data_dir.join(DATABASE_FILE);
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&db)
            .with_context(|| format!("cannot open the database {}", db.display()))?,
    );
    let clock = system_clock();
    let admin_token_path = config.admin_token_path();
    ensure_admin_token(
        store.as_ref(),
        &admin_token_path,
        config.rotate_admin_token,
        clock(),
    )?;

    let mut api_config = ApiConfig::new(config.agent_root.clone());
    api_config.spec_policy.allowed_roots = config.allowed_roots.clone();
    api_config.base_domain = config.base_domain.clone();
    let router = Arc::new(Router::new(config.listener_config()));

    let api_listener = TcpListener::bind(&config.api_addr)
        .await
        .with_context(|| format!("cannot listen on api address {}", config.api_addr))?;
    let app_listener = TcpListener::bind(&config.app_addr)
        .await
        .with_context(|| format!("cannot listen on app address {}", config.app_addr))?;
    let api_addr = api_listener.local_addr()?;
    let app_addr = app_listener.local_addr()?;

    let artifacts = Arc::new(
        slipway_artifacts::LocalArtifactStore::new(config.data_dir.join("artifacts"))
            .context("cannot open the artifact store")?,
    );
    let engine = build_engine(
        &config,
        Arc::clone(&store),
        Arc::clone(&artifacts),
        Arc::clone(&router),
        app_addr,
        clock.clone(),
    )?;
    let report = engine
        .reconcile()
        .await
        .context("start-up reconcile failed")?;
    info!(
        runs_failed = report.runs_failed,
        runs_stopped = report.runs_stopped,
        sandboxes_cleaned = report.sandboxes_cleaned,
        "reconciled state left by the previous run of the server"
    );
    let signer = load_signing_key(&config.data_dir, &artifacts)?;
    engine.set_signer(Arc::clone(&signer));
    let state = AppState::new(store, api_config)
        .with_clock(clock)
        .with_engine(engine.clone(), artifacts)
        .with_capture_options(slipway_artifacts::CaptureOptions {
            max_compressed_bytes: config.max_snapshot_bytes,
            max_files: config.max_snapshot_files,
            ..slipway_artifacts::CaptureOptions::default()
        })
        .with_trust(config.trust_policy.clone(), Some(signer));

    Ok(Server {
        config,
        engine,
        state,
        router,
        api_listener,
        app_listener,
        api_addr,
        app_addr,
        admin_token_path,
    })
}

impl Server {
    /// Serves the API and app traffic until `shutdown` is cancelled, then lets both drain.
    pub async fn run(self, shutdown: CancellationToken) {
        info!(api = %self.api_addr, app = %self.app_addr, data_dir = %self.config.data_dir.display(), "serving");
        let api = slipway_api::app(self.state.clone());
        // Long-lived streams (WebSocket events, SSE logs) end when the bus closes, so that the
        // graceful shutdown below does not wait for them.
        let (bus, closing) = (self.engine.events().clone(), shutdown.clone());
        tokio::spawn(async move {
            closing.cancelled().await;
            bus.close();
        });
        if let Some(every) = self.config.gc_interval {
            tokio::spawn(collect_garbage_every(
                self.engine.clone(),
                every,
                shutdown.clone(),
            ));
        }
        // The app listener's connection guards (connection limits, request-head and idle
        // timeouts), which `axum::serve` does not have: API clients are untrusted too. It
        // ends only at `shutdown` (a failed accept is retried).
        let api_server = slipway_router::serve_service(
            self.api_listener,
            self.config.listener_config(),
            hyper_util::service::TowerToHyperService::new(api),
            shutdown.clone().cancelled_owned(),
        );
        let app_server = slipway_router::serve(
            self.app_listener,
            Arc::clone(&self.router),
            shutdown.cancelled_owned(),
        );
        tokio::join!(api_server, app_server);
        // Stop every app and destroy every sandbox; the next start-up settles the runs.
        self.engine.shutdown().await;
    }
}

/// An artifact younger than this is never collected, so one published a moment before its row
/// is written is safe.
const GC_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Runs artifact garbage collection every `every` until `shutdown`; the first pass runs at once.
async fn collect_garbage_every(
    engine: Engine,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match engine.collect_garbage(GC_MIN_AGE).await {
            Ok(report) if !report.removed.is_empty() => {
                info!(
                    removed = report.removed.len(),
                    kept = report.kept,
                    "collected unreferenced artifacts"
                );
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "artifact garbage collection failed; trying again later"),
        }
    }
}

/// Creates the data directory private to the user (0700); tightens an existing one that is
/// readable by others, since it holds the database and the admin token.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create data directory {}", dir.display()))?;
        info!(data_dir = %dir.display(), "created data directory");
    }
    let meta = fs::metadata(dir)
        .with_context(|| format!("cannot read data directory {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("data directory {} is not a directory", dir.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        warn!(data_dir = %dir.display(), mode = format!("{mode:o}"), "data directory was accessible to other users; setting it to 0700");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).with_context(|| {
            format!("cannot set permissions of data directory {}", dir.display())
        })?;
    }
    Ok(())
}

/// Loads the artifact signing key, creating it (0600) on first start. A new key signs the
/// artifacts stored before it existed, so they stay deployable.
fn load_signing_key(
    data_dir: &Path,
    artifacts: &slipway_artifacts::LocalArtifactStore,
) -> anyhow::Result<Arc<slipway_trust::Signer>> {
    let path = data_dir.join(slipway_trust::signing::KEY_FILE);
    let (signer, created) = slipway_trust::Signer::load_or_create(&path)?;
    if created {
        info!(path = %path.display(), key_id = signer.key_id(), "created the artifact signing key");
        let signed = sign_existing_artifacts(&signer, artifacts.root());
        if signed > 0 {
            info!(signed, "signed the artifacts stored before the key existed");
        }
    } else {
        info!(key_id = signer.key_id(), "loaded the artifact signing key");
    }
    Ok(Arc::new(signer))
}

/// Signs `<root>/<agent>/<hash>.tar.zst` and `<root>/<agent>/releases/<hash>.tar.zst` that have
/// no signature yet. Returns how many were signed.
fn sign_existing_artifacts(signer: &slipway_trust::Signer, root: &Path) -> usize {
    let mut signed = 0;
    let Ok(agents) = fs::read_dir(root) else {
        return 0;
    };
    for agent in agents.flatten() {
        let agent_name = agent.file_name().to_string_lossy().into_owned();
        for (kind, dir) in [
            ("snapshot", agent.path()),
            ("release", agent.path().join("releases")),
        ] {
            let Ok(files) = fs::read_dir(&dir) else {
                continue;
            };
            for file in files.flatten() {
                let name = file.file_name().to_string_lossy().into_owned();
                let Some(hash) = name.strip_suffix(".tar.zst") else {
                    continue;
                };
                if !slipway_artifacts::is_content_hash(hash) {
                    continue;
                }
                match signer.sign_file_once(kind, &agent_name, hash, &file.path()) {
                    Ok(true) => signed += 1,
                    Ok(false) => {}
                    Err(e) => {
                        warn!(path = %file.path().display(), error = %e, "could not sign an existing artifact")
                    }
                }
            }
        }
    }
    signed
}

/// Makes sure an operator token exists; writes a new one to `path` on first start or when
/// rotating. Only the token's hash goes to the store.
fn ensure_admin_token(
    store: &dyn Store,
    path: &Path,
    rotate: bool,
    now: i64,
) -> anyhow::Result<()> {
    if rotate {
        let revoked = store.revoke_operator_tokens(now)?;
        info!(revoked, "revoked operator tokens");
    } else if store.has_operator_token()? {
        if !path.exists() {
            warn!(
                path = %path.display(),
                "an operator token exists but its file is missing; run `slipway serve --rotate-admin-token` to issue a new one"
            );
        }
        return Ok(());
    }
    let token = mint_token(TokenKind::Operator, None, now);
    // The file first: if storing fails, the next start issues a new token and overwrites it.
    write_private_file(path, &format!("{}\n", token.secret))?;
    store.insert_token(&token.record)?;
    info!(path = %path.display(), "wrote a new admin token");
    Ok(())
}

/// Writes `contents` to `path` with mode 0600 from the first byte: written under a temporary
/// name created 0600, then renamed over `path`.
pub fn write_private_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", tmp.display())),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// `slipway serve`.
///
/// # Errors
/// Configuration, start-up or listener failures.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig::resolve(args)?;
    crate::logging::init(config.log_format, &config.log_level)?;
    match &config.config_file {
        Some(path) => info!(path = %path.display(), "loaded config file"),
        None => info!("no config file (use --config or SLIPWAY_CONFIG to give one)"),
    }
    info!(
        data_dir = %config.data_dir.display(),
        api_addr = %config.api_addr,
        app_addr = %config.app_addr,
        agent_root = %config.agent_root.as_str(),
        allowed_roots = %config.allowed_roots.join(","),
        base_domain = %config.base_domain,
        static_cache_mib = config.static_cache_bytes >> 20,
        max_snapshot_mib = config.max_snapshot_bytes >> 20,
        max_snapshot_files = config.max_snapshot_files,
        max_connections = config.max_connections,
        max_connections_per_client = config.max_connections_per_client,
        max_ready_previews = config.max_ready_previews,
        "configuration"
    );
    slipway_router::CacheBudget::global().set_limit(config.static_cache_bytes);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let server = build_server(config).await?;
        // Signal handlers go in before the addresses are printed: whoever reads them may
        // signal at once, and must get a clean shutdown rather than the default death.
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone())?;
        print_ready(&server)?;
        server.run(shutdown).await;
        info!("stopped");
        Ok(())
    })
}

fn print_ready(server: &Server) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "slipway: api listening on http://{}", server.api_addr)?;
    writeln!(out, "slipway: app listening on http://{}", server.app_addr)?;
    writeln!(
        out,
        "slipway: admin token in {}",
        server.admin_token_path.display()
    )?;
    out.flush()?;
    Ok(())
}

fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "shutting down");
        shutdown.cancel();
    });
    Ok(())
}

/// The cgroup directory holding this server's sandboxes. Start-up cleanup kills everything
/// under it, so two servers on one machine (two data directories) must not share it: the name
/// carries a digest of the data directory's path.
fn cgroup_parent_for(data_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::os::unix::ffi::OsStrExt;
    let canonical = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_bytes());
    format!("slipway-{}", &hex::encode(digest)[..12])
}

/// The run engine: sandboxes when this machine can make them (otherwise runs fail and say why),
/// the build egress allowlist derived from the host's npm and pip configuration.
fn build_engine(
    config: &ServeConfig,
    store: Arc<dyn Store>,
    artifacts: Arc<slipway_artifacts::LocalArtifactStore>,
    router: Arc<Router>,
    app_addr: SocketAddr,
    clock: slipway_api::Clock,
) -> anyhow::Result<Engine> {
    let driver = match slipway_sandbox::check_support() {
        Ok(()) => {
            let helper = std::env::current_exe()
                .context("cannot find the slipway executable for sandbox helpers")?;
            let mut driver_config =
                slipway_sandbox::DriverConfig::new(helper, config.data_dir.join("sandboxes"));
            driver_config.cgroup_parent = cgroup_parent_for(&config.data_dir);
            // Named after the data directory: no other driver uses it.
            driver_config.remove_cgroup_parent_on_drop = true;
            slipway_sandbox::LinuxDriver::new(driver_config).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    if let Err(reason) = &driver {
        warn!("sandboxes are unavailable, so every deployment run will fail until this is fixed: {reason}");
    }
    let mut engine_config =
        EngineConfig::new(config.data_dir.join("cache"), config.agent_root.clone());
    engine_config.base_domain = config.base_domain.clone();
    engine_config.app_port = app_addr.port();
    engine_config.warm_time = config.warm_time;
    engine_config.max_snapshot_bytes = config.max_snapshot_bytes;
    engine_config.max_snapshot_files = config.max_snapshot_files;
    engine_config.max_ready_previews = config.max_ready_previews;
    let registry = slipway_sandbox::RegistryConfig::derive();
    engine_config.egress_allow = registry.egress_config(&config.egress_allow).allow_hosts;
    engine_config.egress_env = registry.sandbox_env();
    info!(hosts = %engine_config.egress_allow.join(","), "build egress allowlist");
    engine_config.runtime_egress_pins = config.egress_pins.clone();
    Ok(Engine::new(
        store,
        artifacts,
        driver,
        router,
        engine_config,
        EventBus::default(),
        clock,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_pins_are_host_equals_ip() {
        let (host, ip) = parse_egress_pin("API.Internal=10.1.2.3").unwrap();
        assert_eq!(
            (host.as_str(), ip.to_string().as_str()),
            ("api.internal", "10.1.2.3")
        );
        for bad in [
            "api.internal",
            "api.internal=x",
            "*.internal=10.0.0.1",
            "a:80=10.0.0.1",
        ] {
            assert!(parse_egress_pin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_data_dirs_become_templates_the_core_accepts() {
        assert_eq!(
            lexical_normalize(Path::new("/a/b/../c/./d")),
            PathBuf::from("/a/c/d")
        );
        let args = ServeArgs {
            data_dir: Some(PathBuf::from("x/../data")),
            ..Default::default()
        };
        let config = ServeConfig::resolve(args).unwrap();
        assert!(config.data_dir.is_absolute() && config.data_dir.ends_with("data"));
        assert!(!config.agent_root.as_str().contains(".."));
        assert_eq!(config.base_domain, DEFAULT_BASE_DOMAIN);
        assert_eq!(config.api_addr, DEFAULT_API_ADDR);
    }

    #[test]
    fn the_file_is_underneath_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        fs::write(&file, "api_addr = \"127.0.0.1:1\"\napp_addr = \"127.0.0.1:2\"\nallowed_roots = [\"/a/\"]\nlog_format = \"json\"\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            api_addr: Some("127.0.0.1:3".into()),
            ..Default::default()
        };
        let config = ServeConfig::resolve(args).unwrap();
        assert_eq!(config.api_addr, "127.0.0.1:3");
        assert_eq!(config.app_addr, "127.0.0.1:2");
        assert_eq!(config.allowed_roots, ["/a"]);
        assert_eq!(config.log_format, LogFormat::Json);
        let args = ServeArgs {
            allowed_roots: vec!["/".into()],
            ..Default::default()
        };
        assert!(ServeConfig::resolve(args)
            .unwrap_err()
            .to_string()
            .contains("must not be /"));
    }
}
