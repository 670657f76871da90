//! `slipway versions`, `slipway rollback`, `slipway promote`: the production side (issue 6).

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use super::{format_millis, GlobalArgs};
use crate::client::Client;

/// `slipway versions [N] [--history]`.
#[derive(Debug, Clone, Args)]
pub struct VersionsArgs {
    /// Show one version in detail instead of the list.
    #[arg(value_name = "N")]
    pub number: Option<i64>,
    /// Show the production route's history (who switched it, when, why) instead.
    #[arg(long, conflicts_with = "number")]
    pub history: bool,
}

/// `slipway rollback [--to N]`.
#[derive(Debug, Clone, Args)]
pub struct RollbackArgs {
    /// The version to serve [default: the newest version older than the active one].
    #[arg(long, value_name = "N")]
    pub to: Option<i64>,
    /// Why; kept in the route history.
    #[arg(long)]
    pub note: Option<String>,
}

/// `slipway promote RUN`.
#[derive(Debug, Clone, Args)]
pub struct PromoteArgs {
    /// A ready run (typically a preview) to make the new production version.
    pub run: String,
    /// Why; kept with the version and in the route history.
    #[arg(long)]
    pub note: Option<String>,
}

fn base(global: &GlobalArgs, client: &Client) -> anyhow::Result<String> {
    Ok(format!(
        "/api/agents/{}/deployments",
        global.agent_id(client)?
    ))
}

fn body(note: &Option<String>) -> Value {
    match note {
        Some(n) => json!({ "note": n }),
        None => json!({}),
    }
}

