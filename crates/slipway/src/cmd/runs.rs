//! Runs and snapshots: `deploy`, `runs`, `logs`, `stop`, `inspect`, `snapshot`, `snapshots`.
//!
//! `deploy` takes the upload path: the CLI captures the directory itself, asks the server
//! whether it already has that content hash, uploads the archive only if not, then starts a run
//! of that snapshot and follows its log until it is ready or failed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use slipway_core::detect::{detect, TreeShape};
use ureq::http::Method;

use super::GlobalArgs;
use crate::client::{ApiFailure, Client};

#[derive(Debug, Clone, Args)]
pub struct DeployArgs {
    /// Directory to deploy.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Deploy to production instead of the spec's default target.
    #[arg(long)]
    pub prod: bool,
    /// A note kept with the run.
    #[arg(long)]
    pub note: Option<String>,
    /// Return as soon as the run is created instead of following it.
    #[arg(long)]
    pub no_wait: bool,
    /// Capture the spec's sourceDir on the server (host path) instead of uploading DIR.
    #[arg(long)]
    pub server_source: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RunArg {
    /// The run id (`run-…`).
    pub run: String,
}

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// The run id (`run-…`).
    pub run: String,
    /// Keep following new lines until the run has settled.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(long)]
    pub tail: Option<u64>,
    /// Only lines containing TEXT (case-sensitive), printed with their line numbers.
    #[arg(long, value_name = "TEXT", conflicts_with = "follow")]
    pub grep: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    /// Directory to capture.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Print the content hash without contacting the server.
    #[arg(long)]
    pub hash_only: bool,
}

fn agent_path(global: &GlobalArgs, client: &Client) -> anyhow::Result<String> {
    Ok(format!(
        "/api/agents/{}/deployments",
        global.agent_id(client)?
    ))
}

fn is_not_found(err: &anyhow::Error) -> bool {
    err.downcast_ref::<ApiFailure>()
        .is_some_and(|f| f.status == 404)
}

fn spinner(msg: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("static template"),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Looks at the top of `dir` the way the detector needs.
fn tree_shape(dir: &Path) -> TreeShape {
    let mut shape = TreeShape::default();
    if let Ok(entries) = std::fs::read_dir(dir) {
        shape.root_files = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("package.json")) {
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            if let Some(scripts) = v["scripts"].as_object() {
                shape.package_scripts = scripts.keys().cloned().collect();
            }
            shape.package_main = v["main"].as_str().map(str::to_string);
        }
    }
    shape
}

/// Makes sure the agent has a spec: keeps an existing one; otherwise builds one from
/// `slipway.toml` in DIR or from auto-detection, and says what it chose.
fn ensure_spec(client: &Client, base: &str, dir: &Path, quiet: bool) -> anyhow::Result<()> {
    match client.get::<Value>(&format!("{base}/spec")) {
        Ok(spec) => {
            if !quiet {
                if let Some(note) = spec_disagreement(&spec, dir) {
                    eprintln!("{note}");
                }
            }
            return Ok(());
        }
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e),
    }
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "app".into());
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mut body = json!({ "name": name, "sourceDir": format!("/config/miniapps/{slug}") });
    if let Some(file) = super::spec::ProjectFile::load(dir, false)? {
        let fields = [
            ("name", file.name.map(Value::from)),
            ("sourceDir", file.source_dir.map(Value::from)),
            ("installCommand", file.install.map(Value::from)),
            ("buildCommand", file.build.map(Value::from)),
            ("startCommand", file.start.map(Value::from)),
            ("runtimePort", file.port.map(Value::from)),
            ("env", file.env.map(|e| json!(e))),
            ("targetDefault", file.target.map(Value::from)),
            ("kind", file.kind.map(Value::from)),
            (
                "runtimeEgressAllow",
                file.runtime_egress_allow.map(|h| json!(h)),
            ),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                body[k] = v;
            }
        }
        if !quiet {
            eprintln!(
                "no spec yet: creating one from {}",
                dir.join(super::spec::PROJECT_FILE).display()
            );
        }
    } else {
        let detection = detect(&tree_shape(dir)).with_context(|| {
            format!(
                "this agent has no spec and {} has no slipway.toml and no recognisable shape \
                 (package.json, requirements.txt, pyproject.toml or index.html); run `slipway spec set` first",
                dir.display()
            )
        })?;
        // A site with no server of its own is served by the router's file server, with no
        // process (`kind: static`). The spec still needs a start command: Python's file server,
        // used only if the kind is changed to `dynamic` later.
        let serverless = detection.start_command.is_none();
        let start = detection
            .start_command
            .clone()
            .unwrap_or_else(|| "python3 -m http.server $PORT --bind 127.0.0.1".to_string());
        body["installCommand"] = json!(detection.install_command);
        body["buildCommand"] = json!(detection.build_command);
        body["startCommand"] = json!(start);
        if serverless {
            body["kind"] = json!("static");
        }
        if !quiet {
            eprintln!("no spec yet: detected {}", detection.framework);
            for r in &detection.reasons {
                eprintln!("  {r}");
            }
            if serverless {
                eprintln!("  no server of its own → kind static: the router serves its files, no process runs");
            }
        }
    }
    let _: Value = client.put(&format!("{base}/spec"), &body)?;
    Ok(())
}

