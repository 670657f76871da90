//! Deployments, releases and versions (issue 6): production URL, rollback warm and cold,
//! failed deploys, promote, gapless swaps under load, static releases. Real sandboxes, real
//! SQLite, real HTTP through the router on a socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use slipway_core::{AgentRootTemplate, DeploymentStatus, DeploymentTarget, SpecDraft, SpecPolicy};
use slipway_engine::{Engine, EngineConfig, EventBus, Source, StartRequest};
use slipway_store::{Agent, LogQuery, RunRecord, SqliteStore, Store, VersionStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::{harness_with, Harness, Options};

/// The shared harness, with production knobs set; `H`'s own helpers take a deploy target.
struct H(Harness);

impl std::ops::Deref for H {
    type Target = Harness;
    fn deref(&self) -> &Harness {
        &self.0
    }
}

async fn harness(warm: Duration, readiness: Duration) -> Option<H> {
    let opts = Options {
        readiness_timeout: readiness,
        warm_time: Some(warm),
        drain_timeout: Some(Duration::from_secs(5)),
        ..Options::default()
    };
    harness_with(opts).await.map(H)
}

/// A python app serving its workspace; install and build append to files, so any re-run shows.
const INSTALL: &str = "echo installed >> installed.txt";
const BUILD: &str = "echo built >> built.txt";
const START: &str = "exec python3 -m http.server $PORT --bind 127.0.0.1";

impl H {
    fn app_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join("agents")
            .join(&self.agent)
            .join("config/miniapps/shop")
    }

    fn write(&self, files: &[(&str, &str)]) {
        for (name, body) in files {
            let p = self.app_dir().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
    }

    fn spec(
        &self,
        install: &str,
        build: &str,
        start: &str,
        kind: Option<&str>,
        env: &[(&str, &str)],
    ) {
        let draft = SpecDraft {
            name: Some("My Shop".into()),
            source_dir: Some("/config/miniapps/shop".into()),
            install_command: Some(install.into()),
            build_command: Some(build.into()),
            start_command: Some(start.into()),
            runtime_port: Some(8000),
            kind: kind.map(str::to_string),
            env: Some(
                env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        };
        let valid = draft.validate(&SpecPolicy::default()).unwrap();
        let spec = valid.into_spec(
            format!("spc-{}", &self.agent[4..]),
            self.agent.clone(),
            1,
            1,
        );
        self.store.upsert_spec(&spec).unwrap();
    }

    async fn start(&self, target: DeploymentTarget) -> RunRecord {
        self.engine
            .start(StartRequest {
                agent_id: self.agent.clone(),
                target: Some(target),
                note: Some("test".into()),
                source: Source::SpecSourceDir,
                operator: Some("tok-test".into()),
            })
            .await
            .unwrap()
    }

    async fn settle(&self, id: &str) -> RunRecord {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let r = self.engine.get_run(&self.agent, id).await.unwrap();
            if r.status.is_settled() || r.status == DeploymentStatus::Ready {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {id} never settled:\n{}",
                self.log(id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deploys the current files with `content` in `version.txt`; returns the ready run.
    async fn deploy(&self, content: &str, target: DeploymentTarget) -> RunRecord {
        self.write(&[("version.txt", content)]);
        let run = self.start(target).await;
        let r = self.settle(&run.id).await;
        assert_eq!(
            r.status,
            DeploymentStatus::Ready,
            "error {:?}\n{}",
            r.error,
            self.log(&run.id)
        );
        r
    }

    fn log(&self, id: &str) -> String {
        self.store
            .read_logs(id, LogQuery::default())
            .unwrap()
            .into_iter()
            .map(|l| format!("{:>5} {:<6} {}", l.line_no, l.stream, l.text))
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn prod_host(&self) -> String {
        let dep = self
            .engine
            .deployment(&self.agent)
            .await
            .unwrap()
            .expect("a deployment");
        self.engine.production_host(&dep.slug)
    }

    async fn prod_get(&self, path: &str) -> (u16, String) {
        let host = self.prod_host().await;
        request(self.app_addr, &host, path, &[])
            .await
            .expect("request")
    }

    fn active(&self) -> Option<i64> {
        self.store
            .get_deployment(&self.agent)
            .unwrap()
            .and_then(|d| d.active_version)
    }

    fn versions(&self) -> Vec<i64> {
        self.store
            .list_versions(&self.agent, 100)
            .unwrap()
            .into_iter()
            .map(|v| v.version_number)
            .collect()
    }
}

/// One HTTP/1.1 request with `Connection: close`; the whole response as (status, raw text).
async fn raw(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("response timeout"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

async fn request(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let (status, text) = raw(addr, host, path, headers).await?;
    Ok((
        status,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

fn header<'a>(raw: &'a str, name: &str) -> Option<&'a str> {
    let head = raw.split_once("\r\n\r\n").map(|(h, _)| h).unwrap_or(raw);
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_versions_rollback_warm_and_cold_from_the_release() {
    let Some(h) = harness(Duration::from_secs(600), Duration::from_secs(30)).await else {
        return;
    };
    h.spec(INSTALL, BUILD, START, None, &[]);
    let mut runs = Vec::new();
    for (n, content) in [(1, "v1"), (2, "v2"), (3, "v3")] {
        let run = h.deploy(content, DeploymentTarget::Production).await;
        assert_eq!(h.active(), Some(n));
        assert_eq!(
            h.prod_get("/version.txt").await,
            (200, content.to_string()),
            "after deploying {content}"
        );
        runs.push(run);
    }
    let dep = h.engine.deployment(&h.agent).await.unwrap().unwrap();
    assert_eq!(dep.slug, "my-shop");
    assert_eq!(
        h.engine.production_url(&dep.slug),
        format!("http://my-shop.localhost:{}/", h.app_addr.port())
    );
    let v1 = h.store.get_version(&h.agent, 1).unwrap().unwrap();
    assert_eq!(v1.run_id.as_deref(), Some(runs[0].id.as_str()));
    assert_eq!(v1.operator.as_deref(), Some("tok-test"));
    assert!(v1.snapshot_hash.is_some());
    assert_eq!(v1.release_hash.len(), 64);
    let release = h
        .store
        .get_release(&h.agent, &v1.release_id)
        .unwrap()
        .unwrap();
    assert!(release.file_count >= 3 && release.size_bytes > 0);
    assert!(h
        .dir
        .path()
        .join("artifacts")
        .join(&h.agent)
        .join("releases")
        .join(format!("{}.tar.zst", v1.release_hash))
        .is_file());

    // v2's instance is stopped: it is cold now. v1's is still warm.
    h.engine.stop(&h.agent, &runs[1].id).await.unwrap();
    assert_eq!(h.engine.live_versions(&h.agent).await, vec![1, 3]);

    let out = h
        .engine
        .rollback(
            &h.agent,
            Some(1),
            Some("tok-op".into()),
            Some("bad v3".into()),
        )
        .await
        .unwrap();
    assert!(out.warm, "v1 was warm");
    assert_eq!(h.active(), Some(1));
    assert_eq!(h.prod_get("/version.txt").await, (200, "v1".to_string()));

    let out = h
        .engine
        .rollback(&h.agent, Some(2), None, None)
        .await
        .unwrap();
    assert!(!out.warm, "v2 had been stopped");
    assert_eq!(h.active(), Some(2));
    assert_eq!(h.prod_get("/version.txt").await, (200, "v2".to_string()));
    // Booted from the release: install and build ran exactly once, at build time.
    assert_eq!(
        h.prod_get("/installed.txt").await,
        (200, "installed\n".to_string())
    );
    assert_eq!(h.prod_get("/built.txt").await, (200, "built\n".to_string()));
    // The booted instance writes to the log of the run that built v2: the boot line, then the
    // app's own output (http.server logs each request on stderr; lines are written in batches).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = h.log(&runs[1].id);
        let booted = log.find("> booting version 2 from release");
        if booted.is_some_and(|at| log[at..].contains("GET /built.txt"))
            || tokio::time::Instant::now() > deadline
        {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let boot_at = log
        .find("> booting version 2 from release")
        .unwrap_or_else(|| panic!("no boot line in v2's run log:\n{log}"));
    assert!(
        log[boot_at..].contains("GET /built.txt"),
        "the booted app's output is not in v2's run log:\n{log}"
    );

    // Default rollback target: the newest version older than the active one.
    let out = h.engine.rollback(&h.agent, None, None, None).await.unwrap();
    assert_eq!(out.version.version_number, 1);
    assert_eq!(h.prod_get("/version.txt").await, (200, "v1".to_string()));

    let history = h.store.route_history(&h.agent, 100).unwrap();
    let moves: Vec<_> = history
        .iter()
        .rev()
        .map(|c| (c.from_version, c.to_version, c.reason.as_str()))
        .collect();
    assert_eq!(
        moves,
        vec![
            (None, Some(1), "deploy"),
            (Some(1), Some(2), "deploy"),
            (Some(2), Some(3), "deploy"),
            (Some(3), Some(1), "rollback"),
            (Some(1), Some(2), "rollback"),
            (Some(2), Some(1), "rollback"),
        ]
    );
    assert_eq!(history[2].operator.as_deref(), Some("tok-op"));
    assert_eq!(history[2].note.as_deref(), Some("bad v3"));
    assert!(matches!(
        h.engine.rollback(&h.agent, Some(9), None, None).await,
        Err(slipway_engine::ProductionError::VersionNotFound { version: 9 })
    ));
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_production_deploys_leave_the_previous_version_serving() {
    let Some(h) = harness(Duration::from_secs(600), Duration::from_secs(4)).await else {
        return;
    };
    h.spec(INSTALL, BUILD, START, None, &[]);
    h.deploy("v1", DeploymentTarget::Production).await;
    assert_eq!(h.prod_get("/version.txt").await, (200, "v1".to_string()));

    // A build error.
    h.spec(INSTALL, "exit 3", START, None, &[]);
    h.write(&[("version.txt", "broken build")]);
    let run = h.start(DeploymentTarget::Production).await;
    let failed = h.settle(&run.id).await;
    assert_eq!(failed.status, DeploymentStatus::Failed);
    assert_eq!(h.prod_get("/version.txt").await, (200, "v1".to_string()));
    assert_eq!(h.active(), Some(1));

    // A readiness failure: the app never listens.
    h.spec(INSTALL, BUILD, "sleep 600", None, &[]);
    h.write(&[("version.txt", "never ready")]);
    let run = h.start(DeploymentTarget::Production).await;
    let failed = h.settle(&run.id).await;
    assert_eq!(
        failed.status,
        DeploymentStatus::Failed,
        "{:?}",
        failed.error
    );
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("ready"),
        "{:?}",
        failed.error
    );
    assert_eq!(h.prod_get("/version.txt").await, (200, "v1".to_string()));
    assert_eq!(h.active(), Some(1));
    assert_eq!(h.versions(), vec![1]);

    h.spec(INSTALL, BUILD, START, None, &[]);
    h.deploy("v2", DeploymentTarget::Production).await;
    assert_eq!(h.versions(), vec![2, 1], "numbers increase monotonically");
    assert_eq!(h.prod_get("/version.txt").await, (200, "v2".to_string()));
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_a_preview_run_without_rebuilding() {
    let Some(h) = harness(Duration::from_secs(600), Duration::from_secs(30)).await else {
        return;
    };
    h.spec(INSTALL, BUILD, START, None, &[]);
    h.deploy("v1", DeploymentTarget::Production).await;
    let preview = h.deploy("preview one", DeploymentTarget::Preview).await;
    assert_eq!(
        h.prod_get("/version.txt").await,
        (200, "v1".to_string()),
        "a preview run leaves production alone"
    );
    // The platform's own lines (the app's request lines land asynchronously, so they are left
    // out): promote must add none — no install, build or start.
    let platform_lines = |log: String| {
        log.lines()
            .filter(|l| l.contains(" system "))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let log_before = platform_lines(h.log(&preview.id));

    let v = h
        .engine
        .promote(&h.agent, &preview.id, Some("tok-op".into()), None)
        .await
        .unwrap();
    assert_eq!(v.version_number, 2);
    assert_eq!(v.origin, "promote");
    assert_eq!(v.run_id.as_deref(), Some(preview.id.as_str()));
    assert_eq!(
        h.prod_get("/version.txt").await,
        (200, "preview one".to_string())
    );
    assert_eq!(
        h.prod_get("/built.txt").await,
        (200, "built\n".to_string()),
        "no rebuild"
    );
    assert_eq!(
        platform_lines(h.log(&preview.id)),
        log_before,
        "promote runs nothing in the run"
    );
    let release = h
        .store
        .release_for_run(&h.agent, &preview.id)
        .unwrap()
        .unwrap();
    assert_eq!(v.release_id, release.id, "same release");

    // A failed run cannot be promoted.
    h.spec(INSTALL, "exit 1", START, None, &[]);
    let bad = h.start(DeploymentTarget::Preview).await;
    h.settle(&bad.id).await;
    assert!(matches!(
        h.engine.promote(&h.agent, &bad.id, None, None).await,
        Err(slipway_engine::ProductionError::NotReady { .. })
    ));
    assert_eq!(h.active(), Some(2));
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gapless_swaps_under_load() {
    // Short warm time: some rollback targets have been stopped and boot cold, so swaps happen
    // both between warm instances and onto fresh ones, while old ones drain and stop.
    let Some(h) = harness(Duration::from_secs(3), Duration::from_secs(30)).await else {
        return;
    };
    h.spec(INSTALL, BUILD, START, None, &[]);
    let first = h.deploy("v1", DeploymentTarget::Production).await;
    let host = h.prod_host().await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, host, addr) = (stop.clone(), ok.clone(), host.clone(), h.app_addr);
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match request(addr, &host, "/version.txt", &[]).await {
                    Ok((200, body)) if body.starts_with('v') => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((status, body)) => {
                        failures.push(format!("{status}: {}", &body[..body.len().min(200)]))
                    }
                    Err(e) => failures.push(format!("connection: {e}")),
                }
            }
            failures
        }));
    }
    let mut cycles = 1;
    h.deploy("v2", DeploymentTarget::Production).await;
    cycles += 1;
    h.deploy("v3", DeploymentTarget::Production).await;
    cycles += 1;
    // v1's instance goes away: the first rollback to it boots cold, under load.
    h.engine.stop(&h.agent, &first.id).await.unwrap();
    let mut cold = 0;
    let targets = [2, 3, 2, 1, 3, 2, 3, 2, 3, 1, 2, 3, 2, 3, 1, 3, 2];
    for to in targets {
        let out = h
            .engine
            .rollback(&h.agent, Some(to), None, None)
            .await
            .unwrap();
        cold += usize::from(!out.warm);
        assert_eq!(h.active(), Some(to));
        cycles += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(cycles >= 20);
    assert!(cold >= 1, "at least one swap onto a cold-booted instance");
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed requests (of {} ok), first: {:?}",
        failures.len(),
        ok.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) > 100, "the load loop barely ran");
    h.engine.shutdown().await;
}

fn sandbox_dirs(h: &H) -> Vec<String> {
    match std::fs::read_dir(h.dir.path().join("sandboxes")) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("sbx-"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_release_is_served_without_a_process() {
    let Some(h) = harness(Duration::from_secs(600), Duration::from_secs(30)).await else {
        return;
    };
    let build = "mkdir -p dist/assets && cp version.txt dist/index.html && printf 0123456789 > dist/assets/digits.txt";
    // `start` must never run for a static release.
    h.spec(
        "",
        build,
        "echo started > started.txt; exec sleep 600",
        Some("static"),
        &[],
    );
    h.deploy("<h1>static v1</h1>", DeploymentTarget::Production)
        .await;
    assert!(
        sandbox_dirs(&h).is_empty(),
        "no sandbox may remain: {:?}",
        sandbox_dirs(&h)
    );
    let host = h.prod_host().await;
    let (status, raw1) = raw(h.app_addr, &host, "/", &[]).await.unwrap();
    assert_eq!(status, 200, "{raw1}");
    assert!(raw1.ends_with("<h1>static v1</h1>"), "{raw1}");
    assert!(header(&raw1, "content-type")
        .unwrap()
        .starts_with("text/html"));
    let etag = header(&raw1, "etag").expect("an ETag").to_string();
    assert!(header(&raw1, "last-modified").is_some());
    let (status, _) = raw(h.app_addr, &host, "/", &[("If-None-Match", &etag)])
        .await
        .unwrap();
    assert_eq!(status, 304);
    let (status, ranged) = raw(
        h.app_addr,
        &host,
        "/assets/digits.txt",
        &[("Range", "bytes=2-5")],
    )
    .await
    .unwrap();
    assert_eq!(status, 206, "{ranged}");
    assert!(ranged.ends_with("\r\n\r\n2345"), "{ranged}");
    assert_eq!(header(&ranged, "content-range"), Some("bytes 2-5/10"));
    // SPA fallback is off by default.
    let (status, _) = raw(h.app_addr, &host, "/some/route", &[("Accept", "text/html")])
        .await
        .unwrap();
    assert_eq!(status, 404);

    // v2 with SPA fallback on.
    h.spec(
        "",
        build,
        "exec sleep 600",
        Some("static"),
        &[("SLIPWAY_SPA_FALLBACK", "1")],
    );
    h.deploy("<h1>static v2</h1>", DeploymentTarget::Production)
        .await;
    assert!(
        sandbox_dirs(&h).is_empty(),
        "no sandbox may remain: {:?}",
        sandbox_dirs(&h)
    );
    let (status, body) = request(h.app_addr, &host, "/some/route", &[("Accept", "text/html")])
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "<h1>static v2</h1>"));
    // Rolling back to a static version needs no boot either.
    let out = h
        .engine
        .rollback(&h.agent, Some(1), None, None)
        .await
        .unwrap();
    assert_eq!(out.version.version_number, 1);
    assert_eq!(
        request(h.app_addr, &host, "/", &[]).await.unwrap(),
        (200, "<h1>static v1</h1>".to_string())
    );
    assert!(sandbox_dirs(&h).is_empty());
    h.engine.shutdown().await;
}

#[tokio::test]
async fn garbage_collection_only_takes_unreferenced_artifacts() {
    use slipway_store::{ReleaseKind, ReleaseRecord, SnapshotRecord};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
    let artifacts =
        Arc::new(slipway_artifacts::LocalArtifactStore::new(dir.path().join("artifacts")).unwrap());
    let router = Arc::new(slipway_router::Router::new(
        slipway_router::RouterConfig::default(),
    ));
    let template = format!("{}/agents/{{agentId}}", dir.path().display());
    let config = EngineConfig::new(
        dir.path().join("cache"),
        AgentRootTemplate::parse(&template).unwrap(),
    );
    let engine = Engine::new(
        store.clone(),
        artifacts.clone(),
        Err("not needed".into()),
        router,
        config,
        EventBus::default(),
        slipway_engine::system_clock(),
    );
    let agent = "agt-aaaaaaaaaaaaaaaa";
    store
        .insert_agent(&Agent {
            id: agent.into(),
            name: "gc".into(),
            created_at: 1,
        })
        .unwrap();
    let h = |c: char| c.to_string().repeat(64);
    let touch = |p: PathBuf| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"x").unwrap();
        p
    };
    let snap_kept = touch(artifacts.path(agent, &h('a')).unwrap());
    let snap_gone = touch(artifacts.path(agent, &h('b')).unwrap());
    let rel_kept = touch(artifacts.release_path(agent, &h('c')).unwrap());
    let rel_gone = touch(artifacts.release_path(agent, &h('d')).unwrap());
    store
        .insert_snapshot(&SnapshotRecord {
            id: "snp-aaaaaaaaaaaaaaaa".into(),
            agent_id: agent.into(),
            spec_id: None,
            source_dir: "/config/miniapps/x".into(),
            artifact_path: "x".into(),
            content_hash: h('a'),
            file_count: 1,
            size_bytes: 1,
            created_at: 1,
        })
        .unwrap();
    store
        .insert_release(&ReleaseRecord {
            id: "rel-aaaaaaaaaaaaaaaa".into(),
            agent_id: agent.into(),
            run_id: None,
            content_hash: h('c'),
            artifact_sha256: h('e'),
            artifact_path: "x".into(),
            kind: ReleaseKind::Dynamic,
            static_dir: None,
            spa_fallback: false,
            start_command: "true".into(),
            runtime_port: 3000,
            file_count: 1,
            size_bytes: 1,
            created_at: 1,
        })
        .unwrap();
    // Young files are never taken, referenced or not.
    let report = engine
        .collect_garbage(Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(report.removed.is_empty());
    assert_eq!(report.kept, 4);
    let report = engine.collect_garbage(Duration::ZERO).await.unwrap();
    let mut removed = report.removed.clone();
    removed.sort();
    let mut want = vec![snap_gone.clone(), rel_gone.clone()];
    want.sort();
    assert_eq!(removed, want);
    assert!(snap_kept.is_file() && rel_kept.is_file());
    assert!(!snap_gone.exists() && !rel_gone.exists());
}
