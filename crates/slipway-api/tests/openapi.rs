//! The OpenAPI document lists every route with its method, and the bearer scheme.

use std::collections::BTreeSet;

use axum::http::{Method, StatusCode};

use crate::util::TestApp;

/// Every route the API serves. A new route must be added here *and* appear in the document.
const ROUTES: [(&str, &str); 31] = [
    ("get", "/api/health"),
    ("get", "/api/whoami"),
    ("get", "/api/openapi.json"),
    ("post", "/api/agents"),
    ("get", "/api/agents"),
    ("get", "/api/agents/{id}"),
    ("get", "/api/agents/{id}/deployments/spec"),
    ("put", "/api/agents/{id}/deployments/spec"),
    ("get", "/api/agents/{id}/deployments"),
    ("post", "/api/agents/{id}/deployments/start"),
    ("get", "/api/agents/{id}/deployments/{runId}"),
    ("post", "/api/agents/{id}/deployments/{runId}/stop"),
    ("get", "/api/agents/{id}/deployments/{runId}/logs"),
    ("get", "/api/agents/{id}/deployments/{runId}/logs/stream"),
    ("get", "/api/events"),
    ("get", "/api/agents/{id}/deployments/snapshots"),
    (
        "get",
        "/api/agents/{id}/deployments/snapshots/{contentHash}",
    ),
    (
        "head",
        "/api/agents/{id}/deployments/snapshots/{contentHash}",
    ),
    (
        "put",
        "/api/agents/{id}/deployments/snapshots/{contentHash}",
    ),
    ("get", "/api/agents/{id}/deployments/versions"),
    (
        "post",
        "/api/agents/{id}/deployments/versions/{versionNumber}/rollback",
    ),
    ("post", "/api/agents/{id}/deployments/{runId}/promote"),
    ("get", "/api/agents/{id}/deployments/routes/history"),
    ("post", "/api/agents/{id}/gates"),
    ("get", "/api/gates"),
    ("get", "/api/gates/{gateId}"),
    ("post", "/api/gates/{gateId}/approve"),
    ("post", "/api/gates/{gateId}/deny"),
    ("get", "/api/audit"),
    ("get", "/api/audit/verify"),
    ("get", "/api/keys"),
];

#[tokio::test]
async fn openapi_lists_every_route() {
    let app = TestApp::new();
    let r = app.call(Method::GET, "/api/openapi.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut listed = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "head", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                listed.insert((method.clone(), path.clone()));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // Authenticated routes declare the scheme; health does not.
    assert!(doc["paths"]["/api/agents"]["post"]["security"].is_array());
    assert!(doc["paths"]["/api/health"]["get"]["security"].is_null());
    for name in ["SpecDto", "SpecInput", "ErrorBody", "CreatedAgentDto"] {
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "schema {name} missing"
        );
    }
}

/// Every documented route is really served: none answers `not_found` (the fallback).
#[tokio::test]
async fn every_documented_route_is_served() {
    let app = TestApp::new();
    let (id, _) = app.agent("bot").await;
    for (method, path) in ROUTES {
        let path = path.replace("{id}", &id);
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = app
            .call(method.clone(), &path, Some(&app.operator), None)
            .await;
        assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        // A HEAD answer has no body to tell the fallback apart; the upload tests cover it.
        if r.status == StatusCode::NOT_FOUND && method != Method::HEAD {
            assert_ne!(r.json()["code"], "not_found", "{method} {path}");
        }
    }
}
