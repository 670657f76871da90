//! Authentication, operator-only routes and per-agent access.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::json;
use slipway_api::auth::mint_token;
use slipway_store::TokenKind;

use crate::util::{good_spec, spec_path, TestApp};

#[tokio::test]
async fn health_needs_no_token() {
    let app = TestApp::new();
    let r = app.call(Method::GET, "/api/health", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"status": "ok"}));
}

#[tokio::test]
async fn every_bad_credential_is_401_with_www_authenticate() {
    let app = TestApp::new();
    let unknown = mint_token(TokenKind::Operator, None, 1).secret;
    let truncated = &app.operator[..app.operator.len() - 4];
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        ("unknown token", Some(format!("Bearer {unknown}"))),
        ("truncated token", Some(format!("Bearer {truncated}"))),
        ("garbage token", Some("Bearer hello".into())),
        ("empty token", Some("Bearer ".into())),
        ("wrong scheme", Some(format!("Basic {}", app.operator))),
        ("no scheme", Some(app.operator.clone())),
    ];
    for (what, header) in cases {
        let mut req = Request::builder().uri("/api/whoami");
        if let Some(h) = header {
            req = req.header("authorization", h);
        }
        let r = app.send(req.body(Body::empty()).unwrap()).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
        r.error(StatusCode::UNAUTHORIZED, "unauthorized");
        assert_eq!(r.headers["www-authenticate"], "Bearer", "{what}");
    }
    // The right token, for contrast, and the lower-case scheme is accepted.
    let r = app
        .send(
            Request::builder()
                .uri("/api/whoami")
                .header("authorization", format!("bearer {}", app.operator))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn revoked_tokens_are_refused() {
    let app = TestApp::new();
    assert_eq!(
        app.call(Method::GET, "/api/whoami", Some(&app.operator), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(app.state.store.revoke_operator_tokens(5).unwrap(), 1);
    let r = app
        .call(Method::GET, "/api/whoami", Some(&app.operator), None)
        .await;
    let msg = r.error(StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(msg.contains("revoked"), "{msg}");
}

#[tokio::test]
async fn whoami_tells_operator_from_agent() {
    let app = TestApp::new();
    let r = app
        .call(Method::GET, "/api/whoami", Some(&app.operator), None)
        .await;
    let b = r.json();
    assert_eq!(b["kind"], "operator");
    assert!(b["agentId"].is_null());
    assert!(b["tokenId"].as_str().unwrap().starts_with("tok-"));
    let (id, token) = app.agent("bot").await;
    let b = app
        .call(Method::GET, "/api/whoami", Some(&token), None)
        .await
        .json();
    assert_eq!(b["kind"], "agent");
    assert_eq!(b["agentId"], id.as_str());
}

#[tokio::test]
async fn operator_creates_and_lists_agents() {
    let app = TestApp::new();
    app.set_time(42);
    let r = app
        .call(
            Method::POST,
            "/api/agents",
            Some(&app.operator),
            Some(json!({"name": "  builder bot "})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let b = r.json();
    assert_eq!(b["name"], "builder bot");
    assert_eq!(b["createdAt"], 42);
    assert!(b["id"].as_str().unwrap().starts_with("agt-"));
    assert!(b["token"].as_str().unwrap().starts_with("slw_ag_"));
    let (second, _) = app.agent("second").await;
    let list = app
        .call(Method::GET, "/api/agents", Some(&app.operator), None)
        .await
        .json();
    let ids: Vec<&str> = list["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![b["id"].as_str().unwrap(), second.as_str()]);
    // No secret or hash ever appears in a listing.
    assert!(!list.to_string().contains("slw_"));
    assert!(!list.to_string().to_lowercase().contains("hash"));
}

#[tokio::test]
async fn agent_tokens_cannot_use_operator_routes() {
    let app = TestApp::new();
    let (_, token) = app.agent("bot").await;
    let r = app
        .call(
            Method::POST,
            "/api/agents",
            Some(&token),
            Some(json!({"name": "x"})),
        )
        .await;
    r.error(StatusCode::FORBIDDEN, "forbidden");
    let r = app
        .call(Method::GET, "/api/agents", Some(&token), None)
        .await;
    r.error(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn agent_names_are_validated() {
    let app = TestApp::new();
    let op = Some(app.operator.as_str());
    let msg = app
        .call(
            Method::POST,
            "/api/agents",
            op,
            Some(json!({"name": "   "})),
        )
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert_eq!(msg, "agent name must not be blank");
    let msg = app
        .call(
            Method::POST,
            "/api/agents",
            op,
            Some(json!({"name": "x".repeat(65)})),
        )
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert!(msg.contains("longer than 64"), "{msg}");
    let msg = app
        .call(Method::POST, "/api/agents", op, Some(json!({})))
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert!(msg.contains("missing field `name`"), "{msg}");
    let msg = app
        .call(Method::POST, "/api/agents", op, Some(json!({"name": 5})))
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert!(msg.starts_with("name: invalid type: integer `5`"), "{msg}");
    let msg = app
        .call(
            Method::POST,
            "/api/agents",
            op,
            Some(json!({"name": "a", "admin": true})),
        )
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert!(msg.contains("unknown field `admin`"), "{msg}");
}

#[tokio::test]
async fn agents_see_themselves_operators_see_all() {
    let app = TestApp::new();
    let (a, a_token) = app.agent("a").await;
    let r = app
        .call(
            Method::GET,
            &format!("/api/agents/{a}"),
            Some(&a_token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["name"], "a");
    let r = app
        .call(
            Method::GET,
            &format!("/api/agents/{a}"),
            Some(&app.operator),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["id"], a.as_str());
}

/// Another agent's id, an id that does not exist and an id that cannot exist all get the
/// same bytes, on every agent route.
#[tokio::test]
async fn other_agents_are_indistinguishable_from_missing_ones() {
    let app = TestApp::new();
    let (a, a_token) = app.agent("a").await;
    let (b, _) = app.agent("b").await;
    let put = app
        .call(
            Method::PUT,
            &spec_path(&b),
            Some(&app.operator),
            Some(good_spec()),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK);
    let missing = "agt-aaaaaaaaaaaaaaaa";
    let malformed = "..%2F..%2Fetc";
    for suffix in ["", "/deployments/spec"] {
        let mut bodies = Vec::new();
        for target in [b.as_str(), missing, malformed] {
            let path = format!("/api/agents/{target}{suffix}");
            let r = app.call(Method::GET, &path, Some(&a_token), None).await;
            r.error(StatusCode::NOT_FOUND, "agent_not_found");
            bodies.push(r.bytes.clone());
            let r = app
                .call(
                    Method::PUT,
                    &format!("/api/agents/{target}/deployments/spec"),
                    Some(&a_token),
                    Some(good_spec()),
                )
                .await;
            r.error(StatusCode::NOT_FOUND, "agent_not_found");
            bodies.push(r.bytes);
        }
        assert!(
            bodies.windows(2).all(|w| w[0] == w[1]),
            "bodies differ: {bodies:?}"
        );
    }
    // The operator gets the same 404 for a missing agent, and a's own routes work.
    app.call(
        Method::GET,
        &format!("/api/agents/{missing}"),
        Some(&app.operator),
        None,
    )
    .await
    .error(StatusCode::NOT_FOUND, "agent_not_found");
    app.call(Method::GET, &spec_path(&a), Some(&a_token), None)
        .await
        .error(StatusCode::NOT_FOUND, "spec_not_found");
    // b's spec was not touched by a's attempts.
    let spec = app
        .call(Method::GET, &spec_path(&b), Some(&app.operator), None)
        .await
        .json();
    assert_eq!(spec["name"], "my-app");
}

#[tokio::test]
async fn authentication_comes_before_existence() {
    let app = TestApp::new();
    let r = app
        .call(
            Method::GET,
            "/api/agents/agt-aaaaaaaaaaaaaaaa/deployments/spec",
            None,
            None,
        )
        .await;
    r.error(StatusCode::UNAUTHORIZED, "unauthorized");
}
