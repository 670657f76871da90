//! Closing client connections that ask nothing.
//!
//! hyper bounds the reading of each HTTP/1 request head (`header_read_timeout`, which also
//! closes a keep-alive connection left idle), but not the wait for a connection's first bytes
//! (the HTTP/2 preface is sniffed before a protocol is chosen), nor an HTTP/2 connection that
//! asks nothing. Without a bound, silent connections could hold every connection slot
//! (`max_connections`) and shut every app out.
//!
//! Each I/O thread has one [`Sweeper`]: every connection registers a [`Watch`] with it, and the
//! sweeper looks at all of them a few times per timeout period, asking a connection to close
//! (gracefully: a response under way finishes first) when its first request head has not
//! arrived within `first` of being accepted, or when no request started during a whole `idle`
//! period. The request path pays one relaxed increment per request and one waker registration
//! when the connection task waits; the timers live in the sweeper, not in each connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

use crate::lock;

/// One connection's side: what it started, and the sweeper's request to close.
#[derive(Default)]
pub(crate) struct Watch {
    requests: AtomicU64,
    close: AtomicBool,
    waker: AtomicWaker,
}

impl Watch {
    /// Counts a request whose head has arrived.
    pub(crate) fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn ask_to_close(&self) {
        self.close.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn asked_to_close(&self) -> bool {
        self.close.load(Ordering::Acquire)
    }
}

/// The connections of one I/O thread, and the timeouts they are held to.
pub(crate) struct Sweeper {
    watched: Mutex<Vec<Watched>>,
    first: Duration,
    idle: Duration,
}

struct Watched {
    watch: Weak<Watch>,
    /// The request count at `since`.
    seen: u64,
    /// When the connection was accepted, or when its request count last changed.
    since: Instant,
}

impl Sweeper {
    /// `first`: how long a connection may take to bring its first request head; `idle`: how
    /// long it may then go without starting a request.
    pub(crate) fn new(first: Duration, idle: Duration) -> Self {
        Self {
            watched: Mutex::new(Vec::new()),
            first,
            idle,
        }
    }

    /// Watches a connection accepted now.
    pub(crate) fn watch(&self) -> Arc<Watch> {
        let watch = Arc::new(Watch::default());
        lock(&self.watched).push(Watched {
            watch: Arc::downgrade(&watch),
            seen: 0,
            since: Instant::now(),
        });
        watch
    }

    /// Sweeps until its task is aborted (run it on the connections' runtime), four times per
    /// shortest timeout, so a connection is asked to close soon after its timeout expired.
    pub(crate) async fn run(&self) {
        let period =
            (self.first.min(self.idle) / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            self.sweep(Instant::now());
        }
    }

    fn sweep(&self, now: Instant) {
        lock(&self.watched).retain_mut(|w| {
            let Some(watch) = w.watch.upgrade() else {
                return false;
            };
            let started = watch.requests.load(Ordering::Relaxed);
            if started != w.seen {
                (w.seen, w.since) = (started, now);
                return true;
            }
            let limit = if started == 0 { self.first } else { self.idle };
            if now.duration_since(w.since) < limit {
                return true;
            }
            watch.ask_to_close();
            false
        });
    }

    /// Asks every connection to close (the listener is stopping).
    pub(crate) fn close_all(&self) {
        for w in lock(&self.watched).drain(..) {
            if let Some(watch) = w.watch.upgrade() {
                watch.ask_to_close();
            }
        }
    }
}

/// Drives `connection` to its end, starting its graceful shutdown once `watch` is asked to
/// close.
pub(crate) async fn drive<F, E>(
    connection: F,
    graceful_shutdown: impl Fn(Pin<&mut F>),
    watch: &Watch,
) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
{
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    std::future::poll_fn(|cx| loop {
        if !closing && watch.asked_to_close() {
            graceful_shutdown(connection.as_mut());
            closing = true;
        }
        if let Poll::Ready(ended) = connection.as_mut().poll(cx) {
            return Poll::Ready(ended);
        }
        if closing {
            return Poll::Pending;
        }
        watch.waker.register(cx.waker());
        // Asked between the check above and the registration: poll again rather than sleep.
        if !watch.asked_to_close() {
            return Poll::Pending;
        }
    })
    .await
}
