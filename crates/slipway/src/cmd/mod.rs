//! Client commands, one module per command group. Each takes the [`GlobalArgs`] and its own
//! arguments, talks to the server through [`Client`], and prints human text or, with `--json`,
//! the server's JSON.
//!
//! To add a command group: write `cmd/<name>.rs` with a clap `Subcommand`/`Args` type and a
//! `run(global, args)` function, add a variant to `Command` in `main.rs` and one dispatch arm.

pub mod agents;
pub mod events;
pub mod login;
pub mod runs;
pub mod spec;
pub mod trust;
pub mod versions;

use anyhow::bail;
use clap::Args;
use serde::Serialize;

use crate::client::Client;

/// The server every client command talks to when nothing else says.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

/// Flags every client command accepts.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Server URL [default: from `slipway login`, else http://127.0.0.1:7070].
    #[arg(long, global = true, env = "SLIPWAY_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// API token [default: from `slipway login`].
    #[arg(
        long,
        global = true,
        env = "SLIPWAY_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Print the server's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Act for this agent (with an operator token) [default: the token's own agent].
    #[arg(long, global = true, env = "SLIPWAY_AGENT", value_name = "ID")]
    pub agent: Option<String>,
}

impl GlobalArgs {
    /// A client for the resolved server and token: saved login < environment < flags.
    ///
    /// # Errors
    /// The saved login config is unreadable.
    pub fn client(&self) -> anyhow::Result<Client> {
        let saved = login::LoginConfig::load()?;
        let server = self
            .server
            .clone()
            .or(saved.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        let token = self.token.clone().or(saved.token);
        Ok(Client::new(&server, token))
    }

    /// The agent to act for: `--agent`, else the token's own agent.
    ///
    /// # Errors
    /// An operator token without `--agent`, or a failed `/api/whoami`.
    pub fn agent_id(&self, client: &Client) -> anyhow::Result<String> {
        if let Some(agent) = &self.agent {
            return Ok(agent.clone());
        }
        let me: slipway_api::dto::WhoamiDto = client.get("/api/whoami")?;
        match me.agent_id {
            Some(id) => Ok(id),
            None => bail!("this is an operator token: name the agent with --agent ID"),
        }
    }

    /// Prints `value` as pretty JSON.
    ///
    /// # Errors
    /// Never in practice (the values are JSON already).
    pub fn print_json(&self, value: &impl Serialize) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(value)?);
        Ok(())
    }
}

/// `2024-05-01T12:00:00Z` for milliseconds since the epoch (UTC, proleptic Gregorian).
pub fn format_millis(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::format_millis;

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_millis(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_millis(1_714_564_800_999), "2024-05-01T12:00:00Z");
        assert_eq!(format_millis(-1_000), "1969-12-31T23:59:59Z");
    }
}
