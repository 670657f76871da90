//! Run-time egress: a proxy on the sandbox's loopback that reaches only the hosts a spec
//! allow-lists. The allowed upstream is a real HTTP server on this machine's loopback; its name
//! is pinned to 127.0.0.1 the way an operator pins an internal host (a pin opens nothing by
//! itself: the name must be allow-listed too). No traffic leaves this machine.

use crate::counting_upstream::Upstream;
use crate::require_sandboxes;
use crate::util::*;
use slipway_sandbox::{
    DeniedAttempt, EgressPolicy, EgressProxy, ExecRequest, Sandbox, SandboxHandle,
    DEFAULT_PROXY_PORT,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Opens a run-time proxy in `sb` allowing `upstream.test:<port>` (pinned to 127.0.0.1) and
/// recording every denial.
async fn open_proxy(
    sb: &dyn SandboxHandle,
    upstream: &Upstream,
) -> (EgressProxy, Arc<Mutex<Vec<DeniedAttempt>>>) {
    let denials = Arc::new(Mutex::new(Vec::new()));
    let seen = denials.clone();
    let policy = EgressPolicy::new([format!("upstream.test:{}", upstream.port)])
        .with_pins([("upstream.test".to_string(), "127.0.0.1".parse().unwrap())])
        .with_observer(Arc::new(move |d| seen.lock().unwrap().push(d.clone())));
    let listener = sb.listen(DEFAULT_PROXY_PORT).await.expect("listen inside");
    let proxy = EgressProxy::start(listener, policy, sb.id()).unwrap();
    (proxy, denials)
}

async fn run_with(sb: &Sandbox, proxy: &EgressProxy, command: &str) -> Ran {
    let mut req = ExecRequest::new(command).timeout(Duration::from_secs(60));
    for (k, v) in proxy.env() {
        req = req.env(k, v);
    }
    run_req(sb, req).await
}

#[tokio::test]
async fn an_allow_listed_host_is_reached_through_the_proxy() {
    require_sandboxes!();
    let upstream = Upstream::start("hello from upstream\n").await;
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let (proxy, denials) = open_proxy(&sb, &upstream).await;
    let port = upstream.port;
    // Plain HTTP through the proxy, then a CONNECT tunnel (curl --proxytunnel), both from the
    // proxy variables the app is given.
    let ran = run_with(
        &sb,
        &proxy,
        &format!(
            "echo \"proxy=[$HTTP_PROXY]\"; curl -sS -m 20 http://upstream.test:{port}/ && \
             curl -sS -m 20 --proxytunnel http://upstream.test:{port}/"
        ),
    )
    .await
    .ok();
    assert_eq!(
        ran.stdout,
        format!(
            "proxy=[http://127.0.0.1:{DEFAULT_PROXY_PORT}]\nhello from upstream\nhello from upstream\n"
        ),
        "{ran:#?}"
    );
    assert_eq!(upstream.connections(), 2);
    assert!(denials.lock().unwrap().is_empty());
    drop(proxy);
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn a_host_not_on_the_list_is_refused_before_connecting_and_reported() {
    require_sandboxes!();
    let upstream = Upstream::start("hello from upstream\n").await;
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let (proxy, denials) = open_proxy(&sb, &upstream).await;
    let port = upstream.port;
    let ran = run_with(
        &sb,
        &proxy,
        &format!(
            // Another name, the allowed name on another port, the upstream's IP literal, and a
            // CONNECT to another name.
            "for url in http://other.test:{port}/ http://upstream.test:{}/ http://127.0.0.1:{port}/; do \
               curl -sS -m 20 --noproxy '' -w 'status=%{{http_code}}\\n' \"$url\"; done; \
             curl -sS -m 20 --proxytunnel http://other.test:{port}/ 2>&1; echo rc=$?",
            port + 1
        ),
    )
    .await;
    let out = &ran.stdout;
    assert!(
        out.contains("denied: host other.test is not in the egress allowlist\nstatus=403"),
        "{ran:#?}"
    );
    assert!(
        out.contains(&format!(
            "denied: port {} of host upstream.test is not in the egress allowlist\nstatus=403",
            port + 1
        )),
        "{ran:#?}"
    );
    assert!(
        out.contains("is an IP address; only allow-listed host names are reachable\nstatus=403"),
        "{ran:#?}"
    );
    assert!(out.contains("403") && out.contains("rc=56"), "{ran:#?}");
    assert_eq!(upstream.connections(), 0, "nothing reached the upstream");
    let denied = denials.lock().unwrap().clone();
    let hosts: Vec<(&str, u16)> = denied.iter().map(|d| (d.host.as_str(), d.port)).collect();
    assert_eq!(
        hosts,
        [
            ("other.test", port),
            ("upstream.test", port + 1),
            ("127.0.0.1", port),
            ("other.test", port)
        ],
        "{denied:#?}"
    );
    assert!(denied.iter().all(|d| d.sandbox == sb.id()));
    drop(proxy);
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn without_an_allowlist_a_running_app_has_no_proxy_and_no_way_out() {
    require_sandboxes!();
    let upstream = Upstream::start("hello from upstream\n").await;
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let port = upstream.port;
    let ran = run(
        &sb,
        &format!(
            "echo \"proxy=[$HTTP_PROXY$HTTPS_PROXY$http_proxy]\"; \
             curl -sS -m 5 -x http://127.0.0.1:{DEFAULT_PROXY_PORT} http://upstream.test:{port}/ 2>&1; echo rc=$?; \
             curl -sS -m 5 --noproxy '*' http://127.0.0.1:{port}/ 2>&1; echo rc=$?"
        ),
    )
    .await
    .ok();
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"proxy=[]"), "{ran:#?}");
    // Connection refused twice: no proxy listens, and the host's loopback is not this one.
    assert_eq!(
        ran.stdout.matches("rc=7").count(),
        2,
        "both refused: {ran:#?}"
    );
    assert_eq!(upstream.connections(), 0);
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn closing_the_proxy_cuts_the_way_out() {
    require_sandboxes!();
    let upstream = Upstream::start("hello from upstream\n").await;
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let (proxy, _denials) = open_proxy(&sb, &upstream).await;
    let port = upstream.port;
    let env = proxy.env();
    let ok = run_with(
        &sb,
        &proxy,
        &format!("curl -sS -m 20 http://upstream.test:{port}/"),
    )
    .await
    .ok();
    assert_eq!(ok.stdout, "hello from upstream\n");
    proxy.close();
    let mut req = ExecRequest::new(format!(
        "curl -sS -m 5 http://upstream.test:{port}/ 2>&1; echo rc=$?"
    ))
    .timeout(Duration::from_secs(60));
    for (k, v) in env {
        req = req.env(k, v);
    }
    let mut after = run_req(&sb, req.clone()).await;
    // The listener goes away as soon as the proxy task notices; poll briefly.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !after.stdout.contains("rc=7") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = run_req(&sb, req.clone()).await;
    }
    assert!(after.stdout.contains("rc=7"), "{after:#?}");
    assert_eq!(upstream.connections(), 1);
    sb.destroy().await.unwrap();
}
