//! Seed 004's spec endpoints: every validation rule, upsert semantics, field types.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::util::{good_spec, spec_path, TestApp};

/// PUTs `good_spec()` with `field` set to `value` (removed when `None`) and expects
/// `invalid_spec` with exactly `message`.
async fn check_rejected(
    app: &TestApp,
    agent: &str,
    token: &str,
    field: &str,
    value: Option<Value>,
    message: &str,
) {
    let mut spec = good_spec();
    match value {
        Some(v) => spec[field] = v,
        None => {
            spec.as_object_mut().unwrap().remove(field);
        }
    }
    let r = app
        .call(
            Method::PUT,
            &spec_path(agent),
            Some(token),
            Some(spec.clone()),
        )
        .await;
    let got = r.error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_spec");
    assert_eq!(got, message, "for {field} = {:?}", spec.get(field));
}

#[tokio::test]
async fn every_seed_rule_is_rejected_with_its_own_message() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    let roots = "/config/miniapps, /config/memory/projects";
    let cases: Vec<(&str, Option<Value>, String)> = vec![
        ("name", None, "name is required".into()),
        ("name", Some(json!("  ")), "name must not be blank".into()),
        ("name", Some(json!("x".repeat(101))), "name is longer than 100 characters".into()),
        ("name", Some(json!("a\u{7}b")), "name must not contain control characters".into()),
        ("sourceDir", None, "sourceDir is required".into()),
        ("sourceDir", Some(json!("config/miniapps/app")), r#"sourceDir: path must be absolute (start with '/'): "config/miniapps/app""#.into()),
        (
            "sourceDir",
            Some(json!("/config/miniapps/../../etc")),
            r#"sourceDir: path must not contain '..' (path traversal): "/config/miniapps/../../etc""#.into(),
        ),
        ("sourceDir", Some(json!("/etc/app")), format!(r#"sourceDir "/etc/app" is not under an allowed root ({roots})"#)),
        ("sourceDir", Some(json!("/config/miniapps")), format!(r#"sourceDir "/config/miniapps" is not under an allowed root ({roots})"#)),
        ("sourceDir", Some(json!("/config/miniapps-evil/x")), format!(r#"sourceDir "/config/miniapps-evil/x" is not under an allowed root ({roots})"#)),
        ("installCommand", Some(json!("a\u{0}b")), "installCommand must not contain NUL characters".into()),
        ("buildCommand", None, "buildCommand is required".into()),
        ("buildCommand", Some(json!("")), "buildCommand must not be blank".into()),
        ("startCommand", None, "startCommand is required".into()),
        ("startCommand", Some(json!(" ")), "startCommand must not be blank".into()),
        ("runtimePort", Some(json!(80)), "runtimePort must be between 1024 and 65535, got 80".into()),
        ("runtimePort", Some(json!(1023)), "runtimePort must be between 1024 and 65535, got 1023".into()),
        ("runtimePort", Some(json!(65536)), "runtimePort must be between 1024 and 65535, got 65536".into()),
        ("runtimePort", Some(json!(-1)), "runtimePort must be between 1024 and 65535, got -1".into()),
        ("runtimePort", Some(json!(u64::MAX)), format!("runtimePort must be between 1024 and 65535, got {}", u64::MAX)),
        ("runtimePort", Some(json!("3000")), "runtimePort must be an integer, got a string".into()),
        ("runtimePort", Some(json!(3000.5)), "runtimePort must be an integer, got 3000.5".into()),
        ("env", Some(json!({"1BAD": "x"})), r#"env name "1BAD" is invalid: it must match [A-Za-z_][A-Za-z0-9_]*"#.into()),
        ("env", Some(json!({"A-B": "x"})), r#"env name "A-B" is invalid: it must match [A-Za-z_][A-Za-z0-9_]*"#.into()),
        ("env", Some(json!({"PORT": "1"})), "env name PORT is reserved: slipway sets it for the app".into()),
        ("env", Some(json!({"A": 1})), "env value of A must be a string, got a number".into()),
        ("env", Some(json!(["A=1"])), "env must be an object of strings, got an array".into()),
        ("targetDefault", Some(json!("staging")), r#"targetDefault must be "preview" or "production", got "staging""#.into()),
        ("targetDefault", Some(json!(true)), "targetDefault must be a string, got a boolean".into()),
        ("kind", Some(json!("vm")), r#"kind must be "auto", "static" or "dynamic", got "vm""#.into()),
        ("name", Some(json!(7)), "name must be a string, got a number".into()),
        ("sourceDir", Some(json!({"path": "/x"})), "sourceDir must be a string, got an object".into()),
    ];
    for (field, value, message) in cases {
        check_rejected(&app, &id, &token, field, value, &message).await;
    }
    // Nothing was stored by any of them.
    app.call(Method::GET, &spec_path(&id), Some(&token), None)
        .await
        .error(StatusCode::NOT_FOUND, "spec_not_found");
}

#[tokio::test]
async fn allowed_roots_come_from_config() {
    let app =
        TestApp::with_config(|c| c.spec_policy.allowed_roots = vec!["/home/agent/apps".into()]);
    let (id, token) = app.agent("bot").await;
    check_rejected(
        &app,
        &id,
        &token,
        "sourceDir",
        None,
        "sourceDir is required",
    )
    .await;
    check_rejected(
        &app,
        &id,
        &token,
        "sourceDir",
        Some(json!("/config/miniapps/a")),
        r#"sourceDir "/config/miniapps/a" is not under an allowed root (/home/agent/apps)"#,
    )
    .await;
    let mut spec = good_spec();
    spec["sourceDir"] = json!("/home/agent/apps/site");
    let r = app
        .call(Method::PUT, &spec_path(&id), Some(&token), Some(spec))
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn missing_spec_is_a_clear_404() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    let msg = app
        .call(Method::GET, &spec_path(&id), Some(&token), None)
        .await
        .error(StatusCode::NOT_FOUND, "spec_not_found");
    assert!(msg.contains("no deployment spec"), "{msg}");
}

#[tokio::test]
async fn put_upserts_keeping_id_and_created_at() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    app.set_time(1_000);
    let first = app
        .call(
            Method::PUT,
            &spec_path(&id),
            Some(&token),
            Some(good_spec()),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK);
    let first = first.json();
    assert_eq!(first["agentId"], id.as_str());
    assert!(first["id"].as_str().unwrap().starts_with("spc-"));
    assert_eq!(first["createdAt"], 1_000);
    assert_eq!(first["updatedAt"], 1_000);
    let keys: Vec<&String> = first.as_object().unwrap().keys().collect();
    let mut expected = vec![
        "id",
        "agentId",
        "name",
        "sourceDir",
        "installCommand",
        "buildCommand",
        "startCommand",
        "runtimePort",
        "env",
        "targetDefault",
        "kind",
        "runtimeEgressAllow",
        "createdAt",
        "updatedAt",
    ];
    expected.sort_unstable();
    let mut keys: Vec<&str> = keys.into_iter().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, expected);

    app.set_time(5_000);
    let mut changed = good_spec();
    changed["name"] = json!("renamed");
    changed["runtimePort"] = json!(8080);
    let second = app
        .call(Method::PUT, &spec_path(&id), Some(&token), Some(changed))
        .await
        .json();
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["createdAt"], 1_000);
    assert_eq!(second["updatedAt"], 5_000);
    assert_eq!(second["name"], "renamed");
    assert_eq!(second["runtimePort"], 8080);
    let got = app
        .call(Method::GET, &spec_path(&id), Some(&token), None)
        .await
        .json();
    assert_eq!(got, second);
}

#[tokio::test]
async fn defaults_and_normalisation_are_applied() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    let spec = json!({
        "name": " app ",
        "sourceDir": "/config/memory/projects//x/./y/",
        "buildCommand": "true",
        "startCommand": "./run",
        "installCommand": null
    });
    let got = app
        .call(Method::PUT, &spec_path(&id), Some(&token), Some(spec))
        .await
        .json();
    assert_eq!(got["name"], "app");
    assert_eq!(got["sourceDir"], "/config/memory/projects/x/y");
    assert_eq!(got["installCommand"], "");
    assert_eq!(got["runtimePort"], 3000);
    assert_eq!(got["env"], json!({}));
    assert_eq!(got["targetDefault"], "preview");
    assert_eq!(got["kind"], "auto");
}

#[tokio::test]
async fn a_get_result_can_be_put_back() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    app.call(
        Method::PUT,
        &spec_path(&id),
        Some(&token),
        Some(good_spec()),
    )
    .await;
    let got = app
        .call(Method::GET, &spec_path(&id), Some(&token), None)
        .await
        .json();
    app.set_time(9_000);
    // Read-only fields are ignored even when they lie.
    let mut back = got.clone();
    back["createdAt"] = json!(1);
    back["agentId"] = json!("agt-bbbbbbbbbbbbbbbb");
    back["id"] = json!("spc-bbbbbbbbbbbbbbbb");
    let r = app
        .call(Method::PUT, &spec_path(&id), Some(&token), Some(back))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    let again = r.json();
    assert_eq!(again["id"], got["id"]);
    assert_eq!(again["agentId"], id.as_str());
    assert_eq!(again["createdAt"], got["createdAt"]);
    assert_eq!(again["updatedAt"], 9_000);
}

#[tokio::test]
async fn runtime_egress_allow_is_validated_and_stored() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    let cases: Vec<(Value, &str)> = vec![
        (
            json!("api.example.com"),
            "runtimeEgressAllow must be an array of host names, got a string",
        ),
        (
            json!(["api.example.com", 7]),
            "runtimeEgressAllow[1] must be a string, got a number",
        ),
        (
            json!(["*.example.com"]),
            r#"runtimeEgressAllow entry "*.example.com" is invalid: wildcards are not supported; list each host name"#,
        ),
        (
            json!(["https://api.example.com/v1"]),
            r#"runtimeEgressAllow entry "https://api.example.com/v1" is invalid: give a host name such as api.example.com, not a URL"#,
        ),
        (
            json!(["10.0.0.1"]),
            r#"runtimeEgressAllow entry "10.0.0.1" is invalid: IP addresses are not allowed; give a host name"#,
        ),
        (
            json!(["api.example.com:99999"]),
            r#"runtimeEgressAllow entry "api.example.com:99999" is invalid: the port must be a number from 1 to 65535"#,
        ),
    ];
    for (value, message) in cases {
        check_rejected(
            &app,
            &id,
            &token,
            "runtimeEgressAllow",
            Some(value),
            message,
        )
        .await;
    }
    let mut spec = good_spec();
    spec["runtimeEgressAllow"] = json!(["API.Example.com", "hooks.example.org:8443"]);
    let got = app
        .call(Method::PUT, &spec_path(&id), Some(&token), Some(spec))
        .await
        .json();
    assert_eq!(
        got["runtimeEgressAllow"],
        json!(["api.example.com", "hooks.example.org:8443"])
    );
    let read = app
        .call(Method::GET, &spec_path(&id), Some(&token), None)
        .await
        .json();
    assert_eq!(read["runtimeEgressAllow"], got["runtimeEgressAllow"]);
    // Absent means none.
    let got = app
        .call(
            Method::PUT,
            &spec_path(&id),
            Some(&token),
            Some(good_spec()),
        )
        .await
        .json();
    assert_eq!(got["runtimeEgressAllow"], json!([]));
}

#[tokio::test]
async fn unknown_fields_are_named() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    let mut spec = good_spec();
    spec["repoUrl"] = json!("https://example.invalid/x.git");
    let msg = app
        .call(Method::PUT, &spec_path(&id), Some(&token), Some(spec))
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_spec");
    assert!(msg.starts_with(r#"unknown field "repoUrl""#), "{msg}");
    assert!(msg.contains("sourceDir"), "{msg}");
}

#[tokio::test]
async fn operator_may_set_an_agents_spec() {
    let app = TestApp::new();
    let (id, token) = app.agent("bot").await;
    let r = app
        .call(
            Method::PUT,
            &spec_path(&id),
            Some(&app.operator),
            Some(good_spec()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let got = app
        .call(Method::GET, &spec_path(&id), Some(&token), None)
        .await
        .json();
    assert_eq!(got["env"], json!({"NODE_ENV": "production"}));
}
