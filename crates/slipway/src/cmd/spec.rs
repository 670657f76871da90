//! `slipway spec get|set`: the agent's deployment spec.
//!
//! `set` builds the body from, lowest first: the current spec (so unspecified fields keep their
//! values), `slipway.toml` in `--dir`, then flags. Validation is the server's alone, so the CLI
//! can never accept a spec the server refuses or the reverse.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Map, Value};
use slipway_api::dto::SpecDto;
use slipway_api::routes::spec::SPEC_FIELDS;

use super::{format_millis, GlobalArgs};
use crate::client::{ApiFailure, Client};

/// The project file read by `spec set`.
pub const PROJECT_FILE: &str = "slipway.toml";

#[derive(Debug, Clone, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process")]
pub enum SpecCommand {
    /// Print the agent's deployment spec.
    Get,
    /// Create or update the agent's deployment spec from flags and slipway.toml; fields given
    /// nowhere keep their current values.
    Set(SpecSetArgs),
}

#[derive(Debug, Clone, Default, Args)]
pub struct SpecSetArgs {
    /// App name.
    #[arg(long)]
    pub name: Option<String>,
    /// Absolute path of the app inside the agent's sandbox, under an allowed root.
    #[arg(long, value_name = "PATH")]
    pub source_dir: Option<String>,
    /// Install command, e.g. `npm ci` (empty for none).
    #[arg(long, value_name = "COMMAND")]
    pub install: Option<String>,
    /// Build command (`true` when there is nothing to build).
    #[arg(long, value_name = "COMMAND")]
    pub build: Option<String>,
    /// Start command of the app.
    #[arg(long, value_name = "COMMAND")]
    pub start: Option<String>,
    /// Port the app listens on (1024-65535).
    #[arg(long, allow_negative_numbers = true)]
    pub port: Option<i64>,
    /// Environment variable for the app; repeat for several.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,
    /// Default target of a deploy: preview or production.
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// auto, static or dynamic.
    #[arg(long)]
    pub kind: Option<String>,
    /// Host (`host` or `host:port`) the running app may reach through its egress proxy; repeat
    /// for several. Replaces the current list; by default a running app has no outbound network.
    #[arg(long = "runtime-egress-allow", value_name = "HOST")]
    pub runtime_egress_allow: Vec<String>,
    /// Directory holding slipway.toml [default: the current directory, where the file is
    /// optional].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

fn parse_env_pair(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {raw:?}")),
    }
}

/// `slipway.toml`: the spec's fields under short names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    pub name: Option<String>,
    pub source_dir: Option<String>,
    pub install: Option<String>,
    pub build: Option<String>,
    pub start: Option<String>,
    pub port: Option<i64>,
    pub env: Option<BTreeMap<String, String>>,
    pub target: Option<String>,
    pub kind: Option<String>,
    /// Hosts the running app may reach (`runtimeEgressAllow`).
    pub runtime_egress_allow: Option<Vec<String>>,
}

