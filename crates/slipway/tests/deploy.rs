//! `slipway deploy` end to end: the real binary, a real server, real sandboxes, real HTTP.

use std::time::{Duration, Instant};

use crate::util::*;

#[test]
fn deploy_a_static_site_then_redeploy_without_reupload() {
    if !sandboxes_available() {
        return;
    }
    let env = Env::new();
    let (_agent, token) = env.agent("deployer");
    let app = env.dir.path().join("site");
    write(
        &app,
        &[
            ("index.html", "<h1>hello from slipway</h1>"),
            ("notes.log", "ignored by default"),
        ],
    );
    let app_str = app.to_str().unwrap();

    let first = env.run(&["--token", &token, "deploy", app_str]);
    assert_eq!(first.code, 0, "{first:#?}");
    assert!(
        first.stderr.contains("detected static site"),
        "{}",
        first.stderr
    );
    assert!(first.stderr.contains("uploaded"), "{}", first.stderr);
    // No server of its own: the router serves the files, no process runs.
    assert!(first.stderr.contains("kind static"), "{}", first.stderr);
    assert!(
        first
            .stderr
            .contains("> static site: serving ./ without a process"),
        "{}",
        first.stderr
    );
    let url = first.stdout.trim().to_string();
    assert!(
        url.starts_with("http://run-") && url.contains(".preview.localhost:"),
        "{url}"
    );
    let (status, body) = get(&env.server.app, &host_of(&url), "/");
    assert_eq!(status, 200);
    assert!(body.contains("hello from slipway"), "{body}");
    // `*.log` is ignored by default: it is not in the snapshot.
    let (status, _) = get(&env.server.app, &host_of(&url), "/notes.log");
    assert_eq!(status, 404);

    // The same tree again: the server already has the snapshot; a new run, a new sandbox.
    let second = env.run(&["--token", &token, "--json", "deploy", app_str]);
    let run = second.json();
    assert_eq!(run["status"], "ready");
    assert_ne!(run["url"].as_str().unwrap(), url);
    // The CLI has hashed this tree before: it hashes it again from its stat cache, and since
    // the server has that snapshot it archives nothing.
    let quiet = env.run(&["--token", &token, "deploy", app_str]);
    assert!(
        quiet
            .stderr
            .contains("already on the server (nothing archived)"),
        "{}",
        quiet.stderr
    );

    let runs = env.run(&["--token", &token, "--json", "runs"]).json();
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    let snapshots: Vec<_> = runs
        .iter()
        .map(|r| r["snapshotId"].as_str().unwrap().to_string())
        .collect();
    assert!(runs.iter().all(|r| r["status"] == "ready"));
    let sandboxes: std::collections::BTreeSet<_> = runs
        .iter()
        .map(|r| r["sandboxId"].as_str().unwrap())
        .collect();
    assert_eq!(sandboxes.len(), 3, "every run has its own sandbox");
    let _ = snapshots;

    // Stop one run: its URL answers 410, the others keep serving.
    let id = runs[0]["id"].as_str().unwrap();
    let stopped = env.run(&["--token", &token, "--json", "stop", id]).json();
    assert_eq!(stopped["status"], "stopped");
    let (status, _) = get(
        &env.server.app,
        &host_of(runs[0]["url"].as_str().unwrap()),
        "/",
    );
    assert_eq!(status, 410);
    let (status, _) = get(
        &env.server.app,
        &host_of(runs[1]["url"].as_str().unwrap()),
        "/",
    );
    assert_eq!(status, 200);
    let logs = env.run(&["--token", &token, "logs", id]);
    assert!(logs.ok().contains("> capturing source..."), "{logs:#?}");

    // A changed file, same size, right after: the stat cache does not hide it; the new tree is
    // archived, uploaded and served.
    write(&app, &[("index.html", "<h1>HELLO FROM SLIPWAY</h1>")]);
    let changed = env.run(&["--token", &token, "deploy", app_str]);
    assert_eq!(changed.code, 0, "{changed:#?}");
    assert!(changed.stderr.contains("uploaded"), "{}", changed.stderr);
    let (status, body) = get(&env.server.app, &host_of(changed.stdout.trim()), "/");
    assert_eq!(status, 200);
    assert!(body.contains("HELLO FROM SLIPWAY"), "{body}");
}

