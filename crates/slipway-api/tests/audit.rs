//! The audit log (issue 7): every privileged action leaves its entry; filters and paging; an
//! agent sees only its own; editing or deleting a row in the database makes `verify` fail and
//! name the first bad entry.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::gates::{trust_app, TrustApp};
use crate::util::spec_path;

async fn verify(t: &TrustApp) -> Value {
    let r = t
        .app
        .call(
            Method::GET,
            "/api/audit/verify",
            Some(&t.app.operator),
            None,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
    r.json()
}

/// A log with a few kinds of entries; returns (agent, token).
async fn busy_log(t: &TrustApp) -> (String, String) {
    let (agent, token) = t.agent("audited").await;
    let h = t.snapshot(&agent, &token, &[("index.html", "a")]).await;
    let r = t
        .start(
            &agent,
            &token,
            json!({ "target": "production", "snapshot": h }),
            None,
        )
        .await;
    let gate = r.json()["gateId"].as_str().unwrap().to_string();
    t.advance(10);
    t.app
        .call(
            Method::POST,
            &format!("/api/gates/{gate}/deny"),
            Some(&t.app.operator),
            Some(json!({ "reason": "no" })),
        )
        .await;
    t.advance(10);
    let mut spec = crate::util::good_spec();
    spec["runtimePort"] = json!(4000);
    t.app
        .call(Method::PUT, &spec_path(&agent), Some(&token), Some(spec))
        .await;
    (agent, token)
}

#[tokio::test]
async fn privileged_actions_leave_entries_that_filter_and_page() {
    let t = trust_app();
    let t0 = t.now();
    let (agent, token) = busy_log(&t).await;
    let (other, other_token) = t.agent("bystander").await;

    let all = t.audit("").await;
    let find = |action: &str| {
        all.iter()
            .find(|e| e["action"] == action && e["agentId"] == agent.as_str())
            .cloned()
    };
    let created = find("token.create").expect("agent creation records its token");
    assert_eq!(created["actorKind"], "operator");
    assert!(created["target"].as_str().unwrap().starts_with("tok-"));
    let spec = find("spec.update").expect("spec change");
    assert!(
        spec["reason"].as_str().unwrap().contains("port 4000"),
        "{spec}"
    );
    assert_eq!(spec["actorKind"], "agent");
    assert!(find("gate.request").is_some());
    let deny = find("gate.deny").unwrap();
    assert_eq!(deny["outcome"], "denied");
    assert!(deny["gateId"].as_str().unwrap().starts_with("gte-"));

    // Entries chain: each names the hash of the one before it.
    for pair in all.windows(2) {
        assert_eq!(pair[0]["prevHash"], pair[1]["hash"]);
        assert_eq!(
            pair[0]["seq"].as_u64().unwrap(),
            pair[1]["seq"].as_u64().unwrap() + 1
        );
    }

    // Filters: agent, action family, time range.
    let gates = t.audit(&format!("agent={agent}&action=gate.")).await;
    assert!(
        !gates.is_empty()
            && gates
                .iter()
                .all(|e| e["action"].as_str().unwrap().starts_with("gate."))
    );
    let late = t.audit(&format!("since={}", t0 + 20)).await;
    assert!(late.iter().all(|e| e["ts"].as_i64().unwrap() >= t0 + 20));
    assert!(late
        .iter()
        .any(|e| e["action"] == "spec.update" && e["agentId"] == agent.as_str()));
    let early = t.audit(&format!("until={}", t0 + 10)).await;
    assert!(early.iter().all(|e| e["ts"].as_i64().unwrap() < t0 + 10));
    assert!(!early.is_empty());

    // Paging: newest first, `nextBefore` continues.
    let r = t
        .app
        .call(
            Method::GET,
            "/api/audit?limit=2",
            Some(&t.app.operator),
            None,
        )
        .await
        .json();
    assert_eq!(r["entries"].as_array().unwrap().len(), 2);
    let next = r["nextBefore"].as_u64().unwrap();
    let page2 = t.audit(&format!("limit=2&before={next}")).await;
    assert_eq!(page2[0]["seq"].as_u64().unwrap(), next - 1);

    // An agent sees only its own entries, whatever it asks for; it may not verify.
    let own = t
        .app
        .call(Method::GET, "/api/audit", Some(&other_token), None)
        .await
        .json();
    let own = own["entries"].as_array().unwrap();
    assert!(
        !own.is_empty() && own.iter().all(|e| e["agentId"] == other.as_str()),
        "{own:?}"
    );
    let theirs = t
        .app
        .call(
            Method::GET,
            &format!("/api/audit?agent={agent}"),
            Some(&other_token),
            None,
        )
        .await
        .json();
    assert!(theirs["entries"].as_array().unwrap().is_empty());
    let r = t
        .app
        .call(Method::GET, "/api/audit/verify", Some(&token), None)
        .await;
    r.error(StatusCode::FORBIDDEN, "forbidden");
    let r = t
        .app
        .call(Method::GET, "/api/audit?since=abc", Some(&token), None)
        .await;
    r.error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
}

fn sql(t: &TrustApp, statement: &str) {
    let conn = rusqlite::Connection::open(&t.db).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    let changed = conn.execute(statement, []).unwrap();
    assert_eq!(changed, 1, "{statement}");
}

#[tokio::test]
async fn editing_or_deleting_a_row_breaks_verify_at_the_first_bad_entry() {
    let t = trust_app();
    busy_log(&t).await;
    let ok = verify(&t).await;
    assert_eq!(ok["ok"], true, "{ok}");
    let n = ok["entries"].as_u64().unwrap();
    assert!(n >= 5, "{ok}");

    // Edit entry 3's outcome: entry 3 is named.
    sql(&t, "UPDATE audit_log SET outcome = 'ok' WHERE seq = 3");
    let bad = verify(&t).await;
    assert_eq!(bad["ok"], false);
    assert_eq!(bad["firstBad"]["seq"], 3, "{bad}");
    assert!(
        bad["firstBad"]["reason"]
            .as_str()
            .unwrap()
            .contains("edited"),
        "{bad}"
    );

    // Delete entry 2 as well: now entry 2 is the first bad one.
    sql(&t, "DELETE FROM audit_log WHERE seq = 2");
    let bad = verify(&t).await;
    assert_eq!(bad["firstBad"]["seq"], 2, "{bad}");
    assert!(
        bad["firstBad"]["reason"]
            .as_str()
            .unwrap()
            .contains("missing"),
        "{bad}"
    );

    // On a fresh log, deleting the newest row is caught too (the recorded head).
    let t = trust_app();
    busy_log(&t).await;
    let n = verify(&t).await["entries"].as_u64().unwrap();
    sql(&t, &format!("DELETE FROM audit_log WHERE seq = {n}"));
    let bad = verify(&t).await;
    assert_eq!(bad["firstBad"]["seq"], n, "{bad}");

    // And rewriting a row's hash to match its edit still breaks the link of the next entry.
    let t = trust_app();
    busy_log(&t).await;
    sql(
        &t,
        "UPDATE audit_log SET reason = 'forged', hash = 'ff' WHERE seq = 2",
    );
    let bad = verify(&t).await;
    assert_eq!(bad["firstBad"]["seq"], 2, "{bad}");
}
