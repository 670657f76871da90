//! `slipway serve`: data directory, admin token, configuration layers, listeners, shutdown.

use std::os::unix::fs::PermissionsExt;

use nix::sys::signal::Signal;

use crate::util::{mode, noise, run_in, slipway_command, walk, Server, SmallDisk};

#[test]
fn first_start_creates_a_private_data_dir_and_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("nested/data");
    let server = Server::start(&data, &[], &[]);
    assert_eq!(server.token_path, data.join("admin.token"));
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&server.token_path), 0o600);
    let token = server.admin_token();
    assert!(
        token.starts_with("slw_op_") && token.len() == 7 + 64,
        "{token}"
    );
    assert!(data.join("slipway.db").exists());
    // The token works and is the operator's.
    let r = run_in(
        dir.path(),
        &dir.path().join("cfg"),
        &[
            "--server",
            &server.api,
            "--token",
            &token,
            "whoami",
            "--json",
        ],
        &[],
    );
    assert_eq!(r.json()["kind"], "operator");
    // Its secret is not in the database, only its hash.
    server.stop();
    let db = std::fs::read(data.join("slipway.db")).unwrap();
    let wal = std::fs::read(data.join("slipway.db-wal")).unwrap_or_default();
    let needle = token.as_bytes();
    assert!(
        !db.windows(needle.len()).any(|w| w == needle)
            && !wal.windows(needle.len()).any(|w| w == needle)
    );
}

#[test]
fn a_data_dir_open_to_others_is_tightened_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start(&data, &[], &[]);
    assert_eq!(mode(&data), 0o700);
    assert!(
        server.stderr().contains("accessible to other users"),
        "{}",
        server.stderr()
    );
    server.stop();
}

#[test]
fn restart_keeps_the_token_and_rotation_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("cfg");
    let first = Server::start(&data, &[], &[]);
    let old = first.admin_token();
    first.stop();

    let second = Server::start(&data, &[], &[]);
    assert_eq!(
        second.admin_token(),
        old,
        "a restart must not issue a new token"
    );
    let r = run_in(
        dir.path(),
        &cfg,
        &["--server", &second.api, "--token", &old, "whoami"],
        &[],
    );
    assert_eq!(r.code, 0, "{r:#?}");
    second.stop();

    std::fs::remove_file(data.join("admin.token")).unwrap();
    let third = Server::start(&data, &[], &[]);
    third.wait_for_log("slipway serve --rotate-admin-token");
    assert!(
        !data.join("admin.token").exists(),
        "the lost token is not silently replaced"
    );
    third.stop();

    let rotated = Server::start(&data, &["--rotate-admin-token"], &[]);
    let new = rotated.admin_token();
    assert_ne!(new, old);
    assert_eq!(mode(&rotated.token_path), 0o600);
    let r = run_in(
        dir.path(),
        &cfg,
        &["--server", &rotated.api, "--token", &old, "whoami"],
        &[],
    );
    assert_eq!(r.code, 4, "the old token is revoked: {r:#?}");
    let r = run_in(
        dir.path(),
        &cfg,
        &["--server", &rotated.api, "--token", &new, "whoami"],
        &[],
    );
    assert_eq!(r.code, 0, "{r:#?}");
    rotated.stop();
}

#[test]
fn sigterm_and_sigint_stop_the_server_cleanly() {
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Server::start(&dir.path().join("data"), &[], &[]);
        let status = server.signal_and_wait(signal);
        assert_eq!(
            status.code(),
            Some(0),
            "{signal}: {status:?}; stderr:\n{}",
            server.stderr()
        );
        assert!(
            server.stderr().contains("shutting down"),
            "{}",
            server.stderr()
        );
    }
}

#[test]
fn the_app_listener_answers_unknown_hosts_with_404() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[], &[]);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let resp = agent
        .get(format!("{}/", server.app))
        .header("Host", "nobody.example")
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    // And the API is not served on the app listener.
    let resp = agent
        .get(format!("{}/api/health", server.app))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let resp = agent
        .get(format!("{}/api/health", server.api))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    server.stop();
}

/// Slow-loris on the API listener: a client that sends half a request head and then nothing
/// (or nothing at all) must not keep its connection, or enough of them would use up the
/// server's connections and file descriptors. The API shares the app listener's guards; the
/// request-head timeout is 10 s by default.
#[test]
fn the_api_listener_closes_connections_that_never_complete_a_request() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[], &[]);
    let addr = server.api.trim_start_matches("http://").to_string();
    let started = std::time::Instant::now();
    let mut streams: Vec<std::net::TcpStream> =
        [&b""[..], b"GET /api/health HTTP/1.1\r\nHost: x\r\n"]
            .iter()
            .map(|sent| {
                let mut stream = std::net::TcpStream::connect(&addr).unwrap();
                stream.write_all(sent).unwrap();
                stream
                    .set_read_timeout(Some(std::time::Duration::from_secs(40)))
                    .unwrap();
                stream
            })
            .collect();
    for stream in &mut streams {
        let mut rest = Vec::new();
        // End of stream (or a reset): the server closed it. A timeout means it never did.
        match stream.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("the server kept a connection that never completed a request: {e}"),
        }
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            !rest.contains("200 OK"),
            "an incomplete head was answered: {rest}"
        );
    }
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(9),
        "closed before the 10 s head timeout: {:?}",
        started.elapsed()
    );
    // Complete requests are still served.
    let resp = ureq::get(format!("{}/api/health", server.api))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    server.stop();
}