/// A note when the agent's existing spec (which the deploy uses) disagrees with what `dir`
/// says about itself: fields its `slipway.toml` sets otherwise, or, without one, a start
/// command detected from its files. `None` when they agree, or when `dir` says nothing.
fn spec_disagreement(spec: &Value, dir: &Path) -> Option<String> {
    let field = |name: &str| spec[name].as_str().unwrap_or_default().to_string();
    let shown = dir.display();
    if let Ok(Some(file)) = super::spec::ProjectFile::load(dir, false) {
        let differing: Vec<&str> = [
            ("install", "installCommand", &file.install),
            ("build", "buildCommand", &file.build),
            ("start", "startCommand", &file.start),
            ("kind", "kind", &file.kind),
        ]
        .into_iter()
        .filter(|(_, key, value)| value.as_ref().is_some_and(|v| *v != field(key)))
        .map(|(name, _, _)| name)
        .collect();
        return (!differing.is_empty()).then(|| {
            format!(
                "note: deploying with the agent's spec; {shown}/slipway.toml sets {} otherwise \
                 (`slipway spec set --dir {shown}` applies it)",
                differing.join(", ")
            )
        });
    }
    let detection = detect(&tree_shape(dir))?;
    let start = detection.start_command?;
    (start != field("startCommand")).then(|| {
        format!(
            "note: deploying with the agent's spec (start `{}`); {shown} looks like {} \
             (start `{start}`): `slipway spec set` changes the spec",
            field("startCommand"),
            detection.framework
        )
    })
}

/// The CLI's capture settings: the defaults plus a stat cache of its own
/// (`$SLIPWAY_CACHE_DIR/stat`, by default in the user's cache directory), so a tree deployed
/// from this machine before is hashed again without reading its unchanged files.
fn capture_options() -> slipway_artifacts::CaptureOptions {
    let cache = match std::env::var_os("SLIPWAY_CACHE_DIR") {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => dirs::cache_dir().map(|d| d.join("slipway")),
    };
    slipway_artifacts::CaptureOptions {
        stat_cache_dir: cache.map(|d| d.join("stat")),
        // The archive is a temporary file, uploaded and deleted: no need to wait for the disk.
        durable: false,
        ..slipway_artifacts::CaptureOptions::default()
    }
}

/// Captures `dir` to a temporary archive. Returns the captured record and the archive's path.
fn capture(
    dir: &Path,
    opts: &slipway_artifacts::CaptureOptions,
    quiet: bool,
) -> anyhow::Result<(slipway_artifacts::Captured, tempfile::TempDir)> {
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let out = tmp.path().join("snapshot.tar.zst");
    let pb = spinner(&format!("capturing {}", dir.display()), quiet);
    let captured = slipway_artifacts::capture_to_file(dir, &out, opts)
        .with_context(|| format!("cannot capture {}", dir.display()))?;
    pb.finish_and_clear();
    Ok((captured, tmp))
}

/// A local tree's snapshot, on the server.
struct Sent {
    content_hash: String,
    /// Files in the snapshot, when it was archived here (not when only hashed).
    file_count: Option<u64>,
    uploaded: bool,
}

