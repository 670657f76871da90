//! The routing table: host name → route, swapped atomically.
//!
//! Readers (every request) do one lock-free `ArcSwap` load and a hash lookup. Writers (the
//! engine) are serialised by a mutex, build a new map and swap it in, so a request sees either
//! the old table or the new one, never a half-updated one.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::RouterConfig;
use crate::error_page::ErrorCode;
use crate::proxy::UpstreamPool;
use crate::shard::{self, Padded, SHARDS};
use crate::static_files::StaticSite;

/// A place the router can open connections to: one app instance.
///
/// The engine implements it by opening a socket inside the sandbox's network namespace; the
/// router only ever calls [`Upstream::connect`] and never learns where the socket leads.
pub trait Upstream: Send + Sync + 'static {
    /// Opens a fresh connection to the app. Called when no idle pooled connection is left.
    fn connect(&self) -> BoxFuture<'static, io::Result<TcpStream>>;
    /// A short name for logs (a run or instance id); never shown to visitors.
    fn name(&self) -> String;
}

/// What a host is routed to.
#[derive(Clone)]
pub enum Route {
    /// A running app, reverse-proxied.
    Upstream(Arc<dyn Upstream>),
    /// A static release, served from disk by the router itself.
    Static(StaticSite),
    /// Nothing to serve right now; the router answers with an error page.
    Unavailable(Unavailable),
}

impl Route {
    /// Whether `self` and `other` would serve identically, so replacing one by the other can
    /// keep the existing connection pool and in-flight count.
    fn same_as(&self, other: &Route) -> bool {
        match (self, other) {
            (Route::Upstream(a), Route::Upstream(b)) => Arc::ptr_eq(a, b),
            (Route::Static(a), Route::Static(b)) => a == b,
            (Route::Unavailable(a), Route::Unavailable(b)) => a == b,
            _ => false,
        }
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Upstream(u) => f.debug_tuple("Upstream").field(&u.name()).finish(),
            Route::Static(s) => f.debug_tuple("Static").field(s).finish(),
            Route::Unavailable(u) => f.debug_tuple("Unavailable").field(u).finish(),
        }
    }
}

/// Why a host has nothing to serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnavailableKind {
    /// The deployment was stopped: 410 Gone.
    Stopped,
    /// The run failed to build or start: 503 (`deploy_failed`), without `Retry-After`.
    Failed,
    /// The run is still being built or started: 503 with `Retry-After`.
    NotReady,
}

impl UnavailableKind {
    /// The error code (and so status and `X-Slipway-Error`) of this state.
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Stopped => ErrorCode::Stopped,
            Self::Failed => ErrorCode::DeployFailed,
            Self::NotReady => ErrorCode::NotReady,
        }
    }
}

/// An error page standing in for an app. `title` and `detail` replace the default texts; they
/// are shown to anyone, so they must not contain internal details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable {
    pub kind: UnavailableKind,
    pub title: Option<String>,
    pub detail: Option<String>,
}

impl Unavailable {
    /// The default page of `kind`.
    pub fn new(kind: UnavailableKind) -> Self {
        Self {
            kind,
            title: None,
            detail: None,
        }
    }

    /// Replaces the default title.
    pub fn with_title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Replaces the default explanation.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// A host name the table cannot hold.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("invalid host name {host:?}")]
    InvalidHost { host: String },
}

/// Counts the requests (and upgraded connections) a route is serving: one counter per thread
/// (see [`crate::shard`]), summed when read, and a wake-up for [`Drain::wait`] only while
/// someone waits (`Notify::notify_waiters` takes a lock).
pub(crate) struct InFlight {
    counts: [Padded<AtomicUsize>; SHARDS],
    /// [`Drain::wait`] calls in progress.
    watchers: AtomicUsize,
    zero: Notify,
    /// Set once the route has left the table (after the new table is in place): a request
    /// that counts itself afterwards must not be served by it (see [`Router::enter`]).
    retired: AtomicBool,
}

impl InFlight {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            counts: Default::default(),
            watchers: AtomicUsize::new(0),
            zero: Notify::new(),
            retired: AtomicBool::new(false),
        })
    }

    fn count(&self) -> usize {
        self.counts.iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }
}

/// Held for as long as one request (including its response body, or its upgraded
/// connection) is being served. It owns the request's reference to its table entry (so the
/// entry's pool is at hand without another reference count touched by every thread), until
/// the request becomes an upgraded connection, which keeps only the count.
pub(crate) struct InFlightGuard {
    holds: Holds,
    /// The counter it incremented (the guard may be dropped on another thread).
    shard: usize,
}

