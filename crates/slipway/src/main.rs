//! `slipway`: the one binary. `slipway serve` runs the server (control-plane API and app
//! traffic); every other command is an HTTP client of that API.
//!
//! Invariants, as absences:
//! - client commands never open the database or the data directory: everything goes through
//!   the HTTP API, so they behave the same against a remote server;
//! - the CLI validates no spec rule itself: the server's message is printed as is;
//! - no secret (admin token, saved login) is ever written with permissions wider than 0600, and
//!   no token is printed except the one `agents create` was asked for;
//! - stdout carries only command output and `serve`'s three address lines; logs go to stderr;
//! - no environment variable is set by the process: configuration layers are merged in code.
//!
//! Exit codes: 0 success, 1 general failure, 2 usage error (clap), 3 not found,
//! 4 unauthorized or forbidden.

mod client;
mod cmd;
mod logging;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::ApiFailure;
use crate::cmd::agents::AgentsCommand;
use crate::cmd::login::LoginArgs;
use crate::cmd::spec::SpecCommand;
use crate::cmd::GlobalArgs;
use crate::serve::ServeArgs;

/// Self-hosted deployments: a directory in, a sandboxed app at a stable URL out.
#[derive(Debug, Parser)]
#[command(name = "slipway", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: the API and the app-traffic router.
    Serve(ServeArgs),
    /// Create and list agents (operator token).
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Read or change the agent's deployment spec.
    #[command(subcommand)]
    Spec(SpecCommand),
    /// Check a server URL and token, then save them for later commands.
    Login(LoginArgs),
    /// Show whom the current token speaks for.
    Whoami,
    /// Deploy a directory: capture it, upload it if the server lacks it, start a run in a fresh
    /// sandbox, follow its log and print its URL when it is ready.
    Deploy(cmd::runs::DeployArgs),
    /// List the agent's runs, newest first.
    Runs,
    /// Print a run's log.
    Logs(cmd::runs::LogsArgs),
    /// Stop one run (and destroy its sandbox).
    Stop(cmd::runs::RunArg),
    /// Show one run: status, URL, snapshot, sandbox, commands, error.
    Inspect(cmd::runs::RunArg),
    /// Capture a directory and upload it as a snapshot without deploying; prints its content hash.
    Snapshot(cmd::runs::SnapshotArgs),
    /// List the agent's snapshots, newest first.
    Snapshots,
    /// List the production versions (which is active, which are warm); `versions N` shows one,
    /// `versions --history` the production route's history.
    Versions(cmd::versions::VersionsArgs),
    /// Point the production URL at an older version (default: the previous one). No rebuild.
    Rollback(cmd::versions::RollbackArgs),
    /// Make a ready (preview) run the new production version, without rebuilding.
    Promote(cmd::versions::PromoteArgs),
    /// Print live events (runs, logs, snapshots) as they happen; `--json` for one JSON object
    /// per line.
    Events(cmd::events::EventsArgs),
    /// List gates (approval requests for privileged actions), pending first.
    Gates(cmd::trust::GatesArgs),
    /// Approve a pending gate (operator token); its requester then runs the action once.
    Approve(cmd::trust::GateArg),
    /// Deny a pending gate (operator token).
    Deny(cmd::trust::DenyArgs),
    /// Read the audit log (`audit verify` checks its hash chain).
    Audit(cmd::trust::AuditArgs),
    /// Verify an artifact's sha256 and signature offline, against the server's public key or a
    /// key file.
    Verify(cmd::trust::VerifyArgs),
}

fn main() -> ExitCode {
    // The sandbox helper subcommands run the privileged set-up of a sandbox. They must be
    // dispatched before anything else: no thread, no runtime, no allocation-heavy parsing.
    if let Some(sub) = std::env::args().nth(1) {
        if slipway_sandbox::is_helper_subcommand(&sub) {
            let args: Vec<String> = std::env::args().skip(1).collect();
            slipway_sandbox::helper_main(&args);
        }
    }
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve(args) => serve::run(args.clone()),
        Command::Agents(command) => cmd::agents::run(&cli.global, command),
        Command::Spec(command) => cmd::spec::run(&cli.global, command),
        Command::Login(args) => cmd::login::login(&cli.global, args),
        Command::Whoami => cmd::login::whoami(&cli.global),
        Command::Deploy(args) => cmd::runs::deploy(&cli.global, args),
        Command::Runs => cmd::runs::runs(&cli.global),
        Command::Logs(args) => cmd::runs::logs(&cli.global, args),
        Command::Stop(args) => cmd::runs::stop(&cli.global, args),
        Command::Inspect(args) => cmd::runs::inspect(&cli.global, args),
        Command::Snapshot(args) => cmd::runs::snapshot(&cli.global, args),
        Command::Snapshots => cmd::runs::snapshots(&cli.global),
        Command::Versions(args) => cmd::versions::versions(&cli.global, args),
        Command::Rollback(args) => cmd::versions::rollback(&cli.global, args),
        Command::Promote(args) => cmd::versions::promote(&cli.global, args),
        Command::Events(args) => cmd::events::run(&cli.global, args),
        Command::Gates(args) => cmd::trust::gates(&cli.global, args),
        Command::Approve(args) => cmd::trust::approve(&cli.global, args),
        Command::Deny(args) => cmd::trust::deny(&cli.global, args),
        Command::Audit(args) => cmd::trust::audit(&cli.global, args),
        Command::Verify(args) => cmd::trust::verify(&cli.global, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(failure) = err.downcast_ref::<ApiFailure>() {
                eprintln!("error: {failure}");
                ExitCode::from(failure.exit_code())
            } else {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        }
    }
}