/// base_domain from the file, then the environment over it, then the flag over both.
#[test]
fn configuration_precedence_is_file_then_env_then_flag() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("slipway-server.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\napi_addr = \"127.0.0.1:0\"\napp_addr = \"127.0.0.1:0\"\nbase_domain = \"file.example\"\nallowed_roots = [\"/srv/apps\"]\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let config_str = config.to_str().unwrap();
    let start = |extra: &[&str], env: &[(&str, &str)]| {
        let mut cmd = slipway_command();
        cmd.arg("serve");
        Server::spawn(cmd, extra, env)
    };

    let s = start(&["--config", config_str], &[]);
    s.wait_for_log("base_domain=file.example");
    assert!(
        s.stderr()
            .contains(&format!("loaded config file path={config_str}")),
        "{}",
        s.stderr()
    );
    assert!(
        s.stderr().contains("allowed_roots=/srv/apps"),
        "{}",
        s.stderr()
    );
    assert_eq!(
        s.token_path,
        data.join("admin.token"),
        "data_dir comes from the file"
    );
    s.stop();

    let s = start(
        &[],
        &[
            ("SLIPWAY_CONFIG", config_str),
            ("SLIPWAY_BASE_DOMAIN", "env.example"),
        ],
    );
    s.wait_for_log("base_domain=env.example");
    s.stop();

    let s = start(
        &["--config", config_str, "--base-domain", "flag.example"],
        &[("SLIPWAY_BASE_DOMAIN", "env.example")],
    );
    s.wait_for_log("base_domain=flag.example");
    s.stop();

    // A comma-separated list in the environment replaces the file's list.
    let s = start(
        &["--config", config_str],
        &[("SLIPWAY_ALLOWED_ROOTS", "/srv/a,/srv/b")],
    );
    s.wait_for_log("allowed_roots=/srv/a,/srv/b");
    s.stop();
}

#[test]
fn without_a_config_file_the_server_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[], &[]);
    s.wait_for_log("no config file");
    s.wait_for_log("static_cache_mib=256");
    s.stop();
}

#[test]
fn the_static_cache_budget_is_configurable_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("data"),
        &[],
        &[("SLIPWAY_STATIC_CACHE_MIB", "0")],
    );
    s.wait_for_log("static_cache_mib=0");
    s.stop();

    let out = slipway_command()
        .args([
            "serve",
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
            "--static-cache-mib",
            "70000",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("static cache must be at most 65536 MiB") && stderr.contains("70000"),
        "{stderr}"
    );
}

