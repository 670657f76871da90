//! The event bus: every run creation, status change, log batch and snapshot creation is
//! published once, after it is saved.
//!
//! A `tokio::sync::broadcast` channel gives every subscriber its own bounded view of one shared
//! ring: a slow subscriber never slows the pipeline, it falls behind and learns it missed
//! events (`Lagged`), which the API turns into a `resync` event.

use std::sync::Arc;

use slipway_store::{LogLine, RunRecord, SnapshotRecord};
use tokio::sync::broadcast;

/// What happened.
#[derive(Debug, Clone)]
pub enum Event {
    RunNew(RunRecord),
    RunUpdate(RunRecord),
    /// Lines `first_line ..= first_line + lines.len() - 1` of a run's log.
    LogAppend { agent_id: String, run_id: String, first_line: u64, lines: Vec<LogLine> },
    SnapshotCreated(SnapshotRecord),
}

impl Event {
    /// The agent the event belongs to; subscribers only see their own agent's events.
    pub fn agent_id(&self) -> &str {
        match self {
            Event::RunNew(r) | Event::RunUpdate(r) => &r.agent_id,
            Event::LogAppend { agent_id, .. } => agent_id,
            Event::SnapshotCreated(s) => &s.agent_id,
        }
    }

    /// The run the event is about, if any.
    pub fn run_id(&self) -> Option<&str> {
        match self {
            Event::RunNew(r) | Event::RunUpdate(r) => Some(&r.id),
            Event::LogAppend { run_id, .. } => Some(run_id),
            Event::SnapshotCreated(_) => None,
        }
    }

    /// The event's name on the wire (seed 004).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::RunNew(_) => "deployment:run:new",
            Event::RunUpdate(_) => "deployment:run:update",
            Event::LogAppend { .. } => "deployment:log:append",
            Event::SnapshotCreated(_) => "deployment:snapshot:created",
        }
    }
}

/// Publisher side. Cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
}

impl EventBus {
    /// `capacity` events are kept for the slowest subscriber before it lags.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        Self { tx }
    }

    /// Publishes without waiting; having no subscriber is fine.
    pub fn publish(&self, event: Event) {
        let _ = self.tx.send(Arc::new(event));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(4096)
    }
}