pub fn versions(global: &GlobalArgs, args: &VersionsArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    let base = base(global, &client)?;
    if args.history {
        let page: Value = client.get(&format!("{base}/routes/history"))?;
        if global.json {
            return global.print_json(&page);
        }
        println!(
            "{:<20}  {:>4} → {:<4}  {:<8}  {:<22}  NOTE",
            "WHEN", "FROM", "TO", "WHY", "WHO"
        );
        let v = |x: &Value| x.as_i64().map_or("-".to_string(), |n| n.to_string());
        for c in page["changes"].as_array().cloned().unwrap_or_default() {
            println!(
                "{:<20}  {:>4} → {:<4}  {:<8}  {:<22}  {}",
                format_millis(c["createdAt"].as_i64().unwrap_or(0)),
                v(&c["fromVersion"]),
                v(&c["toVersion"]),
                c["reason"].as_str().unwrap_or_default(),
                c["operator"].as_str().unwrap_or("-"),
                c["note"].as_str().unwrap_or(""),
            );
        }
        return Ok(());
    }
    let list: Value = client.get(&format!("{base}/versions"))?;
    if let Some(n) = args.number {
        let Some(v) = list["versions"]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["versionNumber"] == n))
            .cloned()
        else {
            bail!("version {n} not found");
        };
        if global.json {
            return global.print_json(&v);
        }
        let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
        println!(
            "version   {n}{}",
            if v["active"] == true { " (active)" } else { "" }
        );
        println!(
            "url       {}",
            list["deployment"]["productionUrl"].as_str().unwrap_or("-")
        );
        println!(
            "instance  {}",
            if v["warm"] == true {
                "running"
            } else {
                "stopped (a rollback boots it from its release)"
            }
        );
        println!("origin    {}", s("origin"));
        println!("run       {}", s("runId"));
        println!("release   {} ({})", s("releaseHash"), s("releaseId"));
        println!("snapshot  {}", s("snapshotHash"));
        println!("operator  {}", s("operator"));
        println!("note      {}", s("note"));
        println!(
            "created   {}",
            format_millis(v["createdAt"].as_i64().unwrap_or(0))
        );
        println!(
            "start     {}",
            v["spec"]["startCommand"].as_str().unwrap_or("-")
        );
        return Ok(());
    }
    if global.json {
        return global.print_json(&list);
    }
    match list["deployment"]["productionUrl"].as_str() {
        Some(url) => println!(
            "{} {url}",
            list["deployment"]["slug"].as_str().unwrap_or_default()
        ),
        None => {
            println!("no production deployment yet (slipway deploy --prod)");
            return Ok(());
        }
    }
    println!(
        "{:>7}  {:<6}  {:<7}  {:<20}  {:<22}  {:<12}  NOTE",
        "VERSION", "STATE", "ORIGIN", "CREATED", "RUN", "RELEASE"
    );
    for v in list["versions"].as_array().cloned().unwrap_or_default() {
        let state = if v["active"] == true {
            "active"
        } else if v["warm"] == true {
            "warm"
        } else {
            "-"
        };
        println!(
            "{:>7}  {:<6}  {:<7}  {:<20}  {:<22}  {:<12}  {}",
            v["versionNumber"].as_i64().unwrap_or(0),
            state,
            v["origin"].as_str().unwrap_or_default(),
            format_millis(v["createdAt"].as_i64().unwrap_or(0)),
            v["runId"].as_str().unwrap_or("-"),
            v["releaseHash"]
                .as_str()
                .map_or("-", |h| &h[..h.len().min(12)]),
            v["note"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

pub fn rollback(global: &GlobalArgs, args: &RollbackArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    let base = base(global, &client)?;
    let to = match args.to {
        Some(n) => n,
        None => {
            let list: Value = client.get(&format!("{base}/versions"))?;
            let active = list["deployment"]["activeVersion"]
                .as_i64()
                .context("production serves no version now; name one with --to N")?;
            list["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["versionNumber"].as_i64())
                .filter(|n| *n < active)
                .max()
                .with_context(|| format!("there is no version before {active} to roll back to"))?
        }
    };
    // Rollback is gated by default (issue 7): wait for an operator's approval if asked to.
    let agent = base
        .trim_start_matches("/api/agents/")
        .trim_end_matches("/deployments")
        .to_string();
    let gate = serde_json::json!({ "action": "rollback", "subject": format!("version:{to}") });
    let out: Value = super::trust::with_gate(&client, &agent, &gate, global.json, |token| {
        super::trust::post_gated(
            &client,
            &format!("{base}/versions/{to}/rollback"),
            &body(&args.note),
            token,
        )
    })?;
    if global.json {
        return global.print_json(&out);
    }
    let how = if out["changed"] == false {
        "already active"
    } else if out["wasWarm"] == true {
        "warm instance, switched at once"
    } else {
        "booted from its release"
    };
    eprintln!("production → version {to} ({how})");
    println!("{}", out["productionUrl"].as_str().unwrap_or_default());
    Ok(())
}

pub fn promote(global: &GlobalArgs, args: &PromoteArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    let base = base(global, &client)?;
    // Promote is gated by default (issue 7): wait for an operator's approval if asked to.
    let agent = base
        .trim_start_matches("/api/agents/")
        .trim_end_matches("/deployments")
        .to_string();
    let gate = serde_json::json!({ "action": "promote", "subject": format!("run:{}", args.run) });
    let v: Value = super::trust::with_gate(&client, &agent, &gate, global.json, |token| {
        super::trust::post_gated(
            &client,
            &format!("{base}/{}/promote", args.run),
            &body(&args.note),
            token,
        )
    })?;
    if global.json {
        return global.print_json(&v);
    }
    let url = production_url(&client, &base)?;
    eprintln!(
        "run {} is production version {}",
        args.run,
        v["versionNumber"].as_i64().unwrap_or(0)
    );
    println!("{url}");
    Ok(())
}

/// The agent's production URL, once it has a deployment.
///
/// # Errors
/// The request failed or there is no deployment yet.
pub fn production_url(client: &Client, base: &str) -> anyhow::Result<String> {
    let list: Value = client.get(&format!("{base}/versions"))?;
    list["deployment"]["productionUrl"]
        .as_str()
        .map(str::to_string)
        .context("the agent has no production deployment")
}