/// Makes sure the server has the snapshot of `dir`: uploads it unless the server has that
/// content hash already. A tree this machine has hashed before is hashed first (only its
/// changed files are read) and archived only if the server lacks it; a tree never seen is
/// archived at once (the archive reads every file anyway, and fills the stat cache).
fn send_snapshot(client: &Client, base: &str, dir: &Path, quiet: bool) -> anyhow::Result<Sent> {
    let opts = capture_options();
    // A content hash the server was just asked about and lacks.
    let mut missing = None;
    if slipway_artifacts::has_stat_cache(dir, &opts) {
        let pb = spinner(&format!("hashing {}", dir.display()), quiet);
        let content_hash = slipway_artifacts::hash_tree(dir, &opts)
            .with_context(|| format!("cannot capture {}", dir.display()))?;
        pb.finish_and_clear();
        if server_has(client, base, &content_hash)? {
            return Ok(Sent {
                content_hash,
                file_count: None,
                uploaded: false,
            });
        }
        missing = Some(content_hash);
    }
    // The tree may have changed since it was hashed: what is uploaded is what was archived,
    // and a hash other than the one just asked about is asked about again.
    let (captured, _tmp) = capture(dir, &opts, quiet)?;
    let uploaded = if missing.as_deref() == Some(captured.content_hash.as_str()) {
        put_archive(client, base, &captured, quiet)?;
        true
    } else {
        upload(client, base, &captured, quiet)?
    };
    Ok(Sent {
        content_hash: captured.content_hash,
        file_count: Some(captured.file_count),
        uploaded,
    })
}

