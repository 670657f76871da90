//! Run-time egress: a running app reaches the hosts its spec's `runtimeEgressAllow` names, and
//! nothing else, through a proxy on its sandbox's loopback — the same proxy builds use, with only
//! the spec's hosts. An empty list means no proxy at all: the app has no way out.
//!
//! The build proxy is closed (`close_egress`) before the start command runs; this one is opened
//! after that, so the app never sees the registries the build could reach.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use slipway_sandbox::{EgressPolicy, EgressProxy, DEFAULT_PROXY_PORT};

use crate::logs::RunLog;
use crate::SandboxRef;

/// Where a denied attempt is reported, besides the server's own log.
pub(crate) enum DenialLog {
    /// The run's log (lines `> egress denied: ...`).
    Run(RunLog),
    /// Only the server's log.
    None,
}

/// The port of the run-time proxy: the build proxy's port, unless the app itself uses it.
pub(crate) fn proxy_port(app_port: u16) -> u16 {
    if app_port == DEFAULT_PROXY_PORT {
        DEFAULT_PROXY_PORT + 1
    } else {
        DEFAULT_PROXY_PORT
    }
}

/// Opens the run-time proxy of `sandbox` for `hosts`; `Ok(None)` when `hosts` is empty.
///
/// # Errors
/// The proxy's port could not be bound inside the sandbox.
pub(crate) async fn open(
    sandbox: &SandboxRef,
    hosts: &[String],
    app_port: u16,
    pins: &[(String, IpAddr)],
    log: DenialLog,
) -> Result<Option<EgressProxy>, String> {
    if hosts.is_empty() {
        return Ok(None);
    }
    let port = proxy_port(app_port);
    // The build proxy on the same port was closed just before; its listener goes away as soon
    // as its task notices, so retry briefly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let listener = loop {
        match sandbox.listen(port).await {
            Ok(l) => break l,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("run-time egress proxy: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let mut policy = EgressPolicy::new(hosts.iter().cloned()).with_pins(pins.iter().cloned());
    if let DenialLog::Run(log) = log {
        policy = policy.with_observer(Arc::new(move |d| {
            log.try_system(format!(
                "> egress denied: {}:{}: {}",
                d.host, d.port, d.reason
            ));
        }));
    }
    EgressProxy::start(listener, policy, sandbox.id().to_string())
        .map(Some)
        .map_err(|e| format!("run-time egress proxy: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_steps_aside_for_the_app_port() {
        assert_eq!(proxy_port(3000), DEFAULT_PROXY_PORT);
        assert_ne!(proxy_port(DEFAULT_PROXY_PORT), DEFAULT_PROXY_PORT);
    }
}
