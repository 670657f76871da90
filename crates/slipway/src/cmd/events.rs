//! Live streams: `slipway events` (the WebSocket event stream) and the SSE log follower used by
//! `slipway logs -f` and `slipway deploy`.
//!
//! Both are synchronous, like the rest of the CLI: the WebSocket client is `tungstenite` over a
//! plain `TcpStream` (so `http://` servers only; for `https://` put a TLS-terminating proxy's
//! plain port or use the API directly), and the SSE reader streams a `ureq` response body line
//! by line.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;
use ureq::http::Method;

use super::GlobalArgs;
use crate::client::{ApiFailure, Client};

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    /// Only this run's events.
    #[arg(long)]
    pub run: Option<String>,
    /// With an operator token: every agent's events (the default is `--agent` or all agents).
    #[arg(long)]
    pub all: bool,
}

/// Percent-encodes a query value.
pub fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `slipway events`: prints each event as it happens until the server closes the stream.
pub fn run(global: &GlobalArgs, args: &EventsArgs) -> anyhow::Result<()> {
    let client = global.client()?;
    let mut query = Vec::new();
    if let Some(agent) = global.agent.as_ref().filter(|_| !args.all) {
        query.push(format!("agent={}", encode_query(agent)));
    }
    if let Some(run) = &args.run {
        query.push(format!("run={}", encode_query(run)));
    }
    let path = if query.is_empty() {
        "/api/events".to_string()
    } else {
        format!("/api/events?{}", query.join("&"))
    };
    let server = client.server();
    let Some(rest) = server.strip_prefix("http://") else {
        bail!(
            "`slipway events` speaks plain WebSocket only (ws://); {server} is not an http:// URL"
        );
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let mut request = format!("ws://{authority}{path}")
        .into_client_request()
        .context("cannot build the WebSocket request")?;
    // The same Authorization header as every other request of this client.
    let template = client.request(Method::GET, &path).body(())?;
    if let Some(auth) = template.headers().get("authorization") {
        request.headers_mut().insert("authorization", auth.clone());
    }
    let stream = std::net::TcpStream::connect(authority)
        .with_context(|| format!("cannot reach the slipway server at {server}"))?;
    let (mut socket, _) = match tungstenite::client(request, stream) {
        Ok(ok) => ok,
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            return Err(ApiFailure {
                status,
                code: v["code"].as_str().unwrap_or("http_error").to_string(),
                message: v["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("the server answered {status}")),
            }
            .into());
        }
        Err(e) => {
            return Err(anyhow::anyhow!(
                "WebSocket handshake with {server} failed: {e}"
            ))
        }
    };
    loop {
        let message = match socket.read() {
            Ok(m) => m,
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(())
            }
            Err(e) => return Err(anyhow::anyhow!("the event stream broke: {e}")),
        };
        match message {
            Message::Text(text) => {
                if global.json {
                    println!("{}", text.as_str());
                } else {
                    let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    for line in describe(&v) {
                        println!("{line}");
                    }
                }
            }
            Message::Close(_) => return Ok(()),
            _ => {}
        }
    }
}

