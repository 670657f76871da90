//! The event bus: every run creation, status change, log batch and snapshot creation is
//! published once, after it is saved.
//!
//! Each subscriber has its own bounded queue. Publishing never waits: when a subscriber's queue
//! is full, its queued events are dropped and it receives [`Delivery::Resync`] next — "you missed
//! events; reload what you show from the API, then keep reading". Events published after the
//! overflow are delivered after the resync, in order. So a stalled WebSocket client costs at most
//! its queue's memory and never slows the pipeline or the other subscribers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use slipway_store::{LogLine, RouteChange, RunRecord, SnapshotRecord, VersionRecord};
use tokio::sync::Notify;

/// What happened.
#[derive(Debug, Clone)]
pub enum Event {
    RunNew(RunRecord),
    RunUpdate(RunRecord),
    /// Lines `first_line ..= first_line + lines.len() - 1` of a run's log.
    LogAppend {
        agent_id: String,
        run_id: String,
        first_line: u64,
        lines: Vec<LogLine>,
    },
    SnapshotCreated(SnapshotRecord),
    /// A production version was created (issue 6).
    VersionCreated(VersionRecord),
    /// The production route changed: deploy, promote, rollback or stop (issue 6).
    RouteChanged(RouteChange),
}

impl Event {
    /// The agent the event belongs to; subscribers only see their own agent's events.
    pub fn agent_id(&self) -> &str {
        match self {
            Event::RunNew(r) | Event::RunUpdate(r) => &r.agent_id,
            Event::LogAppend { agent_id, .. } => agent_id,
            Event::SnapshotCreated(s) => &s.agent_id,
            Event::VersionCreated(v) => &v.agent_id,
            Event::RouteChanged(c) => &c.agent_id,
        }
    }

    /// The run the event is about, if any.
    pub fn run_id(&self) -> Option<&str> {
        match self {
            Event::RunNew(r) | Event::RunUpdate(r) => Some(&r.id),
            Event::LogAppend { run_id, .. } => Some(run_id),
            Event::SnapshotCreated(_) | Event::RouteChanged(_) => None,
            Event::VersionCreated(v) => v.run_id.as_deref(),
        }
    }

    /// The event's name on the wire (seed 004).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::RunNew(_) => "deployment:run:new",
            Event::RunUpdate(_) => "deployment:run:update",
            Event::LogAppend { .. } => "deployment:log:append",
            Event::SnapshotCreated(_) => "deployment:snapshot:created",
            Event::VersionCreated(_) => "deployment:version:created",
            Event::RouteChanged(_) => "deployment:route:changed",
        }
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<Event>),
    /// The subscriber fell behind and `missed` events were dropped for it (at least). Whatever
    /// it shows may be stale: reload it, then keep reading.
    Resync {
        missed: u64,
    },
}

/// Events queued per subscriber before it is considered behind.
pub const DEFAULT_SUBSCRIBER_CAPACITY: usize = 1024;

struct Queue {
    events: VecDeque<Arc<Event>>,
    /// `Some(n)`: the subscriber overflowed and `n` events were dropped since it last saw a
    /// resync. Delivered before anything still queued.
    missed: Option<u64>,
    closed: bool,
}

struct Slot {
    capacity: usize,
    queue: Mutex<Queue>,
    ready: Notify,
}

impl Slot {
    fn push(&self, event: &Arc<Event>) {
        let mut q = lock(&self.queue);
        if q.closed {
            return;
        }
        if q.events.len() >= self.capacity {
            // Behind: drop what it has not read (it will reload anyway) and free the memory.
            let dropped = q.events.len() as u64 + 1;
            q.events.clear();
            q.events.shrink_to(self.capacity.min(64));
            *q.missed.get_or_insert(0) += dropped;
        } else {
            q.events.push_back(Arc::clone(event));
        }
        drop(q);
        self.ready.notify_one();
    }

