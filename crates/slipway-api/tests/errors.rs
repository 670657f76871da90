//! Bad input of every kind gets a JSON error from the table, never a 500 or plain text.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::util::{good_spec, spec_path, TestApp};

#[tokio::test]
async fn malformed_json_is_400_naming_the_problem() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    let path = spec_path(&id);
    let r = app
        .raw(
            Method::PUT,
            &path,
            &token,
            Some("application/json"),
            "{\"name\": ",
        )
        .await;
    let msg = r.error(StatusCode::BAD_REQUEST, "invalid_json");
    assert!(msg.contains("EOF while parsing"), "{msg}");
    let r = app
        .raw(
            Method::PUT,
            &path,
            &token,
            Some("application/json"),
            "{\"name\": 'x'}",
        )
        .await;
    let msg = r.error(StatusCode::BAD_REQUEST, "invalid_json");
    assert!(msg.contains("line 1 column"), "{msg}");
    let r = app
        .raw(
            Method::PUT,
            &path,
            &token,
            Some("application/json"),
            "[1, 2]",
        )
        .await;
    assert_eq!(
        r.error(StatusCode::BAD_REQUEST, "invalid_json"),
        "the request body must be a JSON object"
    );
    let r = app
        .raw(
            Method::PUT,
            &path,
            &token,
            Some("application/json"),
            vec![0xff, 0xfe],
        )
        .await;
    r.error(StatusCode::BAD_REQUEST, "invalid_json");
    let r = app
        .raw(
            Method::POST,
            "/api/agents",
            &app.operator,
            Some("application/json"),
            "{\"name\": \"a\"} trailing",
        )
        .await;
    r.error(StatusCode::BAD_REQUEST, "invalid_json");
}

#[tokio::test]
async fn missing_or_wrong_content_type_is_415() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    let body = good_spec().to_string();
    let r = app
        .raw(Method::PUT, &spec_path(&id), &token, None, body.clone())
        .await;
    let msg = r.error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    assert!(msg.contains("Content-Type: application/json"), "{msg}");
    let r = app
        .raw(
            Method::PUT,
            &spec_path(&id),
            &token,
            Some("text/plain"),
            body.clone(),
        )
        .await;
    r.error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let r = app
        .raw(
            Method::POST,
            "/api/agents",
            &app.operator,
            None,
            r#"{"name":"a"}"#,
        )
        .await;
    r.error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    // Parameters and +json types are fine.
    let r = app
        .raw(
            Method::PUT,
            &spec_path(&id),
            &token,
            Some("application/json; charset=utf-8"),
            body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_bodies_are_413_json() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    let mut spec = good_spec();
    spec["env"] = json!({ "BIG": "x".repeat(1024 * 1024 + 10) });
    let r = app
        .raw(
            Method::PUT,
            &spec_path(&id),
            &token,
            Some("application/json"),
            spec.to_string(),
        )
        .await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    // Also when the size is not declared up front.
    let chunks = futures_chunks(spec.to_string().into_bytes());
    let r = app
        .raw(
            Method::PUT,
            &spec_path(&id),
            &token,
            Some("application/json"),
            chunks,
        )
        .await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
}

/// A streamed body without `Content-Length`.
fn futures_chunks(bytes: Vec<u8>) -> axum::body::Body {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    axum::body::Body::from_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn limits_come_from_config() {
    let app = TestApp::with_config(|c| c.json_body_limit = 100);
    let (id, token) = app.agent("bot").await;
    let r = app
        .call(
            Method::PUT,
            &spec_path(&id),
            Some(&token),
            Some(good_spec()),
        )
        .await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
}

#[tokio::test]
async fn unknown_routes_are_404_json() {
    let app = TestApp::new();
    for path in ["/", "/api", "/api/nope", "/api/agents/x/y/z", "/index.html"] {
        let r = app.call(Method::GET, path, Some(&app.operator), None).await;
        r.error(StatusCode::NOT_FOUND, "not_found");
    }
}

#[tokio::test]
async fn wrong_methods_are_405_json_with_allow() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    let r = app
        .call(Method::DELETE, &spec_path(&id), Some(&token), None)
        .await;
    r.error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let allow = r.headers["allow"].to_str().unwrap();
    assert!(allow.contains("GET") && allow.contains("PUT"), "{allow}");
    let r = app.call(Method::POST, "/api/health", None, None).await;
    r.error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}
