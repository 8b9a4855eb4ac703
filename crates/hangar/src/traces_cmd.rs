//! `hangar traces ls|show`: the traces Hangar keeps (its own spans and its agents').

use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;
use serde_json::Value;

use crate::client::Client;

#[derive(Subcommand)]
pub enum TracesCmd {
    /// Recent traces, newest first: the request, its agent and session, how long it took.
    Ls {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        session: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One trace as a tree of spans, each with its start (from the trace's) and duration.
    Show {
        trace_id: String,
        /// Also print each span's attributes.
        #[arg(long)]
        attributes: bool,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(c: &Client, cmd: TracesCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TracesCmd::Ls {
            agent,
            session,
            limit,
            json,
        } => {
            let q = crate::client::query(&[
                ("limit", Some(limit.to_string())),
                ("agent", agent),
                ("session", session),
            ]);
            let v: Value = c
                .json(Method::GET, &format!("/v1/traces?{q}"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<32}  {:<28}  {:<30}  {:>10}  {:>5}  STARTED",
                "TRACE", "NAME", "SESSION", "DURATION", "SPANS"
            );
            for t in v["traces"].as_array().into_iter().flatten() {
                let s = |k: &str| t[k].as_str().unwrap_or("-").to_owned();
                println!(
                    "{:<32}  {:<28}  {:<30}  {:>10}  {:>5}  {}{}",
                    s("trace_id"),
                    s("name"),
                    s("session_id"),
                    duration(t["duration_us"].as_i64().unwrap_or(0)),
                    t["spans"],
                    started(t["start_us"].as_i64().unwrap_or(0)),
                    if t["error"] == true { "  (error)" } else { "" }
                );
            }
        }
        TracesCmd::Show {
            trace_id,
            attributes,
            json,
        } => {
            let v: Value = c
                .json(
                    Method::GET,
                    &format!("/v1/traces/{}", hangar_proto::encode_query(&trace_id)),
                    None,
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let spans = v["spans"].as_array().cloned().unwrap_or_default();
            for line in tree(&spans, attributes) {
                println!("{line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The spans as indented lines, children under their parent in start order; spans whose
/// parent is not in the trace (the caller's, say) are roots.
fn tree(spans: &[Value], attributes: bool) -> Vec<String> {
    let t0 = spans
        .iter()
        .filter_map(|s| s["start_us"].as_i64())
        .min()
        .unwrap_or(0);
    let ids: std::collections::HashSet<&str> =
        spans.iter().filter_map(|s| s["span_id"].as_str()).collect();
    let is_root = |s: &Value| {
        s["parent_span_id"]
            .as_str()
            .is_none_or(|p| !ids.contains(p))
    };
    let mut out = Vec::new();
    let mut stack: Vec<(&Value, usize)> = spans
        .iter()
        .filter(|s| is_root(s))
        .rev()
        .map(|s| (s, 0))
        .collect();
    while let Some((span, depth)) = stack.pop() {
        let start = span["start_us"].as_i64().unwrap_or(0);
        let end = span["end_us"].as_i64().unwrap_or(start);
        let status = match span["status"].as_str() {
            Some("error") => "  ERROR",
            _ => "",
        };
        out.push(format!(
            "{:indent$}{}  [{}]  +{}  {}{status}",
            "",
            span["name"].as_str().unwrap_or("?"),
            span["service"].as_str().unwrap_or("?"),
            duration(start - t0),
            duration(end - start),
            indent = depth * 2
        ));
        if attributes {
            for (k, v) in span["attributes"].as_object().into_iter().flatten() {
                out.push(format!("{:indent$}{k} = {v}", "", indent = depth * 2 + 4));
            }
        }
        // Spans come in start order; the stack takes them last first.
        if let Some(id) = span["span_id"].as_str() {
            let children: Vec<&Value> = spans
                .iter()
                .filter(|c| c["parent_span_id"].as_str() == Some(id))
                .collect();
            stack.extend(children.into_iter().rev().map(|c| (c, depth + 1)));
        }
    }
    out
}

fn duration(us: i64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else {
        format!("{:.1} ms", us as f64 / 1e3)
    }
}

fn started(us: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(us.max(0) as u64),
    )
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_trace_prints_as_a_tree_under_its_roots() {
        let spans = [
            json!({"span_id": "a", "parent_span_id": "caller", "name": "invoke_agent notes:1",
                   "service": "hangar", "start_us": 1000, "end_us": 9000, "status": "unset"}),
            json!({"span_id": "b", "parent_span_id": "a", "name": "create_session",
                   "service": "hangar", "start_us": 1100, "end_us": 5000, "status": "unset"}),
            json!({"span_id": "c", "parent_span_id": "a", "name": "POST /responses",
                   "service": "hangar", "start_us": 5100, "end_us": 8900, "status": "error"}),
            json!({"span_id": "d", "parent_span_id": "c", "name": "tool",
                   "service": "notes", "start_us": 6000, "end_us": 7000, "status": "ok",
                   "attributes": {"k": 1}}),
        ];
        let lines = tree(&spans, true);
        assert_eq!(
            lines,
            [
                "invoke_agent notes:1  [hangar]  +0.0 ms  8.0 ms",
                "  create_session  [hangar]  +0.1 ms  3.9 ms",
                "  POST /responses  [hangar]  +4.1 ms  3.8 ms  ERROR",
                "    tool  [notes]  +5.0 ms  1.0 ms",
                "        k = 1",
            ]
        );
    }
}
