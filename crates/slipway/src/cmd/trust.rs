//! Gates, audit and signatures: `gates`, `approve`, `deny`, `audit`, `audit verify`, `verify`;
//! and [`with_gate`], which `deploy --prod` (and any other gated command) runs its action
//! through.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use ureq::http::Method;

use super::GlobalArgs;
use crate::client::{ApiFailure, Client};

/// The header a gated action takes its token in.
pub const GATE_TOKEN_HEADER: &str = "X-Slipway-Gate-Token";

#[derive(Debug, Clone, Args)]
pub struct GatesArgs {
    /// Only gates in this state (pending, approved, denied, expired, consumed, invalidated).
    #[arg(long)]
    pub state: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct GateArg {
    /// The gate id (`gte-…`).
    pub gate: String,
}

#[derive(Debug, Clone, Args)]
pub struct DenyArgs {
    /// The gate id (`gte-…`).
    pub gate: String,
    /// Why; kept with the gate and in the audit log.
    #[arg(long)]
    pub reason: String,
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    /// Only this agent's entries (operator token).
    #[arg(long = "for-agent", value_name = "ID")]
    pub for_agent: Option<String>,
    /// Only this action (`deploy.start`), or a family ending in `.` (`gate.`).
    #[arg(long)]
    pub action: Option<String>,
    /// Only entries at or after this time (ms since the epoch).
    #[arg(long)]
    pub since: Option<i64>,
    /// Only entries before this time (ms since the epoch).
    #[arg(long)]
    pub until: Option<i64>,
    /// Only entries older than this sequence number (paging).
    #[arg(long)]
    pub before: Option<u64>,
    /// At most this many entries.
    #[arg(long, default_value_t = 50)]
    pub limit: u64,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Check the audit log's hash chain; names the first bad entry (operator token).
    Verify,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The artifact file (`<contentHash>.tar.zst`); its signature is `<file>.sig`.
    pub artifact: PathBuf,
    /// The public key: a file with the JSON of `GET /api/keys` (or one key of it). Without it the
    /// server's key is fetched.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The signature file [default: <artifact>.sig].
    #[arg(long, value_name = "FILE")]
    pub signature: Option<PathBuf>,
}

fn print_gate(g: &Value) {
    let s = |k: &str| g[k].as_str().unwrap_or("-").to_string();
    println!("gate       {}", s("id"));
    println!("state      {}", s("state"));
    println!("agent      {}", s("agentId"));
    println!("action     {}", s("action"));
    println!("subject    {}", s("subject"));
    println!("target     {}", s("target"));
    println!("framework  {}", s("framework"));
    println!("build      {}", s("buildCommand"));
    println!(
        "requested  {} by {} ({})",
        super::format_millis(g["requestedAt"].as_i64().unwrap_or(0)),
        s("requestedBy"),
        s("requestedByKind")
    );
    if let Some(r) = g["reason"].as_str() {
        println!("reason     {r}");
    }
    println!("warning    {}", s("warning"));
}

pub fn gates(global: &GlobalArgs, args: &GatesArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    let path = match &args.state {
        Some(st) => format!("/api/gates?state={st}"),
        None => "/api/gates".to_string(),
    };
    let list: Value = client.get(&path)?;
    if global.json {
        return global.print_json(&list);
    }
    let gates = list["gates"].as_array().cloned().unwrap_or_default();
    if gates.is_empty() {
        println!("no gates");
        return Ok(());
    }
    println!(
        "{:<22} {:<12} {:<18} {:<22} {:<30} SUBJECT",
        "GATE", "STATE", "ACTION", "AGENT", "TARGET"
    );
    for g in gates {
        let s = |k: &str| g[k].as_str().unwrap_or("-").to_string();
        let mut subject = s("subject");
        if subject.len() > 30 {
            subject.truncate(30);
        }
        println!(
            "{:<22} {:<12} {:<18} {:<22} {:<30} {}",
            s("id"),
            s("state"),
            s("action"),
            s("agentId"),
            s("target"),
            subject
        );
    }
    Ok(())
}

pub fn approve(global: &GlobalArgs, args: &GateArg) -> anyhow::Result<()> {
    let client = global.client()?;
    let gate: Value = client.get(&format!("/api/gates/{}", args.gate))?;
    if !global.json {
        print_gate(&gate);
    }
    let decided: Value = client.post(&format!("/api/gates/{}/approve", args.gate), &json!({}))?;
    if global.json {
        return global.print_json(&decided);
    }
    println!(
        "approved: the requester can now run the action once, within {} s",
        ttl_secs(&decided)
    );
    Ok(())
}

fn ttl_secs(g: &Value) -> i64 {
    let (exp, at) = (
        g["expiresAt"].as_i64().unwrap_or(0),
        g["decidedAt"].as_i64().unwrap_or(0),
    );
    ((exp - at) / 1000).max(0)
}

pub fn deny(global: &GlobalArgs, args: &DenyArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    let decided: Value = client.post(
        &format!("/api/gates/{}/deny", args.gate),
        &json!({ "reason": args.reason }),
    )?;
    if global.json {
        return global.print_json(&decided);
    }
    println!("denied {}", args.gate);
    Ok(())
}

pub fn audit(global: &GlobalArgs, args: &AuditArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    if let Some(AuditCommand::Verify) = args.command {
        let result: Value = client.get("/api/audit/verify")?;
        if global.json {
            global.print_json(&result)?;
        }
        if result["ok"].as_bool() == Some(true) {
            if !global.json {
                println!(
                    "audit log verified: {} entries, head {}",
                    result["entries"],
                    result["headHash"].as_str().unwrap_or("-")
                );
            }
            return Ok(());
        }
        let bad = &result["firstBad"];
        bail!(
            "audit log is broken at entry {}: {}",
            bad["seq"],
            bad["reason"].as_str().unwrap_or("?")
        );
    }
    let mut query = vec![format!("limit={}", args.limit)];
    for (k, v) in [
        ("agent", args.for_agent.clone()),
        ("action", args.action.clone()),
        ("since", args.since.map(|v| v.to_string())),
        ("until", args.until.map(|v| v.to_string())),
        ("before", args.before.map(|v| v.to_string())),
    ] {
        if let Some(v) = v {
            query.push(format!("{k}={v}"));
        }
    }
    let list: Value = client.get(&format!("/api/audit?{}", query.join("&")))?;
    if global.json {
        return global.print_json(&list);
    }
    let entries = list["entries"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<6} {:<20} {:<9} {:<22} {:<20} {:<9} DETAIL",
        "SEQ", "TIME", "ACTOR", "AGENT", "ACTION", "OUTCOME"
    );
    for e in &entries {
        let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
        let detail = [
            e["target"].as_str(),
            e["runId"].as_str(),
            e["gateId"].as_str(),
            e["reason"].as_str(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
        println!(
            "{:<6} {:<20} {:<9} {:<22} {:<20} {:<9} {detail}",
            e["seq"],
            super::format_millis(e["ts"].as_i64().unwrap_or(0)),
            s("actorKind"),
            s("agentId"),
            s("action"),
            s("outcome"),
        );
    }
    if let Some(next) = list["nextBefore"].as_u64() {
        println!("(older entries: --before {next})");
    }
    Ok(())
}

/// Reads a public key file: the JSON of `GET /api/keys`, or one key object.
fn load_key(path: &Path) -> anyhow::Result<slipway_trust::PublicKeyInfo> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("key file {} is not JSON", path.display()))?;
    let key = if v["keys"].is_array() {
        v["keys"][0].clone()
    } else {
        v
    };
    serde_json::from_value(key)
        .with_context(|| format!("key file {} holds no public key", path.display()))
}

