//! What every handler shares: the store, the configuration and the clock.

use std::sync::Arc;

use slipway_core::{AgentRootTemplate, SpecPolicy};
use slipway_store::Store;

use crate::error::ApiError;

/// The current time in milliseconds since the Unix epoch; injected so tests control it.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    })
}

/// Largest JSON body the JSON routes accept.
pub const DEFAULT_JSON_BODY_LIMIT: usize = 1024 * 1024;

/// Settings of the API, fixed at start-up.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Rules a spec must follow (allowed source roots, size limits).
    pub spec_policy: SpecPolicy,
    /// Where an agent's sandbox paths live on the host.
    pub agent_root: AgentRootTemplate,
    /// The domain under which apps get their host names (`<run>.preview.<base_domain>`).
    pub base_domain: String,
    /// Largest body of a JSON route, in bytes. Routes that take uploads set their own limit.
    pub json_body_limit: usize,
}

impl ApiConfig {
    /// A configuration with default limits.
    pub fn new(agent_root: AgentRootTemplate) -> Self {
        Self {
            spec_policy: SpecPolicy::default(),
            agent_root,
            base_domain: "localhost".to_string(),
            json_body_limit: DEFAULT_JSON_BODY_LIMIT,
        }
    }
}

/// Shared state of the API. Cheap to clone: every field is behind an `Arc`.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub config: Arc<ApiConfig>,
    pub clock: Clock,
    /// The run engine; `None` in servers (and tests) that only manage specs.
    pub engine: Option<slipway_engine::Engine>,
    /// Where snapshot archives are kept; `None` disables the upload path.
    pub artifacts: Option<Arc<slipway_artifacts::LocalArtifactStore>>,
    /// Limits applied to uploaded snapshots (the same as for host captures).
    pub capture_options: slipway_artifacts::CaptureOptions,
    /// Gate policy, the artifact signer and gate-decision wake-ups (issue 7).
    pub trust: Arc<TrustState>,
}

/// What the gate, audit and key routes share.
#[derive(Debug, Default)]
pub struct TrustState {
    /// Which actions need a gate, and the token and request lifetimes.
    pub policy: slipway_trust::TrustPolicy,
    /// Signs artifacts; `None` in servers (and tests) without a signing key.
    pub signer: Option<Arc<slipway_trust::Signer>>,
    /// Woken whenever a gate is decided, so long-polls return at once.
    pub decided: tokio::sync::Notify,
}

impl AppState {
    /// State with the wall clock.
    pub fn new(store: Arc<dyn Store>, config: ApiConfig) -> Self {
        Self {
            store,
            config: Arc::new(config),
            clock: system_clock(),
            engine: None,
            artifacts: None,
            capture_options: slipway_artifacts::CaptureOptions::default(),
            trust: Arc::new(TrustState::default()),
        }
    }

    /// Replaces the gate policy and the artifact signer.
    #[must_use]
    pub fn with_trust(
        mut self,
        policy: slipway_trust::TrustPolicy,
        signer: Option<Arc<slipway_trust::Signer>>,
    ) -> Self {
        self.trust = Arc::new(TrustState {
            policy,
            signer,
            decided: tokio::sync::Notify::new(),
        });
        self
    }

    /// Attaches the run engine and the artifact store (deployments and snapshots routes).
    #[must_use]
    pub fn with_engine(
        mut self,
        engine: slipway_engine::Engine,
        artifacts: Arc<slipway_artifacts::LocalArtifactStore>,
    ) -> Self {
        self.engine = Some(engine);
        self.artifacts = Some(artifacts);
        self
    }

    /// Replaces the limits applied to uploaded snapshots.
    #[must_use]
    pub fn with_capture_options(mut self, options: slipway_artifacts::CaptureOptions) -> Self {
        self.capture_options = options;
        self
    }

    /// Replaces the clock (tests).
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    /// Runs a store call off the async runtime: the store is synchronous (SQLite calls are
    /// short but may wait on the file lock).
    ///
    /// # Errors
    /// The store's error converted by the error table, or an internal error if the blocking
    /// task panicked.
    pub async fn store<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> slipway_store::Result<T> + Send + 'static,
    {
        let store = Arc::clone(&self.store);
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
            Ok(result) => result.map_err(ApiError::from),
            Err(join) => Err(ApiError::internal(format!("store task failed: {join}"))),
        }
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
