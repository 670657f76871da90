//! `slipway deploy --prod`, `versions`, `rollback`, `promote` end to end: the real binary, a
//! real server, real sandboxes, real HTTP.

use crate::util::*;

#[test]
fn deploy_prod_versions_rollback_and_promote_from_the_cli() {
    if !sandboxes_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Gates (issue 7) are not what this test is about.
    let server = Server::start(
        &dir.path().join("data"),
        &["--gate-action", "none", "--warm-time", "600"],
        &[],
    );
    let env = Env { dir, server };
    let (_agent, token) = env.agent("shipper");
    let app = env.dir.path().join("Shop Front");
    let app_str = app.to_str().unwrap();
    let t = ["--token", token.as_str()];
    let cli = |args: &[&str]| env.run(&[&t[..], args].concat());

    write(
        &app,
        &[("index.html", "<h1>shop</h1>"), ("version.txt", "v1")],
    );
    let first = cli(&["deploy", "--prod", app_str]);
    let url = first.ok().trim().to_string();
    assert!(
        url.starts_with("http://shop-front.localhost:"),
        "the production URL, not the run's: {first:#?}"
    );
    let host = host_of(&url);
    assert_eq!(
        get(&env.server.app, &host, "/version.txt"),
        (200, "v1".to_string())
    );

    write(&app, &[("version.txt", "v2")]);
    let second = cli(&["deploy", "--prod", app_str]);
    assert_eq!(second.ok().trim(), url, "the production URL never changes");
    assert_eq!(
        get(&env.server.app, &host, "/version.txt"),
        (200, "v2".to_string())
    );

    let list = cli(&["--json", "versions"]).json();
    let numbers: Vec<i64> = list["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["versionNumber"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [2, 1], "newest first");
    assert_eq!(list["versions"][0]["active"], true);
    assert_eq!(list["versions"][1]["warm"], true);
    assert_eq!(list["deployment"]["productionUrl"], url.as_str());
    let text = cli(&["versions"]);
    assert!(
        text.ok().contains("active") && text.stdout.contains("warm"),
        "{text:#?}"
    );

    // The runs list says which run became which version.
    let runs = cli(&["runs"]);
    assert!(
        runs.ok().contains("v1") && runs.stdout.contains("v2"),
        "{runs:#?}"
    );

    // Default rollback target: the previous version.
    let back = cli(&["rollback", "--note", "v2 is broken"]);
    assert_eq!(back.ok().trim(), url);
    assert!(back.stderr.contains("version 1 (warm"), "{back:#?}");
    assert_eq!(
        get(&env.server.app, &host, "/version.txt"),
        (200, "v1".to_string())
    );
    let forward = cli(&["rollback", "--to", "2"]);
    forward.ok();
    assert_eq!(
        get(&env.server.app, &host, "/version.txt"),
        (200, "v2".to_string())
    );
    let missing = cli(&["rollback", "--to", "7"]);
    assert_eq!(missing.code, 3, "{missing:#?}");
    assert!(
        missing.stderr.contains("version 7 not found"),
        "{missing:#?}"
    );

    // Promote a preview run.
    write(&app, &[("version.txt", "v3 via preview")]);
    let preview = cli(&["--json", "deploy", app_str]).json();
    let run_id = preview["id"].as_str().unwrap().to_string();
    assert_eq!(
        get(&env.server.app, &host, "/version.txt"),
        (200, "v2".to_string())
    );
    let promoted = cli(&["promote", &run_id]);
    assert_eq!(promoted.ok().trim(), url);
    assert!(
        promoted.stderr.contains("production version 3"),
        "{promoted:#?}"
    );
    assert_eq!(
        get(&env.server.app, &host, "/version.txt"),
        (200, "v3 via preview".to_string())
    );

    let one = cli(&["versions", "3"]);
    assert!(
        one.ok().contains("origin    promote") && one.stdout.contains(&run_id),
        "{one:#?}"
    );
    let history = cli(&["--json", "versions", "--history"]).json();
    let reasons: Vec<&str> = history["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        ["promote", "rollback", "rollback", "deploy", "deploy"]
    );
    assert_eq!(history["changes"][2]["note"], "v2 is broken");
}
