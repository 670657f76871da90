use std::collections::HashMap;
use std::sync::Arc;

use hyper::StatusCode;
use slipway_router::{Route, Unavailable, UnavailableKind};

use crate::util::{raw_request, raw_status, Client, Loopback, Req, TestRouter, TestUpstream};

#[tokio::test]
async fn routes_by_host_ignoring_case_port_and_trailing_dot() {
    let router = TestRouter::start_default().await;
    let a = TestUpstream::named("app a").await;
    let b = TestUpstream::named("app b").await;
    router.set("a.example.test", a.route());
    router.set("B.Example.Test", b.route());
    let client = Client::new(router.addr);

    for (host, want) in [
        ("a.example.test", "app a"),
        ("A.EXAMPLE.TEST", "app a"),
        ("a.example.test:8080", "app a"),
        ("a.example.test.", "app a"),
        ("b.example.test", "app b"),
        ("b.example.test:80", "app b"),
    ] {
        let reply = client.get(host, "/").await;
        assert_eq!(reply.status, StatusCode::OK, "{host}");
        assert_eq!(reply.text(), want, "{host}");
        assert_eq!(reply.error_code(), None, "{host}");
    }
}

#[tokio::test]
async fn unknown_host_gets_a_404_page_or_json() {
    let router = TestRouter::start_default().await;
    let client = Client::new(router.addr);

    let page = client.get("nothing.example.test", "/some/path").await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    assert_eq!(page.error_code(), Some("unknown_host"));
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(
        page.text().contains("No app at this address"),
        "{}",
        page.text()
    );

    let json = client
        .send(Req::get("nothing.example.test", "/").header("accept", "application/json"))
        .await;
    assert_eq!(json.status, StatusCode::NOT_FOUND);
    assert_eq!(json.header("content-type"), Some("application/json"));
    let value: serde_json::Value = serde_json::from_slice(&json.body).expect("json body");
    assert_eq!(value["code"], "unknown_host");
    assert!(value["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn unavailable_routes_answer_with_their_status_and_code() {
    let router = TestRouter::start_default().await;
    let client = Client::new(router.addr);
    let cases = [
        (
            "stopped.test",
            UnavailableKind::Stopped,
            StatusCode::GONE,
            "stopped",
        ),
        (
            "failed.test",
            UnavailableKind::Failed,
            StatusCode::SERVICE_UNAVAILABLE,
            "deploy_failed",
        ),
        (
            "starting.test",
            UnavailableKind::NotReady,
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
        ),
    ];
    for (host, kind, _, _) in cases {
        router.set(host, Route::Unavailable(Unavailable::new(kind)));
    }
    let mut bodies = Vec::new();
    for (host, _, status, code) in cases {
        let reply = client.get(host, "/").await;
        assert_eq!(reply.status, status, "{host}");
        assert_eq!(reply.error_code(), Some(code), "{host}");
        assert_eq!(reply.header("cache-control"), Some("no-store"), "{host}");
        assert_eq!(
            reply.header("retry-after").is_some(),
            code == "not_ready",
            "{host}"
        );
        let json = client
            .send(Req::get(host, "/").header("accept", "application/json"))
            .await;
        let value: serde_json::Value = serde_json::from_slice(&json.body).expect("json body");
        assert_eq!(value["code"], code);
        bodies.push(reply.text());
    }
    // Each state explains itself differently.
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), cases.len());
}

#[tokio::test]
async fn unavailable_page_shows_engine_text_escaped() {
    let router = TestRouter::start_default().await;
    let page = Unavailable::new(UnavailableKind::Failed)
        .with_title("Build failed")
        .with_detail("npm exited with <status 1> & more");
    router.set("failed.test", Route::Unavailable(page));
    let reply = Client::new(router.addr).get("failed.test", "/").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let text = reply.text();
    assert!(text.contains("Build failed"), "{text}");
    assert!(
        text.contains("npm exited with &lt;status 1&gt; &amp; more"),
        "{text}"
    );
}

#[tokio::test]
async fn malformed_or_missing_host_is_400() {
    let router = TestRouter::start_default().await;
    let upstream = TestUpstream::named("app").await;
    router.set("app.test", upstream.route());
    for request in [
        "GET / HTTP/1.1\r\nHost: bad host\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: app.test:port\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: app..test\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: app.test\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.0\r\n\r\n",
    ] {
        let response = raw_request(router.addr, request).await;
        assert_eq!(raw_status(&response), 400, "{request:?} -> {response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("x-slipway-error: bad_host"),
            "{response}"
        );
    }
    // The same connection setup with a valid host reaches the app.
    let ok = raw_request(
        router.addr,
        "GET / HTTP/1.1\r\nHost: APP.test:1234\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&ok), 200, "{ok}");
    assert_eq!(
        upstream.requests.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn table_updates_report_what_left() {
    let router = TestRouter::start_default().await;
    let a = TestUpstream::named("a").await;
    let upstream: Arc<dyn slipway_router::Upstream> = Arc::new(Loopback(a.addr));
    let table = &router.router;

    assert!(table
        .set("app.test", Route::Upstream(Arc::clone(&upstream)))
        .unwrap()
        .is_none());
    // Setting the very same upstream keeps the entry: nothing to drain.
    assert!(table
        .set("APP.test", Route::Upstream(Arc::clone(&upstream)))
        .unwrap()
        .is_none());
    let replaced = table
        .set(
            "app.test",
            Route::Unavailable(Unavailable::new(UnavailableKind::Stopped)),
        )
        .unwrap();
    assert_eq!(
        replaced.map(|d| d.host().to_owned()),
        Some("app.test".to_owned())
    );
    assert!(table
        .set("bad host", Route::Upstream(Arc::clone(&upstream)))
        .is_err());

    let mut all = HashMap::new();
    all.insert(
        "app.test".to_owned(),
        Route::Unavailable(Unavailable::new(UnavailableKind::Stopped)),
    );
    all.insert(
        "new.test".to_owned(),
        Route::Upstream(Arc::clone(&upstream)),
    );
    let drains = table.replace_all(all).unwrap();
    assert!(
        drains.is_empty(),
        "unchanged route must not be drained: {drains:?}"
    );
    assert_eq!(table.hosts(), ["app.test", "new.test"]);

    let drains = table.replace_all(HashMap::new()).unwrap();
    let mut hosts: Vec<&str> = drains.iter().map(|d| d.host()).collect();
    hosts.sort();
    assert_eq!(hosts, ["app.test", "new.test"]);
    assert!(table.get("new.test").is_none());
    assert!(table.remove("new.test").is_none());

    let reply = Client::new(router.addr).get("new.test", "/").await;
    assert_eq!(reply.error_code(), Some("unknown_host"));
}
