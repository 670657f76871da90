//! `slipway login` and `slipway whoami`, and the saved login (`config.toml`, mode 0600, in
//! `$SLIPWAY_CONFIG_DIR` or the user config directory + `/slipway`).

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use slipway_api::dto::WhoamiDto;

use super::GlobalArgs;
use crate::client::Client;

/// The saved server and token.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginConfig {
    pub server: Option<String>,
    pub token: Option<String>,
}

/// Where the saved login lives.
pub fn config_dir() -> Option<PathBuf> {
    match std::env::var_os("SLIPWAY_CONFIG_DIR") {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => dirs::config_dir().map(|d| d.join("slipway")),
    }
}

impl LoginConfig {
    fn path() -> Option<PathBuf> {
        config_dir().map(|d| d.join("config.toml"))
    }

    /// The saved login, or an empty one when there is none.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed.
    pub fn load() -> anyhow::Result<Self> {
        let Some(path) = Self::path() else {
            return Ok(Self::default());
        };
        match fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .with_context(|| format!("invalid login config {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => {
                Err(e).with_context(|| format!("cannot read login config {}", path.display()))
            }
        }
    }

    /// Saves with mode 0600 (the file holds a token), in a directory created 0700.
    ///
    /// # Errors
    /// The directory or file cannot be written.
    pub fn save(&self) -> anyhow::Result<PathBuf> {
        let dir = config_dir().context("no config directory: set SLIPWAY_CONFIG_DIR")?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("config.toml");
        crate::serve::write_private_file(&path, &toml::to_string(self)?)?;
        Ok(path)
    }
}

/// Arguments of `slipway login` (the server and token are the global `--server`/`--token`).
#[derive(Debug, Clone, Args)]
pub struct LoginArgs {}

/// Verifies the token against the server, then saves both.
///
/// # Errors
/// No token given, the server refuses it, or the file cannot be written.
pub fn login(global: &GlobalArgs, _args: &LoginArgs) -> anyhow::Result<()> {
    let Some(token) = global.token.clone() else {
        bail!("give the token to save with --token TOKEN (or SLIPWAY_TOKEN)");
    };
    let server = global
        .server
        .clone()
        .unwrap_or_else(|| super::DEFAULT_SERVER.to_string());
    let client = Client::new(&server, Some(token.clone()));
    let me: WhoamiDto = client.get("/api/whoami")?;
    let path = LoginConfig {
        server: Some(server.clone()),
        token: Some(token),
    }
    .save()?;
    if global.json {
        return global.print_json(&me);
    }
    let who = me
        .agent_id
        .as_deref()
        .map_or_else(|| "operator".to_string(), |id| format!("agent {id}"));
    println!(
        "logged in to {server} as {who}; saved to {}",
        path.display()
    );
    Ok(())
}

/// # Errors
/// The server refuses the token or cannot be reached.
pub fn whoami(global: &GlobalArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    let me: WhoamiDto = client.get("/api/whoami")?;
    if global.json {
        return global.print_json(&me);
    }
    println!("server:  {}", client.server());
    println!("kind:    {}", me.kind);
    println!("token:   {}", me.token_id);
    if let Some(agent) = me.agent_id {
        println!("agent:   {agent}");
    }
    Ok(())
}
