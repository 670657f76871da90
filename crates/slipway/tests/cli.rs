//! Client commands against a real server.

use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use crate::util::{mode, Env};

#[test]
fn agents_create_and_list() {
    let env = Env::new();
    let created = env.admin(&["agents", "create", "builder", "--json"]).json();
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("agt-"));
    assert!(created["token"].as_str().unwrap().starts_with("slw_ag_"));
    let human = env.admin(&["agents", "create", "second"]);
    assert!(human.ok().contains("token: slw_ag_"), "{human:#?}");
    let list = env.admin(&["agents", "list", "--json"]).json();
    let names: Vec<&str> = list["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["builder", "second"]);
    let text = env.admin(&["agents", "list"]);
    assert!(text.ok().contains(id), "{text:#?}");
}

#[test]
fn spec_set_from_flags_then_get_round_trips_and_partial_updates_keep_fields() {
    let env = Env::new();
    let (_, token) = env.agent("bot");
    let set = env
        .run(&[
            "--token",
            &token,
            "spec",
            "set",
            "--json",
            "--name",
            "site",
            "--source-dir",
            "/config/miniapps/site",
            "--install",
            "npm ci",
            "--build",
            "npm run build",
            "--start",
            "node server.js",
            "--port",
            "3100",
            "--env",
            "NODE_ENV=production",
            "--env",
            "GREETING=a=b",
            "--target",
            "production",
            "--kind",
            "dynamic",
        ])
        .json();
    assert_eq!(set["name"], "site");
    assert_eq!(set["runtimePort"], 3100);
    assert_eq!(
        set["env"],
        json!({"NODE_ENV": "production", "GREETING": "a=b"})
    );
    assert_eq!(set["targetDefault"], "production");
    assert_eq!(set["kind"], "dynamic");
    let got = env
        .run(&["--token", &token, "spec", "get", "--json"])
        .json();
    assert_eq!(got, set);

    // Only the port changes; everything else is kept.
    let updated = env
        .run(&[
            "--token", &token, "spec", "set", "--port", "4000", "--env", "EXTRA=1", "--json",
        ])
        .json();
    assert_eq!(updated["runtimePort"], 4000);
    assert_eq!(updated["id"], set["id"]);
    assert_eq!(updated["createdAt"], set["createdAt"]);
    assert_eq!(updated["startCommand"], "node server.js");
    assert_eq!(
        updated["env"],
        json!({"NODE_ENV": "production", "GREETING": "a=b", "EXTRA": "1"})
    );

    let human = env.run(&["--token", &token, "spec", "get"]);
    assert!(
        human
            .ok()
            .contains("sourceDir:       /config/miniapps/site"),
        "{human:#?}"
    );
}

