//! `hangar keys create|ls|rm`: API keys. A new key is printed once; only its hash is kept.

use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use crate::client::Client;

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Make a key: `hangar keys create ci --role deployer`.
    Create {
        name: String,
        /// admin, deployer or invoker.
        #[arg(long, value_parser = ["admin", "deployer", "invoker"])]
        role: String,
        /// The key may name the end user (`x-agent-user-id`), as a trusted front end does.
        #[arg(long)]
        assert_user: bool,
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: it stops working at once.
    Rm { id: String },
}

pub async fn run(c: &Client, cmd: KeysCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCmd::Create {
            name,
            role,
            assert_user,
            json,
        } => {
            let v: Value = c
                .json(
                    Method::POST,
                    "/v1/keys",
                    Some(json!({"name": name, "role": role, "assert_user": assert_user})),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                eprintln!(
                    "key {} ({}) made; it is shown only now:",
                    v["id"].as_str().unwrap_or(""),
                    v["role"].as_str().unwrap_or("")
                );
                println!("{}", v["key"].as_str().unwrap_or(""));
            }
        }
        KeysCmd::Ls { json } => {
            let v: Value = c.json(Method::GET, "/v1/keys", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<14} {:<9} {:<12} {:<26} {:<26} NAME",
                "ID", "ROLE", "ASSERT-USER", "CREATED", "REVOKED"
            );
            for k in v["keys"].as_array().into_iter().flatten() {
                println!(
                    "{:<14} {:<9} {:<12} {:<26} {:<26} {}",
                    k["id"].as_str().unwrap_or(""),
                    k["role"].as_str().unwrap_or(""),
                    k["assert_user"],
                    k["created_at"].as_str().unwrap_or(""),
                    k["revoked_at"].as_str().unwrap_or("-"),
                    k["name"].as_str().unwrap_or("")
                );
            }
        }
        KeysCmd::Rm { id } => {
            c.call(Method::DELETE, &format!("/v1/keys/{id}"), None)
                .await?;
            eprintln!("key {id} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}
