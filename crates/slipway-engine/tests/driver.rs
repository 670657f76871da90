//! The engine holds sandboxes only through the driver interface (`SandboxDriver`,
//! `SandboxHandle`): a driver that wraps the real Linux driver and counts every call runs a real
//! deploy end to end. Nothing is mocked: each call is delegated to the real sandbox.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slipway_core::DeploymentStatus;
use slipway_sandbox::{
    BoxFuture, CgroupError, CleanupReport, CreateError, DestroyError, ExecError, ExecRequest,
    ExitStatus, LinuxDriver, NetError, OutputSink, Process, SandboxDriver, SandboxHandle,
    SandboxSpec, Usage,
};
use tokio::net::{TcpListener, TcpStream};

use crate::util::*;

/// Calls by name.
#[derive(Default)]
struct Calls(Mutex<BTreeMap<&'static str, usize>>);

impl Calls {
    fn hit(&self, name: &'static str) {
        *self.0.lock().unwrap().entry(name).or_default() += 1;
    }

    fn get(&self, name: &str) -> usize {
        self.0.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

struct CountingDriver {
    real: LinuxDriver,
    calls: Arc<Calls>,
}

struct CountingSandbox {
    real: Arc<dyn SandboxHandle>,
    calls: Arc<Calls>,
}

impl SandboxDriver for CountingDriver {
    fn name(&self) -> &'static str {
        "counting-linux"
    }

    fn create(
        &self,
        spec: SandboxSpec,
    ) -> BoxFuture<'_, Result<Arc<dyn SandboxHandle>, CreateError>> {
        self.calls.hit("create");
        Box::pin(async move {
            let real = SandboxDriver::create(&self.real, spec).await?;
            Ok(Arc::new(CountingSandbox {
                real,
                calls: self.calls.clone(),
            }) as Arc<dyn SandboxHandle>)
        })
    }

    fn cleanup_leftovers(&self) -> CleanupReport {
        self.calls.hit("cleanup_leftovers");
        SandboxDriver::cleanup_leftovers(&self.real)
    }
}

impl SandboxHandle for CountingSandbox {
    fn id(&self) -> &str {
        self.real.id()
    }

    fn spawn(
        &self,
        req: ExecRequest,
        output: Option<OutputSink>,
    ) -> BoxFuture<'_, Result<Process, ExecError>> {
        self.calls.hit("spawn");
        self.real.spawn(req, output)
    }

    fn exec(
        &self,
        req: ExecRequest,
        output: Option<OutputSink>,
    ) -> BoxFuture<'_, Result<ExitStatus, ExecError>> {
        self.calls.hit("exec");
        self.real.exec(req, output)
    }

    fn connect(&self, port: u16) -> BoxFuture<'_, Result<TcpStream, NetError>> {
        self.calls.hit("connect");
        self.real.connect(port)
    }

    fn listen(&self, port: u16) -> BoxFuture<'_, Result<TcpListener, NetError>> {
        self.calls.hit("listen");
        self.real.listen(port)
    }

    fn usage(&self) -> Result<Usage, CgroupError> {
        self.calls.hit("usage");
        self.real.usage()
    }

    fn export_workspace<'a>(
        &'a self,
        dest: &'a Path,
    ) -> BoxFuture<
        'a,
        Result<slipway_sandbox::export::ExportSummary, slipway_sandbox::export::ExportError>,
    > {
        self.calls.hit("export_workspace");
        self.real.export_workspace(dest)
    }

    fn close_egress(&self) {
        self.calls.hit("close_egress");
        self.real.close_egress()
    }

    fn destroy(&self) -> BoxFuture<'_, Result<(), DestroyError>> {
        self.calls.hit("destroy");
        self.real.destroy()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_runs_a_deploy_through_any_driver() {
    let calls = Arc::new(Calls::default());
    let counted = calls.clone();
    let Some(h) = harness_with(Options {
        wrap_driver: Some(Box::new(move |real| {
            Arc::new(CountingDriver {
                real,
                calls: counted,
            }) as Arc<dyn SandboxDriver>
        })),
        ..Options::default()
    })
    .await
    else {
        return;
    };
    h.engine.reconcile().await.unwrap();
    assert_eq!(calls.get("cleanup_leftovers"), 1);
    h.write(&[("index.py", "print('built')\n")]);
    h.set_spec(
        "echo installing",
        "python3 index.py > built.txt",
        "python3 -m http.server $PORT --bind 127.0.0.1",
        3000,
    );
    let run = h.start().await;
    let ready = h
        .wait_for(&run.id, DeploymentStatus::Ready, Duration::from_secs(60))
        .await;
    let (status, body) = h.get(&h.preview_host(&ready.id), "/built.txt").await;
    assert_eq!((status, body.as_str()), (200, "built\n"));
    // One sandbox; install, build and start spawned in it; the build output exported; the
    // build's egress closed before the app started; readiness and the request connected in.
    assert_eq!(calls.get("create"), 1);
    assert_eq!(calls.get("spawn"), 3);
    assert_eq!(calls.get("export_workspace"), 1);
    assert_eq!(calls.get("close_egress"), 1);
    assert!(calls.get("connect") >= 2, "readiness probe and one request");
    assert_eq!(calls.get("destroy"), 0);
    h.engine.stop(&h.agent, &run.id).await.unwrap();
    assert_eq!(calls.get("destroy"), 1);
}