/// Human lines for one event.
fn describe(v: &Value) -> Vec<String> {
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    let kind = s(&v["type"]);
    let p = &v["payload"];
    match kind.as_str() {
        "deployment:run:new" => vec![format!(
            "{} run {} created ({})",
            s(&v["agentId"]),
            s(&v["runId"]),
            s(&p["target"])
        )],
        "deployment:run:update" => {
            let mut line = format!(
                "{} run {} {}",
                s(&v["agentId"]),
                s(&v["runId"]),
                s(&p["status"])
            );
            if let Some(url) = p["url"].as_str().filter(|_| p["status"] == "ready") {
                line.push_str(&format!(" {url}"));
            }
            if let Some(e) = p["error"].as_str() {
                line.push_str(&format!(": {e}"));
            }
            vec![line]
        }
        "deployment:log:append" => p["lines"]
            .as_array()
            .map(|lines| {
                lines
                    .iter()
                    .map(|l| {
                        format!(
                            "{} {:>6} {}",
                            s(&v["runId"]),
                            l["line"].as_u64().unwrap_or(0),
                            s(&l["text"])
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        "deployment:snapshot:created" => {
            let hash = p["contentHash"].as_str().unwrap_or("");
            vec![format!(
                "{} snapshot {} ({} files)",
                s(&v["agentId"]),
                &hash[..hash.len().min(12)],
                p["fileCount"]
            )]
        }
        "deployment:version:created" => {
            vec![format!(
                "{} version {} created ({}, run {})",
                s(&v["agentId"]),
                p["versionNumber"],
                s(&p["origin"]),
                s(&p["runId"])
            )]
        }
        "deployment:route:changed" => vec![format!(
            "{} production route: version {} -> {} ({})",
            s(&v["agentId"]),
            p["fromVersion"],
            p["toVersion"],
            s(&p["reason"])
        )],
        "resync" => vec![format!(
            "(fell behind: {} events missed; reload with `slipway runs`)",
            v["missed"]
        )],
        _ => vec![v.to_string()],
    }
}

/// How many times in a row a broken log stream is reopened before giving up.
const MAX_RECONNECTS: u32 = 20;

/// Follows a run's log over SSE from line `after` + 1: hands each line to `on_line`, reopens a
/// dropped stream with `Last-Event-ID` (so no line is lost or repeated), and returns the run
/// (as JSON) once the server says the stream ended.
///
/// # Errors
/// The server refused the stream (unknown run, bad token), or it stayed unreachable.
pub fn follow_log(
    client: &Client,
    run_path: &str,
    mut after: u64,
    mut on_line: impl FnMut(&Value),
) -> anyhow::Result<Value> {
    let mut failures = 0;
    loop {
        let mut builder = client
            .request(Method::GET, &format!("{run_path}/logs/stream"))
            .header("Accept", "text/event-stream");
        if after > 0 {
            builder = builder.header("Last-Event-ID", after.to_string());
        }
        let outcome = match client.send(builder.body(())?) {
            Ok(response) => read_stream(response, &mut after, &mut on_line, &mut failures),
            Err(e) if e.downcast_ref::<ApiFailure>().is_some() => return Err(e),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(true) => return client.get(run_path),
            Ok(false) | Err(_) if failures < MAX_RECONNECTS => {
                failures += 1;
                std::thread::sleep(Duration::from_millis(250 * u64::from(failures.min(4))));
            }
            Ok(false) => bail!(
                "the log stream of {run_path} kept breaking; `slipway logs` shows what is stored"
            ),
            Err(e) => return Err(e.context("the log stream broke and could not be reopened")),
        }
    }
}

/// Reads one SSE response. `Ok(true)`: the `end` event came; `Ok(false)`: the stream broke.
fn read_stream(
    response: ureq::http::Response<ureq::Body>,
    after: &mut u64,
    on_line: &mut impl FnMut(&Value),
    failures: &mut u32,
) -> anyhow::Result<bool> {
    let reader = BufReader::new(response.into_body().into_reader());
    let (mut event, mut data) = (String::new(), String::new());
    for line in reader.lines() {
        let Ok(line) = line else { return Ok(false) };
        let line = line.strip_suffix('\r').unwrap_or(&line);
        if line.is_empty() {
            // Dispatch. A line event's number is in its data too; the id field says the same.
            if event == "end" {
                return Ok(true);
            }
            if !data.is_empty() {
                let v: Value = serde_json::from_str(&data)
                    .context("the server sent a log event that is not JSON")?;
                let n = v["line"].as_u64().unwrap_or(0);
                if n > *after {
                    on_line(&v);
                    *after = n;
                    *failures = 0;
                }
            }
            event.clear();
            data.clear();
            continue;
        }
        if line.starts_with(':') {
            continue; // heartbeat
        }
        let (field, value) = line
            .split_once(':')
            .map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
        match field {
            "event" => event = value.to_string(),
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            _ => {}
        }
    }
    Ok(false)
}
