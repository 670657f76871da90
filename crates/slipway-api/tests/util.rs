//! Test helpers: a fresh in-memory store per test, an operator token, a controllable clock,
//! and one request helper that returns status, headers and the parsed JSON body.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use slipway_api::auth::mint_token;
use slipway_api::{app, ApiConfig, AppState};
use slipway_core::AgentRootTemplate;
use slipway_store::{SqliteStore, Store, TokenKind};
use tower::ServiceExt;

pub struct TestApp {
    pub state: AppState,
    pub router: Router,
    pub operator: String,
    pub clock: Arc<AtomicI64>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub bytes: Vec<u8>,
}

impl Reply {
    /// The body as JSON; panics with the raw body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.bytes)
            )
        })
    }

    /// Asserts an error reply and returns its message.
    #[track_caller]
    pub fn error(&self, status: StatusCode, code: &str) -> String {
        let body = self.json();
        assert_eq!(self.status, status, "body: {body}");
        assert_eq!(body["code"], code, "body: {body}");
        assert_eq!(self.headers["content-type"], "application/json");
        let obj = body.as_object().unwrap();
        assert_eq!(
            obj.len(),
            2,
            "error body has exactly code and message: {body}"
        );
        body["message"]
            .as_str()
            .expect("message is a string")
            .to_string()
    }
}

impl TestApp {
    pub fn new() -> Self {
        Self::with_config(|_| {})
    }

    pub fn with_config(f: impl FnOnce(&mut ApiConfig)) -> Self {
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open_in_memory().expect("in-memory store"));
        let token = mint_token(TokenKind::Operator, None, 1);
        store.insert_token(&token.record).unwrap();
        let mut config = ApiConfig::new(AgentRootTemplate::parse("/srv/agents/{agentId}").unwrap());
        f(&mut config);
        let clock = Arc::new(AtomicI64::new(1_000));
        let c = Arc::clone(&clock);
        let state =
            AppState::new(store, config).with_clock(Arc::new(move || c.load(Ordering::SeqCst)));
        Self {
            router: app(state.clone()),
            state,
            operator: token.secret,
            clock,
        }
    }

    pub fn set_time(&self, ms: i64) {
        self.clock.store(ms, Ordering::SeqCst);
    }

    pub async fn send(&self, req: Request<Body>) -> Reply {
        let resp = self
            .router
            .clone()
            .oneshot(req)
            .await
            .expect("router is infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        Reply {
            status,
            headers,
            bytes,
        }
    }

    /// A request with an optional bearer token and an optional JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        };
        self.send(req.unwrap()).await
    }

    /// A request with a raw body and content type.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        self.send(req.body(body.into()).unwrap()).await
    }

    /// Creates an agent as the operator; returns (id, token).
    pub async fn agent(&self, name: &str) -> (String, String) {
        let r = self
            .call(
                Method::POST,
                "/api/agents",
                Some(&self.operator),
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "{:?}",
            String::from_utf8_lossy(&r.bytes)
        );
        let b = r.json();
        (
            b["id"].as_str().unwrap().to_string(),
            b["token"].as_str().unwrap().to_string(),
        )
    }
}

/// A spec that passes every rule.
pub fn good_spec() -> Value {
    json!({
        "name": "my-app",
        "sourceDir": "/config/miniapps/my-app",
        "installCommand": "npm ci",
        "buildCommand": "npm run build",
        "startCommand": "node server.js",
        "runtimePort": 3000,
        "env": { "NODE_ENV": "production" },
        "targetDefault": "preview",
        "kind": "auto"
    })
}

pub fn spec_path(agent: &str) -> String {
    format!("/api/agents/{agent}/deployments/spec")
}