/// `slipway verify ARTIFACT`: hashes the file and checks its signature, locally.
pub fn verify(global: &GlobalArgs, args: &VerifyArgs) -> anyhow::Result<()> {
    let key = match &args.key {
        Some(path) => load_key(path)?,
        None => {
            let client = global.client()?;
            let keys: Value = client.get("/api/keys")?;
            serde_json::from_value(keys["keys"][0].clone())
                .context("the server's answer holds no public key")?
        }
    };
    let sig = match &args.signature {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a slipway signature", p.display()))?
        }
        None => slipway_trust::signing::read_signature(&args.artifact)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.artifact.display()))?,
    };
    // A file named after its content hash must be the artifact the signature names.
    let named = args
        .artifact
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".tar.zst"))
        .map(str::to_string);
    let expected = slipway_trust::Expected {
        content_hash: named.as_deref(),
        ..Default::default()
    };
    slipway_trust::signing::verify_with(&key, &args.artifact, &sig, &expected)
        .map_err(|e| anyhow::anyhow!("{} does not verify: {e}", args.artifact.display()))?;
    if global.json {
        return global.print_json(&json!({ "verified": true, "signature": sig }));
    }
    println!(
        "verified: {} {} of agent {}, sha256 {}, signed by key {}",
        sig.kind, sig.content_hash, sig.agent_id, sig.sha256, sig.key_id
    );
    Ok(())
}