    fn close(&self) {
        lock(&self.queue).closed = true;
        self.ready.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a queue lock leaves a consistent queue; keep using it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Publisher side. Cheap to clone.
#[derive(Clone, Default)]
pub struct EventBus {
    inner: Arc<BusInner>,
}

#[derive(Default)]
struct BusInner {
    subscribers: Mutex<Vec<Weak<Slot>>>,
    closed: std::sync::atomic::AtomicBool,
}

impl EventBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hands `event` to every subscriber without waiting; having no subscriber is fine.
    pub fn publish(&self, event: Event) {
        let event = Arc::new(event);
        let mut subs = lock(&self.inner.subscribers);
        subs.retain(|weak| match weak.upgrade() {
            Some(slot) => {
                slot.push(&event);
                true
            }
            None => false,
        });
    }

    /// A subscription with the default queue size.
    pub fn subscribe(&self) -> Subscription {
        self.subscribe_with_capacity(DEFAULT_SUBSCRIBER_CAPACITY)
    }

    /// A subscription that holds at most `capacity` unread events before it gets a resync.
    pub fn subscribe_with_capacity(&self, capacity: usize) -> Subscription {
        let slot = Arc::new(Slot {
            capacity: capacity.max(1),
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                missed: None,
                closed: false,
            }),
            ready: Notify::new(),
        });
        let mut subs = lock(&self.inner.subscribers);
        if self.inner.closed.load(std::sync::atomic::Ordering::SeqCst) {
            slot.close();
        }
        subs.push(Arc::downgrade(&slot));
        Subscription { slot }
    }

    /// Ends every subscription (server shutdown): their `recv` returns `None` once drained, so
    /// long-lived streams (WebSocket, SSE) finish and the server can stop.
    pub fn close(&self) {
        let subs = lock(&self.inner.subscribers);
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for slot in subs.iter().filter_map(Weak::upgrade) {
            slot.close();
        }
    }

    /// Live subscriptions (for tests and metrics).
    pub fn subscriber_count(&self) -> usize {
        lock(&self.inner.subscribers)
            .iter()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// Subscriber side; dropping it unsubscribes.
pub struct Subscription {
    slot: Arc<Slot>,
}

impl Subscription {
    /// The next delivery; `None` once the bus is closed and the queue drained.
    pub async fn recv(&mut self) -> Option<Delivery> {
        loop {
            if let Some(d) = self.try_recv() {
                return Some(d);
            }
            if lock(&self.slot.queue).closed {
                return None;
            }
            // `notify_one` stores a permit when nobody waits, so a push between the check above
            // and this await is not lost.
            self.slot.ready.notified().await;
        }
    }

    /// The next delivery if one is waiting.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        let mut q = lock(&self.slot.queue);
        if let Some(missed) = q.missed.take() {
            return Some(Delivery::Resync { missed });
        }
        q.events.pop_front().map(Delivery::Event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(n: u64) -> Event {
        Event::SnapshotCreated(SnapshotRecord {
            id: format!("snp-{n}"),
            agent_id: "agt-a".into(),
            spec_id: None,
            source_dir: "/x".into(),
            artifact_path: "a".into(),
            content_hash: "h".into(),
            file_count: n,
            size_bytes: 0,
            created_at: 0,
        })
    }

    fn number(d: &Delivery) -> u64 {
        match d {
            Delivery::Event(e) => match &**e {
                Event::SnapshotCreated(s) => s.file_count,
                _ => unreachable!(),
            },
            Delivery::Resync { .. } => u64::MAX,
        }
    }

    #[tokio::test]
    async fn a_stalled_subscriber_gets_resync_and_never_blocks_others() {
        let bus = EventBus::new();
        let mut stalled = bus.subscribe_with_capacity(8);
        let mut live = bus.subscribe_with_capacity(8);
        let mut seen = Vec::new();
        // `publish` is synchronous: it cannot wait for anyone. 10,000 events with one reader that
        // never reads and one that keeps up.
        for n in 0..10_000 {
            bus.publish(snapshot(n));
            while let Some(d) = live.try_recv() {
                seen.push(number(&d));
            }
        }
        assert_eq!(
            seen,
            (0..10_000).collect::<Vec<_>>(),
            "the live subscriber lost or reordered events"
        );
        // The stalled one: a resync first, counting everything it lost, then only what came
        // after its last overflow, in order.
        let first = stalled.try_recv().unwrap();
        let Delivery::Resync { missed } = first else {
            panic!("wanted a resync, got {first:?}")
        };
        let mut rest = Vec::new();
        while let Some(d) = stalled.try_recv() {
            rest.push(number(&d));
        }
        assert!(rest.len() <= 8, "the queue is bounded: {}", rest.len());
        assert_eq!(missed + rest.len() as u64, 10_000);
        assert_eq!(
            rest,
            ((10_000 - rest.len() as u64)..10_000).collect::<Vec<_>>()
        );
        // After a resync, delivery resumes normally.
        bus.publish(snapshot(42));
        assert_eq!(number(&stalled.recv().await.unwrap()), 42);
    }

    #[tokio::test]
    async fn recv_wakes_on_publish_and_ends_on_close() {
        let bus = EventBus::new();
        let mut sub = bus.subscribe();
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(d) = sub.recv().await {
                got.push(number(&d));
            }
            got
        });
        tokio::task::yield_now().await;
        bus.publish(snapshot(1));
        bus.publish(snapshot(2));
        bus.close();
        assert_eq!(waiter.await.unwrap(), vec![1, 2]);
        // Subscribing after close ends at once.
        assert!(bus.subscribe().recv().await.is_none());
    }

    #[test]
    fn dropped_subscriptions_are_forgotten() {
        let bus = EventBus::new();
        let a = bus.subscribe();
        let _b = bus.subscribe();
        assert_eq!(bus.subscriber_count(), 2);
        drop(a);
        bus.publish(snapshot(1));
        assert_eq!(bus.subscriber_count(), 1);
        assert_eq!(lock(&bus.inner.subscribers).len(), 1);
    }
}
