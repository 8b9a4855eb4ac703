//! `hangar secrets set|ls|rm`: an agent's secrets. Values are read from stdin (never from the
//! command line, where `ps` and shell history would keep them) and are never printed.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use hyper::Method;

use hangar_proto::agent::SecretInfo;

use crate::client::{check, full, Client};

#[derive(Subcommand)]
pub enum SecretsCmd {
    /// Set a secret from stdin: `hangar secrets set notes bot-password < file`.
    Set {
        agent: String,
        name: String,
        /// A host the egress proxy may send it to for `network.inject` (repeatable;
        /// `*.domain` and `:port` as in `network.allow`). Without one, only Hangar itself
        /// uses the secret.
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
    },
    /// List an agent's secrets (names and when they were set; never values).
    Ls {
        agent: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a secret.
    Rm { agent: String, name: String },
}

pub async fn run(c: &Client, cmd: SecretsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SecretsCmd::Set { agent, name, hosts } => {
            let mut value = Vec::new();
            std::io::stdin()
                .take(hangar_agents::MAX_SECRET as u64 + 1)
                .read_to_end(&mut value)
                .context("reading the secret from stdin")?;
            // A value typed or echoed ends with a newline that is not part of it.
            if value.ends_with(b"\n") {
                value.pop();
                if value.ends_with(b"\r") {
                    value.pop();
                }
            }
            let resp = c
                .send(
                    Method::PUT,
                    &if hosts.is_empty() {
                        format!("/v1/agents/{agent}/secrets/{name}")
                    } else {
                        format!(
                            "/v1/agents/{agent}/secrets/{name}?hosts={}",
                            hosts.join(",")
                        )
                    },
                    &[("content-type", "application/octet-stream")],
                    full(value),
                )
                .await?;
            let info: SecretInfo = serde_json::from_slice(&check(resp).await?)?;
            eprintln!("secret {} of {agent} set", info.name);
        }
        SecretsCmd::Ls { agent, json } => {
            let v: serde_json::Value = c
                .json(Method::GET, &format!("/v1/agents/{agent}/secrets"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let list: Vec<SecretInfo> = serde_json::from_value(v["secrets"].clone())?;
                println!("{:<32} {:<24} HOSTS", "NAME", "UPDATED");
                for s in list {
                    println!("{:<32} {:<24} {}", s.name, s.updated_at, s.hosts.join(","));
                }
            }
        }
        SecretsCmd::Rm { agent, name } => {
            c.call(
                Method::DELETE,
                &format!("/v1/agents/{agent}/secrets/{name}"),
                None,
            )
            .await?;
            eprintln!("secret {name} of {agent} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}