/// Runs a gated action. `action(None)` first; if the server answers `gate_required`, asks for
/// the gate (`POST /api/agents/{id}/gates` — the server answers the pending gate it opened),
/// prints what an operator should run, waits for the decision (long-poll), reads the single-use
/// token and runs `action(Some(token))` once.
///
/// # Errors
/// The action's own failure, a denied or expired gate.
pub fn with_gate<T>(
    client: &Client,
    agent_id: &str,
    gate_request: &Value,
    quiet: bool,
    mut action: impl FnMut(Option<&str>) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match action(None) {
        Err(e)
            if e.downcast_ref::<ApiFailure>()
                .is_some_and(|f| f.code == "gate_required") => {}
        other => return other,
    }
    let gate: Value = client.post(&format!("/api/agents/{agent_id}/gates"), gate_request)?;
    let id = gate["id"]
        .as_str()
        .context("the server's gate has no id")?
        .to_string();
    if !quiet {
        eprintln!("this needs an operator's approval: gate {id} is pending");
        eprintln!("  action     {}", gate["action"].as_str().unwrap_or("-"));
        eprintln!("  subject    {}", gate["subject"].as_str().unwrap_or("-"));
        eprintln!("  target     {}", gate["target"].as_str().unwrap_or("-"));
        eprintln!("  framework  {}", gate["framework"].as_str().unwrap_or("-"));
        eprintln!(
            "  build      {}",
            gate["buildCommand"].as_str().unwrap_or("-")
        );
        eprintln!("  warning    {}", gate["warning"].as_str().unwrap_or("-"));
        eprintln!("an operator should run:");
        eprintln!("  slipway approve {id}");
        eprintln!("or, to refuse it:");
        eprintln!("  slipway deny {id} --reason \"...\"");
        eprintln!("waiting for the decision...");
    }
    let token = wait_for_token(client, &id)?;
    if !quiet {
        eprintln!("gate {id} approved; running the action with its single-use token");
    }
    action(Some(&token))
}

/// Long-polls the gate until it is decided; returns its token once approved.
fn wait_for_token(client: &Client, id: &str) -> anyhow::Result<String> {
    loop {
        let gate: Value = client.get(&format!("/api/gates/{id}?wait=30"))?;
        match gate["state"].as_str().unwrap_or_default() {
            "pending" => continue,
            "approved" => {
                return gate["token"]
                    .as_str()
                    .map(str::to_string)
                    .with_context(|| format!("gate {id} is approved but its token was already handed out; request a new approval"));
            }
            "denied" => bail!(
                "gate {id} was denied: {}",
                gate["reason"].as_str().unwrap_or("no reason given")
            ),
            other => bail!("gate {id} is {other}; request a new approval"),
        }
    }
}

/// POST with a JSON body and, when given, the gate token header.
///
/// # Errors
/// See [`Client::send`].
pub fn post_gated(
    client: &Client,
    path: &str,
    body: &Value,
    token: Option<&str>,
) -> anyhow::Result<Value> {
    let mut req = client
        .request(Method::POST, path)
        .header("Content-Type", "application/json");
    if let Some(t) = token {
        req = req.header(GATE_TOKEN_HEADER, t);
    }
    let mut response = client.send(req.body(serde_json::to_string(body)?)?)?;
    response
        .body_mut()
        .read_json()
        .context("the server's answer is not the expected JSON")
}
