//! The egress proxy: an HTTP forward proxy (plain `http://` requests and `CONNECT` tunnels)
//! that listens on a sandbox's loopback and connects out from the host's network namespace, only
//! to allow-listed host names (on ports 80 and 443, or the one port an entry names), never to an
//! IP literal or an address in a loopback, private, link-local or otherwise non-public range —
//! unless the operator pinned that host name to an address (see [`EgressPolicy::with_pins`]).
//!
//! Two users: the driver serves the build proxy of a sandbox created with
//! [`crate::EgressConfig`] (closed for good by `close_egress` when the build is over); the engine
//! serves a run-time proxy with the spec's `runtimeEgressAllow` hosts through [`EgressProxy`].

mod allowlist;

pub use allowlist::{derive_registry_allowlist, RegistryConfig};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Ports the proxy connects to for an allowlist entry that names no port.
pub const ALLOWED_PORTS: [u16; 2] = [80, 443];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Called for every refused destination (after it is logged), e.g. to write it into a run's log.
pub type DenialObserver = Arc<dyn Fn(&DeniedAttempt) + Send + Sync>;

/// One refused proxy request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeniedAttempt {
    /// The sandbox whose workload asked.
    pub sandbox: String,
    /// The host as the workload named it.
    pub host: String,
    pub port: u16,
    pub reason: Denied,
}

/// Which ports of one allow-listed host the proxy may connect to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ports {
    /// An entry without a port: 80 and 443.
    web: bool,
    /// Entries `host:port`: exactly these.
    listed: BTreeSet<u16>,
}

impl Ports {
    fn allows(&self, port: u16) -> bool {
        (self.web && ALLOWED_PORTS.contains(&port)) || self.listed.contains(&port)
    }
}

/// Which destinations the proxy may connect to.
#[derive(Clone, Default)]
pub struct EgressPolicy {
    allow: HashMap<String, Ports>,
    /// Host names the operator pinned to addresses: no DNS, and no public-address check.
    pins: HashMap<String, Vec<IpAddr>>,
    on_denied: Option<DenialObserver>,
    /// Turns true when egress is closed for good (the build is over): the listener stops
    /// accepting and every open connection and tunnel is cut.
    closed: tokio::sync::watch::Sender<bool>,
}

impl fmt::Debug for EgressPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressPolicy")
            .field("allow", &self.allow)
            .field("pins", &self.pins)
            .field("observed", &self.on_denied.is_some())
            .field("closed", &*self.closed.borrow())
            .finish()
    }
}

/// Why the proxy refused a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Port { host: String, port: u16 },
    IpLiteral { host: String },
    NotAllowed { host: String },
    Unresolvable { host: String, error: String },
    NonPublicAddress { host: String, addr: IpAddr },
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::Port { host, port } => {
                write!(
                    f,
                    "port {port} of host {host} is not in the egress allowlist"
                )
            }
            Denied::IpLiteral { host } => write!(
                f,
                "{host} is an IP address; only allow-listed host names are reachable"
            ),
            Denied::NotAllowed { host } => write!(f, "host {host} is not in the egress allowlist"),
            Denied::Unresolvable { host, error } => {
                write!(f, "host {host} cannot be resolved: {error}")
            }
            Denied::NonPublicAddress { host, addr } => {
                write!(f, "host {host} resolves to non-public address {addr}")
            }
        }
    }
}

fn normalize(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Splits an allowlist entry into host and port: `host`, or `host:port` with a decimal port.
fn split_entry(entry: &str) -> (String, Option<u16>) {
    if let Some((host, port)) = entry.rsplit_once(':') {
        if !host.contains(':') && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(port) = port.parse::<u16>() {
                return (normalize(host), Some(port));
            }
        }
    }
    (normalize(entry), None)
}