enum Holds {
    Entry(Arc<RouteEntry>),
    Count(Arc<InFlight>),
}

impl InFlightGuard {
    /// Counts a request on `entry`'s route.
    pub(crate) fn enter(entry: Arc<RouteEntry>) -> Self {
        let shard = shard::current();
        entry.in_flight.counts[shard].fetch_add(1, Ordering::SeqCst);
        Self {
            holds: Holds::Entry(entry),
            shard,
        }
    }

    /// Counts a request on `entry`'s route unless the route has been retired (then the count
    /// is given back at once).
    fn enter_live(entry: Arc<RouteEntry>) -> Option<Self> {
        let guard = Self::enter(entry);
        (!guard.in_flight().retired.load(Ordering::SeqCst)).then_some(guard)
    }

    /// The request's table entry; `None` once upgraded.
    pub(crate) fn entry(&self) -> Option<&RouteEntry> {
        match &self.holds {
            Holds::Entry(entry) => Some(entry),
            Holds::Count(_) => None,
        }
    }

    /// The pool of the request's route, if it has one.
    pub(crate) fn pool(&self) -> Option<&UpstreamPool> {
        self.entry().and_then(|entry| entry.pool.as_ref())
    }

    /// Keeps counting, but lets go of the entry: an upgraded connection (a WebSocket may stay
    /// open for hours) must not keep the route's pool, and its idle connections to the old
    /// instance, alive.
    pub(crate) fn upgraded(mut self) -> Self {
        if let Holds::Entry(entry) = &self.holds {
            self.holds = Holds::Count(Arc::clone(&entry.in_flight));
        }
        self
    }

    fn in_flight(&self) -> &InFlight {
        match &self.holds {
            Holds::Entry(entry) => &entry.in_flight,
            Holds::Count(in_flight) => in_flight,
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let in_flight = self.in_flight();
        // The decrement that brings the total to zero brings its own counter to zero. Either
        // this sees the watcher, or the watcher (registered before it reads the counts) sees
        // the decrement: every access here is `SeqCst`.
        if in_flight.counts[self.shard].fetch_sub(1, Ordering::SeqCst) == 1
            && in_flight.watchers.load(Ordering::SeqCst) > 0
        {
            in_flight.zero.notify_waiters();
        }
    }
}

/// Counts one [`Drain::wait`] as watching while it lives.
struct Watching<'a>(&'a InFlight);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A handle on one route's in-flight work, returned when the route leaves the table, so the
/// engine can wait for it to finish before stopping the instance behind it.
///
/// Holding a `Drain` does not keep the route's connection pool alive: the pool is dropped as
/// soon as the last request using it completes.
#[derive(Clone)]
pub struct Drain {
    host: String,
    in_flight: Arc<InFlight>,
}

impl Drain {
    /// The host the route was serving.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Requests and upgraded connections still being served by the route.
    pub fn in_flight(&self) -> usize {
        self.in_flight.count()
    }

