//! `hangar audit ls|verify`: the audit trail, and whether it is whole.

use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;
use serde_json::Value;

use crate::client::Client;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// List records, oldest first: who, what, when, on which agent and session.
    Ls {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        session: Option<String>,
        /// Only records after this position.
        #[arg(long)]
        after: Option<i64>,
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Check the whole chain: an edited, removed or reordered record is reported with its
    /// position, and the exit code is 1.
    Verify {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(c: &Client, cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Ls {
            agent,
            session,
            after,
            limit,
            json,
        } => {
            let q = crate::client::query(&[
                ("limit", Some(limit.to_string())),
                ("agent", agent),
                ("session", session),
                ("after", after.map(|a| a.to_string())),
            ]);
            let v: Value = c.json(Method::GET, &format!("/v1/audit?{q}"), None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:>6}  {:<24}  {:<16}  {:<26}  {:<12}  {:<30}  STATUS",
                "SEQ", "AT", "WHO", "WHAT", "AGENT", "SESSION"
            );
            for r in v["records"].as_array().into_iter().flatten() {
                let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
                println!(
                    "{:>6}  {:<24}  {:<16}  {:<26}  {:<12}  {:<30}  {}",
                    r["seq"],
                    s("at"),
                    s("actor"),
                    s("action"),
                    s("agent"),
                    s("session"),
                    r["detail"]["status"]
                );
            }
        }
        AuditCmd::Verify { json } => {
            let v: Value = c.json(Method::GET, "/v1/audit/verify", None).await?;
            let ok = v["ok"] == true;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if ok {
                println!(
                    "the audit trail is whole: {} records, the last is {} ({})",
                    v["records"],
                    v["last"]["seq"],
                    v["last"]["hash"].as_str().unwrap_or("")
                );
            } else {
                println!(
                    "the audit trail is broken at record {}: {}",
                    v["break"]["seq"],
                    v["break"]["problem"].as_str().unwrap_or("")
                );
            }
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
