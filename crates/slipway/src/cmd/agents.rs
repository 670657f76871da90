//! `slipway agents …` (operator).

use clap::Subcommand;
use slipway_api::dto::{AgentListDto, CreatedAgentDto};

use super::{format_millis, GlobalArgs};

#[derive(Debug, Clone, Subcommand)]
pub enum AgentsCommand {
    /// Create an agent and print its id and token (shown only this once).
    Create {
        /// Display name, 1-64 characters.
        name: String,
    },
    /// List every agent.
    List,
}

/// # Errors
/// The server refuses or cannot be reached.
pub fn run(global: &GlobalArgs, command: &AgentsCommand) -> anyhow::Result<()> {
    let client = global.client()?;
    match command {
        AgentsCommand::Create { name } => {
            let created: CreatedAgentDto =
                client.post("/api/agents", &serde_json::json!({ "name": name }))?;
            if global.json {
                return global.print_json(&created);
            }
            println!("id:    {}", created.id);
            println!("name:  {}", created.name);
            println!("token: {}", created.token);
            eprintln!("keep the token now: slipway stores only its hash and cannot show it again");
        }
        AgentsCommand::List => {
            let list: AgentListDto = client.get("/api/agents")?;
            if global.json {
                return global.print_json(&list);
            }
            if list.agents.is_empty() {
                println!("no agents yet: create one with `slipway agents create NAME`");
            }
            for agent in list.agents {
                println!(
                    "{}  {}  {}",
                    agent.id,
                    format_millis(agent.created_at),
                    agent.name
                );
            }
        }
    }
    Ok(())
}