impl ProjectFile {
    /// Reads `dir/slipway.toml`; a missing file is an error only when `required`.
    ///
    /// # Errors
    /// Unreadable or invalid file, or a required file missing.
    pub fn load(dir: &Path, required: bool) -> anyhow::Result<Option<Self>> {
        let path = dir.join(PROJECT_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(
                toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
}

fn spec_path(agent: &str) -> String {
    format!("/api/agents/{agent}/deployments/spec")
}

/// # Errors
/// The server refuses or cannot be reached, or slipway.toml is invalid.
pub fn run(global: &GlobalArgs, command: &SpecCommand) -> anyhow::Result<()> {
    let client = global.client()?;
    let agent = global.agent_id(&client)?;
    let spec = match command {
        SpecCommand::Get => client.get::<SpecDto>(&spec_path(&agent))?,
        SpecCommand::Set(args) => set(&client, &agent, args)?,
    };
    if global.json {
        return global.print_json(&spec);
    }
    print_spec(&spec);
    Ok(())
}

fn current_spec(client: &Client, agent: &str) -> anyhow::Result<Option<SpecDto>> {
    match client.get::<SpecDto>(&spec_path(agent)) {
        Ok(spec) => Ok(Some(spec)),
        Err(e)
            if e.downcast_ref::<ApiFailure>()
                .is_some_and(|f| f.code == "spec_not_found") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn set(client: &Client, agent: &str, args: &SpecSetArgs) -> anyhow::Result<SpecDto> {
    let file = ProjectFile::load(
        args.dir.as_deref().unwrap_or(Path::new(".")),
        args.dir.is_some(),
    )?;
    let current = current_spec(client, agent)?;
    let body = merge(current.as_ref(), file.as_ref(), args)?;
    client.put(&spec_path(agent), &Value::Object(body))
}

/// One layer of spec fields under their API names; `None` leaves a field to the layer below.
type Layer = [(&'static str, Option<Value>); 8];

fn file_layer(f: &ProjectFile) -> Layer {
    [
        ("name", f.name.clone().map(Value::from)),
        ("sourceDir", f.source_dir.clone().map(Value::from)),
        ("installCommand", f.install.clone().map(Value::from)),
        ("buildCommand", f.build.clone().map(Value::from)),
        ("startCommand", f.start.clone().map(Value::from)),
        ("runtimePort", f.port.map(Value::from)),
        ("targetDefault", f.target.clone().map(Value::from)),
        ("kind", f.kind.clone().map(Value::from)),
    ]
}

fn flag_layer(f: &SpecSetArgs) -> Layer {
    [
        ("name", f.name.clone().map(Value::from)),
        ("sourceDir", f.source_dir.clone().map(Value::from)),
        ("installCommand", f.install.clone().map(Value::from)),
        ("buildCommand", f.build.clone().map(Value::from)),
        ("startCommand", f.start.clone().map(Value::from)),
        ("runtimePort", f.port.map(Value::from)),
        ("targetDefault", f.target.clone().map(Value::from)),
        ("kind", f.kind.clone().map(Value::from)),
    ]
}

/// The PUT body: current spec < project file < flags.
///
/// # Errors
/// Never in practice (the current spec is JSON already).
pub fn merge(
    current: Option<&SpecDto>,
    file: Option<&ProjectFile>,
    flags: &SpecSetArgs,
) -> anyhow::Result<Map<String, Value>> {
    let mut body = match current.map(serde_json::to_value).transpose()? {
        Some(Value::Object(mut map)) => {
            map.retain(|k, _| SPEC_FIELDS.contains(&k.as_str()));
            map
        }
        _ => Map::new(),
    };
    for layer in [file.map(file_layer), Some(flag_layer(flags))]
        .into_iter()
        .flatten()
    {
        for (key, value) in layer {
            if let Some(value) = value {
                body.insert(key.to_string(), value);
            }
        }
    }
    // env: the file's table replaces the current one; flags then set single variables.
    if let Some(env) = file.and_then(|f| f.env.as_ref()) {
        body.insert("env".into(), serde_json::to_value(env)?);
    }
    // runtimeEgressAllow: a list from the file, then from flags, replaces the current one.
    if let Some(hosts) = file.and_then(|f| f.runtime_egress_allow.as_ref()) {
        body.insert("runtimeEgressAllow".into(), serde_json::to_value(hosts)?);
    }
    if !flags.runtime_egress_allow.is_empty() {
        body.insert(
            "runtimeEgressAllow".into(),
            serde_json::to_value(&flags.runtime_egress_allow)?,
        );
    }
    if !flags.env.is_empty() {
        let env = body
            .entry("env")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(env) = env {
            for (k, v) in &flags.env {
                env.insert(k.clone(), Value::String(v.clone()));
            }
        }
    }
    Ok(body)
}

fn print_spec(spec: &SpecDto) {
    println!("id:              {}", spec.id);
    println!("agent:           {}", spec.agent_id);
    println!("name:            {}", spec.name);
    println!("sourceDir:       {}", spec.source_dir);
    println!("installCommand:  {}", spec.install_command);
    println!("buildCommand:    {}", spec.build_command);
    println!("startCommand:    {}", spec.start_command);
    println!("runtimePort:     {}", spec.runtime_port);
    println!("targetDefault:   {}", spec.target_default);
    println!("kind:            {}", spec.kind);
    if spec.runtime_egress_allow.is_empty() {
        println!("runtimeEgress:   (none)");
    } else {
        println!("runtimeEgress:   {}", spec.runtime_egress_allow.join(" "));
    }
    if spec.env.is_empty() {
        println!("env:             (none)");
    } else {
        println!("env:");
        for (k, v) in &spec.env {
            println!("  {k}={v}");
        }
    }
    println!("createdAt:       {}", format_millis(spec.created_at));
    println!("updatedAt:       {}", format_millis(spec.updated_at));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> SpecDto {
        SpecDto {
            id: "spc-aaaaaaaaaaaaaaaa".into(),
            agent_id: "agt-aaaaaaaaaaaaaaaa".into(),
            name: "old".into(),
            source_dir: "/config/miniapps/old".into(),
            install_command: "npm ci".into(),
            build_command: "npm run build".into(),
            start_command: "node s.js".into(),
            runtime_port: 3000,
            env: [("A".to_string(), "1".to_string())].into(),
            target_default: "preview".into(),
            kind: "auto".into(),
            runtime_egress_allow: vec!["old.example".into()],
            created_at: 1,
            updated_at: 2,
        }
    }

    #[test]
    fn flags_override_file_override_current() {
        let file = ProjectFile {
            name: Some("from-file".into()),
            port: Some(4000),
            build: Some("make".into()),
            ..Default::default()
        };
        let flags = SpecSetArgs {
            name: Some("from-flag".into()),
            env: vec![("B".into(), "2".into())],
            ..Default::default()
        };
        let body = merge(Some(&current()), Some(&file), &flags).unwrap();
        assert_eq!(body["name"], "from-flag");
        assert_eq!(body["runtimePort"], 4000);
        assert_eq!(body["buildCommand"], "make");
        assert_eq!(body["startCommand"], "node s.js");
        assert_eq!(body["env"], serde_json::json!({"A": "1", "B": "2"}));
        assert!(body.get("id").is_none() && body.get("createdAt").is_none());
    }

    #[test]
    fn runtime_egress_allow_comes_from_file_then_flags() {
        let body = merge(Some(&current()), None, &SpecSetArgs::default()).unwrap();
        assert_eq!(
            body["runtimeEgressAllow"],
            serde_json::json!(["old.example"])
        );
        let file: ProjectFile =
            toml::from_str("runtime_egress_allow = [\"api.example.com\", \"x.example:8443\"]")
                .unwrap();
        let body = merge(Some(&current()), Some(&file), &SpecSetArgs::default()).unwrap();
        assert_eq!(
            body["runtimeEgressAllow"],
            serde_json::json!(["api.example.com", "x.example:8443"])
        );
        let flags = SpecSetArgs {
            runtime_egress_allow: vec!["flag.example".into()],
            ..Default::default()
        };
        let body = merge(Some(&current()), Some(&file), &flags).unwrap();
        assert_eq!(
            body["runtimeEgressAllow"],
            serde_json::json!(["flag.example"])
        );
    }

    #[test]
    fn a_file_env_table_replaces_the_current_env() {
        let file = ProjectFile {
            env: Some([("C".to_string(), "3".to_string())].into()),
            ..Default::default()
        };
        let body = merge(Some(&current()), Some(&file), &SpecSetArgs::default()).unwrap();
        assert_eq!(body["env"], serde_json::json!({"C": "3"}));
    }

    #[test]
    fn env_pairs_parse() {
        assert_eq!(parse_env_pair("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env_pair("A=").unwrap(), ("A".into(), String::new()));
        assert!(parse_env_pair("A").is_err());
        assert!(parse_env_pair("=x").is_err());
    }
}
