//! The deploy permission gate over the real API (issue 7): the whole flow, and every misuse —
//! reuse, expiry (injected time), wrong action, wrong snapshot, wrong target, another agent,
//! forged and truncated tokens, an agent approving its own gate, approving a denied or expired
//! gate, two concurrent consumers. Runs go through a real engine whose sandboxes are disabled,
//! so every started run fails at provisioning: that is also the failed deploy that must
//! invalidate its token.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use slipway_api::auth::mint_token;
use slipway_api::{app, ApiConfig, AppState};
use slipway_core::AgentRootTemplate;
use slipway_store::{SqliteStore, Store, TokenKind};

use crate::util::{good_spec, spec_path, Reply, TestApp};

/// A server with a real store (a file, so tests can tamper with it), artifact store, engine
/// (without sandboxes) and signing key.
pub struct TrustApp {
    pub app: TestApp,
    pub dir: tempfile::TempDir,
    pub db: std::path::PathBuf,
}

pub fn trust_app() -> TrustApp {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("slipway.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
    let token = mint_token(TokenKind::Operator, None, 1);
    store.insert_token(&token.record).unwrap();
    let template = format!("{}/agents/{{agentId}}", dir.path().display());
    let config = ApiConfig::new(AgentRootTemplate::parse(&template).unwrap());
    let clock = Arc::new(AtomicI64::new(1_700_000_000_000));
    let c = Arc::clone(&clock);
    let clock_fn: slipway_api::Clock = Arc::new(move || c.load(Ordering::SeqCst));
    let artifacts =
        Arc::new(slipway_artifacts::LocalArtifactStore::new(dir.path().join("artifacts")).unwrap());
    let router = Arc::new(slipway_router::Router::new(
        slipway_router::RouterConfig::default(),
    ));
    let engine_config = slipway_engine::EngineConfig::new(
        dir.path().join("cache"),
        AgentRootTemplate::parse(&template).unwrap(),
    );
    let engine = slipway_engine::Engine::new(
        Arc::clone(&store),
        Arc::clone(&artifacts),
        Err("sandboxes are switched off in this test".into()),
        router,
        engine_config,
        slipway_engine::EventBus::default(),
        clock_fn.clone(),
    );
    let signer = Arc::new(slipway_trust::Signer::from_seed(rand::random()));
    engine.set_signer(Arc::clone(&signer));
    let state = AppState::new(store, config)
        .with_clock(clock_fn)
        .with_engine(engine, artifacts)
        .with_trust(slipway_trust::TrustPolicy::default(), Some(signer));
    TrustApp {
        app: TestApp {
            router: app(state.clone()),
            state,
            operator: token.secret,
            clock,
        },
        dir,
        db,
    }
}

impl TrustApp {
    pub fn now(&self) -> i64 {
        self.app.clock.load(Ordering::SeqCst)
    }

    pub fn advance(&self, ms: i64) {
        self.app.clock.fetch_add(ms, Ordering::SeqCst);
    }

    /// An agent with a spec; returns (id, token).
    pub async fn agent(&self, name: &str) -> (String, String) {
        let (id, token) = self.app.agent(name).await;
        let r = self
            .app
            .call(
                Method::PUT,
                &spec_path(&id),
                Some(&token),
                Some(good_spec()),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.bytes)
        );
        (id, token)
    }

    /// Captures `files` and uploads the snapshot for the agent; returns its content hash.
    pub async fn snapshot(&self, agent: &str, token: &str, files: &[(&str, &str)]) -> String {
        let src = tempfile::tempdir().unwrap();
        for (name, body) in files {
            std::fs::write(src.path().join(name), body).unwrap();
        }
        let out = src.path().join("snap.tar.zst");
        let captured = slipway_artifacts::capture_to_file(
            &src.path().join("."),
            &out,
            &slipway_artifacts::CaptureOptions::default(),
        );
        let captured = match captured {
            Ok(c) => c,
            Err(e) => panic!("capture: {e}"),
        };
        let bytes = std::fs::read(&captured.artifact_path).unwrap();
        let path = format!(
            "/api/agents/{agent}/deployments/snapshots/{}",
            captured.content_hash
        );
        let r = self
            .app
            .raw(Method::PUT, &path, token, Some("application/zstd"), bytes)
            .await;
        assert!(
            r.status == StatusCode::CREATED || r.status == StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.bytes)
        );
        captured.content_hash
    }

    /// `POST …/deployments/start` with an optional gate token.
    pub async fn start(
        &self,
        agent: &str,
        token: &str,
        body: Value,
        gate_token: Option<&str>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("/api/agents/{agent}/deployments/start"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json");
        if let Some(t) = gate_token {
            req = req.header("x-slipway-gate-token", t);
        }
        self.app
            .send(req.body(Body::from(body.to_string())).unwrap())
            .await
    }

    pub async fn gate(&self, id: &str, token: &str) -> Value {
        let r = self
            .app
            .call(Method::GET, &format!("/api/gates/{id}"), Some(token), None)
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.bytes)
        );
        r.json()
    }

    pub async fn approve(&self, id: &str) -> Reply {
        self.app
            .call(
                Method::POST,
                &format!("/api/gates/{id}/approve"),
                Some(&self.app.operator),
                None,
            )
            .await
    }

    /// Requests a gate with `body`, approves it as the operator and reads the token as the
    /// requester; returns (gate id, token).
    pub async fn approved_token(&self, agent: &str, token: &str, body: Value) -> (String, String) {
        let r = self
            .app
            .call(
                Method::POST,
                &format!("/api/agents/{agent}/gates"),
                Some(token),
                Some(body),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&r.bytes)
        );
        let id = r.json()["id"].as_str().unwrap().to_string();
        let a = self.approve(&id).await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&a.bytes)
        );
        let g = self.gate(&id, token).await;
        let t = g["token"]
            .as_str()
            .expect("the requester's first read carries the token")
            .to_string();
        (id, t)
    }

    /// Audit entries (operator view), newest first.
    pub async fn audit(&self, query: &str) -> Vec<Value> {
        let r = self
            .app
            .call(
                Method::GET,
                &format!("/api/audit?{query}"),
                Some(&self.app.operator),
                None,
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.bytes)
        );
        r.json()["entries"].as_array().unwrap().clone()
    }

    /// Polls until the gate reaches `state`.
    pub async fn wait_gate_state(&self, id: &str, token: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let g = self.gate(id, token).await;
            if g["state"] == state {
                return g;
            }
            assert!(Instant::now() < deadline, "gate never became {state}: {g}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until the run has settled (ready, failed, stopped).
    pub async fn wait_run(&self, agent: &str, token: &str, run: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self
                .app
                .call(
                    Method::GET,
                    &format!("/api/agents/{agent}/deployments/{run}"),
                    Some(token),
                    None,
                )
                .await;
            let v = r.json();
            if ["ready", "failed", "stopped"].contains(&v["status"].as_str().unwrap_or("")) {
                return v;
            }
            assert!(Instant::now() < deadline, "run never settled: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn artifact(&self, agent: &str, hash: &str) -> std::path::PathBuf {
        self.dir
            .path()
            .join("artifacts")
            .join(agent)
            .join(format!("{hash}.tar.zst"))
    }
}

fn prod(hash: &str) -> Value {
    json!({ "target": "production", "snapshot": hash })
}

/// A 403 with `code`; returns the body.
#[track_caller]
fn refused(r: &Reply, code: &str) -> Value {
    let body = r.json();
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], code, "{body}");
    body
}