impl EgressPolicy {
    /// A policy allowing `hosts`: each entry is a host name (ports 80 and 443) or `host:port`
    /// (that port only). Names are compared case-insensitively, without a trailing dot.
    pub fn new(hosts: impl IntoIterator<Item = String>) -> Self {
        let mut allow: HashMap<String, Ports> = HashMap::new();
        for entry in hosts {
            let (host, port) = split_entry(&entry);
            if host.is_empty() {
                continue;
            }
            let ports = allow.entry(host).or_default();
            match port {
                None => ports.web = true,
                Some(p) => {
                    ports.listed.insert(p);
                }
            }
        }
        Self {
            allow,
            pins: HashMap::new(),
            on_denied: None,
            closed: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Pins host names to addresses, as the operator configured them (never from a workload or
    /// a spec): a pinned name is not looked up in DNS, and its addresses may be private or local
    /// — that is the point, e.g. an internal API on the LAN. A pin opens nothing by itself: the
    /// name must still be allow-listed.
    pub fn with_pins(mut self, pins: impl IntoIterator<Item = (String, IpAddr)>) -> Self {
        for (host, ip) in pins {
            self.pins.entry(normalize(&host)).or_default().push(ip);
        }
        self
    }

    /// Calls `observer` for every refused destination.
    pub fn with_observer(mut self, observer: DenialObserver) -> Self {
        self.on_denied = Some(observer);
        self
    }

    /// Whether nothing at all is allowed.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty()
    }

    /// Closes egress for good: the proxy stops accepting and cuts every open connection.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves once [`EgressPolicy::close`] was called.
    pub async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Checks a destination before anything is resolved or connected.
    ///
    /// # Errors
    /// The reason the destination is refused.
    pub fn check(&self, host: &str, port: u16) -> Result<(), Denied> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<IpAddr>().is_ok() {
            return Err(Denied::IpLiteral {
                host: host.to_string(),
            });
        }
        let host = normalize(host);
        let Some(ports) = self.allow.get(&host) else {
            return Err(Denied::NotAllowed { host });
        };
        if !ports.allows(port) {
            return Err(Denied::Port { host, port });
        }
        Ok(())
    }

    /// Checks and resolves a destination; every address it resolves to must be public.
    ///
    /// # Errors
    /// The reason the destination is refused.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Denied> {
        self.check(host, port)?;
        let host = normalize(host);
        if let Some(ips) = self.pins.get(&host) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| Denied::Unresolvable {
                host: host.clone(),
                error: e.to_string(),
            })?
            .collect();
        if addrs.is_empty() {
            return Err(Denied::Unresolvable {
                host,
                error: "no addresses".into(),
            });
        }
        if let Some(bad) = addrs.iter().find(|a| !is_allowed_destination(a.ip())) {
            return Err(Denied::NonPublicAddress {
                host,
                addr: bad.ip(),
            });
        }
        Ok(addrs)
    }
}

/// Whether the proxy may connect to `ip`: a unicast address outside every loopback, private,
/// link-local, shared (CGNAT), multicast and reserved range — so never this machine, its LAN,
/// the control plane or another sandbox. Documentation ranges are allowed: they are not local,
/// and some egress gateways answer DNS with them.
pub fn is_allowed_destination(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_allowed_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_allowed_v4(v4);
            }
            let seg0 = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg0 & 0xfe00) == 0xfc00 // unique local
                || (seg0 & 0xffc0) == 0xfe80 // link-local
                || (seg0 & 0xffc0) == 0xfec0 // site-local (deprecated)
                || v6.segments()[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible
                || seg0 == 0x0064 && v6.segments()[1] == 0xff9b) // NAT64 maps to any IPv4
        }
    }
}

fn is_allowed_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space (CGNAT)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking
        || o[0] >= 240) // reserved
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn denied(
    policy: &EgressPolicy,
    sandbox: &str,
    host: &str,
    port: u16,
    reason: &Denied,
) -> Response<ProxyBody> {
    tracing::warn!(sandbox, host, port, %reason, "egress denied");
    if let Some(observe) = &policy.on_denied {
        observe(&DeniedAttempt {
            sandbox: sandbox.to_string(),
            host: host.to_string(),
            port,
            reason: reason.clone(),
        });
    }
    text(
        StatusCode::FORBIDDEN,
        format!("slipway egress proxy: denied: {reason}\n"),
    )
}

async fn connect_any(addrs: &[SocketAddr]) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::other("no addresses");
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        }
    }
    Err(last)
}

