//! `hangar check AGENT`: the OpenResponses conformance cases against a deployed agent, through
//! its stable endpoint. Each case sends a request, and the rules in `check_rules` judge what
//! came back; what fails is printed with why, and the exit code says whether all passed.

use std::process::ExitCode;

use clap::Args;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};

use crate::check_rules::{check_response, check_stream, parse_sse, Finding};
use crate::client::{full, Client};

#[derive(Args)]
pub struct CheckArgs {
    /// The deployed agent to check.
    agent: String,
    /// The end user (isolation key) the checks act as.
    #[arg(long, default_value = "hangar-check")]
    user: String,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// One case's outcome.
struct Case {
    name: &'static str,
    findings: Vec<Finding>,
    /// Why the case did not apply, if it did not.
    skipped: Option<String>,
}

impl Case {
    fn passed(&self) -> bool {
        !self.findings.iter().any(|f| f.must)
    }
}

struct Agent<'a> {
    client: &'a Client,
    path: String,
    user: &'a str,
}

impl Agent<'_> {
    /// POSTs `body`; the status, content type and whole body.
    async fn post(&self, body: &Value) -> anyhow::Result<(u16, String, String)> {
        let resp = self
            .client
            .send(
                Method::POST,
                &self.path,
                &[
                    ("content-type", "application/json"),
                    ("x-agent-user-id", self.user),
                ],
                full(serde_json::to_vec(body)?),
            )
            .await?;
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, ctype, String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// A non-streaming case: the answer must be a completed response object.
    async fn json_case(&self, body: Value) -> anyhow::Result<(Vec<Finding>, Option<Value>)> {
        let (status, ctype, text) = self.post(&body).await?;
        let mut findings = Vec::new();
        let fail = |m: String| Finding {
            must: true,
            at: None,
            message: m,
        };
        if status != 200 {
            findings.push(fail(format!("HTTP {status}: {}", text.trim())));
            return Ok((findings, None));
        }
        if !ctype.starts_with("application/json") {
            findings.push(fail(format!(
                "content type {ctype:?}, not application/json"
            )));
        }
        let v: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                findings.push(fail(format!("the answer is not JSON: {e}")));
                return Ok((findings, None));
            }
        };
        findings.extend(check_response(&v));
        if v.get("status").and_then(Value::as_str) != Some("completed") {
            findings.push(fail(format!(
                "status is {}, not \"completed\"",
                v["status"]
            )));
        }
        if v.get("output")
            .and_then(Value::as_array)
            .is_none_or(|o| o.is_empty())
        {
            findings.push(fail("output is empty".into()));
        }
        Ok((findings, Some(v)))
    }
}

