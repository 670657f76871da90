//! Limits and timeouts of the app-traffic listener.

use std::time::Duration;

/// Tunables of a [`crate::Router`] and its listener.
///
/// The defaults suit a single machine serving a handful of apps; every field explains what it
/// protects against.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Largest request body forwarded to an app. A declared `Content-Length` above it is
    /// refused with 413 before any byte of the body is read; a streamed body is cut off when it
    /// crosses it.
    pub max_request_body: u64,
    /// After answering 413, up to this many bytes of the refused body are still read and
    /// discarded before the connection is closed. Closing a socket with unread data makes the
    /// kernel send a reset, and a client still writing its body would then see `EPIPE` or a
    /// reset instead of the 413 (nginx's "lingering close").
    pub rejected_body_drain: u64,
    /// How long that draining may take in total.
    pub rejected_body_drain_timeout: Duration,
    /// How long opening a connection to an app may take before the request fails with 504.
    pub connect_timeout: Duration,
    /// How long the app may take to send its response headers before the request fails with
    /// 504. Bodies are not bounded: long downloads and event streams are legitimate.
    pub response_header_timeout: Duration,
    /// How long an idle keep-alive connection to an app is kept for reuse. Shorter than the
    /// apps' own idle timeouts (Node's `keepAliveTimeout` defaults to 5 s), so the router does
    /// not send a request on a connection the app is closing at that moment (which would
    /// answer 502).
    pub pool_idle_timeout: Duration,
    /// Idle keep-alive connections kept per route and I/O thread; more concurrent requests
    /// open more connections, but only this many stay open once idle.
    pub pool_max_idle_per_upstream: usize,
    /// How long a client may take to send a complete request head (slowloris guard).
    pub header_read_timeout: Duration,
    /// How long a client connection may go without starting a request before it is closed
    /// (gracefully: a response under way still finishes). HTTP/1 keep-alive connections are
    /// closed sooner, by `header_read_timeout`; this bounds HTTP/2 connections, which have no
    /// request head to wait for. Idle connections are what a flood of clients would hold to use
    /// up `max_connections`.
    pub idle_timeout: Duration,
    /// Connections accepted at once; further clients wait in the listen backlog. A connection
    /// must bring its first complete request head within `header_read_timeout` of being
    /// accepted, or it is closed.
    pub max_connections: usize,
    /// Of those, how many one client may hold (an IPv4 address, or an IPv6 /64); 0: no limit.
    /// A client over it gets a `429` and its connection is closed. Behind a load balancer
    /// every client has the balancer's address: raise it or set 0 there.
    pub max_connections_per_client: usize,
    /// Dedicated I/O threads serving the listener, each with its own single-threaded runtime
    /// that keeps a connection, and the upstream connections it uses, on one thread (default:
    /// one per CPU; about 15-20% more proxied requests per second than a shared work-stealing
    /// runtime in `docs/bench-router.md`). 0 serves on the runtime that calls [`crate::serve`].
    pub io_threads: usize,
    /// After the shutdown signal, how long in-flight requests may run before their
    /// connections are dropped.
    pub shutdown_grace: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            max_request_body: 100 * 1024 * 1024,
            rejected_body_drain: 16 * 1024 * 1024,
            rejected_body_drain_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            response_header_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(4),
            pool_max_idle_per_upstream: 32,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 10_000,
            max_connections_per_client: 256,
            io_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}
