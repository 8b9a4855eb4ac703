//! `hangar`: the server (`hangar serve`) and the CLI that talks to it over HTTP.
//!
//! This crate is wiring only: argument parsing, configuration, output formatting. Everything
//! with rules of its own lives in the library crates.

mod agent_yaml;
mod agents_cmd;
mod audit_cmd;
mod bench;
mod bench_agents;
mod bench_protocols;
mod bench_security;
mod bench_tracing;
mod check;
mod check_rules;
mod client;
mod doctor;
mod images_cmd;
mod keys_cmd;
mod logs_cmd;
mod sandbox_cmd;
mod secrets_cmd;
mod serve;
mod traces_cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hangar",
    version,
    about = "Run AI agents in production: every session in its own sandbox"
)]
struct Cli {
    /// The Hangar server the CLI talks to.
    #[arg(
        long,
        global = true,
        env = "HANGAR_URL",
        default_value = "http://127.0.0.1:7070"
    )]
    url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Hangar server.
    Serve(Box<serve::ServeArgs>),
    /// Report which sandbox drivers work on this host, and how to fix those that don't.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Deploy the agent in DIR (its agent.yaml) as a new version.
    Deploy(agents_cmd::DeployArgs),
    /// Send one message to an agent and print its answer as it streams.
    Invoke(agents_cmd::InvokeArgs),
    /// Run the OpenResponses conformance cases against a deployed agent.
    Check(check::CheckArgs),
    /// Talk to an agent interactively (one session, each turn chained on the last).
    Chat {
        agent: String,
        /// The end user (isolation key) to act as.
        #[arg(long)]
        user: Option<String>,
        /// Continue in this session.
        #[arg(long)]
        session: Option<String>,
    },
    /// List agents.
    Agents {
        #[arg(long)]
        json: bool,
    },
    /// List an agent's versions and their traffic.
    Versions {
        agent: String,
        #[arg(long)]
        json: bool,
    },
    /// Show or set an agent's traffic split.
    #[command(subcommand)]
    Traffic(agents_cmd::TrafficCmd),
    /// Sessions: list, create, show, exec, cp, logs, suspend, resume, rm.
    #[command(subcommand)]
    Sessions(agents_cmd::SessionsCmd),
    /// API keys: create, ls, rm.
    #[command(subcommand)]
    Keys(keys_cmd::KeysCmd),
    /// The audit trail: ls, verify.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCmd),
    /// Traces Hangar keeps: ls, show.
    #[command(subcommand)]
    Traces(traces_cmd::TracesCmd),
    /// An agent's secrets: set (from stdin), ls, rm.
    #[command(subcommand)]
    Secrets(secrets_cmd::SecretsCmd),
    /// Build, import and list images.
    #[command(subcommand)]
    Images(images_cmd::ImagesCmd),
    /// Manage sandboxes directly.
    #[command(subcommand)]
    Sandbox(sandbox_cmd::SandboxCmd),
    /// Measure Hangar against the raw runtimes it builds on.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Doctor { json } => doctor::run(json),
            Command::Deploy(args) => {
                agents_cmd::deploy(&client::Client::new(&cli.url)?, &cli.url, args).await
            }
            Command::Invoke(args) => {
                agents_cmd::invoke(&client::Client::new(&cli.url)?, args).await
            }
            Command::Check(args) => check::run(&client::Client::new(&cli.url)?, args).await,
            Command::Chat {
                agent,
                user,
                session,
            } => {
                agents_cmd::chat(
                    &client::Client::new(&cli.url)?,
                    &agent,
                    user.as_deref(),
                    session,
                )
                .await
            }
            Command::Agents { json } => {
                agents_cmd::agents(&client::Client::new(&cli.url)?, json).await
            }
            Command::Versions { agent, json } => {
                agents_cmd::versions(&client::Client::new(&cli.url)?, &agent, json).await
            }
            Command::Traffic(cmd) => {
                agents_cmd::traffic(&client::Client::new(&cli.url)?, cmd).await
            }
            Command::Sessions(cmd) => {
                agents_cmd::sessions(&client::Client::new(&cli.url)?, cmd).await
            }
            Command::Keys(cmd) => keys_cmd::run(&client::Client::new(&cli.url)?, cmd).await,
            Command::Audit(cmd) => audit_cmd::run(&client::Client::new(&cli.url)?, cmd).await,
            Command::Traces(cmd) => traces_cmd::run(&client::Client::new(&cli.url)?, cmd).await,
            Command::Secrets(cmd) => secrets_cmd::run(&client::Client::new(&cli.url)?, cmd).await,
            Command::Images(cmd) => images_cmd::run(&client::Client::new(&cli.url)?, cmd).await,
            Command::Sandbox(cmd) => sandbox_cmd::run(&client::Client::new(&cli.url)?, cmd).await,
            Command::Bench(cmd) => bench::run(&cli.url, cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The default data directory: `/var/lib/hangar` for root, else `$XDG_DATA_HOME/hangar`
/// or `~/.local/share/hangar`.
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/hangar");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("hangar");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/share/hangar")
}