pub async fn run(client: &Client, args: CheckArgs) -> anyhow::Result<ExitCode> {
    let agent = Agent {
        client,
        path: format!("/agents/{}/responses", args.agent),
        user: &args.user,
    };
    let mut cases = Vec::new();

    let (findings, first) = agent
        .json_case(json!({"input": "hello", "stream": false}))
        .await?;
    cases.push(Case {
        name: "basic",
        findings,
        skipped: None,
    });

    let (status, ctype, text) = agent
        .post(&json!({"input": "hello", "stream": true}))
        .await?;
    let mut findings = Vec::new();
    if status != 200 {
        findings.push(Finding {
            must: true,
            at: None,
            message: format!("HTTP {status}: {}", text.trim()),
        });
    } else {
        if !ctype.starts_with("text/event-stream") {
            findings.push(Finding {
                must: true,
                at: None,
                message: format!("content type {ctype:?}, not text/event-stream"),
            });
        }
        findings.extend(check_stream(&parse_sse(&text)));
        if text.contains(hangar_api::ADDED_DONE.trim_end()) {
            findings.push(Finding {
                must: false,
                at: None,
                message: "the agent ends its stream without `data: [DONE]`; Hangar's endpoint adds it, but a client of the agent itself may wait for it".into(),
            });
        }
    }
    cases.push(Case {
        name: "streaming",
        findings,
        skipped: None,
    });

    let (findings, _) = agent
        .json_case(json!({"instructions": "Answer in one short sentence.", "input": "hello", "stream": false}))
        .await?;
    cases.push(Case {
        name: "system prompt",
        findings,
        skipped: None,
    });

    match first.as_ref().and_then(|v| v["id"].as_str()) {
        Some(id) => {
            let (mut findings, second) = agent
                .json_case(
                    json!({"input": "and again", "previous_response_id": id, "stream": false}),
                )
                .await?;
            if let Some(v) = second {
                if v.get("previous_response_id").and_then(Value::as_str) != Some(id) {
                    findings.push(Finding {
                        must: false,
                        at: None,
                        message: format!(
                            "previous_response_id is {}, not {id:?}",
                            v["previous_response_id"]
                        ),
                    });
                }
            }
            cases.push(Case {
                name: "multi-turn",
                findings,
                skipped: None,
            });
        }
        None => cases.push(Case {
            name: "multi-turn",
            findings: vec![],
            skipped: Some("the basic case gave no response id".into()),
        }),
    }

    let tools = json!([{
        "type": "function", "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }]);
    let (mut findings, answer) = agent
        .json_case(json!({"input": "What is the weather in Paris? Use get_weather with city=Paris.", "tools": tools, "stream": false}))
        .await?;
    let call = answer.as_ref().and_then(|v| {
        v["output"]
            .as_array()?
            .iter()
            .find(|i| i["type"] == "function_call")
            .cloned()
    });
    let mut skipped = None;
    if call.is_some() {
        // The same call, streamed: the function_call events in their order.
        let (status, _, text) = agent
            .post(&json!({"input": "What is the weather in Paris? Use get_weather with city=Paris.", "tools": tools, "stream": true}))
            .await?;
        if status != 200 {
            findings.push(Finding {
                must: true,
                at: None,
                message: format!("streamed: HTTP {status}: {}", text.trim()),
            });
        } else {
            let frames = parse_sse(&text);
            let mut streamed = check_stream(&frames);
            if !frames
                .iter()
                .any(|f| f.data.contains("response.function_call_arguments.done"))
            {
                streamed.push(Finding {
                    must: false,
                    at: None,
                    message:
                        "streamed, the call has no response.function_call_arguments.done event"
                            .into(),
                });
            }
            for f in &mut streamed {
                f.message = format!("streamed: {}", f.message);
            }
            findings.extend(streamed);
        }
    }
    match (call, answer) {
        (Some(call), Some(answer)) => {
            if !call["call_id"].is_string() || !call["arguments"].is_string() {
                findings.push(Finding {
                    must: true,
                    at: None,
                    message: "the function_call item needs a string call_id and arguments".into(),
                });
            }
            let (more, _) = agent
                .json_case(json!({
                    "previous_response_id": answer["id"],
                    "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "{\"temperature_c\": 21}"}],
                    "stream": false,
                }))
                .await?;
            findings.extend(more);
        }
        (None, Some(_)) => {
            findings.clear();
            skipped = Some("the agent made no function call (it offers no tools)".into());
        }
        // The request itself failed: its findings say why.
        (_, None) => {}
    }
    cases.push(Case {
        name: "tool calling",
        findings,
        skipped,
    });

    let all_passed = cases.iter().all(Case::passed);
    if args.json {
        let rows: Vec<Value> = cases
            .iter()
            .map(|c| {
                json!({
                    "case": c.name,
                    "passed": c.passed(),
                    "skipped": c.skipped,
                    "findings": c.findings.iter().map(|f| json!({"must": f.must, "event": f.at, "message": f.message})).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"agent": args.agent, "passed": all_passed, "cases": rows})
            )?
        );
    } else {
        for c in &cases {
            let mark = match (&c.skipped, c.passed()) {
                (Some(_), _) => "skip",
                (None, true) => "pass",
                (None, false) => "FAIL",
            };
            println!("{mark}  {}", c.name);
            if let Some(why) = &c.skipped {
                println!("      {why}");
            }
            for f in &c.findings {
                println!("      {f}");
            }
        }
        println!(
            "\n{}: {}",
            args.agent,
            if all_passed {
                "conforms to OpenResponses"
            } else {
                "does not conform (see FAIL above)"
            }
        );
    }
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