/// Whether the server has the snapshot `content_hash` for the agent.
fn server_has(client: &Client, base: &str, content_hash: &str) -> anyhow::Result<bool> {
    let path = format!("{base}/snapshots/{content_hash}");
    match client.send(client.request(Method::HEAD, &path).body(())?) {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Uploads the archive unless the server has that content hash already. Returns whether it was
/// uploaded.
fn upload(
    client: &Client,
    base: &str,
    captured: &slipway_artifacts::Captured,
    quiet: bool,
) -> anyhow::Result<bool> {
    if server_has(client, base, &captured.content_hash)? {
        return Ok(false);
    }
    put_archive(client, base, captured, quiet)?;
    Ok(true)
}

/// Uploads the captured archive, with a progress bar.
fn put_archive(
    client: &Client,
    base: &str,
    captured: &slipway_artifacts::Captured,
    quiet: bool,
) -> anyhow::Result<()> {
    let path = format!("{base}/snapshots/{}", captured.content_hash);
    let file = std::fs::File::open(&captured.artifact_path)
        .context("cannot reopen the captured archive")?;
    let size = file.metadata()?.len();
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(size)
    };
    pb.set_style(
        ProgressStyle::with_template("uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("static template"),
    );
    let mut reader = pb.wrap_read(file);
    let request = client
        .request(Method::PUT, &path)
        .header("Content-Type", "application/zstd")
        .header("Content-Length", size.to_string())
        .body(ureq::SendBody::from_reader(&mut reader))?;
    match client.send(request) {
        Ok(_) => {}
        // The server answered: its error says what was wrong.
        Err(err) if err.downcast_ref::<crate::client::ApiFailure>().is_some() => return Err(err),
        // Cut off part-way (a server refusing a large upload stops reading it at some point).
        Err(err) if pb.position() > 0 => {
            return Err(err.context(format!(
                "the server closed the connection after {} of {size} bytes of the upload; it \
                 may have refused the snapshot (too large for its limit, or out of disk space), \
                 its log says why",
                pb.position()
            )))
        }
        Err(err) => return Err(err),
    }
    pb.finish_and_clear();
    Ok(())
}

pub fn deploy(global: &GlobalArgs, args: &DeployArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    let base = agent_path(global, &client)?;
    let quiet = global.json;
    if !args.dir.is_dir() {
        bail!("{} is not a directory", args.dir.display());
    }
    ensure_spec(&client, &base, &args.dir, quiet)?;
    let mut body = json!({});
    if args.prod {
        body["target"] = json!("production");
    }
    if let Some(note) = &args.note {
        body["note"] = json!(note);
    }
    if !args.server_source {
        let sent = send_snapshot(&client, &base, &args.dir, quiet)?;
        if !quiet {
            let short = &sent.content_hash[..12];
            match (sent.file_count, sent.uploaded) {
                (Some(n), true) => eprintln!("snapshot {short} ({n} files) uploaded"),
                (Some(n), false) => eprintln!("snapshot {short} ({n} files) already on the server"),
                (None, _) => eprintln!("snapshot {short} already on the server (nothing archived)"),
            }
        }
        body["snapshot"] = json!(sent.content_hash);
    }
    // A gated target (production, by default) goes through the gate: request, wait for an
    // operator, then start once with the single-use token.
    let run = super::trust::with_gate(
        &client,
        agent_of(&base),
        &deploy_gate_request(&client, &base, args, &body),
        quiet,
        |token| super::trust::post_gated(&client, &format!("{base}/start"), &body, token),
    )?;
    let id = run["id"]
        .as_str()
        .context("the server's run has no id")?
        .to_string();
    if args.no_wait {
        return print_run(global, &run);
    }
    if !quiet {
        eprintln!("run {id} started");
    }
    let final_run = follow(&client, &base, &id, !quiet, None)?;
    let status = final_run["status"].as_str().unwrap_or_default();
    if global.json {
        global.print_json(&final_run)?;
    } else if status == "ready" && final_run["target"] == "production" {
        // A production deploy answers with the stable production URL, not the run's own.
        match super::versions::production_url(&client, &base) {
            Ok(url) => println!("{url}"),
            Err(_) => println!("{}", final_run["url"].as_str().unwrap_or_default()),
        }
    } else if status == "ready" {
        println!("{}", final_run["url"].as_str().unwrap_or_default());
    }
    if status != "ready" {
        let error = final_run["error"]
            .as_str()
            .unwrap_or("the run did not become ready");
        if !quiet {
            eprintln!("error: run {id} {status}: {error}");
        }
        std::process::exit(1);
    }
    Ok(())
}

/// The agent id of an agent's deployments path.
fn agent_of(base: &str) -> &str {
    base.trim_start_matches("/api/agents/")
        .trim_end_matches("/deployments")
}

/// The gate a deploy asks for: its action (from `--prod` or the spec's default target), the
/// snapshot it deploys, and the framework detected here.
fn deploy_gate_request(client: &Client, base: &str, args: &DeployArgs, body: &Value) -> Value {
    let production = args.prod
        || client
            .get::<Value>(&format!("{base}/spec"))
            .is_ok_and(|spec| spec["targetDefault"].as_str() == Some("production"));
    let mut req =
        json!({ "action": if production { "production_deploy" } else { "preview_deploy" } });
    if !production {
        req["target"] = json!("preview");
    }
    if let Some(hash) = body["snapshot"].as_str() {
        req["subject"] = json!(format!("snapshot:{hash}"));
    }
    if let Some(d) = detect(&tree_shape(&args.dir)) {
        req["framework"] = json!(d.framework.to_string());
    }
    req
}

/// Prints the run's log as it grows until the run has settled; returns the final run. Reads
/// the run's SSE stream (`links.stream`) and reopens a dropped one from the last line received,
/// so no line is lost or repeated.
fn follow(
    client: &Client,
    base: &str,
    id: &str,
    print: bool,
    tail: Option<u64>,
) -> anyhow::Result<Value> {
    follow_with(client, base, id, tail, |text| {
        if print {
            // The run's log goes to stderr so that stdout carries only the result (the URL, or
            // the JSON run with --json).
            eprintln!("{text}");
        }
    })
}

fn follow_with(
    client: &Client,
    base: &str,
    id: &str,
    tail: Option<u64>,
    mut out: impl FnMut(&str),
) -> anyhow::Result<Value> {
    let mut after = 0;
    if let Some(t) = tail {
        let page: Value = client.get(&format!("{base}/{id}/logs?tail={t}"))?;
        for l in page["lines"].as_array().cloned().unwrap_or_default() {
            out(l["text"].as_str().unwrap_or_default());
        }
        after = page["nextSince"].as_u64().unwrap_or(0);
    }
    super::events::follow_log(client, &format!("{base}/{id}"), after, |l| {
        out(l["text"].as_str().unwrap_or_default())
    })
}

fn print_run(global: &GlobalArgs, run: &Value) -> anyhow::Result<()> {
    if global.json {
        return global.print_json(run);
    }
    let s = |k: &str| run[k].as_str().unwrap_or("-").to_string();
    println!("run       {}", s("id"));
    println!("status    {}", s("status"));
    println!("target    {}", s("target"));
    println!("url       {}", s("url"));
    println!("snapshot  {}", s("snapshotId"));
    println!("sandbox   {}", s("sandboxId"));
    if let Some(n) = run["note"].as_str() {
        println!("note      {n}");
    }
    if let Some(e) = run["error"].as_str() {
        println!("error     {e}");
    }
    let spec = &run["specSnapshot"];
    for (label, key) in [
        ("install", "installCommand"),
        ("build", "buildCommand"),
        ("start", "startCommand"),
    ] {
        println!("{label:<9} {}", spec[key].as_str().unwrap_or(""));
    }
    println!(
        "created   {}",
        super::format_millis(run["createdAt"].as_i64().unwrap_or(0))
    );
    Ok(())
}

pub fn runs(global: &GlobalArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    let base = agent_path(global, &client)?;
    let list: Value = client.get(&base)?;
    if global.json {
        return global.print_json(&list);
    }
    let runs = list["runs"].as_array().cloned().unwrap_or_default();
    if runs.is_empty() {
        println!("no runs yet: `slipway deploy` starts one");
        return Ok(());
    }
    println!(
        "{:<22} {:<10} {:<10} {:<7} {:<20} URL",
        "RUN", "STATUS", "TARGET", "VERSION", "CREATED"
    );
    for r in runs {
        println!(
            "{:<22} {:<10} {:<10} {:<7} {:<20} {}",
            r["id"].as_str().unwrap_or_default(),
            r["status"].as_str().unwrap_or_default(),
            r["target"].as_str().unwrap_or_default(),
            r["versionNumber"]
                .as_i64()
                .map_or("-".to_string(), |n| format!("v{n}")),
            super::format_millis(r["createdAt"].as_i64().unwrap_or(0)),
            r["url"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

pub fn inspect(global: &GlobalArgs, args: &RunArg) -> anyhow::Result<()> {
    let client = global.client()?;
    let base = agent_path(global, &client)?;
    let run: Value = client.get(&format!("{base}/{}", args.run))?;
    print_run(global, &run)
}

pub fn stop(global: &GlobalArgs, args: &RunArg) -> anyhow::Result<()> {
    let client = global.client()?;
    let base = agent_path(global, &client)?;
    let run: Value = client.post(&format!("{base}/{}/stop", args.run), &json!({}))?;
    if global.json {
        return global.print_json(&run);
    }
    println!(
        "run {} {}",
        args.run,
        run["status"].as_str().unwrap_or_default()
    );
    Ok(())
}

pub fn logs(global: &GlobalArgs, args: &LogsArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    let base = agent_path(global, &client)?;
    if args.follow {
        let run = follow_with(&client, &base, &args.run, args.tail, |text| {
            println!("{text}")
        })?;
        if !global.json {
            eprintln!(
                "run {} {}",
                args.run,
                run["status"].as_str().unwrap_or_default()
            );
        }
        return Ok(());
    }
    let mut params = Vec::new();
    if let Some(t) = args.tail {
        params.push(format!("tail={t}"));
    }
    if let Some(text) = &args.grep {
        params.push(format!("q={}", super::events::encode_query(text)));
    }
    let mut query = format!("{base}/{}/logs", args.run);
    if !params.is_empty() {
        query.push_str(&format!("?{}", params.join("&")));
    }
    let page: Value = client.get(&query)?;
    if global.json {
        return global.print_json(&page);
    }
    for l in page["lines"].as_array().cloned().unwrap_or_default() {
        if args.grep.is_some() {
            println!(
                "{}:{}",
                l["line"].as_u64().unwrap_or(0),
                l["text"].as_str().unwrap_or_default()
            );
        } else {
            println!("{}", l["text"].as_str().unwrap_or_default());
        }
    }
    Ok(())
}

pub fn snapshot(global: &GlobalArgs, args: &SnapshotArgs) -> anyhow::Result<()> {
    if args.hash_only {
        let hash = slipway_artifacts::hash_tree(&args.dir, &capture_options())
            .with_context(|| format!("cannot capture {}", args.dir.display()))?;
        println!("{hash}");
        return Ok(());
    }
    let client = global.client()?;
    let base = agent_path(global, &client)?;
    let sent = send_snapshot(&client, &base, &args.dir, global.json)?;
    let record: Value = client.get(&format!("{base}/snapshots/{}", sent.content_hash))?;
    if global.json {
        return global.print_json(&record);
    }
    println!("{}", sent.content_hash);
    Ok(())
}

pub fn snapshots(global: &GlobalArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    let base = agent_path(global, &client)?;
    let list: Value = client.get(&format!("{base}/snapshots"))?;
    if global.json {
        return global.print_json(&list);
    }
    println!(
        "{:<66} {:>7} {:>12} CREATED",
        "CONTENT HASH", "FILES", "BYTES"
    );
    for s in list["snapshots"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:<66} {:>7} {:>12} {}",
            s["contentHash"].as_str().unwrap_or_default(),
            s["fileCount"].as_u64().unwrap_or(0),
            s["sizeBytes"].as_u64().unwrap_or(0),
            super::format_millis(s["createdAt"].as_i64().unwrap_or(0)),
        );
    }
    Ok(())
}
