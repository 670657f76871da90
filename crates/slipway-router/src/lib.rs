//! App-traffic router: a host-based HTTP reverse proxy and static file server with an
//! atomically swappable routing table.
//!
//! The router knows nothing about runs, the store or sandboxes. The engine fills the table
//! ([`Router::set`], [`Router::remove`], [`Router::replace_all`]) with a [`Route`] per host:
//! an [`Upstream`] it can open connections to, a [`StaticSite`] directory, or an
//! [`Unavailable`] page; [`serve`] answers requests on the app-traffic listener.
//! [`serve_service`] serves any other HTTP service (the API) with the same connection guards.
//!
//! Invariants:
//! - no lock on the request path: one `ArcSwap` load per request;
//! - no body is ever buffered whole: requests and responses stream in both directions;
//! - no internal detail (error text, socket or host path) reaches a visitor: router-made
//!   responses are fixed pages named by `X-Slipway-Error` ([`ErrorCode`]);
//! - an upstream route's connection pool dies with the route: once the route left the table
//!   and its last request finished, no connection to the old instance stays open.
//!
//! Status codes: unknown host 404, malformed host 400, stopped 410, failed deploy 503
//! (`deploy_failed`), not ready 503 + `Retry-After`, app refusing connections or answering
//! garbage 502, connect or response-header timeout 504, body over the limit 413. After a 413
//! the rest of the refused body is read and discarded (bounded by
//! [`RouterConfig::rejected_body_drain`] and its timeout) before the connection closes, so a
//! client still sending receives the 413 instead of a reset.
//!
//! Threads: one acceptor hands each connection to the least-loaded of
//! [`RouterConfig::io_threads`] threads, each a single-threaded runtime that then owns the
//! connection and the upstream connections it uses. Per-request deadlines (hyper's header
//! read timeout, the response-header timeout) use a coarse timer (50 ms ticks) that re-arms
//! with an atomic store instead of a tokio timer registration.
//!
//! Proxying: HTTP/1.1 and HTTP/2 (prior knowledge) from clients, HTTP/1.1 with keep-alive to
//! apps, one small connection pool per upstream route (and I/O thread); hop-by-hop headers are
//! dropped both ways; `X-Forwarded-For` gets the client address appended, `X-Forwarded-Proto`
//! (`http`) and `X-Forwarded-Host` are set by the router alone; the client's `Host` is passed
//! on unchanged. `Upgrade` requests (WebSocket) are proxied and the two connections spliced.
//! An app's `Set-Cookie` whose `Domain` names anything but its own host (say the base domain,
//! which browsers would send to every other app) is dropped.
//!
//! Static sites ([`StaticSite`]): strong `ETag` from file identity and change times,
//! `Last-Modified`, conditional requests, single byte ranges, precompressed `.br`/`.gz`
//! siblings, `/dir` → 308 `/dir/` → `dir/index.html`, optional SPA fallback, no listings, no
//! dotfiles (except `.well-known`), nothing outside the root (`openat2` + `RESOLVE_BENEATH`;
//! absolute symlinks are refused), HTML `no-cache`, other files `public, max-age=300`. Files up
//! to 256 KiB are served from a per-site memory cache after their first request (with their
//! precompressed siblings and prebuilt headers; release trees are immutable), bounded by
//! [`StaticSite::with_cache_limit`].

mod admission;
mod body;
mod config;
mod error_page;
mod host;
mod idle;
mod proxy;
mod server;
mod shard;
mod static_files;
mod table;
mod timer;

pub use body::{BoxError, RouterBody};
pub use config::RouterConfig;
pub use error_page::{ErrorCode, ERROR_HEADER};
pub use server::{serve, serve_service, ConnectionSlot};
pub use static_files::{CacheBudget, StaticSite, StaticSiteError};
pub use table::{Drain, Route, RouteError, Router, Unavailable, UnavailableKind, Upstream};

/// Locks one of the router's mutexes, whether or not a thread panicked while holding it: every
/// critical section here is a single update (a list push or pop, a count), so the data stays
/// usable, and a panic in one connection must not take the listener down with it.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
