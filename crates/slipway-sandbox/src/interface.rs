//! The driver interface: what the engine needs from a sandbox technology, as object-safe traits.
//!
//! ```text
//! SandboxDriver ──create(SandboxSpec)──► Arc<dyn SandboxHandle>
//!      │                                    ├─ spawn / exec   a command (env, cwd, timeout,
//!      │                                    │                 streamed output lines)
//!      │                                    ├─ connect(port)  a TCP stream to the app inside
//!      │                                    ├─ listen(port)   a listener inside (egress proxies)
//!      │                                    ├─ usage()        memory, pids, CPU from the cgroup
//!      │                                    ├─ export_workspace(dest)
//!      │                                    ├─ close_egress() end of the build's way out
//!      │                                    └─ destroy()      kill everything, free everything
//!      └─cleanup_leftovers()  at start-up: what a dead process left behind
//! ```
//!
//! [`LinuxDriver`] and [`Sandbox`] (namespaces + cgroups, the default) implement them by
//! delegating to their inherent methods, so the two can never disagree. The engine holds only
//! `Arc<dyn SandboxDriver>` and `Arc<dyn SandboxHandle>`: a second driver (a microVM one, say)
//! plugs in without touching the pipeline.
//!
//! What a driver must guarantee (the engine relies on it, and the hostile-workload suite checks
//! it for the Linux driver): a fresh environment per `create`, with `/workspace/app` showing the
//! spec's lower dir; no outbound network except the build proxy while `spec.egress` is set and
//! `close_egress` has not been called; `connect`/`listen` reach only the sandbox's own loopback;
//! `destroy` leaves no process, mount or state behind and is idempotent.
//!
//! The types that cross the interface ([`Process`], [`tokio::net::TcpStream`], the error enums)
//! are the Linux driver's own for now; a second driver maps onto them.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::cleanup::CleanupReport;
use crate::config::{ExecRequest, SandboxSpec};
use crate::driver::{CreateError, DestroyError, LinuxDriver, NetError, Sandbox, Usage};
use crate::export::{ExportError, ExportSummary};
use crate::output::OutputSink;
use crate::privileged::cgroup::CgroupError;
use crate::process::{ExecError, ExitStatus, Process};

/// A boxed, sendable future: the return type of the interface's async methods (the same type
/// as `futures_util::future::BoxFuture`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Creates sandboxes of one kind.
pub trait SandboxDriver: Send + Sync + 'static {
    /// A short name for logs, e.g. `linux-namespaces`.
    fn name(&self) -> &'static str;

    /// Builds a fresh sandbox for one run or instance.
    ///
    /// # Errors
    /// A bad spec, an id in use, or a failed set-up step; nothing is left behind.
    fn create(
        &self,
        spec: SandboxSpec,
    ) -> BoxFuture<'_, Result<Arc<dyn SandboxHandle>, CreateError>>;

    /// Removes what sandboxes of a dead slipway process left behind. Call once at start-up.
    fn cleanup_leftovers(&self) -> CleanupReport;
}

/// One live sandbox.
pub trait SandboxHandle: Send + Sync + 'static {
    /// The id given in its spec.
    fn id(&self) -> &str;

    /// Starts `req.command` inside, streaming output lines to `output`.
    ///
    /// # Errors
    /// A bad request, a destroyed sandbox, or a failed set-up step.
    fn spawn(
        &self,
        req: ExecRequest,
        output: Option<OutputSink>,
    ) -> BoxFuture<'_, Result<Process, ExecError>>;

    /// Runs a command to its end (or its timeout).
    ///
    /// # Errors
    /// As [`SandboxHandle::spawn`]; a failing command is an `Ok` with a non-success status.
    fn exec(
        &self,
        req: ExecRequest,
        output: Option<OutputSink>,
    ) -> BoxFuture<'_, Result<ExitStatus, ExecError>> {
        Box::pin(async move {
            let mut process = self.spawn(req, output).await?;
            process.wait().await
        })
    }

    /// Connects to `127.0.0.1:port` inside the sandbox.
    ///
    /// # Errors
    /// Destroyed, or nothing accepts on that port.
    fn connect(&self, port: u16) -> BoxFuture<'_, Result<TcpStream, NetError>>;

    /// Listens on `127.0.0.1:port` inside the sandbox, served from this process.
    ///
    /// # Errors
    /// Destroyed, or the port is taken.
    fn listen(&self, port: u16) -> BoxFuture<'_, Result<TcpListener, NetError>>;

    /// Memory, processes and CPU used so far.
    ///
    /// # Errors
    /// When the accounting cannot be read (e.g. after destroy).
    fn usage(&self) -> Result<Usage, CgroupError>;

    /// Copies the merged `/workspace/app` into `dest` (which must not exist).
    ///
    /// # Errors
    /// See [`ExportError`].
    fn export_workspace<'a>(
        &'a self,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<ExportSummary, ExportError>>;

    /// Closes the build's egress for good. Idempotent.
    fn close_egress(&self);

    /// Kills every process and frees everything. Idempotent.
    ///
    /// # Errors
    /// When something could not be removed (`cleanup_leftovers` retries later).
    fn destroy(&self) -> BoxFuture<'_, Result<(), DestroyError>>;
}

impl SandboxDriver for LinuxDriver {
    fn name(&self) -> &'static str {
        "linux-namespaces"
    }

    fn create(
        &self,
        spec: SandboxSpec,
    ) -> BoxFuture<'_, Result<Arc<dyn SandboxHandle>, CreateError>> {
        Box::pin(async move {
            let sandbox = LinuxDriver::create(self, spec).await?;
            Ok(Arc::new(sandbox) as Arc<dyn SandboxHandle>)
        })
    }

    fn cleanup_leftovers(&self) -> CleanupReport {
        LinuxDriver::cleanup_leftovers(self)
    }
}

impl SandboxHandle for Sandbox {
    fn id(&self) -> &str {
        Sandbox::id(self)
    }

    fn spawn(
        &self,
        req: ExecRequest,
        output: Option<OutputSink>,
    ) -> BoxFuture<'_, Result<Process, ExecError>> {
        Box::pin(Sandbox::spawn(self, req, output))
    }

    fn exec(
        &self,
        req: ExecRequest,
        output: Option<OutputSink>,
    ) -> BoxFuture<'_, Result<ExitStatus, ExecError>> {
        Box::pin(Sandbox::exec(self, req, output))
    }

    fn connect(&self, port: u16) -> BoxFuture<'_, Result<TcpStream, NetError>> {
        Box::pin(Sandbox::connect(self, port))
    }

    fn listen(&self, port: u16) -> BoxFuture<'_, Result<TcpListener, NetError>> {
        Box::pin(Sandbox::listen(self, port))
    }

    fn usage(&self) -> Result<Usage, CgroupError> {
        Sandbox::usage(self)
    }

    fn export_workspace<'a>(
        &'a self,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<ExportSummary, ExportError>> {
        Box::pin(Sandbox::export_workspace(self, dest))
    }

    fn close_egress(&self) {
        Sandbox::close_egress(self)
    }

    fn destroy(&self) -> BoxFuture<'_, Result<(), DestroyError>> {
        Box::pin(Sandbox::destroy(self))
    }
}