#[tokio::test]
async fn the_whole_gate_flow_and_a_failed_deploy_invalidates_its_token() {
    let t = trust_app();
    let (agent, token) = t.agent("gated").await;
    let (other, other_token) = t.agent("other").await;
    let hash = t.snapshot(&agent, &token, &[("index.html", "v1")]).await;

    // Preview deploys are not gated by default.
    let r = t
        .start(
            &agent,
            &token,
            json!({ "target": "preview", "snapshot": hash }),
            None,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
    t.wait_run(&agent, &token, r.json()["id"].as_str().unwrap())
        .await;

    // Production without a token: 403 gate_required naming a pending gate for exactly this.
    let body = refused(
        &t.start(&agent, &token, prod(&hash), None).await,
        "gate_required",
    );
    let gate_id = body["gateId"].as_str().expect("gateId").to_string();
    assert!(gate_id.starts_with("gte-"));
    let again = refused(
        &t.start(&agent, &token, prod(&hash), None).await,
        "gate_required",
    );
    assert_eq!(
        again["gateId"],
        gate_id.as_str(),
        "the same pending gate is reused"
    );

    // The popup's contents.
    let g = t.gate(&gate_id, &token).await;
    assert_eq!(g["state"], "pending");
    assert_eq!(g["agentId"], agent.as_str());
    assert_eq!(g["action"], "production_deploy");
    assert_eq!(g["subject"], format!("snapshot:{hash}"));
    assert_eq!(g["target"], "my-app.localhost");
    assert_eq!(g["buildCommand"], "npm ci && npm run build");
    assert_eq!(g["framework"], "Node.js");
    assert!(g["warning"].as_str().unwrap().contains("High-risk"), "{g}");
    assert_eq!(g["requestedByKind"], "agent");
    assert!(g.get("token").is_none());

    // Operators see every gate, pending first; an agent sees only its own; others get 404.
    let list = t
        .app
        .call(Method::GET, "/api/gates", Some(&t.app.operator), None)
        .await
        .json();
    assert_eq!(list["gates"][0]["id"], gate_id.as_str());
    let mine = t
        .app
        .call(Method::GET, "/api/gates", Some(&other_token), None)
        .await
        .json();
    assert!(mine["gates"]
        .as_array()
        .unwrap()
        .iter()
        .all(|g| g["agentId"] == other.as_str()));
    let r = t
        .app
        .call(
            Method::GET,
            &format!("/api/gates/{gate_id}"),
            Some(&other_token),
            None,
        )
        .await;
    r.error(StatusCode::NOT_FOUND, "gate_not_found");

    // An agent can never approve (or deny) its own gate.
    let r = t
        .app
        .call(
            Method::POST,
            &format!("/api/gates/{gate_id}/approve"),
            Some(&token),
            None,
        )
        .await;
    let msg = r.error(StatusCode::FORBIDDEN, "forbidden");
    assert!(msg.contains("only an operator"), "{msg}");
    let r = t
        .app
        .call(
            Method::POST,
            &format!("/api/gates/{gate_id}/deny"),
            Some(&token),
            None,
        )
        .await;
    r.error(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(t.gate(&gate_id, &token).await["state"], "pending");

    // Long-poll: a waiter returns as soon as the operator decides.
    let waiter = {
        let router = t.app.router.clone();
        let (id, tok) = (gate_id.clone(), token.clone());
        tokio::spawn(async move {
            use tower::ServiceExt;
            let req = Request::get(format!("/api/gates/{id}?wait=30"))
                .header("authorization", format!("Bearer {tok}"))
                .body(Body::empty())
                .unwrap();
            let resp = router.oneshot(req).await.unwrap();
            let bytes = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            serde_json::from_slice::<Value>(&bytes).unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let approved = t.approve(&gate_id).await;
    assert_eq!(approved.status, StatusCode::OK);
    assert_eq!(approved.json()["state"], "approved");
    assert!(
        approved.json().get("token").is_none(),
        "the approver never sees the token"
    );
    let waited = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("long-poll returned")
        .unwrap();
    assert_eq!(waited["state"], "approved");
    // The waiting requester got the token, once; nobody else ever does.
    let secret = waited["token"]
        .as_str()
        .expect("token in the requester's first read")
        .to_string();
    assert!(secret.starts_with("slw_gate_"));
    assert!(t.gate(&gate_id, &token).await.get("token").is_none());
    assert!(t
        .gate(&gate_id, &t.app.operator)
        .await
        .get("token")
        .is_none());
    assert_eq!(t.gate(&gate_id, &token).await["tokenIssued"], true);

    // Forged and truncated tokens.
    let forged = format!("slw_gate_{}", "ab".repeat(32));
    refused(
        &t.start(&agent, &token, prod(&hash), Some(&forged)).await,
        "gate_token_invalid",
    );
    refused(
        &t.start(
            &agent,
            &token,
            prod(&hash),
            Some(&secret[..secret.len() - 2]),
        )
        .await,
        "gate_token_invalid",
    );
    refused(
        &t.start(&agent, &token, prod(&hash), Some("")).await,
        "gate_token_invalid",
    );

    // The action consumes the token.
    let r = t.start(&agent, &token, prod(&hash), Some(&secret)).await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
    let run = r.json();
    assert_eq!(run["target"], "production");
    let run_id = run["id"].as_str().unwrap().to_string();
    let g = t.gate(&gate_id, &token).await;
    assert!(
        ["consumed", "invalidated"].contains(&g["state"].as_str().unwrap()),
        "{g}"
    );
    assert_eq!(g["usedFor"], run_id.as_str());

    // Reuse is refused.
    refused(
        &t.start(&agent, &token, prod(&hash), Some(&secret)).await,
        "gate_token_used",
    );

    // The run fails (no sandboxes here): its token is invalidated, a new approval is needed.
    let settled = t.wait_run(&agent, &token, &run_id).await;
    assert_eq!(settled["status"], "failed");
    let g = t.wait_gate_state(&gate_id, &token, "invalidated").await;
    assert!(
        g["reason"].as_str().unwrap().contains("the deploy failed"),
        "{g}"
    );
    refused(
        &t.start(&agent, &token, prod(&hash), Some(&secret)).await,
        "gate_token_used",
    );
    let next = refused(
        &t.start(&agent, &token, prod(&hash), None).await,
        "gate_required",
    );
    assert_ne!(
        next["gateId"],
        gate_id.as_str(),
        "a new gate, not the used one"
    );

    // Every step is in the audit log.
    let entries = t.audit(&format!("agent={agent}")).await;
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .rev()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    for want in [
        ("gate.request", "pending"),
        ("gate.approve", "refused"),
        ("gate.deny", "refused"),
        ("gate.approve", "approved"),
        ("gate.token.create", "ok"),
        ("production_deploy.refused", "refused"),
        ("deploy.start", "ok"),
        ("deploy.failed", "failed"),
        ("gate.invalidate", "ok"),
    ] {
        assert!(actions.contains(&want), "missing {want:?} in {actions:?}");
    }
    let start = entries
        .iter()
        .find(|e| e["action"] == "deploy.start" && e["gateId"] == gate_id.as_str())
        .unwrap();
    assert_eq!(start["runId"], run_id.as_str());
    assert_eq!(start["snapshotHash"], hash.as_str());
    assert_eq!(start["target"], "my-app.localhost");
    assert_eq!(start["actorKind"], "agent");
    assert!(start["actorId"].as_str().unwrap().starts_with("tok-"));
}

#[tokio::test]
async fn tokens_for_another_action_snapshot_target_or_agent_are_refused() {
    let t = trust_app();
    let (agent, token) = t.agent("alpha").await;
    let (other, other_token) = t.agent("beta").await;
    let h1 = t.snapshot(&agent, &token, &[("index.html", "one")]).await;
    let h2 = t.snapshot(&agent, &token, &[("index.html", "two")]).await;
    let same_content_other_agent = t
        .snapshot(&other, &other_token, &[("index.html", "one")])
        .await;
    assert_eq!(same_content_other_agent, h1);

    let cases = [
        (
            "action",
            json!({ "action": "promote", "subject": format!("snapshot:{h1}") }),
        ),
        (
            "subject",
            json!({ "action": "production_deploy", "subject": format!("snapshot:{h2}") }),
        ),
        (
            "target",
            json!({ "action": "production_deploy", "subject": format!("snapshot:{h1}"), "target": "evil.example.com" }),
        ),
    ];
    for (field, body) in cases {
        let (_, secret) = t.approved_token(&agent, &token, body).await;
        let b = refused(
            &t.start(&agent, &token, prod(&h1), Some(&secret)).await,
            "gate_token_mismatch",
        );
        assert!(
            b["message"].as_str().unwrap().contains(field),
            "{field}: {b}"
        );
    }
    // Another agent's token, for the very same content.
    let (_, secret) = t
        .approved_token(
            &other,
            &other_token,
            json!({ "action": "production_deploy", "subject": format!("snapshot:{h1}") }),
        )
        .await;
    let b = refused(
        &t.start(&agent, &token, prod(&h1), Some(&secret)).await,
        "gate_token_mismatch",
    );
    assert!(b["message"].as_str().unwrap().contains("agent"), "{b}");
    // …and it is still good for its own agent: a mismatch does not burn it.
    let r = t
        .start(&other, &other_token, prod(&h1), Some(&secret))
        .await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
    // An agent cannot even ask for another agent's gate.
    let r = t
        .app
        .call(
            Method::POST,
            &format!("/api/agents/{other}/gates"),
            Some(&token),
            Some(json!({ "action": "rollback" })),
        )
        .await;
    r.error(StatusCode::NOT_FOUND, "agent_not_found");
    let refusals = t.audit("action=production_deploy.refused").await;
    assert_eq!(refusals.len(), 4, "{refusals:?}");
    assert!(refusals.iter().all(|e| e["reason"]
        .as_str()
        .unwrap()
        .starts_with("gate_token_mismatch")));
}

#[tokio::test]
async fn tokens_expire_and_only_pending_gates_can_be_decided() {
    let t = trust_app();
    let (agent, token) = t.agent("clock").await;
    let h = t.snapshot(&agent, &token, &[("index.html", "x")]).await;
    let subject = json!({ "action": "production_deploy", "subject": format!("snapshot:{h}") });

    // An approved token expires after the default 5 minutes.
    let (gate, secret) = t.approved_token(&agent, &token, subject.clone()).await;
    t.advance(5 * 60 * 1000 + 1);
    refused(
        &t.start(&agent, &token, prod(&h), Some(&secret)).await,
        "gate_token_expired",
    );
    assert_eq!(t.gate(&gate, &token).await["state"], "expired");
    let r = t.approve(&gate).await;
    let msg = r.error(StatusCode::CONFLICT, "gate_not_pending");
    assert!(msg.contains("expired"), "{msg}");

    // A denied gate cannot be approved afterwards; the reason is kept.
    let r = t
        .app
        .call(
            Method::POST,
            &format!("/api/agents/{agent}/gates"),
            Some(&token),
            Some(subject.clone()),
        )
        .await;
    let denied = r.json()["id"].as_str().unwrap().to_string();
    let r = t
        .app
        .call(
            Method::POST,
            &format!("/api/gates/{denied}/deny"),
            Some(&t.app.operator),
            Some(json!({ "reason": "not today" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["state"], "denied");
    assert_eq!(r.json()["reason"], "not today");
    t.approve(&denied)
        .await
        .error(StatusCode::CONFLICT, "gate_not_pending");
    let g = t.gate(&denied, &token).await;
    assert_eq!(g["state"], "denied");
    assert!(g.get("token").is_none());
    let deny_entry = &t.audit("action=gate.deny").await[0];
    assert!(deny_entry["reason"].as_str().unwrap().contains("not today"));

    // A pending request lapses (after an hour): it can no longer be approved.
    let r = t
        .app
        .call(
            Method::POST,
            &format!("/api/agents/{agent}/gates"),
            Some(&token),
            Some(subject),
        )
        .await;
    let lapsed = r.json()["id"].as_str().unwrap().to_string();
    t.advance(60 * 60 * 1000);
    t.approve(&lapsed)
        .await
        .error(StatusCode::CONFLICT, "gate_not_pending");
    assert_eq!(t.gate(&lapsed, &token).await["state"], "expired");

    // Malformed requests and unknown gates.
    let r = t
        .app
        .call(
            Method::POST,
            &format!("/api/agents/{agent}/gates"),
            Some(&token),
            Some(json!({ "action": "launch" })),
        )
        .await;
    r.error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    let r = t
        .app
        .call(
            Method::POST,
            &format!("/api/agents/{agent}/gates"),
            Some(&token),
            Some(json!({ "action": "rollback", "subject": "x" })),
        )
        .await;
    r.error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    t.approve("gte-aaaaaaaaaaaaaaaa")
        .await
        .error(StatusCode::NOT_FOUND, "gate_not_found");
    t.approve("nonsense")
        .await
        .error(StatusCode::NOT_FOUND, "gate_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_concurrent_consumers_of_one_token_exactly_one_wins() {
    let t = Arc::new(trust_app());
    for round in 0..5 {
        let (agent, token) = t.agent(&format!("racer{round}")).await;
        let h = t.snapshot(&agent, &token, &[("index.html", "race")]).await;
        let (_, secret) = t
            .approved_token(
                &agent,
                &token,
                json!({ "action": "production_deploy", "subject": format!("snapshot:{h}") }),
            )
            .await;
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let (t, agent, token, secret, h) = (
                Arc::clone(&t),
                agent.clone(),
                token.clone(),
                secret.clone(),
                h.clone(),
            );
            tasks.push(tokio::spawn(async move {
                t.start(&agent, &token, prod(&h), Some(&secret)).await
            }));
        }
        let mut replies = Vec::new();
        for task in tasks {
            replies.push(task.await.unwrap());
        }
        let won: Vec<&Reply> = replies
            .iter()
            .filter(|r| r.status == StatusCode::ACCEPTED)
            .collect();
        let lost: Vec<&Reply> = replies
            .iter()
            .filter(|r| r.status != StatusCode::ACCEPTED)
            .collect();
        assert_eq!(won.len(), 1, "exactly one consumer wins");
        refused(lost[0], "gate_token_used");
    }
}

#[tokio::test]
async fn a_tampered_snapshot_is_refused_at_rollout_with_an_audit_entry() {
    let t = trust_app();
    let (agent, token) = t.agent("tamper").await;
    let h = t
        .snapshot(&agent, &token, &[("index.html", "<h1>v1</h1>")])
        .await;
    let artifact = t.artifact(&agent, &h);
    assert!(
        slipway_trust::signing::signature_path(&artifact).is_file(),
        "uploads are signed"
    );

    // One flipped byte.
    flip_byte(&artifact);
    let r = t
        .start(
            &agent,
            &token,
            json!({ "target": "preview", "snapshot": h }),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let run = t
        .wait_run(&agent, &token, r.json()["id"].as_str().unwrap())
        .await;
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("rollout refused") && error.contains("its bytes changed"),
        "{error}"
    );
    let refused = &t.audit("action=rollout.refused").await[0];
    assert_eq!(refused["snapshotHash"], h.as_str());
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("bytes changed"),
        "{refused}"
    );
    flip_byte(&artifact);

    // A replaced signature (well-formed, wrong bytes).
    let mut sig = slipway_trust::signing::read_signature(&artifact).unwrap();
    sig.signature = "00".repeat(64);
    slipway_trust::signing::write_signature(&artifact, &sig).unwrap();
    let r = t
        .start(
            &agent,
            &token,
            json!({ "target": "preview", "snapshot": h }),
            None,
        )
        .await;
    let run = t
        .wait_run(&agent, &token, r.json()["id"].as_str().unwrap())
        .await;
    assert!(
        run["error"].as_str().unwrap().contains("forged or altered"),
        "{run}"
    );
    let refusals = t.audit("action=rollout.refused").await;
    assert_eq!(refusals.len(), 2);

    // The public key is served, and it verifies a good artifact offline.
    let keys = t
        .app
        .call(Method::GET, "/api/keys", None, None)
        .await
        .json();
    let key: slipway_trust::PublicKeyInfo =
        serde_json::from_value(keys["keys"][0].clone()).unwrap();
    let h2 = t
        .snapshot(&agent, &token, &[("index.html", "<h1>v2</h1>")])
        .await;
    slipway_trust::signing::verify_artifact(&key, &t.artifact(&agent, &h2), &Default::default())
        .unwrap();
}

pub fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}
