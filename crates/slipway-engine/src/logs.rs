//! Per-run logs: platform lines and the commands' output, persisted in order, bounded.
//!
//! Lines are numbered from 1 by the store. A run keeps at most `max_lines` lines: the first
//! `max_lines - tail_lines` are written as they come; after that, lines go to a ring of the last
//! `tail_lines`, and when the run's pipeline ends a marker saying how many lines were dropped is
//! written, followed by that tail. So the head (how the build started) and the tail (why it
//! failed) both survive a build that prints millions of lines.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use slipway_sandbox::{OutputLine, OutputSink};
use slipway_store::{LogLine, Store};
use tokio::sync::mpsc;

use crate::events::{Event, EventBus};

/// Which source a line came from. `system` lines are written by slipway itself.
pub const STREAM_SYSTEM: &str = "system";

/// How many lines a run keeps and how many of the last lines survive when it overflows.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    pub max_lines: u64,
    pub tail_lines: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_lines: 100_000,
            tail_lines: 2_000,
        }
    }
}

enum Msg {
    Line {
        ts: i64,
        stream: String,
        text: String,
    },
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Handle to a run's log writer. Cheap to clone; the writer task ends when every handle and
/// every output sink is dropped, after writing what it holds.
#[derive(Clone)]
pub struct RunLog {
    tx: mpsc::Sender<Msg>,
}

impl RunLog {
    /// Starts the writer task for one run.
    pub fn start(
        store: Arc<dyn Store>,
        events: EventBus,
        agent_id: String,
        run_id: String,
        limits: LogLimits,
        clock: crate::Clock,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        // Bounded: when the store is slow, commands' output backs up into their pipes instead
        // of slipway's memory.
        let (tx, rx) = mpsc::channel(4096);
        let writer = Writer {
            store,
            events,
            agent_id,
            run_id,
            limits,
            written: 0,
            dropped: 0,
            tail: VecDeque::new(),
            pending: Vec::new(),
            clock,
        };
        let task = tokio::spawn(writer.run(rx));
        (Self { tx }, task)
    }

    /// Writes a platform line such as `> capturing source...`.
    pub async fn system(&self, text: impl Into<String>) {
        let _ = self
            .tx
            .send(Msg::Line {
                ts: 0,
                stream: STREAM_SYSTEM.into(),
                text: text.into(),
            })
            .await;
    }

    /// Writes a platform line without waiting: from synchronous code (the egress proxy's denial
    /// observer). When the log's queue is full the line is dropped rather than block the caller.
    pub fn try_system(&self, text: impl Into<String>) {
        let _ = self.tx.try_send(Msg::Line {
            ts: 0,
            stream: STREAM_SYSTEM.into(),
            text: text.into(),
        });
    }

    /// Waits until every line sent so far is persisted and published — including, when the
    /// run has overflowed its cap, the drop marker and the held-back tail. The pipeline calls it
    /// once before it records `ready` or `failed`, so a reader that sees the run settled finds
    /// the whole pipeline log in the store. Lines after a flush are capped the same way (a new
    /// tail, written at the next flush or when the log ends).
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// A sink for a sandboxed command's output, forwarding into this log.
    pub fn output_sink(&self) -> (OutputSink, tokio::task::JoinHandle<()>) {
        let (otx, mut orx) = mpsc::channel::<OutputLine>(1024);
        let tx = self.tx.clone();
        let task = tokio::spawn(async move {
            while let Some(line) = orx.recv().await {
                let msg = Msg::Line {
                    ts: line.ts_ms as i64,
                    stream: line.stream.as_str().into(),
                    text: line.text,
                };
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
        });
        (otx, task)
    }
}

struct Writer {
    store: Arc<dyn Store>,
    events: EventBus,
    agent_id: String,
    run_id: String,
    limits: LogLimits,
    written: u64,
    dropped: u64,
    tail: VecDeque<(i64, String, String)>,
    pending: Vec<(i64, String, String)>,
    clock: crate::Clock,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        const BATCH: usize = 512;
        let head_cap = self
            .limits
            .max_lines
            .saturating_sub(self.limits.tail_lines + 1);
        loop {
            // Gather a batch: wait for one message, then take whatever else is already queued
            // (up to BATCH) or arrives within a few milliseconds.
            let first = rx.recv().await;
            let Some(first) = first else { break };
            let mut flushes = Vec::new();
            let handle =
                |m: Msg, w: &mut Writer, flushes: &mut Vec<tokio::sync::oneshot::Sender<()>>| {
                    match m {
                        Msg::Line { ts, stream, text } => {
                            let ts = if ts == 0 { (w.clock)() } else { ts };
                            if w.written + (w.pending.len() as u64) < head_cap {
                                w.pending.push((ts, stream, text));
                            } else {
                                w.dropped += 1;
                                w.tail.push_back((ts, stream, text));
                                if w.tail.len() as u64 > w.limits.tail_lines {
                                    w.tail.pop_front();
                                }
                            }
                        }
                        Msg::Flush(done) => flushes.push(done),
                    }
                };
            handle(first, &mut self, &mut flushes);
            let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
            while self.pending.len() < BATCH && flushes.is_empty() {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) => handle(m, &mut self, &mut flushes),
                    Ok(None) | Err(_) => break,
                }
            }
            self.write_pending().await;
            if !flushes.is_empty() {
                self.write_tail().await;
            }
            for f in flushes {
                let _ = f.send(());
            }
        }
        // All senders are gone: the pipeline is over. Write the drop marker and the tail.
        self.write_tail().await;
    }

    /// Writes the drop marker and the held-back tail, if lines were dropped.
    async fn write_tail(&mut self) {
        if self.dropped == 0 {
            return;
        }
        let kept = self.tail.len() as u64;
        let lost = self.dropped - kept;
        let now = (self.clock)();
        if lost > 0 {
            self.pending.push((
                now,
                STREAM_SYSTEM.into(),
                format!(
                    "[slipway] {lost} lines dropped here: a run keeps at most {} lines (the first lines and the last {})",
                    self.limits.max_lines, self.limits.tail_lines
                ),
            ));
        }
        self.pending.extend(self.tail.drain(..));
        self.dropped = 0;
        self.write_pending().await;
    }

    async fn write_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let batch: Vec<LogLine> = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(ts, stream, text)| LogLine::new(ts, stream, text))
            .collect();
        let store = self.store.clone();
        let run_id = self.run_id.clone();
        let count = batch.len() as u64;
        let result = tokio::task::spawn_blocking(move || {
            store.append_logs(&run_id, &batch).map(|n| (n, batch))
        })
        .await;
        match result {
            Ok(Ok((first_line, batch))) => {
                self.written += count;
                self.events.publish(Event::LogAppend {
                    agent_id: self.agent_id.clone(),
                    run_id: self.run_id.clone(),
                    first_line,
                    lines: batch,
                });
            }
            Ok(Err(e)) => {
                tracing::error!(run = %self.run_id, error = %e, "could not persist log lines")
            }
            Err(e) => tracing::error!(run = %self.run_id, error = %e, "log writer task failed"),
        }
    }
}