#[test]
fn bad_configuration_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "data_dri = \"/tmp/x\"\n").unwrap();
    let out = slipway_command()
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid config file") && stderr.contains("data_dri"),
        "{stderr}"
    );

    let out = slipway_command()
        .args([
            "serve",
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
            "--agent-root",
            "/srv/agents",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("{agentId}"), "{stderr}");

    for (flag, value, says) in [
        ("--max-snapshot-mib", "0", "between 1 and"),
        ("--max-snapshot-mib", "70000", "between 1 and"),
        ("--max-snapshot-files", "0", "at least 1"),
        ("--max-connections", "0", "between 1 and"),
    ] {
        let out = slipway_command()
            .args([
                "serve",
                "--data-dir",
                dir.path().join("d").to_str().unwrap(),
            ])
            .args([flag, value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(says) && stderr.contains(value),
            "{flag} {value}: {stderr}"
        );
    }

    let out = slipway_command()
        .args(["serve", "--log-format", "xml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &["--log-format", "json"], &[]);
    s.wait_for_log("\"serving\"");
    for line in s.stderr().lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    s.stop();
}

/// The server collects unreferenced artifacts on a schedule: an old orphan goes, a young one
/// (perhaps published a moment before its row) stays.
#[test]
fn unreferenced_old_artifacts_are_collected_on_a_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent_dir = data.join("artifacts/agt-orphan");
    std::fs::create_dir_all(agent_dir.join("releases")).unwrap();
    let old = agent_dir.join(format!("{}.tar.zst", "a".repeat(64)));
    let old_release = agent_dir.join(format!("releases/{}.tar.zst", "b".repeat(64)));
    let young = agent_dir.join(format!("{}.tar.zst", "c".repeat(64)));
    let not_an_artifact = agent_dir.join("notes.txt");
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    for path in [&old, &old_release, &young, &not_an_artifact] {
        std::fs::write(path, b"x").unwrap();
    }
    for path in [&old, &old_release, &not_an_artifact] {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
    }
    let server = Server::start(&data, &["--gc-interval", "1"], &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while (old.exists() || old_release.exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !old.exists(),
        "an old unreferenced snapshot artifact was kept"
    );
    assert!(
        !old_release.exists(),
        "an old unreferenced release was kept"
    );
    assert!(
        young.exists(),
        "an artifact younger than an hour was collected"
    );
    assert!(
        not_an_artifact.exists(),
        "a file that is not an artifact was removed"
    );
    server.wait_for_log("collected unreferenced artifacts");
    server.stop();
}

/// A server whose disk fills up during an upload answers 507 `insufficient_storage` with a
/// sentence the user can act on (and no path of the server's), keeps no partial file (the space
/// is given back: a small upload right after succeeds) and keeps serving.
#[test]
fn an_upload_that_fills_the_disk_is_refused_with_507_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_disk) = SmallDisk::mount(&dir.path().join("disk"), "8m") else {
        return;
    };
    let data = dir.path().join("disk/data");
    let server = Server::start(&data, &[], &[]);
    let config = dir.path().join("config");
    let cli = |args: &[&str]| cli_of(&server, dir.path(), &config, args);
    let admin = server.admin_token();
    let agent = cli(&["--token", &admin, "--json", "agents", "create", "full"]).json();
    let token = agent["token"].as_str().unwrap().to_string();

    // 12 MB that zstd cannot shrink, on an 8 MB disk.
    let big = dir.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    let noise = noise(12 << 20);
    std::fs::write(big.join("blob.bin"), &noise).unwrap();
    let refused = cli(&["--token", &token, "snapshot", big.to_str().unwrap()]);
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused.stderr.contains("out of disk space")
            && refused.stderr.contains("insufficient_storage"),
        "{}",
        refused.stderr
    );
    assert!(
        !refused.stderr.contains(data.to_str().unwrap()),
        "no server path in the message: {}",
        refused.stderr
    );
    let leftovers: Vec<_> = walk(&data.join("artifacts"))
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");

    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    // 5 MB fit only if the refused upload's partial file is gone.
    std::fs::write(small.join("blob.bin"), &noise[..5 << 20]).unwrap();
    let stored = cli(&["--token", &token, "snapshot", small.to_str().unwrap()]);
    assert_eq!(stored.code, 0, "the space was given back: {stored:?}");
    server.stop();
}

/// An upload over the server's size limit is refused as soon as it crosses it, and the answer
/// still reaches the client although it is sending 31 MB more: the server reads (and discards)
/// the rest before answering, so the client does not run into a reset or a broken pipe
/// instead. The CLI says what the limit is.
#[test]
fn an_upload_over_the_limit_is_answered_not_reset() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &["--max-snapshot-mib", "1"], &[]);
    let config = dir.path().join("config");
    let cli = |args: &[&str]| cli_of(&server, dir.path(), &config, args);
    let admin = server.admin_token();
    let agent = cli(&["--token", &admin, "--json", "agents", "create", "up"]).json();
    let (id, token) = (
        agent["id"].as_str().unwrap(),
        agent["token"].as_str().unwrap(),
    );

    // 32 MB that zstd cannot shrink.
    let noise = noise(32 << 20);
    let mut tar = tar::Builder::new(Vec::new());
    let mut file = tar::Header::new_gnu();
    file.set_size(noise.len() as u64);
    file.set_mode(0o644);
    tar.append_data(&mut file, "noise.bin", &noise[..]).unwrap();
    let archive = zstd::encode_all(&tar.into_inner().unwrap()[..], 1).unwrap();
    assert!(archive.len() > 30 << 20);

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!(
        "{}/api/agents/{id}/deployments/snapshots/{}",
        server.api,
        "ab".repeat(32)
    );
    let mut response = agent
        .put(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .header("Content-Type", "application/zstd")
        .send(&archive[..])
        .expect("an answer, not a broken connection");
    assert_eq!(response.status().as_u16(), 413);
    let body: serde_json::Value = response.body_mut().read_json().unwrap();
    assert_eq!(body["code"], "payload_too_large", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("1048576"),
        "{body}"
    );

    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("noise.bin"), &noise[..4 << 20]).unwrap();
    let refused = cli(&["--token", token, "snapshot", src.to_str().unwrap()]);
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(refused.stderr.contains("1048576"), "{}", refused.stderr);
    server.stop();
}

/// `slipway --server <server's API> <args>` from `cwd` with the login directory `config`.
fn cli_of(
    server: &Server,
    cwd: &std::path::Path,
    config: &std::path::Path,
    args: &[&str],
) -> crate::util::Run {
    let mut all = vec!["--server", server.api.as_str()];
    all.extend_from_slice(args);
    run_in(cwd, config, &all, &[])
}
