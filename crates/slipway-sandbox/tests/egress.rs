//! The build egress proxy: package managers work through it; nothing else gets out.

use crate::require_sandboxes;
use crate::util::*;
use slipway_sandbox::{EgressConfig, ExecRequest, RegistryConfig};
use std::io::ErrorKind;
use std::sync::OnceLock;
use std::time::Duration;

/// The host's registry configuration, derived once (it starts npm and Python).
fn registries() -> &'static RegistryConfig {
    static CONFIG: OnceLock<RegistryConfig> = OnceLock::new();
    CONFIG.get_or_init(RegistryConfig::derive)
}

/// Sends raw proxy requests from inside the sandbox; prints each response's status line.
fn proxy_requests(requests: &[String]) -> String {
    let mut script = String::from(
        "python3 - <<'PYEOF'\nimport socket\ndef ask(req):\n    s = socket.create_connection(('127.0.0.1', 3128), timeout=10)\n    \
         s.sendall(req.encode())\n    data = b''\n    while b'\\r\\n' not in data:\n        chunk = s.recv(4096)\n        \
         if not chunk: break\n        data += chunk\n    print(data.split(b'\\r\\n')[0].decode())\n",
    );
    for req in requests {
        script.push_str(&format!("ask({req:?})\n"));
    }
    script.push_str("PYEOF");
    script
}

#[tokio::test]
async fn the_proxy_refuses_what_is_not_allow_listed_before_connecting() {
    require_sandboxes!();
    let fx = Fixture::new();
    let lower = fx.lower("egress", &[]);
    let mut spec = fx.spec(&lower);
    spec.egress = Some(EgressConfig::new(vec!["localhost".to_string()]));
    let sb = fx.driver.create(spec).await.unwrap();
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    host.set_nonblocking(true).unwrap();
    let port = host.local_addr().unwrap().port();
    let requests = [
        // An IP literal, a name outside the allowlist, a port other than 80/443, and an
        // allow-listed name that resolves to loopback.
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
        "CONNECT other.invalid:443 HTTP/1.1\r\nHost: other.invalid:443\r\n\r\n".to_string(),
        format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"),
        "CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n".to_string(),
        "GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(),
    ];
    let ran = run(&sb, &proxy_requests(&requests)).await.ok();
    assert_eq!(
        ran.stdout,
        "HTTP/1.1 403 Forbidden\n".repeat(requests.len()),
        "{ran:#?}"
    );
    assert_eq!(
        host.accept().unwrap_err().kind(),
        ErrorKind::WouldBlock,
        "no connection arrived"
    );
    // The refusal says why.
    let body = run(
        &sb,
        "curl --noproxy '' -sS -x http://127.0.0.1:3128 http://localhost/",
    )
    .await;
    assert!(body.stdout.contains("non-public address"), "{body:#?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn without_egress_there_is_no_proxy_and_no_way_out() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let ran = run(
        &sb,
        "curl -sS -m 5 -x http://127.0.0.1:3128 http://localhost/ 2>&1; echo rc=$?",
    )
    .await
    .ok();
    assert!(ran.stdout.contains("rc=7"), "connection refused: {ran:#?}");
    sb.destroy().await.unwrap();
}

#[test]
fn the_allowlist_comes_from_the_hosts_package_managers() {
    let cfg = registries();
    let derived = slipway_sandbox::derive_registry_allowlist();
    assert_eq!(&derived, &cfg.hosts);
    if which("npm") {
        let registry = cfg
            .npm_registry
            .as_deref()
            .expect("npm has a registry configured");
        assert!(
            derived.iter().any(|h| registry.contains(h.as_str())),
            "{cfg:?}"
        );
    }
    assert!(
        derived.iter().all(|h| !h.is_empty() && !h.contains('/')),
        "{derived:?}"
    );
}

