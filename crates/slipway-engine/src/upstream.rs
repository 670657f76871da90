//! The router's view of a sandboxed app: an [`Upstream`] whose connections are opened inside
//! the sandbox's network namespace. No host port is ever opened for an app.

use futures_util::future::BoxFuture;
use slipway_router::Upstream;
use std::io;
use tokio::net::TcpStream;

use crate::SandboxRef;

/// One app instance: a port inside one sandbox.
pub struct SandboxUpstream {
    pub sandbox: SandboxRef,
    pub port: u16,
    /// The run (or instance) id, for logs.
    pub name: String,
}

impl Upstream for SandboxUpstream {
    fn connect(&self) -> BoxFuture<'static, io::Result<TcpStream>> {
        let sandbox = self.sandbox.clone();
        let port = self.port;
        Box::pin(async move {
            sandbox
                .connect(port)
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()))
        })
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}