#[test]
fn upload_and_host_capture_give_the_same_content_hash() {
    if !sandboxes_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agents_root = dir.path().join("agents");
    let template = format!("{}/{{agentId}}", agents_root.display());
    let server = Server::start(&dir.path().join("data"), &["--agent-root", &template], &[]);
    let env = EnvWith::new(&dir, &server);
    let (agent, token) = env.agent("hasher");
    let host_dir = agents_root.join(&agent).join("config/miniapps/app");
    write(
        &host_dir,
        &[("index.html", "same tree"), ("a/b.txt", "nested")],
    );
    let hash_only = env.run(&["snapshot", "--hash-only", host_dir.to_str().unwrap()]);
    let local_hash = hash_only.ok().trim().to_string();
    assert_eq!(local_hash.len(), 64);

    let uploaded = env
        .run(&[
            "--token",
            &token,
            "--json",
            "snapshot",
            host_dir.to_str().unwrap(),
        ])
        .json();
    assert_eq!(uploaded["contentHash"], local_hash.as_str());

    // The host path: the server captures sourceDir through the agent-root mapping.
    env.set_host_spec(&token);
    let run = env
        .run(&[
            "--token",
            &token,
            "--json",
            "deploy",
            "--server-source",
            host_dir.to_str().unwrap(),
        ])
        .json();
    assert_eq!(run["status"], "ready", "{run}");
    let snaps = env.run(&["--token", &token, "--json", "snapshots"]).json();
    let hashes: Vec<_> = snaps["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["contentHash"].as_str().unwrap())
        .collect();
    assert_eq!(hashes.len(), 2, "{snaps}");
    assert!(
        hashes.iter().all(|h| *h == local_hash),
        "{hashes:?} vs {local_hash}"
    );
}

#[test]
fn failing_build_exits_nonzero_with_the_error_and_log() {
    if !sandboxes_available() {
        return;
    }
    let env = Env::new();
    let (_agent, token) = env.agent("breaker");
    let app = env.dir.path().join("broken");
    write(
        &app,
        &[
            ("index.html", "x"),
            (
                "slipway.toml",
                "name = \"broken\"\nsource_dir = \"/config/miniapps/broken\"\nbuild = \"echo about to fail; exit 42\"\nstart = \"python3 -m http.server $PORT\"\n",
            ),
        ],
    );
    let out = env.run(&["--token", &token, "deploy", app.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stderr.contains("about to fail"), "{}", out.stderr);
    assert!(
        out.stderr.contains("build command exited with code 42"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "no URL on failure: {:?}", out.stdout);
}

#[test]
fn server_killed_mid_build_restarts_clean() {
    if !sandboxes_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[], &[]);
    let env = EnvWith::new(&dir, &server);
    let (_agent, token) = env.agent("crasher");
    let app = dir.path().join("slow");
    // A sleep no other process on the machine runs: the checks below find it by command line
    // (a plain `sleep 300` in some unrelated shell was once taken for a survivor).
    let sleep = format!("sleep 300.{}", std::process::id());
    let toml = format!(
        "name = \"slow\"\nsource_dir = \"/config/miniapps/slow\"\nbuild = \"echo building; {sleep}\"\nstart = \"python3 -m http.server $PORT\"\n"
    );
    write(&app, &[("index.html", "x"), ("slipway.toml", &toml)]);
    let started = env
        .run(&[
            "--token",
            &token,
            "--json",
            "deploy",
            "--no-wait",
            app.to_str().unwrap(),
        ])
        .json();
    let id = started["id"].as_str().unwrap().to_string();
    let sandbox = started["sandboxId"].as_str().unwrap().to_string();
    // Wait until the build command is running inside the sandbox.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = env.run(&["--token", &token, "logs", &id]);
        if logs.stdout.contains("building") {
            break;
        }
        assert!(Instant::now() < deadline, "build never started: {logs:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // "building" is printed just before the shell starts the sleep.
    while pids_running(&sleep).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the build's sleep should be running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.signal_and_wait(nix::sys::signal::Signal::SIGKILL);
    // Nothing of the sandbox outlives the server.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids_running(&sleep).is_empty() {
        assert!(
            Instant::now() < deadline,
            "sandbox processes survived the server:\n{}",
            describe_pids(&pids_running(&sleep))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let server2 = Server::start(&data, &[], &[]);
    let env = EnvWith::new(&dir, &server2);
    let run = env
        .run(&["--token", &token, "--json", "inspect", &id])
        .json();
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error"], "interrupted: server restarted");
    // The cgroup parent's name depends on the data directory; look under every parent.
    for base in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/memory",
    ] {
        for parent in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let leftover = parent.path().join(&sandbox);
            assert!(!leftover.exists(), "leftover cgroup {}", leftover.display());
        }
    }
    assert!(
        !data.join("sandboxes").join(&sandbox).exists(),
        "leftover sandbox state dir"
    );
    drop(server);
}

/// Pids whose command line contains `needle`.
/// What a failure needs to be explained: each process's state, parent, namespaces and cgroups,
/// and its parent's command line.
fn describe_pids(pids: &[i32]) -> String {
    let read = |path: String| std::fs::read_to_string(path).unwrap_or_default();
    pids.iter()
        .map(|pid| {
            let status = read(format!("/proc/{pid}/status"));
            let keep: Vec<&str> = status
                .lines()
                .filter(|l| {
                    ["State", "PPid", "NSpid", "SigBlk", "SigIgn"]
                        .iter()
                        .any(|k| l.starts_with(k))
                })
                .collect();
            let ppid = keep
                .iter()
                .find_map(|l| l.strip_prefix("PPid:"))
                .map(str::trim)
                .unwrap_or("?");
            let parent = read(format!("/proc/{ppid}/cmdline")).replace('\0', " ");
            let pidns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
            format!(
                "pid {pid}: {} | pid ns {pidns:?} | parent {ppid}: {parent}\ncgroups:\n{}",
                keep.join(" | "),
                read(format!("/proc/{pid}/cgroup"))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn pids_running(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !cmd.contains("pids_running") {
                out.push(pid);
            }
        }
    }
    out
}

/// The host path into a full disk: the run fails in its capturing phase with the OS reason,
/// and neither the run's error nor its log shows the server's data directory.
#[test]
fn a_host_capture_into_a_full_disk_fails_the_run_without_showing_server_paths() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_disk) = SmallDisk::mount(&dir.path().join("disk"), "8m") else {
        return;
    };
    let agents_root = dir.path().join("agents");
    let template = format!("{}/{{agentId}}", agents_root.display());
    let data = dir.path().join("disk/data");
    let server = Server::start(&data, &["--agent-root", &template], &[]);
    let env = EnvWith::new(&dir, &server);
    let (agent, token) = env.agent("filler");
    let host_dir = agents_root.join(&agent).join("config/miniapps/app");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(host_dir.join("blob.bin"), noise(12 << 20)).unwrap();
    env.set_host_spec(&token);
    let out = env.run(&["--token", &token, "--json", "deploy", "--server-source"]);
    assert_ne!(out.code, 0, "{out:?}");
    let run: serde_json::Value = serde_json::from_str(&out.stdout).expect("the run as JSON");
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("could not store the snapshot") && error.contains("No space left"),
        "{error}"
    );
    let logs = env.run(&["--token", &token, "logs", run["id"].as_str().unwrap()]);
    assert!(logs.stdout.contains("> capturing source..."), "{logs:?}");
    for shown in [error, logs.stdout.as_str()] {
        assert!(
            !shown.contains(data.to_str().unwrap()),
            "server path shown: {shown}"
        );
    }
    let leftovers: Vec<_> = walk(&data.join("artifacts"))
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    server.stop();
}

/// An agent keeps at most `--max-ready-previews` previews ready: the one that goes past it
/// stops the oldest, says so in its log, and the stopped one's URL answers 410.
#[test]
fn a_preview_past_the_limit_stops_the_agents_oldest() {
    if !sandboxes_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--max-ready-previews", "2"],
        &[],
    );
    let env = EnvWith::new(&dir, &server);
    let (_, token) = env.agent("iterating");
    let (_, other) = env.agent("neighbour");
    let site = dir.path().join("site");
    write(&site, &[("index.html", "v")]);
    let deploy = |token: &str| {
        let run = env
            .run(&["--token", token, "--json", "deploy", site.to_str().unwrap()])
            .json();
        assert_eq!(run["status"], "ready", "{run}");
        run["id"].as_str().unwrap().to_string()
    };
    let neighbours = deploy(&other);
    let first = deploy(&token);
    let second = deploy(&token);
    let third = deploy(&token);

    let status = |token: &str, id: &str| {
        env.run(&["--token", token, "--json", "inspect", id]).json()["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(status(&token, &first), "stopped");
    assert_eq!(status(&token, &second), "ready");
    assert_eq!(status(&token, &third), "ready");
    assert_eq!(
        status(&other, &neighbours),
        "ready",
        "other agents are not counted"
    );
    let logs = env.run(&["--token", &token, "logs", &third]);
    assert!(
        logs.stdout.contains(&format!(
            "> stopping {first}: an agent keeps at most 2 previews"
        )),
        "{}",
        logs.stdout
    );
    let (code, _) = get(&server.app, &format!("{first}.preview.localhost"), "/");
    assert_eq!(code, 410);
    server.stop();
}

/// A preview whose app was promoted to production is not stopped to make room: the next
/// oldest goes instead, and production keeps serving.
#[test]
fn a_preview_serving_production_is_not_stopped_to_make_room() {
    if !sandboxes_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--max-ready-previews", "2", "--gate-action", "none"],
        &[],
    );
    let env = EnvWith::new(&dir, &server);
    let (_, token) = env.agent("promoter");
    let app = dir.path().join("app");
    write(
        &app,
        &[
            ("index.html", "served"),
            (
                "slipway.toml",
                "name = \"app\"\nbuild = \"true\"\nstart = \"python3 -m http.server $PORT --bind 127.0.0.1\"\n",
            ),
        ],
    );
    let deploy = || {
        let run = env
            .run(&["--token", &token, "--json", "deploy", app.to_str().unwrap()])
            .json();
        assert_eq!(run["status"], "ready", "{run}");
        run["id"].as_str().unwrap().to_string()
    };
    let promoted = deploy();
    let production_url = env
        .run(&["--token", &token, "promote", &promoted])
        .ok()
        .trim()
        .to_string();
    let second = deploy();
    let third = deploy();
    let status = |id: &str| {
        env.run(&["--token", &token, "--json", "inspect", id])
            .json()["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(status(&promoted), "ready", "it serves production");
    assert_eq!(status(&second), "stopped");
    assert_eq!(status(&third), "ready");
    assert_eq!(
        get(&server.app, &host_of(&production_url), "/"),
        (200, "served".to_string())
    );
    server.stop();
}

/// The agent's spec is what a deploy uses; when the directory says otherwise (its
/// `slipway.toml`, or the shape of its files), the CLI says so instead of staying silent.
#[test]
fn deploying_a_directory_the_spec_does_not_fit_says_so() {
    if !sandboxes_available() {
        return;
    }
    let env = Env::new();
    let (_, token) = env.agent("mixed");
    let site = env.dir.path().join("site");
    write(&site, &[("index.html", "site")]);
    // The stderr of a deploy, whether the run succeeds or not.
    let deploy = |dir: &std::path::Path| {
        env.run(&["--token", &token, "deploy", dir.to_str().unwrap()])
            .stderr
    };
    assert!(
        !deploy(&site).contains("note:"),
        "the spec was made from it"
    );
    assert!(
        !deploy(&site).contains("note:"),
        "the same directory fits its spec"
    );

    let node = env.dir.path().join("node");
    write(
        &node,
        &[
            (
                "package.json",
                r#"{"name":"n","scripts":{"start":"node server.js"}}"#,
            ),
            ("server.js", "// unused"),
        ],
    );
    // Deployed with the static site's spec, it fails, as the note warned.
    let said = deploy(&node);
    assert!(
        said.contains("note: deploying with the agent's spec") && said.contains("looks like node"),
        "{said}"
    );
    assert!(said.contains("kind is static"), "{said}");

    let toml = env.dir.path().join("toml");
    write(
        &toml,
        &[
            ("index.html", "toml"),
            (
                "slipway.toml",
                "build = \"true\"\nstart = \"python3 app.py\"\n",
            ),
        ],
    );
    let said = deploy(&toml);
    assert!(said.contains("slipway.toml sets start otherwise"), "{said}");
}

/// Like [`Env`], over a server the test controls.
struct EnvWith {
    dir: std::path::PathBuf,
    api: String,
    admin: String,
}

impl EnvWith {
    fn new(dir: &tempfile::TempDir, server: &Server) -> Self {
        Self {
            dir: dir.path().to_path_buf(),
            api: server.api.clone(),
            admin: server.admin_token(),
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        let mut all = vec!["--server", self.api.as_str()];
        all.extend_from_slice(args);
        run_in(&self.dir, &self.dir.join("config"), &all, &[])
    }

    /// A static-site spec whose `sourceDir` is `/config/miniapps/app` (the host path).
    fn set_host_spec(&self, token: &str) {
        self.run(&[
            "--token",
            token,
            "spec",
            "set",
            "--name",
            "app",
            "--source-dir",
            "/config/miniapps/app",
            "--build",
            "true",
            "--start",
            "python3 -m http.server $PORT --bind 127.0.0.1",
        ])
        .ok();
    }

    fn agent(&self, name: &str) -> (String, String) {
        let v = self
            .run(&["--token", &self.admin, "agents", "create", name, "--json"])
            .json();
        (
            v["id"].as_str().unwrap().to_string(),
            v["token"].as_str().unwrap().to_string(),
        )
    }
}

/// The cgroup directories (any hierarchy) holding a cgroup named `name`.
fn cgroup_parents_of(name: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let roots: Vec<std::path::PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for root in std::iter::once(std::path::PathBuf::from("/sys/fs/cgroup")).chain(roots) {
        let Ok(parents) = std::fs::read_dir(&root) else {
            continue;
        };
        for parent in parents.flatten() {
            if parent.file_name().to_string_lossy().starts_with("slipway-")
                && parent.path().join(name).is_dir()
            {
                found.push(parent.path());
            }
        }
    }
    found
}

#[test]
fn a_server_stopped_with_sigterm_leaves_no_cgroup_behind() {
    if !sandboxes_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), &[], &[]);
    let env = EnvWith::new(&dir, &server);
    let (_agent, token) = env.agent("tidy");
    let app = dir.path().join("site");
    // A served site (a process in a sandbox), not a static one the router would serve.
    write(
        &app,
        &[
            ("index.html", "tidy"),
            (
                "slipway.toml",
                "name = \"tidy\"\nbuild = \"true\"\nstart = \"python3 -m http.server $PORT --bind 127.0.0.1\"\n",
            ),
        ],
    );
    let run = env
        .run(&["--token", &token, "--json", "deploy", app.to_str().unwrap()])
        .json();
    assert_eq!(run["status"], "ready", "{run}");
    let sandbox = run["sandboxId"].as_str().unwrap();
    let parents = cgroup_parents_of(sandbox);
    assert!(!parents.is_empty(), "the running sandbox has a cgroup");

    let status = server.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "{status:?}\n{}", server.stderr());
    // The run's sandbox, the spare built for the next one and the server's parent cgroups.
    let left: Vec<_> = parents.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}
