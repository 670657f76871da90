//! Sandboxes: the driver interface and the Linux namespace driver.
//!
//! A sandbox is the isolated environment of exactly one run or instance: its own mount, pid,
//! network, IPC, UTS and cgroup namespaces; a read-only view of the host's toolchain; a
//! writable `/workspace/app` that is an overlay over a cached extraction of the snapshot; only
//! a loopback interface; cgroup limits; an unprivileged uid with no capabilities, no_new_privs
//! and a seccomp filter. See `docs/sandbox.md` for the privileged steps and the threat model.
//!
//! The engine holds sandboxes through the driver interface ([`SandboxDriver`], [`SandboxHandle`]
//! in `interface.rs`); [`LinuxDriver`] / [`Sandbox`] are its default implementation.
//!
//! Entry points for the engine:
//! - [`check_support`] at start-up: exactly what is missing, or `Ok`.
//! - [`LinuxDriver::new`], then [`LinuxDriver::cleanup_leftovers`] once.
//! - [`LinuxDriver::create`] → [`Sandbox`]: [`Sandbox::spawn`] / [`Sandbox::exec`] commands,
//!   [`Sandbox::connect`] to the app's port, [`Sandbox::export_workspace`], [`Sandbox::usage`],
//!   [`Sandbox::destroy`].
//! - [`derive_registry_allowlist`] / [`RegistryConfig`] for the build egress proxy.
//! - [`EgressPolicy`] + [`EgressProxy`] on a [`Sandbox::listen`] listener for an app's run-time
//!   egress (the spec's `runtimeEgressAllow`).
//!
//! The `slipway` binary must call [`helper_main`] for the hidden subcommands
//! ([`is_helper_subcommand`]) before starting any thread.

mod cleanup;
mod config;
mod driver;
pub mod egress;
pub mod export;
mod interface;
mod output;
mod privileged;
mod process;
mod spawner;
mod support;

pub use cleanup::CleanupReport;
pub use config::{
    DriverConfig, EgressConfig, ExecRequest, Limits, SandboxSpec, SpecError, DEFAULT_PROXY_PORT,
    DEFAULT_WORKLOAD_ID, HOME_PATH, WORKSPACE_PATH,
};
pub use driver::{
    CreateError, DestroyError, DriverError, LinuxDriver, NetError, Sandbox, SpareStats, Usage,
};
pub use egress::{
    derive_registry_allowlist, proxy_env, Denied, DeniedAttempt, EgressPolicy, EgressProxy,
    RegistryConfig,
};
pub use interface::{BoxFuture, SandboxDriver, SandboxHandle};
pub use output::{OutputLine, OutputSink, OutputStream};
pub use privileged::cgroup::CgroupError;
pub use privileged::{helper_main, is_helper_subcommand, EXEC_SUBCOMMAND, INIT_SUBCOMMAND};
pub use process::{ExecError, ExitStatus, Process, TerminationReason};
pub use support::{check_support, Missing, SupportError};