fn which(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// npm and pip need the network; they only run when the derived allowlist is non-empty.
fn registry_egress() -> Option<EgressConfig> {
    let cfg = registries();
    if cfg.hosts.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must derive package registries (scripts/install-deps installs npm)"
        );
        eprintln!("SKIPPED (needs npm or pip configured on the host): no registries derived");
        return None;
    }
    Some(cfg.egress_config(&[]))
}

#[tokio::test]
async fn npm_install_works_through_the_proxy() {
    require_sandboxes!();
    let Some(egress) = registry_egress() else {
        return;
    };
    if !which("npm") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs npm (scripts/install-deps installs it)"
        );
        eprintln!("SKIPPED (needs npm): npm is not installed");
        return;
    }
    let fx = Fixture::new();
    let lower = fx.lower(
        "npm",
        &[(
            "package.json",
            r#"{"name":"t","version":"1.0.0","private":true}"#,
        )],
    );
    let mut spec = fx.spec(&lower);
    spec.egress = Some(egress);
    let sb = fx.driver.create(spec).await.unwrap();
    let req = ExecRequest::new(
        "npm install --no-audit --no-fund --loglevel=error is-number && \
         node -e \"console.log(require('is-number')(42))\"",
    )
    .timeout(Duration::from_secs(300));
    let ran = run_req(&sb, req).await.ok();
    assert!(ran.stdout.ends_with("true\n"), "{ran:#?}");
    assert!(sb
        .upper_layer_path()
        .join("node_modules/is-number/package.json")
        .exists());
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn pip_install_works_through_the_proxy() {
    require_sandboxes!();
    let Some(egress) = registry_egress() else {
        return;
    };
    let fx = Fixture::new();
    let lower = fx.lower("pip", &[("requirements.txt", "six\n")]);
    let mut spec = fx.spec(&lower);
    spec.egress = Some(egress);
    let sb = fx.driver.create(spec).await.unwrap();
    let req = ExecRequest::new(
        "python3 -m pip install --quiet --no-input --target deps -r requirements.txt && \
         PYTHONPATH=deps python3 -c 'import six; print(six.PY3)'",
    )
    .timeout(Duration::from_secs(300));
    let ran = run_req(&sb, req).await.ok();
    assert!(ran.stdout.ends_with("True\n"), "{ran:#?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn closing_egress_cuts_open_connections_and_removes_the_proxy() {
    require_sandboxes!();
    let fx = Fixture::new();
    let lower = fx.lower("egress-close", &[]);
    let mut spec = fx.spec(&lower);
    spec.egress = Some(EgressConfig::new(vec!["localhost".to_string()]));
    let sb = fx.driver.create(spec).await.unwrap();
    let before = run(&sb, "echo \"proxy=[$HTTP_PROXY]\"").await.ok();
    assert!(
        before.stdout.contains("proxy=[http://127.0.0.1:3128]"),
        "{before:#?}"
    );
    // A connection held open across the close: it must be cut, not left as a way out.
    let holder = "python3 -c \"import socket,sys\ns=socket.create_connection(('127.0.0.1',3128),timeout=60)\n\
                  print('connected',flush=True)\nprint('cut' if s.recv(1)==b'' else 'data',flush=True)\"";
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let mut holder = sb
        .spawn(
            ExecRequest::new(holder).timeout(Duration::from_secs(60)),
            Some(tx),
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.text, "connected");
    sb.close_egress();
    let next = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("cut within seconds")
        .unwrap();
    assert_eq!(next.text, "cut");
    assert!(holder.wait().await.unwrap().success());
    let after = run(&sb, "echo \"proxy=[$HTTP_PROXY]\"; curl -sS -m 5 -x http://127.0.0.1:3128 http://localhost/ 2>&1; echo rc=$?")
        .await
        .ok();
    assert!(after.stdout.contains("proxy=[]"), "{after:#?}");
    assert!(
        after.stdout.contains("rc=7"),
        "the proxy port refuses connections: {after:#?}"
    );
    sb.close_egress();
    sb.destroy().await.unwrap();
}
