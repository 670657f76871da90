//! Run-time egress from the spec's `runtimeEgressAllow`: a running app (preview run, production
//! run, and an instance cold-booted from its release) reaches the allow-listed host through its
//! proxy and nothing else; denials land in the run's log; with no allowlist there is no way out.
//!
//! The allowed upstream is a real HTTP server on this machine's loopback. Its name
//! (`upstream.test`) is pinned to 127.0.0.1 by the engine's operator configuration, which is how
//! an operator opens an internal host; nothing is aimed off this machine.

use std::time::Duration;

use slipway_core::{DeploymentStatus, DeploymentTarget};

use crate::counting_upstream::Upstream;
use crate::util::*;

/// The app: `/ok` fetches the allowed upstream, `/denied` another name, `/direct` tries the
/// upstream's address without the proxy, `/env` shows the proxy variable. Python's urllib uses
/// the proxy variables on its own, as most HTTP clients do.
const APP: &str = r#"
import http.server, os, socket, urllib.request, urllib.error
def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return 'status=%d body=%s' % (r.status, r.read().decode().strip())
    except urllib.error.HTTPError as e:
        return 'status=%d body=%s' % (e.code, e.read().decode().strip())
    except Exception as e:
        return 'error=%s' % type(e).__name__
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        port = os.environ['UPSTREAM_PORT']
        if self.path == '/ok':
            out = fetch('http://upstream.test:%s/' % port)
        elif self.path == '/denied':
            out = fetch('http://other.test:%s/' % port)
        elif self.path == '/direct':
            try:
                socket.create_connection(('127.0.0.1', int(port)), timeout=5).close()
                out = 'direct=connected'
            except Exception as e:
                out = 'direct=%s' % type(e).__name__
        elif self.path == '/env':
            out = 'proxy=[%s]' % os.environ.get('HTTP_PROXY', '')
        else:
            out = 'up'
        body = out.encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()
"#;

async fn egress_harness(opts: Options) -> Option<Harness> {
    harness_with(Options {
        runtime_egress_pins: vec![("upstream.test".into(), "127.0.0.1".parse().unwrap())],
        ..opts
    })
    .await
}

/// Sets the spec: the app above, allowing `allow`, targeting `target`.
fn set_app_spec(h: &Harness, upstream: &Upstream, allow: Vec<String>, target: &str) {
    h.write(&[("app.py", APP)]);
    let port = upstream.port.to_string();
    let target = target.to_string();
    h.set_spec_with("", "true", "python3 app.py", 3000, move |d| {
        d.env = Some([("UPSTREAM_PORT".to_string(), port)].into());
        d.runtime_egress_allow = Some(allow);
        d.target_default = Some(target);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_app_reaches_only_its_allow_listed_host_and_denials_are_logged() {
    let Some(h) = egress_harness(Options::default()).await else {
        return;
    };
    let upstream = Upstream::start("hello from upstream").await;
    set_app_spec(
        &h,
        &upstream,
        vec![format!("upstream.test:{}", upstream.port)],
        "preview",
    );
    let run = h.start().await;
    let ready = h
        .wait_for(&run.id, DeploymentStatus::Ready, Duration::from_secs(60))
        .await;
    let host = h.preview_host(&ready.id);
    assert_eq!(
        h.get(&host, "/ok").await,
        (200, "status=200 body=hello from upstream".to_string())
    );
    assert_eq!(upstream.connections(), 1);
    let (status, body) = h.get(&host, "/denied").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        "status=403 body=slipway egress proxy: denied: host other.test is not in the egress allowlist"
    );
    // Without the proxy the app cannot reach the host's loopback at all.
    let (_, direct) = h.get(&host, "/direct").await;
    assert_eq!(direct, "direct=ConnectionRefusedError");
    assert_eq!(
        upstream.connections(),
        1,
        "nothing else reached the upstream"
    );
    let log = h
        .wait_log_contains(
            &run.id,
            &format!(
                "> egress denied: other.test:{}: host other.test is not in the egress allowlist",
                upstream.port
            ),
            Duration::from_secs(10),
        )
        .await;
    assert!(
        log.contains(&format!(
            "> run-time egress to upstream.test:{} through the proxy at 127.0.0.1:3128",
            upstream.port
        )),
        "{log}"
    );
    h.engine.stop(&h.agent, &run.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_allowlist_a_running_app_has_no_proxy_and_no_way_out() {
    let Some(h) = egress_harness(Options::default()).await else {
        return;
    };
    let upstream = Upstream::start("hello from upstream").await;
    set_app_spec(&h, &upstream, Vec::new(), "preview");
    let run = h.start().await;
    let ready = h
        .wait_for(&run.id, DeploymentStatus::Ready, Duration::from_secs(60))
        .await;
    let host = h.preview_host(&ready.id);
    assert_eq!(h.get(&host, "/env").await.1, "proxy=[]");
    // No proxy variable: urllib resolves the name itself, and the sandbox has no DNS and no
    // route; the build proxy's port is closed.
    let (_, ok) = h.get(&host, "/ok").await;
    assert!(ok.starts_with("error="), "{ok}");
    assert_eq!(
        h.get(&host, "/direct").await.1,
        "direct=ConnectionRefusedError"
    );
    assert_eq!(upstream.connections(), 0);
    let log = h.log_text(&run.id);
    assert!(!log.contains("run-time egress"), "{log}");
    h.engine.stop(&h.agent, &run.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_booted_production_instance_gets_its_versions_egress() {
    let Some(h) = egress_harness(Options {
        warm_time: Some(Duration::from_millis(100)),
        drain_timeout: Some(Duration::from_millis(100)),
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let upstream = Upstream::start("hello from upstream").await;
    // Version 1 may reach the upstream; version 2 may not.
    set_app_spec(
        &h,
        &upstream,
        vec![format!("upstream.test:{}", upstream.port)],
        "production",
    );
    let first = h.start().await;
    assert_eq!(first.target, DeploymentTarget::Production);
    h.wait_for(&first.id, DeploymentStatus::Ready, Duration::from_secs(60))
        .await;
    let prod = h.engine.production_host("app");
    assert_eq!(
        h.get(&prod, "/ok").await.1,
        "status=200 body=hello from upstream"
    );
    set_app_spec(&h, &upstream, Vec::new(), "production");
    let second = h.start().await;
    h.wait_for(&second.id, DeploymentStatus::Ready, Duration::from_secs(60))
        .await;
    assert!(h.get(&prod, "/ok").await.1.starts_with("error="));
    // Version 1's instance retires (its run stops); rolling back boots it from its release.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while h.engine.live_versions(&h.agent).await.contains(&1) {
        assert!(tokio::time::Instant::now() < deadline, "v1 never retired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = h
        .engine
        .rollback(&h.agent, Some(1), None, None)
        .await
        .unwrap();
    assert!(!out.warm, "version 1 was booted, not warm");
    assert_eq!(
        h.get(&prod, "/ok").await.1,
        "status=200 body=hello from upstream"
    );
    assert_eq!(
        h.get(&prod, "/denied").await.1,
        "status=403 body=slipway egress proxy: denied: host other.test is not in the egress allowlist"
    );
    assert_eq!(upstream.connections(), 2);
    // The booted instance's denials go to the log of the run that built version 1.
    h.wait_log_contains(
        &first.id,
        "> egress denied: other.test",
        Duration::from_secs(10),
    )
    .await;
    h.engine.shutdown().await;
}
