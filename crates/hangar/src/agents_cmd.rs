//! `hangar deploy`, `invoke`, `chat`, `agents`, `versions`, `traffic` and `sessions`: clients
//! of `/v1/agents`, `/v1/sessions` and the data plane.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::json;

use hangar_proto::agent::{
    AgentList, BuildSource, DeployRequest, ImageInfo, Session, SessionList, TrafficSplit, Version,
    VersionList, SESSION_HEADER, USER_HEADER,
};

use crate::client::{self, Client};
use crate::sandbox_cmd::{self, Remote};

#[derive(Args)]
pub struct DeployArgs {
    /// The agent's directory (holding agent.yaml).
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// Traffic for the new version as NEW_VERSION=PERCENT (e.g. `--traffic 3=10`, checked
    /// against the number the version will get) or PERCENT; the others keep their proportions.
    /// Default: 0 for a later version, 100 for the first.
    #[arg(long)]
    traffic: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct InvokeArgs {
    agent: String,
    /// The input text.
    text: String,
    /// Send to this session (default: a new one, or the one `--previous` names).
    #[arg(long)]
    session: Option<String>,
    /// Continue from this response.
    #[arg(long)]
    previous: Option<String>,
    /// The end user (isolation key) to act as.
    #[arg(long)]
    user: Option<String>,
    /// Print the whole response object instead of streaming its text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum TrafficCmd {
    /// Show the split.
    Show {
        agent: String,
        #[arg(long)]
        json: bool,
    },
    /// Set the split: `hangar traffic set notes 1=90 2=10` (weights sum to 100).
    Set {
        agent: String,
        #[arg(required = true)]
        weights: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum SessionsCmd {
    /// List an agent's sessions.
    Ls {
        agent: String,
        /// Only this isolation key's sessions.
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Create a session (and its sandbox) for an isolation key.
    Create {
        agent: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        version: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Show one session.
    Show { id: String },
    /// Run a command in a session's sandbox; exits with its exit code.
    Exec(sandbox_cmd::ExecArgs),
    /// Copy a file into (`cp LOCAL SESSION:/path`) or out of (`cp SESSION:/path LOCAL|-`) a session.
    Cp { src: String, dst: String },
    /// The agent's stdout and stderr (and hangar-init's lines), timestamped.
    Logs(crate::logs_cmd::LogsArgs),
    /// Suspend a session (scale it to zero now).
    Suspend {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume a suspended session.
    Resume { id: String },
    /// Delete sessions with everything they stored.
    Rm { ids: Vec<String> },
}

const SESSION: Remote = Remote {
    prefix: "sess_",
    base: "/v1/sessions",
    noun: "SESSION",
};

fn server_url(url: &str) -> &str {
    url.trim_end_matches('/')
}

pub async fn deploy(c: &Client, url: &str, args: DeployArgs) -> anyhow::Result<ExitCode> {
    let (spec, file) = crate::agent_yaml::load(&args.dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let traffic = match &args.traffic {
        None => None,
        Some(t) => {
            let (version, percent) = match t.split_once('=') {
                Some((v, p)) => (Some(v), p),
                None => (None, t.as_str()),
            };
            let percent = percent
                .trim_end_matches('%')
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 100)
                .with_context(|| format!("--traffic {t:?}: the percent must be 0 to 100"))?;
            if let Some(v) = version {
                let v: i64 = v
                    .trim_start_matches('v')
                    .parse()
                    .with_context(|| format!("--traffic {t:?} is not NEW_VERSION=PERCENT"))?;
                // Checked before anything is built: a share meant for another version must
                // not land on this one.
                let next = match c
                    .json::<VersionList>(
                        Method::GET,
                        &format!("/v1/agents/{}/versions", spec.name),
                        None,
                    )
                    .await
                {
                    Ok(list) => list.versions.last().map_or(1, |l| l.number + 1),
                    Err(_) => 1,
                };
                if v != next {
                    bail!(
                        "--traffic {t:?}: this deploy makes version {next} of {}, not {v}",
                        spec.name
                    );
                }
            }
            Some(percent)
        }
    };
    let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let image = match spec
        .build
        .source()
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
    {
        BuildSource::Dockerfile(dockerfile) => {
            let context = dir.join(spec.build.context.as_deref().unwrap_or("."));
            eprintln!(
                "building {} from {}…",
                spec.name,
                context.join(dockerfile).display()
            );
            let img: ImageInfo =
                crate::images_cmd::build_dir(c, &context, dockerfile, &spec.name, args.json)
                    .await?;
            img.id
        }
        BuildSource::Image(name) => name.to_owned(),
        BuildSource::Oci(path) => {
            let path = std::fs::canonicalize(dir.join(path))
                .with_context(|| format!("build.oci: {path}"))?;
            eprintln!("importing {}…", path.display());
            crate::images_cmd::import_path(c, &path, &spec.name, args.json)
                .await?
                .id
        }
        BuildSource::Rootfs(_) => bail!(
            "{}: build.rootfs is for `hangar sandbox create --image DIR`; an agent needs an image: \
             use build.dockerfile, build.image or build.oci",
            file.display()
        ),
    };
    let name = spec.name.clone();
    let req = DeployRequest {
        image,
        spec,
        traffic,
    };
    let v: Version = c
        .json(
            Method::POST,
            &format!("/v1/agents/{name}/versions"),
            Some(serde_json::to_value(&req)?),
        )
        .await?;
    let split: TrafficSplit = c
        .json(Method::GET, &format!("/v1/agents/{name}/traffic"), None)
        .await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"version": v, "traffic": split.weights}))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let base = format!("{}/agents/{name}", server_url(url));
    if v.unchanged {
        println!(
            "{name} version {} already has this image and agent.yaml; nothing deployed",
            v.number
        );
    } else {
        println!("deployed {name} version {} (image {})", v.number, v.image);
    }
    println!("traffic: {}", format_split(&split.weights));
    println!("endpoints:");
    println!("  {base}/responses      (OpenResponses; OpenAI SDK base_url = {base})");
    println!("  {base}/invocations");
    println!("try: hangar invoke {name} \"hello\"");
    Ok(ExitCode::SUCCESS)
}

fn format_split(w: &BTreeMap<i64, i64>) -> String {
    w.iter()
        .map(|(v, p)| format!("v{v}={p}%"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What one `/responses` call produced.
struct Answer {
    session: Option<String>,
    response_id: Option<String>,
}

async fn respond(
    c: &Client,
    agent: &str,
    text: &str,
    session: Option<&str>,
    previous: Option<&str>,
    user: Option<&str>,
    json_out: bool,
) -> anyhow::Result<Answer> {
    let mut body = json!({"input": text, "stream": !json_out});
    if let Some(p) = previous {
        body["previous_response_id"] = json!(p);
    }
    let mut headers = vec![("content-type", "application/json")];
    if let Some(s) = session {
        headers.push((SESSION_HEADER, s));
    }
    if let Some(u) = user {
        headers.push((USER_HEADER, u));
    }
    let resp = c
        .send(
            Method::POST,
            &format!("/agents/{agent}/responses"),
            &headers,
            client::full(serde_json::to_vec(&body)?),
        )
        .await?;
    let session = resp
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let streaming = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !resp.status().is_success() || !streaming {
        let bytes = client::check(resp).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).context("the agent's answer is not JSON")?;
        if json_out {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("{}", output_text(&v));
        }
        return Ok(Answer {
            session,
            response_id: v.get("id").and_then(|i| i.as_str()).map(str::to_owned),
        });
    }
    let mut response_id = None;
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut out = std::io::stdout();
    let mut printed = false;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let Some(payload) = line.strip_prefix(b"data:") else {
                continue;
            };
            let Ok(ev) = serde_json::from_slice::<serde_json::Value>(payload) else {
                continue;
            };
            match ev.get("type").and_then(|t| t.as_str()) {
                Some("response.output_text.delta") => {
                    if let Some(d) = ev.get("delta").and_then(|d| d.as_str()) {
                        out.write_all(d.as_bytes())?;
                        out.flush()?;
                        printed = true;
                    }
                }
                Some("response.created") | Some("response.completed") => {
                    if let Some(id) = ev.pointer("/response/id").and_then(|i| i.as_str()) {
                        response_id = Some(id.to_owned());
                    }
                }
                Some("response.failed") | Some("error") => {
                    bail!(
                        "the agent failed: {}",
                        String::from_utf8_lossy(payload).trim()
                    )
                }
                _ => {}
            }
        }
    }
    if printed {
        println!();
    }
    Ok(Answer {
        session,
        response_id,
    })
}

fn output_text(v: &serde_json::Value) -> String {
    let mut s = String::new();
    for item in v
        .get("output")
        .and_then(|o| o.as_array())
        .into_iter()
        .flatten()
    {
        for part in item
            .get("content")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(t) = part.get("text").and_then(|t| t.as_str()) {
                s.push_str(t);
            }
        }
    }
    s
}

pub async fn invoke(c: &Client, args: InvokeArgs) -> anyhow::Result<ExitCode> {
    let a = respond(
        c,
        &args.agent,
        &args.text,
        args.session.as_deref(),
        args.previous.as_deref(),
        args.user.as_deref(),
        args.json,
    )
    .await?;
    eprintln!(
        "session {}  response {}",
        a.session.as_deref().unwrap_or("-"),
        a.response_id.as_deref().unwrap_or("-")
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn chat(
    c: &Client,
    agent: &str,
    user: Option<&str>,
    mut session: Option<String>,
) -> anyhow::Result<ExitCode> {
    eprintln!("chatting with {agent}; an empty line or Ctrl-D ends");
    let mut previous: Option<String> = None;
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        let a = respond(
            c,
            agent,
            line.trim_end(),
            session.as_deref(),
            previous.as_deref(),
            user,
            false,
        )
        .await?;
        if session.is_none() {
            if let Some(s) = &a.session {
                eprintln!("(session {s})");
            }
        }
        session = a.session.or(session);
        previous = a.response_id.or(previous);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn agents(c: &Client, json_out: bool) -> anyhow::Result<ExitCode> {
    let list: AgentList = c.json(Method::GET, "/v1/agents", None).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<9} {:<20} {:<30} ENDPOINT",
        "NAME", "VERSIONS", "TRAFFIC", "SESSIONS"
    );
    for a in list.agents {
        let sessions = a
            .sessions
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{:<20} {:<9} {:<20} {:<30} {}",
            a.name,
            a.versions.len(),
            format_split(&a.traffic),
            if sessions.is_empty() {
                "-".into()
            } else {
                sessions
            },
            a.endpoint
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn versions(c: &Client, agent: &str, json_out: bool) -> anyhow::Result<ExitCode> {
    let list: VersionList = c
        .json(Method::GET, &format!("/v1/agents/{agent}/versions"), None)
        .await?;
    let split: TrafficSplit = c
        .json(Method::GET, &format!("/v1/agents/{agent}/traffic"), None)
        .await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<8} {:<8} {:<26} IMAGE", "VERSION", "TRAFFIC", "CREATED");
    for v in list.versions {
        println!(
            "{:<8} {:<8} {:<26} {}",
            v.number,
            format!("{}%", split.weights.get(&v.number).copied().unwrap_or(0)),
            v.created_at,
            v.image
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn traffic(c: &Client, cmd: TrafficCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TrafficCmd::Show { agent, json } => {
            let split: TrafficSplit = c
                .json(Method::GET, &format!("/v1/agents/{agent}/traffic"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&split)?);
            } else {
                println!("{}", format_split(&split.weights));
            }
        }
        TrafficCmd::Set { agent, weights } => {
            let mut split = BTreeMap::new();
            for w in &weights {
                let (v, p) = w
                    .split_once('=')
                    .with_context(|| format!("{w:?} is not VERSION=PERCENT"))?;
                let v: i64 = v
                    .trim_start_matches('v')
                    .parse()
                    .with_context(|| format!("{w:?}: bad version"))?;
                let p: i64 = p
                    .trim_end_matches('%')
                    .parse()
                    .with_context(|| format!("{w:?}: bad percent"))?;
                split.insert(v, p);
            }
            let split: TrafficSplit = c
                .json(
                    Method::PUT,
                    &format!("/v1/agents/{agent}/traffic"),
                    Some(json!({ "weights": split })),
                )
                .await?;
            println!("{agent}: {}", format_split(&split.weights));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_session(s: &Session) {
    println!(
        "{:<30} {:<8} {:<11} {:<20} {}",
        s.id,
        s.version,
        s.state.as_str(),
        truncate(&s.isolation_key, 20),
        s.last_activity
    );
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

pub async fn sessions(c: &Client, cmd: SessionsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SessionsCmd::Ls { agent, user, json } => {
            let path = match &user {
                Some(u) => format!(
                    "/v1/agents/{agent}/sessions?isolation_key={}",
                    hangar_proto::encode_query(u)
                ),
                None => format!("/v1/agents/{agent}/sessions"),
            };
            let list: SessionList = c.json(Method::GET, &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<30} {:<8} {:<11} {:<20} LAST ACTIVITY",
                    "ID", "VERSION", "STATE", "ISOLATION KEY"
                );
                for s in &list.sessions {
                    print_session(s);
                }
            }
        }
        SessionsCmd::Create {
            agent,
            user,
            version,
            json,
        } => {
            eprintln!("creating a session of {agent} for {user}…");
            let s: Session = c
                .json(
                    Method::POST,
                    &format!("/v1/agents/{agent}/sessions"),
                    Some(json!({"isolation_key": user, "version": version})),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{}", s.id);
                eprintln!("session {} on version {} is {}", s.id, s.version, s.state);
            }
        }
        SessionsCmd::Show { id } => {
            let s: serde_json::Value = c
                .json(Method::GET, &format!("/v1/sessions/{id}"), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        SessionsCmd::Exec(a) => return sandbox_cmd::exec(c, "/v1/sessions", a).await,
        SessionsCmd::Cp { src, dst } => sandbox_cmd::cp(c, &src, &dst, SESSION).await?,
        SessionsCmd::Logs(a) => return crate::logs_cmd::run(c, a).await,
        SessionsCmd::Suspend { id, json } => {
            let s: Session = c
                .json(Method::POST, &format!("/v1/sessions/{id}/suspend"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                match &s.checkpoint {
                    Some(cp) => println!(
                        "suspended {id}: {} checkpoint, {:.1} MiB, {} ms",
                        serde_json::to_value(cp.mode)?.as_str().unwrap_or(""),
                        cp.bytes as f64 / 1048576.0,
                        cp.took_ms
                    ),
                    None => println!("suspended {id}"),
                }
            }
        }
        SessionsCmd::Resume { id } => {
            let s: Session = c
                .json(Method::POST, &format!("/v1/sessions/{id}/resume"), None)
                .await?;
            println!("resumed {id} ({})", s.state);
        }
        SessionsCmd::Rm { ids } => {
            for id in ids {
                c.call(Method::DELETE, &format!("/v1/sessions/{id}"), None)
                    .await?;
                println!("deleted {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
