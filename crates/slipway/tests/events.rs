//! Live events and log streams end to end: a real `slipway serve`, real sandboxes, a real
//! WebSocket client (tungstenite) and a real SSE client (ureq reading the body as it comes).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::client::IntoClientRequest;

use crate::util::*;

/// An app whose build runs `build` and whose server prints nothing (so that the log is exactly
/// the pipeline's when the run is ready).
fn app(env: &Env, name: &str, build: &str) -> String {
    let dir = env.dir.path().join(name);
    write(
        &dir,
        &[
            ("index.html", "<h1>streamed</h1>"),
            ("build.sh", build),
            (
                "slipway.toml",
                &format!(
                    "name = \"{name}\"\nsource_dir = \"/config/miniapps/{name}\"\nbuild = \"sh build.sh\"\n\
                     start = \"exec python3 -m http.server $PORT --bind 127.0.0.1 2>/dev/null\"\n"
                ),
            ),
        ],
    );
    dir.to_str().unwrap().to_string()
}

/// `deploy --no-wait`: the queued run.
fn start(env: &Env, token: &str, dir: &str) -> Value {
    env.run(&["--token", token, "--json", "deploy", "--no-wait", dir])
        .json()
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn get_json(env: &Env, token: &str, path: &str) -> Value {
    let mut r = http()
        .get(format!("{}{path}", env.server.api))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.body_mut().read_json().unwrap()
}

/// The persisted log as (line, text).
fn persisted(env: &Env, token: &str, run: &Value) -> Vec<(u64, String)> {
    let page = get_json(
        env,
        token,
        &format!("{}?limit=100000", run["links"]["logs"].as_str().unwrap()),
    );
    page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["line"].as_u64().unwrap(),
                l["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

// --- a minimal SSE client -------------------------------------------------------------------

#[derive(Debug, Clone)]
struct SseEvent {
    id: Option<u64>,
    event: String,
    data: String,
}

struct Sse {
    lines: std::io::Lines<BufReader<Box<dyn Read + Send>>>,
}

impl Sse {
    fn open(env: &Env, token: &str, path: &str, last_event_id: Option<u64>) -> Sse {
        let mut req = http()
            .get(format!("{}{path}", env.server.api))
            .header("Authorization", format!("Bearer {token}"))
            .header("Accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let r = req.call().unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let reader: Box<dyn Read + Send> = Box::new(r.into_body().into_reader());
        Sse {
            lines: BufReader::new(reader).lines(),
        }
    }

    /// The next event; `None` at the end of the response.
    fn next(&mut self) -> Option<SseEvent> {
        let mut ev = SseEvent {
            id: None,
            event: String::new(),
            data: String::new(),
        };
        let mut any = false;
        for line in self.lines.by_ref() {
            let line = line.ok()?;
            if line.is_empty() {
                if any {
                    return Some(ev);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            any = true;
            let (field, value) = line.split_once(':').map_or((line.as_str(), ""), |(f, v)| {
                (f, v.strip_prefix(' ').unwrap_or(v))
            });
            match field {
                "id" => ev.id = value.parse().ok(),
                "event" => ev.event = value.to_string(),
                "data" => ev.data.push_str(value),
                _ => {}
            }
        }
        None
    }

    /// Reads to the `end` event: the lines as (id, text) and the end event's data.
    fn rest(&mut self, lines: &mut Vec<(u64, String)>) -> Value {
        while let Some(ev) = self.next() {
            if ev.event == "end" {
                assert!(self.next().is_none(), "nothing follows `end`");
                return serde_json::from_str(&ev.data).unwrap();
            }
            let v: Value = serde_json::from_str(&ev.data).unwrap();
            assert_eq!(ev.id, v["line"].as_u64(), "the event id is the line number");
            lines.push((ev.id.unwrap(), v["text"].as_str().unwrap().to_string()));
        }
        panic!(
            "the stream ended without an `end` event after {} lines",
            lines.len()
        );
    }
}

// --- a minimal WebSocket client ------------------------------------------------------------

struct Ws(tungstenite::WebSocket<TcpStream>);

impl Ws {
    fn connect(env: &Env, token: &str, query: &str) -> Result<Ws, u16> {
        let authority = env.server.api.trim_start_matches("http://").to_string();
        let mut req = format!("ws://{authority}/api/events{query}")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let stream = TcpStream::connect(&authority).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        match tungstenite::client(req, stream) {
            Ok((ws, _)) => Ok(Ws(ws)),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                Err(r.status().as_u16())
            }
            Err(e) => panic!("handshake: {e}"),
        }
    }

    fn next(&mut self) -> Value {
        loop {
            match self.0.read().expect("websocket read") {
                tungstenite::Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                tungstenite::Message::Close(_) => panic!("the server closed the event stream"),
                _ => {}
            }
        }
    }

    /// Events until (and including) the update that settles `run`.
    fn until_settled(&mut self, run: Option<&str>) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let v = self.next();
            let done = v["type"] == "deployment:run:update"
                && run.is_none_or(|r| v["runId"] == r)
                && ["ready", "failed", "stopped"]
                    .contains(&v["payload"]["status"].as_str().unwrap_or(""));
            out.push(v);
            if done {
                return out;
            }
        }
    }
}

#[test]
fn websocket_sees_a_whole_deploy_in_order_and_no_other_agents_events() {
    if !sandboxes_available() {
        return;
    }
    let env = Env::new();
    let (a, a_token) = env.agent("watcher-a");
    let (b, b_token) = env.agent("watcher-b");
    let mut ws_a = Ws::connect(&env, &a_token, "").unwrap();
    let mut ws_b = Ws::connect(&env, &b_token, "").unwrap();
    let mut ws_op = Ws::connect(&env, &env.server.admin_token(), &format!("?agent={a}")).unwrap();
    // An agent token cannot ask for another agent's stream: the same 404 as any other resource.
    assert_eq!(
        Ws::connect(&env, &b_token, &format!("?agent={a}")).err(),
        Some(404)
    );
    assert_eq!(Ws::connect(&env, "slw_ag_nope", "").err(), Some(401));

    let dir = app(&env, "ws-app", "echo compiling; echo done\n");
    let deploy = env.run(&["--token", &a_token, "--json", "deploy", &dir]);
    let run = deploy.json();
    assert_eq!(run["status"], "ready", "{deploy:#?}");
    let run_id = run["id"].as_str().unwrap();

    let events = ws_a.until_settled(Some(run_id));
    let types: Vec<&str> = events.iter().map(|v| v["type"].as_str().unwrap()).collect();
    // The upload made the snapshot before the run was started.
    assert_eq!(types[0], "deployment:snapshot:created", "{types:?}");
    assert_eq!(types[1], "deployment:run:new", "{types:?}");
    assert_eq!(events[1]["payload"]["status"], "queued");
    assert_eq!(
        events[1]["payload"]["links"]["stream"],
        format!("/api/agents/{a}/deployments/{run_id}/logs/stream")
    );
    let statuses: Vec<&str> = events
        .iter()
        .filter(|v| v["type"] == "deployment:run:update")
        .map(|v| v["payload"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["capturing", "provisioning", "building", "starting", "ready"]
    );
    // Log lines arrive in order, numbered from 1 without a gap, and all before `ready`: they are
    // exactly the persisted log.
    let mut streamed = Vec::new();
    for v in events
        .iter()
        .filter(|v| v["type"] == "deployment:log:append")
    {
        assert_eq!(v["runId"], run_id);
        for l in v["payload"]["lines"].as_array().unwrap() {
            streamed.push((
                l["line"].as_u64().unwrap(),
                l["text"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert_eq!(streamed, persisted(&env, &a_token, &run));
    assert!(
        streamed.iter().any(|(_, t)| t == "compiling"),
        "{streamed:?}"
    );
    assert!(
        streamed.last().unwrap().1.starts_with("> ready at"),
        "{streamed:?}"
    );
    for v in &events {
        assert_eq!(v["agentId"], a.as_str(), "{v}");
    }
    // The operator's stream filtered to agent A saw the same sequence.
    let op_events = ws_op.until_settled(Some(run_id));
    assert_eq!(op_events, events);

    // B's socket was open the whole time: its first events are B's own.
    let dir_b = app(&env, "ws-app-b", "echo b\n");
    let run_b = env
        .run(&["--token", &b_token, "--json", "deploy", &dir_b])
        .json();
    let events_b = ws_b.until_settled(Some(run_b["id"].as_str().unwrap()));
    for v in &events_b {
        assert_eq!(v["agentId"], b.as_str(), "agent B received {v}");
    }
    assert_eq!(
        events_b
            .iter()
            .filter(|v| v["type"] == "deployment:run:new")
            .count(),
        1
    );
    // A's socket, in turn, gets nothing of B's: the next thing it sees is its own stop.
    env.run(&["--token", &a_token, "stop", run_id]).ok();
    let next = ws_a.next();
    assert_eq!(next["agentId"], a.as_str(), "agent A received {next}");
    assert_eq!(next["payload"]["status"], "stopping");
}

const SLOW_BUILD: &str =
    "i=1\nwhile [ $i -le 300 ]; do echo \"build line $i\"; i=$((i+1)); sleep 0.02; done\n";

#[test]
fn sse_replays_follows_then_ends_and_resumes_without_gaps() {
    if !sandboxes_available() {
        return;
    }
    let env = Env::new();
    let (_a, token) = env.agent("streamer");
    let dir = app(&env, "sse-app", SLOW_BUILD);
    let run = start(&env, &token, &dir);
    let stream_path = run["links"]["stream"].as_str().unwrap().to_string();
    let run_path = run["links"]["self"].as_str().unwrap().to_string();

    // Follow live, then cut the connection in the middle of the build.
    let mut first = Vec::new();
    let mut sse = Sse::open(&env, &token, &stream_path, None);
    while first
        .last()
        .is_none_or(|(_, t): &(u64, String)| t != "build line 50")
    {
        let ev = sse.next().expect("stream ended early");
        assert_ne!(ev.event, "end", "the run settled before line 50: {first:?}");
        let v: Value = serde_json::from_str(&ev.data).unwrap();
        first.push((ev.id.unwrap(), v["text"].as_str().unwrap().to_string()));
    }
    drop(sse);
    let status = get_json(&env, &token, &run_path)["status"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(status, "building", "the cut must happen mid-build");

    // Resume with Last-Event-ID: the rest, each line once, then `end`.
    let cut = first.last().unwrap().0;
    let mut second = Vec::new();
    let end = Sse::open(&env, &token, &stream_path, Some(cut)).rest(&mut second);
    assert_eq!(end["status"], "ready");
    assert_eq!(
        second.first().unwrap().0,
        cut + 1,
        "resumed after the last line received"
    );
    let mut all = first.clone();
    all.extend(second);
    let stored = persisted(&env, &token, &run);
    assert_eq!(all, stored, "every line exactly once, in order");
    let numbers: Vec<u64> = all.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
    for i in 1..=300 {
        assert_eq!(
            all.iter()
                .filter(|(_, t)| *t == format!("build line {i}"))
                .count(),
            1,
            "build line {i}"
        );
    }

    // A settled run: pure replay, then `end` at once. The logs route answers the same stream
    // when asked for `text/event-stream`.
    let mut replay = Vec::new();
    assert_eq!(
        Sse::open(&env, &token, &stream_path, None).rest(&mut replay)["status"],
        "ready"
    );
    assert_eq!(replay, stored);
    let mut negotiated = Vec::new();
    Sse::open(&env, &token, &format!("{run_path}/logs"), Some(290)).rest(&mut negotiated);
    assert_eq!(negotiated, stored[290..].to_vec());

    // History search: matching lines with their numbers; the text is taken literally.
    let found = get_json(&env, &token, &format!("{run_path}/logs?q=line%2029"));
    let hits: Vec<(u64, String)> = found["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["line"].as_u64().unwrap(),
                l["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(u64, String)> = stored
        .iter()
        .filter(|(_, t)| t.contains("line 29"))
        .cloned()
        .collect();
    assert_eq!(hits.len(), 11, "{hits:?}"); // 29 and 290..=299
    assert_eq!(hits, expected);
    assert_eq!(
        get_json(&env, &token, &format!("{run_path}/logs?q=%25"))["lines"],
        serde_json::json!([])
    );
    assert_eq!(
        get_json(&env, &token, &format!("{run_path}/logs?q=line_1"))["lines"],
        serde_json::json!([])
    );
    let grep = env.run(&[
        "--token",
        &token,
        "logs",
        run["id"].as_str().unwrap(),
        "--grep",
        "line 29",
    ]);
    let want: String = expected.iter().map(|(n, t)| format!("{n}:{t}\n")).collect();
    assert_eq!(grep.ok(), want);

    // Another agent cannot read the stream.
    let (_b, other) = env.agent("stranger");
    let r = http()
        .get(format!("{}{stream_path}", env.server.api))
        .header("Authorization", format!("Bearer {other}"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// A TCP proxy to the API that cuts its first connection after `cut_after` bytes of response.
fn cutting_proxy(api: &str, cut_after: usize) -> (String, Arc<AtomicBool>) {
    let upstream = api.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let cut_done = Arc::new(AtomicBool::new(false));
    let cut = Arc::clone(&cut_done);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            let Ok(server) = TcpStream::connect(&upstream) else {
                break;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
            });
            let cut = Arc::clone(&cut);
            std::thread::spawn(move || {
                let (mut client, mut server) = (client, server);
                let limit = if cut.load(Ordering::SeqCst) {
                    usize::MAX
                } else {
                    cut_after
                };
                let mut sent = 0;
                let mut buf = [0u8; 512];
                loop {
                    let n = match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let n = n.min(limit - sent);
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                    if sent >= limit {
                        cut.store(true, Ordering::SeqCst);
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (addr, cut_done)
}

#[test]
fn cli_follow_reconnects_without_losing_or_repeating_lines() {
    if !sandboxes_available() {
        return;
    }
    let env = Env::new();
    let (agent, token) = env.agent("follower");
    let dir = app(&env, "follow-app", SLOW_BUILD);
    let run = start(&env, &token, &dir);
    let id = run["id"].as_str().unwrap();
    // Through a proxy that cuts the stream once, after about 40 lines.
    let (proxy, cut) = cutting_proxy(&env.server.api, 4000);
    let out = run_in(
        env.dir.path(),
        &env.config_dir(),
        &[
            "--server", &proxy, "--token", &token, "--agent", &agent, "logs", id, "-f",
        ],
        &[],
    );
    assert!(cut.load(Ordering::SeqCst), "the proxy never cut the stream");
    let printed: Vec<String> = out.ok().lines().map(str::to_string).collect();
    let stored: Vec<String> = persisted(&env, &token, &run)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(printed, stored, "stderr:\n{}", out.stderr);
    assert!(out.stderr.contains("ready"), "{}", out.stderr);
}

#[test]
fn a_build_printing_200000_lines_streams_exactly_what_is_persisted() {
    if !sandboxes_available() {
        return;
    }
    let env = Env::new();
    let (_a, token) = env.agent("chatty");
    let build = "python3 -c \"import sys\nfor i in range(200000): sys.stdout.write('out %d\\n' % i)\"\nexit 3\n";
    let dir = app(&env, "chatty-app", build);
    let run = start(&env, &token, &dir);
    let mut streamed = Vec::new();
    let end =
        Sse::open(&env, &token, run["links"]["stream"].as_str().unwrap(), None).rest(&mut streamed);
    assert_eq!(end["status"], "failed");
    assert!(
        end["error"]
            .as_str()
            .unwrap()
            .contains("exited with code 3"),
        "{end}"
    );
    let stored = persisted(&env, &token, &run);
    // The default cap: 100,000 lines, the last 2,000 kept after a marker saying how many were
    // dropped. The stream carried exactly that, marker included.
    assert_eq!(stored.len(), 100_000);
    assert_eq!(streamed.len(), stored.len());
    assert!(
        streamed == stored,
        "the stream and the persisted log differ"
    );
    let marker = stored
        .iter()
        .find(|(_, t)| t.contains("lines dropped here"))
        .expect("drop marker");
    assert_eq!(marker.0, 98_000);
    assert_eq!(
        stored.last().unwrap().1,
        "> failed: building: build command exited with code 3"
    );
    assert_eq!(stored[stored.len() - 2].1, "out 199999");
    // The server's peak memory stays far below what holding every line would cost several
    // times over (the log is capped, streams are paged and buffers bounded).
    let status = std::fs::read_to_string(format!("/proc/{}/status", env.server.pid())).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    assert!(hwm_kb < 300 * 1024, "server peak RSS {hwm_kb} kB");
}

#[test]
fn events_cli_prints_json_lines() {
    if !sandboxes_available() {
        return;
    }
    let env = Env::new();
    let (_a, token) = env.agent("cli-watcher");
    let mut child = slipway_command()
        .args([
            "--server",
            &env.server.api,
            "--token",
            &token,
            "--json",
            "events",
        ])
        .env("SLIPWAY_CONFIG_DIR", env.config_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The CLI is subscribed once its handshake is done, which cannot be seen from here: upload
    // fresh snapshots until one shows up on its output.
    let mut n = 0;
    loop {
        n += 1;
        assert!(n < 100, "`slipway events` never printed an event");
        let probe = env.dir.path().join(format!("probe-{n}"));
        write(&probe, &[("index.html", &format!("probe {n}"))]);
        env.run(&["--token", &token, "snapshot", probe.to_str().unwrap()])
            .ok();
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["type"], "deployment:snapshot:created", "{line}");
            while rx.recv_timeout(Duration::from_millis(200)).is_ok() {}
            break;
        }
    }
    let dir = app(&env, "cli-events-app", "echo hi\n");
    let run = env
        .run(&["--token", &token, "--json", "deploy", &dir])
        .json();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|v: &Value| v["type"] == "deployment:run:update" && v["payload"]["status"] == "ready")
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no ready event; saw {seen:?}"));
        seen.push(serde_json::from_str(&line).unwrap());
    }
    assert!(seen.iter().all(|v| v["agentId"] == run["agentId"]));
    assert!(seen
        .iter()
        .any(|v| v["type"] == "deployment:run:new" && v["runId"] == run["id"]));
    let _ = child.kill();
    let _ = child.wait();
}

/// An open event stream holds one of the API listener's connections until it closes (a client
/// cannot open sockets past `--max-connections`); once it closes, a waiting client is served.
#[test]
fn event_websockets_count_against_the_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        crate::util::Server::start(&dir.path().join("data"), &["--max-connections", "2"], &[]);
    let env = Env { dir, server };
    let (_, token) = env.agent("watcher");
    let mut first = Ws::connect(&env, &token, "").expect("first event stream");
    let _second = Ws::connect(&env, &token, "").expect("second event stream");

    // A third client waits in the listen backlog while both streams are open...
    let health = format!("{}/api/health", env.server.api);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(http().get(&health).call().map(|r| r.status().as_u16()));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(700)).is_err(),
        "served past the connection limit"
    );
    // ...and is served once one of them closes.
    first.0.close(None).unwrap();
    while first.0.read().is_ok() {}
    drop(first);
    let status = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("served once a slot is free")
        .expect("an answer");
    assert_eq!(status, 200);
}
