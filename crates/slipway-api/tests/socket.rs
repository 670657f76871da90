//! The API over a real TCP socket with a real HTTP client.

use std::net::SocketAddr;

use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::util::{good_spec, TestApp};

struct Served {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(app: &TestApp) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let router = app.router.clone();
    let shutdown = stop.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .unwrap();
    });
    Served { addr, stop, task }
}

fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// (status, www-authenticate, body) of one request, run on a blocking thread.
async fn request(
    method: &'static str,
    url: String,
    token: Option<String>,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    tokio::task::spawn_blocking(move || {
        let agent = client();
        let req = ureq::http::Request::builder().method(method).uri(&url);
        let req = match &token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        };
        let mut resp = match body {
            Some(b) => agent.run(
                req.header("Content-Type", "application/json")
                    .body(b.to_string())
                    .unwrap(),
            ),
            None => agent.run(req.body(()).unwrap()),
        }
        .expect("request");
        let status = resp.status().as_u16();
        let www = resp
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        let body: Value = resp.body_mut().read_json().expect("JSON body");
        (status, www, body)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_round_trip_over_a_socket() {
    let app = TestApp::new();
    let served = serve(&app).await;
    let base = format!("http://{}", served.addr);

    let (status, _, body) = request("GET", format!("{base}/api/health"), None, None).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));

    let (status, www, body) = request("GET", format!("{base}/api/whoami"), None, None).await;
    assert_eq!(status, 401);
    assert_eq!(www.as_deref(), Some("Bearer"));
    assert_eq!(body["code"], "unauthorized");

    let (status, _, agent) = request(
        "POST",
        format!("{base}/api/agents"),
        Some(app.operator.clone()),
        Some(json!({"name": "bot"})),
    )
    .await;
    assert_eq!(status, 201);
    let (id, token) = (
        agent["id"].as_str().unwrap().to_string(),
        agent["token"].as_str().unwrap().to_string(),
    );
    let spec_url = format!("{base}/api/agents/{id}/deployments/spec");

    let (status, _, put) = request(
        "PUT",
        spec_url.clone(),
        Some(token.clone()),
        Some(good_spec()),
    )
    .await;
    assert_eq!(status, 200, "{put}");
    let (status, _, got) = request("GET", spec_url.clone(), Some(token.clone()), None).await;
    assert_eq!((status, &got), (200, &put));

    let mut bad = good_spec();
    bad["runtimePort"] = json!(22);
    let (status, _, err) = request("PUT", spec_url.clone(), Some(token.clone()), Some(bad)).await;
    assert_eq!(status, 422);
    assert_eq!(
        err["message"],
        "runtimePort must be between 1024 and 65535, got 22"
    );

    let (status, _, err) = request("DELETE", spec_url, Some(token), None).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    served.stop.cancel();
    served.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_over_a_socket_is_413_json() {
    let app = TestApp::new();
    let served = serve(&app).await;
    let url = format!("http://{}/api/agents", served.addr);
    let big = json!({ "name": "x".repeat(1024 * 1024 + 1024) });
    let (status, _, body) = request("POST", url, Some(app.operator.clone()), Some(big)).await;
    assert_eq!(status, 413);
    assert_eq!(body["code"], "payload_too_large");
    served.stop.cancel();
    served.task.await.unwrap();
}
