//! A coarse timer for the per-request deadlines of the listener (hyper's header read timeout,
//! the upstream response-header timeout).
//!
//! Why not tokio's timer: every request re-arms these deadlines, and re-arming a tokio timer
//! that may be the driver's next wake-up writes to the runtime's eventfd to unpark it. A
//! profile of the router in front of a sandboxed app showed one such `write` per request (and
//! the extra `epoll_wait` round it causes). Here, arming or moving a deadline is a store to an
//! atomic; one ticker task per listener runtime scans the armed deadlines every
//! [`TICK`] and wakes the expired ones. Deadlines fire up to one tick late, which is fine for
//! timeouts measured in seconds.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

use crate::lock;

/// How often armed deadlines are checked, and so how late one may fire.
pub(crate) const TICK: Duration = Duration::from_millis(50);

/// The state of one sleep, shared with the registry.
struct Shared {
    /// Deadline in nanoseconds since [`epoch`].
    deadline: AtomicU64,
    /// Whether the registry holds this sleep (it is added on the first pending poll).
    registered: AtomicBool,
    waker: AtomicWaker,
}

/// Every armed sleep of the process. Sleeps add themselves once and are dropped from it by
/// the ticker when they are gone.
fn registry() -> &'static Mutex<Vec<Weak<Shared>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Weak<Shared>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// A sleep until a deadline, checked by the ticker.
pub(crate) struct CoarseSleep {
    shared: Arc<Shared>,
}

impl CoarseSleep {
    pub(crate) fn until(deadline: Instant) -> Self {
        Self {
            shared: Arc::new(Shared {
                deadline: AtomicU64::new(nanos(deadline)),
                registered: AtomicBool::new(false),
                waker: AtomicWaker::new(),
            }),
        }
    }

    /// Moves the deadline; a registered sleep stays registered (no lock, no allocation).
    pub(crate) fn reset(&self, deadline: Instant) {
        self.shared
            .deadline
            .store(nanos(deadline), Ordering::Release);
    }

    /// Moves the deadline out of reach, so a sleep kept for reuse never fires meanwhile.
    pub(crate) fn disarm(&self) {
        self.shared.deadline.store(u64::MAX, Ordering::Release);
    }
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let shared = &self.shared;
        shared.waker.register(cx.waker());
        if shared.registered.load(Ordering::Acquire) {
            // The ticker wakes it once the deadline has passed (and unregisters it first), so
            // a registered sleep need not read the clock on every poll.
            return Poll::Pending;
        }
        if nanos(Instant::now()) >= shared.deadline.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if !shared.registered.swap(true, Ordering::AcqRel) {
            lock(registry()).push(Arc::downgrade(shared));
        }
        // The deadline may have passed while registering.
        if nanos(Instant::now()) >= shared.deadline.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

/// `fut`, or `Err(())` once `sleep` has fired (up to one tick after its deadline).
///
/// Takes the future pinned where the caller keeps it: moved in by value, a large future
/// would be stored (and copied) twice in this one's state. The sleep is borrowed so callers
/// can keep one per connection and re-arm it per request ([`CoarseSleep::reset`]).
pub(crate) async fn timeout<F: Future>(
    sleep: &mut CoarseSleep,
    mut fut: Pin<&mut F>,
) -> Result<F::Output, ()> {
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        Pin::new(&mut *sleep).poll(cx).map(Err)
    })
    .await
}

/// hyper's timer for the listener's connections.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CoarseTimer;

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep::until(Instant::now() + duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep::until(deadline))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<CoarseSleep>() {
            // The sleep stays registered; the ticker reads the new deadline.
            Some(coarse) => coarse.reset(new_deadline),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// Wakes expired sleeps every [`TICK`] until `stop` resolves. Run one per listener runtime
/// (more are harmless: each scan takes the registry's lock).
pub(crate) async fn run_ticker(stop: impl Future<Output = ()>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = interval.tick() => tick(),
            () = &mut stop => return,
        }
    }
}

fn tick() {
    let now = nanos(Instant::now());
    let mut expired = Vec::new();
    {
        let mut sleeps = lock(registry());
        sleeps.retain(|weak| {
            let Some(shared) = weak.upgrade() else {
                return false;
            };
            if now >= shared.deadline.load(Ordering::Acquire) {
                // Out of the registry until polled pending again.
                shared.registered.store(false, Ordering::Release);
                expired.push(shared);
                return false;
            }
            true
        });
    }
    // Woken outside the lock: a woken task may poll (and register) at once.
    for shared in expired {
        shared.waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_after_the_deadline_and_follows_resets() {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ticker = tokio::spawn(run_ticker(async {
            let _ = stop_rx.await;
        }));

        let started = Instant::now();
        CoarseSleep::until(started + Duration::from_millis(100)).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");

        // A reset moves a registered sleep.
        let timer = CoarseTimer;
        let mut sleep = hyper::rt::Timer::sleep(&timer, Duration::from_secs(3600));
        assert!(futures_util::poll!(sleep.as_mut()).is_pending());
        let started = Instant::now();
        hyper::rt::Timer::reset(&timer, &mut sleep, started + Duration::from_millis(100));
        sleep.await;
        assert!(started.elapsed() >= Duration::from_millis(100));

        let mut sleep = CoarseSleep::until(Instant::now() + Duration::from_secs(5));
        assert_eq!(
            timeout(&mut sleep, std::pin::pin!(async { 7 })).await,
            Ok(7)
        );
        // The same sleep, re-armed.
        let started = Instant::now();
        sleep.reset(started + Duration::from_millis(100));
        assert_eq!(
            timeout(&mut sleep, std::pin::pin!(std::future::pending::<()>())).await,
            Err(())
        );
        assert!(started.elapsed() >= Duration::from_millis(100));
        // Disarmed, it does not fire; re-armed after firing, it fires again.
        sleep.disarm();
        let waited = tokio::time::timeout(Duration::from_millis(200), &mut sleep).await;
        assert!(waited.is_err(), "a disarmed sleep fired");
        let started = Instant::now();
        sleep.reset(started + Duration::from_millis(100));
        (&mut sleep).await;
        assert!(started.elapsed() >= Duration::from_millis(100));

        let _ = stop_tx.send(());
        ticker.await.unwrap();
    }
}