/// Serves the proxy on `listener` (normally a listener inside a sandbox's network namespace)
/// until the task is aborted.
pub async fn serve(listener: TcpListener, policy: Arc<EgressPolicy>, sandbox_id: String) {
    let sandbox: Arc<str> = sandbox_id.into();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = policy.closed() => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let (policy, sandbox) = (policy.clone(), sandbox.clone());
        tokio::spawn(async move {
            let closing = policy.clone();
            let service = hyper::service::service_fn(move |req| {
                let (policy, sandbox) = (policy.clone(), sandbox.clone());
                async move { Ok::<_, Infallible>(handle(req, &policy, &sandbox).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                () = closing.closed() => {}
            }
        });
    }
}

/// The proxy settings a command needs to use a proxy on the sandbox's loopback `port`: the
/// variables curl, npm, pip, Node's and Python's HTTP clients read. Local names bypass it.
pub fn proxy_env(port: u16) -> Vec<(String, String)> {
    let proxy = format!("http://127.0.0.1:{port}");
    let mut env: Vec<(String, String)> = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "npm_config_proxy",
        "npm_config_https_proxy",
    ]
    .into_iter()
    .map(|k| (k.to_string(), proxy.clone()))
    .collect();
    for key in ["NO_PROXY", "no_proxy"] {
        env.push((key.to_string(), "localhost,127.0.0.1".to_string()));
    }
    env
}

/// A proxy served on a listener inside a sandbox (see [`crate::Sandbox::listen`]) for as long
/// as this handle lives: the run-time egress of an app whose spec allow-lists hosts. Dropping or
/// closing it stops the listener and cuts every connection it holds.
pub struct EgressProxy {
    policy: Arc<EgressPolicy>,
    task: tokio::task::JoinHandle<()>,
    port: u16,
}

impl EgressProxy {
    /// Serves `policy` on `listener` (bound inside the sandbox `sandbox_id`).
    ///
    /// # Errors
    /// When the listener's local address cannot be read.
    pub fn start(
        listener: TcpListener,
        policy: EgressPolicy,
        sandbox_id: impl Into<String>,
    ) -> std::io::Result<Self> {
        let port = listener.local_addr()?.port();
        let policy = Arc::new(policy);
        let task = tokio::spawn(serve(listener, policy.clone(), sandbox_id.into()));
        Ok(Self { policy, task, port })
    }

    /// The port it listens on, on the sandbox's loopback.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Environment for commands that should use this proxy ([`proxy_env`]).
    pub fn env(&self) -> Vec<(String, String)> {
        proxy_env(self.port)
    }

    /// Stops the proxy and cuts its connections. Idempotent.
    pub fn close(&self) {
        self.policy.close();
        self.task.abort();
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.close();
    }
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressProxy")
            .field("port", &self.port)
            .field("policy", &self.policy)
            .finish()
    }
}

async fn handle(
    req: Request<Incoming>,
    policy: &EgressPolicy,
    sandbox: &str,
) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        return tunnel(req, policy, sandbox).await;
    }
    forward(req, policy, sandbox).await
}

async fn tunnel(
    req: Request<Incoming>,
    policy: &EgressPolicy,
    sandbox: &str,
) -> Response<ProxyBody> {
    let Some(authority) = req.uri().authority().cloned() else {
        return text(StatusCode::BAD_REQUEST, "CONNECT needs host:port\n".into());
    };
    let (host, port) = (authority.host(), authority.port_u16().unwrap_or(443));
    let addrs = match policy.resolve(host, port).await {
        Ok(a) => a,
        Err(reason) => return denied(policy, sandbox, host, port, &reason),
    };
    let mut upstream = match connect_any(&addrs).await {
        Ok(s) => s,
        Err(e) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("cannot connect to {host}:{port}: {e}\n"),
            )
        }
    };
    tracing::debug!(sandbox, host, port, "egress tunnel");
    let closing = policy.closed.subscribe();
    tokio::spawn(async move {
        let mut closing = closing;
        let copy = async {
            if let Ok(upgraded) = hyper::upgrade::on(req).await {
                let mut client = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        };
        tokio::select! {
            () = copy => {}
            _ = closing.wait_for(|c| *c) => {}
        }
    });
    Response::new(Empty::new().map_err(|never| match never {}).boxed())
}

