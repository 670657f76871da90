//! Trust end to end (issue 7): `deploy --prod` waits at the gate until an operator approves;
//! `gates`, `approve`, `audit`, `audit verify`, `verify`; and a tampered release (a flipped
//! byte, a replaced signature) is refused at rollback and promote while production keeps
//! serving. The real binary, a real server, real sandboxes, real HTTP.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use crate::util::*;

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

fn release_file(env: &Env, agent: &str, hash: &str) -> PathBuf {
    env.dir
        .path()
        .join("data/artifacts")
        .join(agent)
        .join("releases")
        .join(format!("{hash}.tar.zst"))
}

#[test]
fn deploy_prod_waits_for_an_operator_then_deploys_once() {
    if !sandboxes_available() {
        return;
    }
    let env = Env::new();
    assert_eq!(
        mode(&env.dir.path().join("data/signing.key")),
        0o600,
        "the signing key is created private"
    );
    let (agent, token) = env.agent("gated");
    let app = env.dir.path().join("site");
    write(&app, &[("index.html", "<h1>approved</h1>")]);

    let mut child = slipway_command()
        .args([
            "--server",
            &env.server.api,
            "--token",
            &token,
            "deploy",
            "--prod",
            app.to_str().unwrap(),
        ])
        .current_dir(env.dir.path())
        .env("SLIPWAY_CONFIG_DIR", env.config_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    let gate = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("deploy --prod never printed the approve command: {seen:#?}")
            });
        seen.push(line.clone());
        if let Some(id) = line.trim().strip_prefix("slipway approve ") {
            break id.to_string();
        }
    };
    assert!(seen.iter().any(|l| l.contains("High-risk")), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains("site.localhost")),
        "the target domain is shown: {seen:#?}"
    );

    // The operator sees it pending, first; the agent cannot approve it.
    let gates = env.admin(&["--json", "gates"]).json();
    assert_eq!(gates["gates"][0]["id"], gate.as_str());
    assert_eq!(gates["gates"][0]["state"], "pending");
    let own = env.run(&["--token", &token, "approve", &gate]);
    assert_eq!(own.code, 4, "{own:#?}");
    let approved = env.admin(&["approve", &gate]);
    assert!(approved.ok().contains("approved"), "{approved:#?}");

    let out = child.wait_with_output().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "deploy failed: {url} {seen:#?} {rest:#?}"
    );
    assert!(url.starts_with("http://site.localhost:"), "{url}");
    assert_eq!(
        get(&env.server.app, &host_of(&url), "/"),
        (200, "<h1>approved</h1>".to_string())
    );
    let gates = env.admin(&["--json", "gates"]).json();
    assert_eq!(gates["gates"][0]["state"], "consumed");

    // Audit: the gate, the token, the deploy; the chain verifies.
    let audit = env
        .admin(&["--json", "audit", "--for-agent", &agent])
        .json();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for want in [
        "token.create",
        "gate.request",
        "gate.approve",
        "gate.token.create",
        "deploy.start",
        "deploy.ready",
    ] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
    let human = env.admin(&["audit", "--action", "gate."]);
    assert!(human.ok().contains("gate.approve"), "{human:#?}");
    let verified = env.admin(&["audit", "verify"]);
    assert!(
        verified.ok().contains("audit log verified"),
        "{verified:#?}"
    );

    // Offline verification of the stored snapshot, against the server's key and a key file.
    let snapshots = env.dir.path().join("data/artifacts").join(&agent);
    let artifact = std::fs::read_dir(&snapshots)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".tar.zst"))
        .expect("a snapshot artifact");
    let ok = env.run(&["verify", artifact.to_str().unwrap()]);
    assert!(ok.ok().contains("verified: snapshot"), "{ok:#?}");
    let key_file = env.dir.path().join("key.json");
    let key = ureq::get(&format!("{}/api/keys", env.server.api))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    std::fs::write(&key_file, key).unwrap();
    let copy = env.dir.path().join(artifact.file_name().unwrap());
    std::fs::copy(&artifact, &copy).unwrap();
    std::fs::copy(slipway_trust_sig(&artifact), slipway_trust_sig(&copy)).unwrap();
    let offline = run_in(
        env.dir.path(),
        &env.config_dir(),
        &[
            "verify",
            copy.to_str().unwrap(),
            "--key",
            key_file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(offline.ok().contains("verified"), "{offline:#?}");
    flip_byte(&copy);
    let bad = run_in(
        env.dir.path(),
        &env.config_dir(),
        &[
            "verify",
            copy.to_str().unwrap(),
            "--key",
            key_file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(bad.code, 1, "{bad:#?}");
    assert!(bad.stderr.contains("its bytes changed"), "{bad:#?}");
}

fn slipway_trust_sig(artifact: &Path) -> PathBuf {
    let mut s = artifact.as_os_str().to_os_string();
    s.push(".sig");
    PathBuf::from(s)
}

#[test]
fn a_tampered_release_is_refused_and_production_keeps_serving() {
    if !sandboxes_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The gate flow is the other test's subject; here only the signatures are.
    let server = Server::start(&dir.path().join("data"), &["--gate-action", "none"], &[]);
    let env = Env { dir, server };
    let (agent, token) = env.agent("signed");
    let app = env.dir.path().join("shop");
    let app_str = app.to_str().unwrap();
    let t = ["--token", token.as_str()];
    let cli = |args: &[&str]| env.run(&[&t[..], args].concat());

    write(
        &app,
        &[("index.html", "<h1>shop</h1>"), ("version.txt", "v1")],
    );
    let url = cli(&["deploy", "--prod", app_str]).ok().trim().to_string();
    let host = host_of(&url);
    write(&app, &[("version.txt", "v2")]);
    cli(&["deploy", "--prod", app_str]).ok();
    assert_eq!(
        get(&env.server.app, &host, "/version.txt"),
        (200, "v2".to_string())
    );
    let versions = cli(&["--json", "versions"]).json();
    let v1 = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["versionNumber"] == 1)
        .unwrap()
        .clone();
    let v1_release = release_file(&env, &agent, v1["releaseHash"].as_str().unwrap());
    assert!(
        slipway_trust_sig(&v1_release).is_file(),
        "releases are signed"
    );

    // One flipped byte in v1's release: rollback is refused, v2 keeps serving.
    flip_byte(&v1_release);
    let refused = cli(&["rollback", "--to", "1"]);
    assert_ne!(refused.code, 0, "{refused:#?}");
    assert!(
        refused.stderr.contains("rollout refused") && refused.stderr.contains("its bytes changed"),
        "{refused:#?}"
    );
    assert_eq!(
        get(&env.server.app, &host, "/version.txt"),
        (200, "v2".to_string())
    );
    flip_byte(&v1_release);

    // A replaced signature: refused too.
    let sig_path = slipway_trust_sig(&v1_release);
    let sig = std::fs::read_to_string(&sig_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&sig).unwrap();
    v["signature"] = serde_json::json!("11".repeat(64));
    std::fs::write(&sig_path, v.to_string()).unwrap();
    let refused = cli(&["rollback", "--to", "1"]);
    assert_ne!(refused.code, 0, "{refused:#?}");
    assert!(refused.stderr.contains("forged or altered"), "{refused:#?}");
    assert_eq!(
        get(&env.server.app, &host, "/version.txt"),
        (200, "v2".to_string())
    );
    std::fs::write(&sig_path, sig).unwrap();

    // With the release intact again, the rollback goes through.
    cli(&["rollback", "--to", "1"]).ok();
    assert_eq!(
        get(&env.server.app, &host, "/version.txt"),
        (200, "v1".to_string())
    );

    // Promote of a preview run whose release was tampered with: refused, v1 keeps serving.
    write(&app, &[("version.txt", "v3")]);
    let run = cli(&["--json", "deploy", app_str]).json();
    let run_id = run["id"].as_str().unwrap().to_string();
    let releases = env
        .dir
        .path()
        .join("data/artifacts")
        .join(&agent)
        .join("releases");
    let newest = std::fs::read_dir(&releases)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".tar.zst"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .unwrap();
    flip_byte(&newest);
    let refused = cli(&["promote", &run_id]);
    assert_ne!(refused.code, 0, "{refused:#?}");
    assert!(refused.stderr.contains("rollout refused"), "{refused:#?}");
    assert_eq!(
        get(&env.server.app, &host, "/version.txt"),
        (200, "v1".to_string())
    );

    // The audit log says why, each time.
    let audit = env
        .admin(&["--json", "audit", "--action", "rollout.refused"])
        .json();
    let reasons: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:#?}");
    assert!(
        reasons.iter().any(|r| r.contains("its bytes changed")),
        "{reasons:#?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("forged or altered")),
        "{reasons:#?}"
    );
}
