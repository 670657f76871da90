//! A run's log as server-sent events: `GET …/deployments/{runId}/logs/stream` (the run's
//! `links.stream`), also served by `GET …/{runId}/logs` when the request says
//! `Accept: text/event-stream`.
//!
//! The stream replays the persisted lines after the resume point, then follows new lines live
//! until the run is settled (`ready`, `failed` or `stopped`), then sends one `end` event and
//! closes. Each line is one event whose `id` is its line number, so a client that reconnects
//! with `Last-Event-ID: N` (or `?since=N`) gets line N+1 onwards: no duplicate, no gap.
//! Comment lines (`: keep-alive`) go out every [`HEARTBEAT`] while nothing else does, so proxies
//! keep idle connections open.
//!
//! Why this ends exactly when the log is complete: the engine flushes a run's log (with any
//! held-back tail of an overflowing log) *before* it records `ready` or `failed`, so once the
//! stream sees the run settled, one more read of the store has every line of the pipeline.
//! Lines come from the store or from `deployment:log:append` events; the line number decides
//! what has been sent, and any gap (a resync, a line published before the subscription) is
//! filled from the store, which numbers lines contiguously.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use slipway_engine::events::{Delivery, Subscription};
use slipway_engine::Event;
use slipway_store::{LogQuery, RunRecord};
use tokio::sync::mpsc;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::AgentAccess;
use crate::dto::LogLineDto;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::{ApiPath, ApiQuery};
use crate::state::AppState;

/// How often a comment line is sent on an idle stream.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// Lines read from the store at a time while replaying.
const PAGE: u64 = 1000;

/// Events buffered between the producer and the socket; the producer waits when the client
/// reads slowly, so a stream's memory is bounded by this and one page.
const BUFFER: usize = 64;

/// Events the stream's bus subscription holds while the producer is busy replaying or waiting
/// on a slow client; beyond that it gets a resync and re-reads the store.
const SUBSCRIPTION_CAPACITY: usize = 256;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream_logs))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct StreamQuery {
    /// Resume after this line number (as `Last-Event-ID`; the header wins when both are given).
    pub since: Option<u64>,
}

/// A run's log as server-sent events: replay, then follow until the run is settled, then an
/// `end` event whose data is `{status, url, error}`. Each line is an event with `id` = line
/// number and data `{line, ts, stream, text}`. Send `Last-Event-ID` to resume.
#[utoipa::path(
    get, path = "/api/agents/{id}/deployments/{runId}/logs/stream", tag = "deployments",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "agent id"),
        ("runId" = String, Path, description = "run id"),
        ("Last-Event-ID" = Option<u64>, Header, description = "resume after this line number"),
        StreamQuery,
    ),
    responses(
        (status = 200, description = "`text/event-stream`: one event per log line, then `end`", content_type = "text/event-stream", body = String),
        (status = 404, description = "agent_not_found or run_not_found", body = ErrorBody),
        (status = 422, description = "invalid_request: a malformed Last-Event-ID", body = ErrorBody),
    ),
)]
pub async fn stream_logs(
    State(state): State<AppState>,
    access: AgentAccess,
    ApiPath(ids): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<StreamQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let since = resume_point(&headers, q.since)?;
    sse_response(state, access.agent.id, ids.1, since).await
}

/// Whether the request asks for server-sent events.
pub fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().starts_with("text/event-stream"))
        })
}

/// The line to resume after: `Last-Event-ID`, else `since`, else 0.
///
/// # Errors
/// `invalid_request` when `Last-Event-ID` is not a line number.
pub fn resume_point(headers: &HeaderMap, since: Option<u64>) -> Result<u64, ApiError> {
    match headers.get("last-event-id") {
        None => Ok(since.unwrap_or(0)),
        Some(v) => {
            let text = v.to_str().unwrap_or("").trim();
            if text.is_empty() {
                return Ok(since.unwrap_or(0));
            }
            text.parse().map_err(|_| {
                ApiError::with_message(
                    ErrorCode::InvalidRequest,
                    format!("Last-Event-ID must be a log line number, got {text:?}"),
                )
            })
        }
    }
}