async fn forward(
    mut req: Request<Incoming>,
    policy: &EgressPolicy,
    sandbox: &str,
) -> Response<ProxyBody> {
    let uri = req.uri().clone();
    let (Some("http"), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "slipway egress proxy: only absolute http:// requests and CONNECT are proxied\n".into(),
        );
    };
    let (host, port) = (authority.host(), authority.port_u16().unwrap_or(80));
    let addrs = match policy.resolve(host, port).await {
        Ok(a) => a,
        Err(reason) => return denied(policy, sandbox, host, port, &reason),
    };
    let upstream = match connect_any(&addrs).await {
        Ok(s) => s,
        Err(e) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("cannot connect to {host}:{port}: {e}\n"),
            )
        }
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(pair) => pair,
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("upstream {host}:{port}: {e}\n"),
                )
            }
        };
    let mut closing = policy.closed.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            _ = conn => {}
            _ = closing.wait_for(|c| *c) => {}
        }
    });
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    *req.uri_mut() = path.parse().expect("a path taken from a valid URI parses");
    let headers = req.headers_mut();
    headers.remove("proxy-connection");
    headers.remove("proxy-authorization");
    if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
        headers.insert(HOST, value);
    }
    match sender.send_request(req).await {
        Ok(resp) => resp.map(|body| body.boxed()),
        Err(e) => text(
            StatusCode::BAD_GATEWAY,
            format!("upstream {host}:{port}: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allow_listed_names_on_web_ports() {
        let policy = EgressPolicy::new(["Registry.Example.".to_string()]);
        assert_eq!(policy.check("registry.example", 443), Ok(()));
        assert_eq!(policy.check("REGISTRY.example.", 80), Ok(()));
        assert_eq!(
            policy.check("registry.example", 22),
            Err(Denied::Port {
                host: "registry.example".into(),
                port: 22
            })
        );
        assert!(matches!(
            policy.check("other.example", 443),
            Err(Denied::NotAllowed { .. })
        ));
        assert!(matches!(
            policy.check("127.0.0.1", 443),
            Err(Denied::IpLiteral { .. })
        ));
        assert!(matches!(
            policy.check("[::1]", 443),
            Err(Denied::IpLiteral { .. })
        ));
        assert!(matches!(
            policy.check("evil.registry.example", 443),
            Err(Denied::NotAllowed { .. })
        ));
    }

    #[test]
    fn entries_with_a_port_allow_only_that_port() {
        let policy = EgressPolicy::new([
            "api.example:8443".to_string(),
            "both.example".to_string(),
            "both.example:9000".to_string(),
        ]);
        assert_eq!(policy.check("api.example", 8443), Ok(()));
        assert_eq!(
            policy.check("api.example", 443),
            Err(Denied::Port {
                host: "api.example".into(),
                port: 443
            })
        );
        assert_eq!(policy.check("both.example", 443), Ok(()));
        assert_eq!(policy.check("both.example", 9000), Ok(()));
        assert!(policy.check("both.example", 9001).is_err());
        // Not a port: the whole entry is a (never matching) name.
        let odd = EgressPolicy::new(["x.example:http".to_string(), "[::1]".to_string()]);
        assert!(odd.check("x.example", 80).is_err());
        assert!(EgressPolicy::new(Vec::new()).is_empty());
    }

    #[tokio::test]
    async fn pinned_names_skip_dns_and_the_public_check_but_not_the_allowlist() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let policy = EgressPolicy::new(["upstream.test:4000".to_string()]).with_pins([
            ("Upstream.Test".to_string(), ip),
            ("other.test".to_string(), ip),
        ]);
        assert_eq!(
            policy.resolve("upstream.test", 4000).await,
            Ok(vec![SocketAddr::new(ip, 4000)])
        );
        assert!(matches!(
            policy.resolve("other.test", 443).await,
            Err(Denied::NotAllowed { .. })
        ));
        assert!(matches!(
            policy.resolve("upstream.test", 443).await,
            Err(Denied::Port { .. })
        ));
    }

    #[test]
    fn proxy_env_names_every_variable_package_managers_read() {
        let env = proxy_env(3130);
        for key in ["HTTP_PROXY", "https_proxy", "npm_config_https_proxy"] {
            assert!(env.contains(&(key.to_string(), "http://127.0.0.1:3130".to_string())));
        }
        assert!(env.iter().any(|(k, _)| k == "NO_PROXY"));
    }

    #[test]
    fn local_and_private_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(
                !is_allowed_destination(ip.parse().unwrap()),
                "{ip} must be refused"
            );
        }
        for ip in ["1.1.1.1", "151.101.1.1", "2606:4700::1111", "203.0.113.80"] {
            assert!(
                is_allowed_destination(ip.parse().unwrap()),
                "{ip} is allowed"
            );
        }
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused() {
        let policy = EgressPolicy::new(["localhost".to_string()]);
        match policy.resolve("localhost", 443).await {
            Err(Denied::NonPublicAddress { addr, .. }) => assert!(addr.is_loopback()),
            other => panic!("expected a non-public refusal, got {other:?}"),
        }
    }
}