    /// Resolves once nothing is in flight on the route. Upgraded connections (WebSockets) count
    /// until they close, so callers usually bound this with a timeout.
    pub async fn wait(&self) {
        self.in_flight.watchers.fetch_add(1, Ordering::SeqCst);
        let _watching = Watching(&self.in_flight);
        loop {
            let notified = self.in_flight.zero.notified();
            tokio::pin!(notified);
            // Register before checking, so a decrement to zero between the check and the await
            // is not missed.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl fmt::Debug for Drain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("host", &self.host)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// One row of the table: the route plus the state that lives exactly as long as it.
pub(crate) struct RouteEntry {
    /// The (normalised) host the entry is the route of.
    pub(crate) host: String,
    pub(crate) route: Route,
    /// Keep-alive connections to the upstream; `None` for non-upstream routes.
    pub(crate) pool: Option<UpstreamPool>,
    pub(crate) in_flight: Arc<InFlight>,
}

/// A persistent (structurally shared) map: a writer's copy costs O(1) and its insert O(log n),
/// so switching one route stays cheap however many hosts the table holds.
type Table = imbl::HashMap<String, Arc<RouteEntry>>;

/// The app-traffic router: a routing table plus the settings of its listener. Share it as
/// `Arc<Router>` between [`crate::serve`] and the engine.
pub struct Router {
    table: ArcSwap<Table>,
    /// Serialises writers so concurrent updates cannot lose each other.
    writer: Mutex<()>,
    config: RouterConfig,
}

impl Router {
    /// An empty table: every host answers 404 until routes are set.
    pub fn new(config: RouterConfig) -> Self {
        Self {
            table: ArcSwap::from_pointee(Table::new()),
            writer: Mutex::new(()),
            config,
        }
    }

    /// The settings this router was built with.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Routes `host` (any case, port and trailing dot ignored) to `route`. Returns the drain
    /// handle of the route it replaced, unless that route was the same (same `Arc` upstream,
    /// same static site, same page), in which case the existing pool is kept.
    ///
    /// # Errors
    /// [`RouteError::InvalidHost`] when `host` is not a host name.
    pub fn set(&self, host: &str, route: Route) -> Result<Option<Drain>, RouteError> {
        let key = table_key(host)?;
        let _writer = self.lock_writer();
        let current = self.table.load();
        if let Some(old) = current.get(&key) {
            if old.route.same_as(&route) {
                return Ok(None);
            }
        }
        let mut next: Table = (**current).clone();
        let old = next.insert(key.clone(), Arc::new(self.entry(&key, route)));
        self.table.store(Arc::new(next));
        Ok(old.map(|old| retire(key, &old)))
    }

    /// Removes the route of `host`; the host answers 404 from now on.
    pub fn remove(&self, host: &str) -> Option<Drain> {
        let key = table_key(host).ok()?;
        let _writer = self.lock_writer();
        let current = self.table.load();
        if !current.contains_key(&key) {
            return None;
        }
        let mut next: Table = (**current).clone();
        let old = next.remove(&key);
        self.table.store(Arc::new(next));
        old.map(|old| retire(key, &old))
    }

    /// Replaces the whole table in one swap. Routes equal to the current ones keep their pools;
    /// the drains of every route that left or changed are returned.
    ///
    /// # Errors
    /// [`RouteError::InvalidHost`] when any host is not a host name; the table is then unchanged.
    pub fn replace_all(&self, routes: HashMap<String, Route>) -> Result<Vec<Drain>, RouteError> {
        let routes = routes
            .into_iter()
            .map(|(host, route)| Ok((table_key(&host)?, route)))
            .collect::<Result<Vec<_>, RouteError>>()?;
        let _writer = self.lock_writer();
        let current = self.table.load_full();
        let mut next = Table::new();
        for (key, route) in routes {
            let entry = match current.get(&key) {
                Some(old) if old.route.same_as(&route) => Arc::clone(old),
                _ => Arc::new(self.entry(&key, route)),
            };
            next.insert(key, entry);
        }
        let gone: Vec<_> = current
            .iter()
            .filter(|(key, old)| next.get(*key).is_none_or(|new| !Arc::ptr_eq(old, new)))
            .map(|(key, old)| (key.clone(), Arc::clone(old)))
            .collect();
        self.table.store(Arc::new(next));
        Ok(gone
            .into_iter()
            .map(|(key, old)| retire(key, &old))
            .collect())
    }

    /// The route of `host`, if any.
    pub fn get(&self, host: &str) -> Option<Route> {
        self.lookup(&table_key(host).ok()?).map(|e| e.route.clone())
    }

    /// The hosts in the table, sorted.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.table.load().keys().cloned().collect();
        hosts.sort();
        hosts
    }

    /// Requests in flight on the current route of `host`.
    pub fn in_flight(&self, host: &str) -> Option<usize> {
        self.drain_handle(host).map(|d| d.in_flight())
    }

    /// A drain handle on the current route of `host`.
    pub fn drain_handle(&self, host: &str) -> Option<Drain> {
        let key = table_key(host).ok()?;
        self.lookup(&key).map(|entry| drain(key, &entry))
    }

    /// The entry of an already-normalised host.
    pub(crate) fn lookup(&self, key: &str) -> Option<Arc<RouteEntry>> {
        self.table.load().get(key).cloned()
    }

    /// The request path: the entry of an already-normalised host, counted as in flight.
    ///
    /// Looking up and counting are two steps, and the route may leave the table between them;
    /// its drain may then already have read a count of zero, and the engine stops the
    /// instance behind it. So the count is checked against the entry's `retired` mark, which
    /// is set after the new table is stored and before the drain reads any count: either the
    /// request sees the mark and looks up again (finding the new table), or the drain sees the
    /// request. Every access is `SeqCst`.
    pub(crate) fn enter(&self, key: &str) -> Option<InFlightGuard> {
        // A route replaced again at every turn would be a writer loop; after a few turns the
        // request is served by what it found, as if it had arrived a moment earlier.
        for _ in 1..ENTER_TRIES {
            if let Some(guard) = InFlightGuard::enter_live(self.lookup(key)?) {
                return Some(guard);
            }
        }
        self.lookup(key).map(InFlightGuard::enter)
    }

    fn entry(&self, host: &str, route: Route) -> RouteEntry {
        let pool = match &route {
            Route::Upstream(upstream) => {
                Some(UpstreamPool::new(Arc::clone(upstream), &self.config))
            }
            _ => None,
        };
        RouteEntry {
            host: host.to_owned(),
            route,
            pool,
            in_flight: InFlight::new(),
        }
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is `()`: a writer that panicked left nothing inconsistent.
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("hosts", &self.hosts())
            .field("config", &self.config)
            .finish()
    }
}

/// How many times [`Router::enter`] looks up a host whose route keeps leaving the table.
const ENTER_TRIES: usize = 4;

/// Marks a route that has left the table as retired and returns its drain handle. The table
/// without it must already be stored (see [`Router::enter`]).
fn retire(host: String, entry: &RouteEntry) -> Drain {
    entry.in_flight.retired.store(true, Ordering::SeqCst);
    drain(host, entry)
}

fn drain(host: String, entry: &RouteEntry) -> Drain {
    Drain {
        host,
        in_flight: Arc::clone(&entry.in_flight),
    }
}

fn table_key(host: &str) -> Result<String, RouteError> {
    crate::host::normalise(host.as_bytes())
        .map(|h| h.into_owned())
        .ok_or_else(|| RouteError::InvalidHost {
            host: host.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(title: &str) -> Route {
        Route::Unavailable(Unavailable::new(UnavailableKind::NotReady).with_title(title))
    }

    fn title(guard: &InFlightGuard) -> String {
        match &guard.entry().expect("not upgraded").route {
            Route::Unavailable(page) => page.title.clone().unwrap_or_default(),
            _ => unreachable!("the tests route only pages"),
        }
    }

    /// The race a drain must not lose: a request looks its host up, is delayed, and counts
    /// itself on the route only after the route was replaced and its drain read zero (so the
    /// engine would stop the instance behind it). It must not be served by the old route.
    #[test]
    fn a_request_counted_after_its_route_left_the_table_is_not_served_by_it() {
        let router = Router::new(RouterConfig::default());
        router.set("app.test", page("old")).unwrap();
        let looked_up = router.lookup("app.test").expect("route set");

        let drain = router
            .set("app.test", page("new"))
            .unwrap()
            .expect("old route replaced");
        assert_eq!(
            drain.in_flight(),
            0,
            "nothing in flight: the old instance may go"
        );

        assert!(
            InFlightGuard::enter_live(looked_up).is_none(),
            "the delayed request is turned away from the retired route"
        );
        assert_eq!(drain.in_flight(), 0, "and its count is given back");
        let guard = router.enter("app.test").expect("host routed");
        assert_eq!(title(&guard), "new", "looking up again finds the new route");
        assert_eq!(drain.in_flight(), 0);
    }

    #[test]
    fn removed_and_replaced_routes_are_retired_and_kept_ones_are_not() {
        let router = Router::new(RouterConfig::default());
        router.set("a.test", page("a")).unwrap();
        router.set("b.test", page("b")).unwrap();
        router.set("c.test", page("c")).unwrap();
        let [a, b, c] = ["a.test", "b.test", "c.test"].map(|h| router.lookup(h).unwrap());

        // A drain handle taken only to look at a live route does not retire it.
        let watched = router.drain_handle("a.test").unwrap();
        assert_eq!(watched.in_flight(), 0);
        assert!(InFlightGuard::enter_live(Arc::clone(&a)).is_some());

        let drains = router
            .replace_all(HashMap::from([
                ("a.test".to_string(), page("a")),
                ("b.test".to_string(), page("b2")),
            ]))
            .unwrap();
        let mut hosts: Vec<&str> = drains.iter().map(Drain::host).collect();
        hosts.sort_unstable();
        assert_eq!(hosts, ["b.test", "c.test"]);
        assert!(
            InFlightGuard::enter_live(a).is_some(),
            "a kept route stays live"
        );
        assert!(
            InFlightGuard::enter_live(b).is_none(),
            "a changed route is retired"
        );
        assert!(
            InFlightGuard::enter_live(c).is_none(),
            "a dropped route is retired"
        );
        assert_eq!(title(&router.enter("b.test").unwrap()), "b2");
        assert!(router.enter("c.test").is_none());

        let a = router.lookup("a.test").unwrap();
        router.remove("a.test").expect("a routed");
        assert!(
            InFlightGuard::enter_live(a).is_none(),
            "a removed route is retired"
        );
    }
}