/// Answers with the SSE stream of one run of `agent` (404 when it is not theirs).
///
/// # Errors
/// `run_not_found`, or a store failure.
pub async fn sse_response(
    state: AppState,
    agent: String,
    raw_run: String,
    since: u64,
) -> Result<Response, ApiError> {
    let not_found =
        || ApiError::with_message(ErrorCode::RunNotFound, format!("run {raw_run} not found"));
    if !slipway_core::IdKind::Run.is_valid(&raw_run) {
        return Err(not_found());
    }
    let (a, r) = (agent.clone(), raw_run.clone());
    state
        .store(move |s| s.get_run(&a, &r))
        .await?
        .ok_or_else(not_found)?;
    // Subscribe before the first read of the store, so that no line published in between is
    // missed (one published before is read from the store).
    let sub = state
        .engine
        .as_ref()
        .map(|e| e.events().subscribe_with_capacity(SUBSCRIPTION_CAPACITY));
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(produce(
        Producer {
            state,
            agent,
            run_id: raw_run,
            cursor: since,
            tx,
        },
        sub,
    ));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("keep-alive"))
        .into_response();
    // nginx and similar buffer responses unless told not to.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

struct Producer {
    state: AppState,
    agent: String,
    run_id: String,
    /// The last line number sent (or the client's resume point).
    cursor: u64,
    tx: mpsc::Sender<SseEvent>,
}

/// The client went away (or the store failed and the stream must end).
struct Stop;

impl Producer {
    async fn send(&self, event: SseEvent) -> Result<(), Stop> {
        self.tx.send(event).await.map_err(|_| Stop)
    }

    async fn send_line(&mut self, line: u64, l: &slipway_store::LogLine) -> Result<(), Stop> {
        let dto = LogLineDto {
            line,
            ts: l.ts,
            stream: l.stream.clone(),
            text: l.text.clone(),
        };
        let data = serde_json::to_string(&dto).map_err(|_| Stop)?;
        self.send(SseEvent::default().id(line.to_string()).data(data))
            .await?;
        self.cursor = line;
        Ok(())
    }

    async fn run_record(&self) -> Result<RunRecord, Stop> {
        let (a, r) = (self.agent.clone(), self.run_id.clone());
        match self.state.store(move |s| s.get_run(&a, &r)).await {
            Ok(Some(run)) => Ok(run),
            Ok(None) => Err(Stop),
            Err(e) => {
                tracing::warn!(run = %self.run_id, error = ?e, "log stream: cannot read the run");
                Err(Stop)
            }
        }
    }

    /// Sends every stored line after the cursor.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            let (run, since) = (self.run_id.clone(), self.cursor);
            let query = LogQuery {
                since: Some(since),
                limit: Some(PAGE),
                ..Default::default()
            };
            let lines = match self.state.store(move |s| s.read_logs(&run, query)).await {
                Ok(lines) => lines,
                Err(e) => {
                    tracing::warn!(run = %self.run_id, error = ?e, "log stream: cannot read the log");
                    return Err(Stop);
                }
            };
            let full = lines.len() as u64 == PAGE;
            for l in &lines {
                self.send_line(l.line_no, l).await?;
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Follows live events until the run settles (`Ok(true)`), or a resync asks for a re-read
    /// (`Ok(false)`).
    async fn follow(&mut self, sub: &mut Subscription) -> Result<bool, Stop> {
        loop {
            let delivery = tokio::select! {
                _ = self.tx.closed() => return Err(Stop),
                d = sub.recv() => d,
            };
            let event = match delivery {
                None => return Err(Stop), // the server is shutting down
                Some(Delivery::Resync { .. }) => return Ok(false),
                Some(Delivery::Event(e)) => e,
            };
            match &*event {
                Event::LogAppend {
                    run_id,
                    first_line,
                    lines,
                    ..
                } if *run_id == self.run_id => {
                    if lines.is_empty() {
                        continue;
                    }
                    if *first_line > self.cursor + 1 {
                        // Lines before this batch were persisted before we subscribed: the
                        // store has them and this batch too.
                        self.catch_up().await?;
                        continue;
                    }
                    for (i, l) in lines.iter().enumerate() {
                        let n = first_line + i as u64;
                        if n > self.cursor {
                            self.send_line(n, l).await?;
                        }
                    }
                }
                Event::RunUpdate(run) if run.id == self.run_id && run.status.is_settled() => {
                    return Ok(true)
                }
                _ => {}
            }
        }
    }
}

async fn produce(mut p: Producer, mut sub: Option<Subscription>) {
    let _ = drive(&mut p, &mut sub).await;
}

async fn drive(p: &mut Producer, sub: &mut Option<Subscription>) -> Result<(), Stop> {
    loop {
        // Status first, then lines: a run seen settled has its whole pipeline log stored.
        let run = p.run_record().await?;
        p.catch_up().await?;
        let Some(sub) = sub.as_mut().filter(|_| !run.status.is_settled()) else {
            let end = json!({ "status": run.status.as_str(), "url": run.url, "error": run.error });
            return p
                .send(SseEvent::default().event("end").data(end.to_string()))
                .await;
        };
        // Settled (true) or resync (false): either way, re-read status and store.
        let _ = p.follow(sub).await?;
    }
}