#[test]
fn spec_set_from_a_project_file_with_flags_on_top() {
    let env = Env::new();
    let (_, token) = env.agent("bot");
    let project = env.dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(
        project.join("slipway.toml"),
        r#"
name = "from-file"
source_dir = "/config/memory/projects/blog"
build = "true"
start = "python3 -m http.server 3000"
port = 3000
target = "preview"
kind = "static"

[env]
MODE = "file"
"#,
    )
    .unwrap();
    let dir = project.to_str().unwrap();
    let set = env
        .run(&[
            "--token",
            &token,
            "spec",
            "set",
            "--dir",
            dir,
            "--name",
            "from-flag",
            "--json",
        ])
        .json();
    assert_eq!(set["name"], "from-flag");
    assert_eq!(set["sourceDir"], "/config/memory/projects/blog");
    assert_eq!(set["buildCommand"], "true");
    assert_eq!(set["kind"], "static");
    assert_eq!(set["env"], json!({"MODE": "file"}));

    // A typo in the file is refused by name, before anything is sent.
    std::fs::write(project.join("slipway.toml"), "nmae = \"x\"\n").unwrap();
    let r = env.run(&["--token", &token, "spec", "set", "--dir", dir]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("nmae"), "{r:#?}");
    // An explicit --dir without a slipway.toml is an error, not a silent no-op.
    let r = env.run(&[
        "--token",
        &token,
        "spec",
        "set",
        "--dir",
        env.dir.path().to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("slipway.toml"), "{r:#?}");
}

#[test]
fn validation_failures_print_the_servers_message() {
    let env = Env::new();
    let (_, token) = env.agent("bot");
    let r = env.run(&[
        "--token",
        &token,
        "spec",
        "set",
        "--name",
        "a",
        "--source-dir",
        "/config/miniapps/a",
        "--build",
        "true",
        "--start",
        "./run",
        "--port",
        "80",
    ]);
    assert_eq!(r.code, 1, "{r:#?}");
    assert_eq!(
        r.stderr.trim(),
        "error: runtimePort must be between 1024 and 65535, got 80 (invalid_spec)"
    );
    let r = env.run(&[
        "--token",
        &token,
        "spec",
        "set",
        "--name",
        "a",
        "--source-dir",
        "/etc/a",
        "--build",
        "true",
        "--start",
        "x",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("is not under an allowed root"), "{r:#?}");
    let r = env.run(&["--token", &token, "spec", "set", "--name", "a"]);
    assert_eq!(
        r.stderr.trim(),
        "error: sourceDir is required (invalid_spec)"
    );
    // Nothing was stored: not found exits 3.
    let r = env.run(&["--token", &token, "spec", "get"]);
    assert_eq!(r.code, 3, "{r:#?}");
    assert!(r.stderr.contains("(spec_not_found)"), "{r:#?}");
}

#[test]
fn auth_failures_exit_4() {
    let env = Env::new();
    let bad = format!("slw_op_{}", "0".repeat(64));
    let r = env.run(&["--token", &bad, "whoami"]);
    assert_eq!(r.code, 4, "{r:#?}");
    assert_eq!(
        r.stderr.trim(),
        "error: the API token is invalid or has been revoked (unauthorized)"
    );
    let r = env.run(&["whoami"]);
    assert_eq!(r.code, 4, "no token at all: {r:#?}");
    let (_, agent_token) = env.agent("bot");
    let r = env.run(&["--token", &agent_token, "agents", "list"]);
    assert_eq!(r.code, 4, "{r:#?}");
    assert!(r.stderr.contains("(forbidden)"), "{r:#?}");
}

#[test]
fn operators_name_the_agent() {
    let env = Env::new();
    let (id, token) = env.agent("bot");
    let r = env.admin(&["spec", "get"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--agent"), "{r:#?}");
    let set = env
        .admin(&[
            "--agent",
            &id,
            "spec",
            "set",
            "--name",
            "a",
            "--source-dir",
            "/config/miniapps/a",
            "--build",
            "true",
            "--start",
            "x",
            "--json",
        ])
        .json();
    assert_eq!(set["agentId"], id.as_str());
    // The agent sees what the operator set; another agent's id is simply not found.
    assert_eq!(
        env.run(&["--token", &token, "spec", "get", "--json"])
            .json(),
        set
    );
    let (_, other) = env.agent("other");
    let r = env.run(&["--token", &other, "--agent", &id, "spec", "get"]);
    assert_eq!(r.code, 3, "{r:#?}");
    assert!(r.stderr.contains("(agent_not_found)"), "{r:#?}");
}

#[test]
fn login_saves_a_private_config_used_by_later_commands() {
    let env = Env::new();
    let (id, token) = env.agent("bot");

    // A refused token is not saved.
    let r = env.run(&["login", "--token", &format!("slw_ag_{}", "1".repeat(64))]);
    assert_eq!(r.code, 4, "{r:#?}");
    assert!(!env.config_dir().join("config.toml").exists());

    let r = env.run(&["login", "--token", &token]);
    assert!(r.ok().contains(&format!("agent {id}")), "{r:#?}");
    let saved = env.config_dir().join("config.toml");
    assert_eq!(mode(&saved), 0o600);
    assert_eq!(
        std::fs::metadata(env.config_dir())
            .unwrap()
            .permissions()
            .mode()
            & 0o077,
        0
    );

    // No --server, no --token: both come from the saved login.
    let cwd = env.dir.path();
    let me = crate::util::run_in(cwd, &env.config_dir(), &["whoami", "--json"], &[]).json();
    assert_eq!(me["agentId"], id.as_str());

    // The environment beats the saved login, and a flag beats the environment.
    let bad = format!("slw_ag_{}", "2".repeat(64));
    let r = crate::util::run_in(
        cwd,
        &env.config_dir(),
        &["whoami"],
        &[("SLIPWAY_TOKEN", bad.as_str())],
    );
    assert_eq!(r.code, 4, "{r:#?}");
    let r = crate::util::run_in(
        cwd,
        &env.config_dir(),
        &["--token", &token, "whoami"],
        &[("SLIPWAY_TOKEN", bad.as_str())],
    );
    assert_eq!(r.code, 0, "{r:#?}");
}

#[test]
fn every_command_has_help() {
    let env = Env::new();
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["agents", "--help"],
        vec!["agents", "create", "--help"],
        vec!["spec", "set", "--help"],
        vec!["login", "--help"],
    ] {
        let r = env.run(&args);
        assert!(r.ok().contains("Usage:"), "{args:?}: {r:#?}");
    }
    let r = env.run(&["spec", "set", "--port", "abc"]);
    assert_eq!(r.code, 2, "usage errors exit 2: {r:#?}");
}

/// A server that stops reading an upload part-way and closes (as a server refusing it would,
/// past its own drain) leaves the CLI with a write error; the CLI says how far the upload got
/// and what that may mean, instead of "cannot reach the server".
#[test]
fn an_upload_cut_off_by_the_server_is_explained() {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Answers HEAD with 404 (not stored yet); reads 64 KiB of a PUT's body, then closes with
    // the rest unread.
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    if head.starts_with("HEAD ") {
                        let answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
                        reader.get_mut().write_all(answer).unwrap();
                        continue;
                    }
                    let mut part = vec![0u8; 64 << 10];
                    let _ = reader.read_exact(&mut part);
                    return;
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("blob.bin"), crate::util::noise(8 << 20)).unwrap();
    let server = format!("http://{addr}");
    let out = crate::util::run_in(
        dir.path(),
        &dir.path().join("config"),
        &[
            "--server",
            &server,
            "--token",
            "slw_fake",
            "--agent",
            "agt-aaaaaaaaaaaaaaaa",
            "snapshot",
            src.to_str().unwrap(),
        ],
        &[],
    );
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("the server closed the connection after")
            && out.stderr.contains("may have refused the snapshot"),
        "{}",
        out.stderr
    );
}
