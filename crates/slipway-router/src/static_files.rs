//! The static file server for static releases: no per-app process, files straight from the
//! release tree.
//!
//! Decisions (also in the crate docs):
//! - `ETag` is strong and derived from the file's identity and change times (device, inode,
//!   size, mtime and ctime with nanoseconds). Release trees are immutable, so a file's bytes
//!   never change under one tag; a new release has new inodes and ctimes even when the tar
//!   fixed every mtime. Hashing content would cost a full read per new file for no gain.
//! - `/dir` redirects (308) to `/dir/`, which serves `dir/index.html`; no directory listing.
//! - Dotfiles and dot-directories are never served (404), except `/.well-known/`.
//! - `..`/`.` segments (also percent-encoded) and encoded `/` or NUL are refused with 400; a
//!   symlink resolving outside the root is answered like a missing file (404).
//! - Cache-Control: HTML files `no-cache` (always revalidated, so a new deploy shows at once);
//!   other files `public, max-age=300` unless the site sets another value.
//! - Files up to [`CACHE_MAX_FILE`] are kept in memory after their first request, together with
//!   their `.br`/`.gz` siblings and the prebuilt headers of every form, up to a byte budget per
//!   site ([`StaticSite::with_cache_limit`]) and a process-wide one shared by all sites
//!   ([`CacheBudget`]). Release trees are immutable and content-addressed,
//!   so an entry never goes stale: a new release is a new [`StaticSite`] with an empty cache,
//!   and the old one's memory goes with its route. A hit costs no system call.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::header::{
    HeaderValue, ACCEPT, ACCEPT_ENCODING, ACCEPT_RANGES, ALLOW, CACHE_CONTROL, CONTENT_ENCODING,
    CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
    LAST_MODIFIED, LOCATION, RANGE, VARY,
};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use tracing::debug;

use crate::body::RouterBody;
use crate::error_page::{error_response, ErrorCode};

/// Files up to this size are read in one go on the I/O thread and sent from memory; larger
/// ones are streamed through `tokio::fs` (its blocking pool).
const SMALL_FILE: u64 = 64 * 1024;
/// Largest file (and precompressed sibling) kept in a site's memory cache.
pub(crate) const CACHE_MAX_FILE: u64 = 2 * 1024 * 1024;
/// Default memory budget of all sites' caches together (the process-wide [`CacheBudget`]).
const DEFAULT_TOTAL_CACHE_LIMIT: u64 = 256 * 1024 * 1024;
/// Default memory budget of one site's cache.
const DEFAULT_CACHE_LIMIT: u64 = 32 * 1024 * 1024;
/// Bytes charged per cache entry on top of its contents: key, maps, prebuilt headers.
const CACHE_ENTRY_OVERHEAD: u64 = 512;
const DEFAULT_ASSET_CACHE_CONTROL: &str = "public, max-age=300";

/// A static release served by the router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticSite {
    inner: Arc<SiteInner>,
}

#[derive(Debug)]
struct SiteInner {
    /// Canonical (symlink-free, absolute) root, so containment is a prefix check.
    root: PathBuf,
    /// The root, held open: files are opened relative to it with `RESOLVE_BENEATH`.
    root_fd: Arc<OwnedFd>,
    spa_fallback: bool,
    asset_cache_control: HeaderValue,
    /// Memory budget of `cache`, in bytes; 0 turns caching off.
    cache_limit: u64,
    cache: FileCache,
}

impl PartialEq for SiteInner {
    fn eq(&self, other: &Self) -> bool {
        self.root == other.root
            && self.spa_fallback == other.spa_fallback
            && self.asset_cache_control == other.asset_cache_control
            && self.cache_limit == other.cache_limit
    }
}

impl Eq for SiteInner {}

/// A static site root that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum StaticSiteError {
    #[error("cannot resolve static root {path}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("static root {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("invalid cache-control value {value:?}")]
    CacheControl { value: String },
}

impl StaticSite {
    /// Serves the directory `root` (resolved once, here), without SPA fallback.
    ///
    /// # Errors
    /// [`StaticSiteError::Root`] when `root` cannot be resolved, [`StaticSiteError::NotADirectory`]
    /// when it is not a directory.
    pub fn new(root: impl AsRef<Path>) -> Result<Self, StaticSiteError> {
        let path = root.as_ref();
        let root = std::fs::canonicalize(path).map_err(|source| StaticSiteError::Root {
            path: path.to_owned(),
            source,
        })?;
        if !root.is_dir() {
            return Err(StaticSiteError::NotADirectory {
                path: path.to_owned(),
            });
        }
        let root_fd = File::open(&root).map_err(|source| StaticSiteError::Root {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            inner: Arc::new(SiteInner {
                root,
                root_fd: Arc::new(root_fd.into()),
                spa_fallback: false,
                asset_cache_control: HeaderValue::from_static(DEFAULT_ASSET_CACHE_CONTROL),
                cache_limit: DEFAULT_CACHE_LIMIT,
                cache: FileCache::default(),
            }),
        })
    }

    /// With fallback on, a request for a missing path without a file extension from a client
    /// that accepts HTML gets `/index.html` with 200 (client-side routing of single-page apps).
    pub fn with_spa_fallback(self, on: bool) -> Self {
        self.map(|inner| inner.spa_fallback = on)
    }

    /// Replaces the `Cache-Control` of non-HTML files (default `public, max-age=300`).
    ///
    /// # Errors
    /// [`StaticSiteError::CacheControl`] when `value` is not a valid header value.
    pub fn with_asset_cache_control(self, value: &str) -> Result<Self, StaticSiteError> {
        let value = HeaderValue::from_str(value).map_err(|_| StaticSiteError::CacheControl {
            value: value.to_owned(),
        })?;
        Ok(self.map(|inner| inner.asset_cache_control = value))
    }

    /// Sets the memory budget of the site's file cache (default 32 MiB); 0 turns it off.
    ///
    /// Files up to 2 MiB are kept in memory from their first request on, with their
    /// precompressed siblings and prebuilt headers, and never read again. Only for trees that
    /// do not change while served, such as static releases; a file changed in place would keep
    /// being served as it was.
    pub fn with_cache_limit(self, bytes: u64) -> Self {
        self.map(|inner| inner.cache_limit = bytes)
    }

    /// Charges the site's cache to `budget` instead of the process-wide one
    /// ([`CacheBudget::global`]); the cache starts empty.
    pub fn with_cache_budget(self, budget: Arc<CacheBudget>) -> Self {
        self.map(|inner| inner.cache = FileCache::with_budget(budget))
    }

    /// Bytes the file cache currently holds (contents plus bookkeeping).
    pub fn cached_bytes(&self) -> u64 {
        self.inner.cache.read().bytes
    }

    /// The canonical root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Whether SPA fallback is on.
    pub fn spa_fallback(&self) -> bool {
        self.inner.spa_fallback
    }

    fn map(self, f: impl FnOnce(&mut SiteInner)) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| SiteInner {
            root: shared.root.clone(),
            root_fd: Arc::clone(&shared.root_fd),
            spa_fallback: shared.spa_fallback,
            asset_cache_control: shared.asset_cache_control.clone(),
            cache_limit: shared.cache_limit,
            cache: FileCache::with_budget(Arc::clone(&shared.cache.budget)),
        });
        f(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }
}

/// What decides how a file is answered, borrowed from the request.
struct Conditions<'a> {
    head: bool,
    json: bool,
    if_none_match: Option<&'a str>,
    if_modified_since: Option<SystemTime>,
    range: Option<&'a str>,
    if_range: Option<&'a str>,
    accepts_br: bool,
    accepts_gzip: bool,
}

impl<'a> Conditions<'a> {
    fn new(headers: &'a HeaderMap, head: bool, json: bool) -> Self {
        let text = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let (accepts_br, accepts_gzip) = accepted_encodings(headers);
        Self {
            head,
            json,
            if_none_match: text(&IF_NONE_MATCH),
            if_modified_since: text(&IF_MODIFIED_SINCE)
                .and_then(|v| httpdate::parse_http_date(v).ok()),
            range: text(&RANGE),
            if_range: text(&IF_RANGE),
            accepts_br,
            accepts_gzip,
        }
    }
}

/// A request that missed the cache, decoded.
struct FileRequest<'a> {
    /// The raw request path, the cache key.
    path: &'a str,
    segments: Vec<String>,
    trailing_slash: bool,
    query: Option<&'a str>,
    accepts_html: bool,
    cond: Conditions<'a>,
}

/// Answers `req` from `site`.
pub(crate) fn serve<B>(site: &StaticSite, req: &Request<B>, json: bool) -> Response<RouterBody> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut response = error_response(ErrorCode::MethodNotAllowed, json);
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
    };
    let path = req.uri().path();
    let headers = req.headers();
    let cond = Conditions::new(headers, head, json);
    // The raw path is the key: it was validated and resolved when the entry was made.
    if let Some(response) = site.inner.cache.answer(path, &cond) {
        return response;
    }
    let segments = match decode_path(path) {
        Ok(segments) => segments,
        Err(PathError::Invalid) => return error_response(ErrorCode::BadPath, json),
        Err(PathError::Hidden) => return error_response(ErrorCode::NotFound, json),
    };
    let request = FileRequest {
        path,
        segments,
        trailing_slash: path.ends_with('/'),
        query: req.uri().query(),
        accepts_html: headers
            .get_all(ACCEPT)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.contains("text/html"))),
        cond,
    };
    // Resolving, opening and reading a small file happen right here, on the I/O thread, as
    // nginx does without `aio threads`: release trees sit on local disk, mostly in the page
    // cache, where these calls take microseconds. A hop to the blocking pool per request would
    // cost more than the calls themselves. Larger files stream through `tokio::fs`.
    respond(site, &request)
}

fn respond(site: &StaticSite, req: &FileRequest) -> Response<RouterBody> {
    let relative: PathBuf = req.segments.iter().collect();
    match open_within(site, &relative) {
        Some(Opened::File(path, file, meta)) if !req.trailing_slash => {
            serve_file(site, req, &path, file, meta, true)
        }
        Some(Opened::Dir(dir)) => {
            if !req.trailing_slash {
                return redirect_to_dir(req);
            }
            match open_within(site, &dir.join("index.html")) {
                Some(Opened::File(path, file, meta)) => {
                    serve_file(site, req, &path, file, meta, true)
                }
                _ => not_found(site, req),
            }
        }
        _ => not_found(site, req),
    }
}

/// What a path relative to the root turned out to be; paths stay relative to the root.
enum Opened {
    File(PathBuf, File, Metadata),
    Dir(PathBuf),
}

/// Set once `openat2` turned out to be unavailable (old kernel, seccomp filter).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens `relative` (to the root) if it resolves, through any symlinks, to a regular file or
/// a directory inside the root.
///
/// `openat2` with `RESOLVE_BENEATH` makes the kernel refuse any resolution leaving the root
/// (`..` or a symlink pointing out, absolute symlinks included: their targets name paths
/// inside the build sandbox, meaningless here) in one syscall and without a race. Where it
/// is unavailable, the path is canonicalised and checked for the root prefix instead.
fn open_within(site: &StaticSite, relative: &Path) -> Option<Opened> {
    let relative = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    let file = if NO_OPENAT2.load(Ordering::Relaxed) {
        open_canonical(site, relative)?
    } else {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match openat2(site.inner.root_fd.as_fd(), relative, how) {
            Ok(fd) => File::from(fd),
            Err(Errno::ENOSYS) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
                open_canonical(site, relative)?
            }
            Err(Errno::EXDEV) => {
                debug!(path = %relative.display(), "refused: resolves outside the static root");
                return None;
            }
            Err(_) => return None,
        }
    };
    let meta = file.metadata().ok()?;
    if meta.is_dir() {
        Some(Opened::Dir(relative.to_owned()))
    } else if meta.is_file() {
        Some(Opened::File(relative.to_owned(), file, meta))
    } else {
        None
    }
}

/// The fallback of [`open_within`]: canonicalise, check the root prefix, refuse hidden targets.
fn open_canonical(site: &StaticSite, relative: &Path) -> Option<File> {
    let canonical = std::fs::canonicalize(site.inner.root.join(relative)).ok()?;
    let Ok(inside) = canonical.strip_prefix(&site.inner.root) else {
        debug!(path = %relative.display(), "refused: resolves outside the static root");
        return None;
    };
    if inside.iter().any(|c| is_hidden(&c.to_string_lossy())) {
        return None;
    }
    File::open(&canonical).ok()
}

fn not_found(site: &StaticSite, req: &FileRequest) -> Response<RouterBody> {
    let extensionless = req.segments.last().is_none_or(|last| !last.contains('.'));
    if site.inner.spa_fallback && extensionless && req.accepts_html {
        if let Some(Opened::File(path, file, meta)) = open_within(site, Path::new("index.html")) {
            // Not cached under this path: the answer depends on `Accept`.
            return serve_file(site, req, &path, file, meta, false);
        }
    }
    error_response(ErrorCode::NotFound, req.cond.json)
}

fn redirect_to_dir(req: &FileRequest) -> Response<RouterBody> {
    // Rebuilt from the decoded segments, never from the raw path: a raw `//host` would make the
    // Location an off-site, protocol-relative URL.
    let mut location = String::from("/");
    for segment in &req.segments {
        location.extend(utf8_percent_encode(segment, PATH_SEGMENT));
        location.push('/');
    }
    if let Some(query) = req.query {
        location.push('?');
        location.push_str(query);
    }
    let mut response = Response::new(RouterBody::empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

/// Characters escaped when a decoded segment goes back into a URL path.
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Answers with the file at `path` (relative to the root), from the cache when `cacheable`
/// (the answer does not depend on more than the raw path) and the file fits.
fn serve_file(
    site: &StaticSite,
    req: &FileRequest,
    path: &Path,
    file: File,
    meta: Metadata,
    cacheable: bool,
) -> Response<RouterBody> {
    if cacheable {
        if let Some(entry) = cache_fill(site, req.path, path, &file, &meta) {
            return entry.respond(&req.cond);
        }
    }
    let content_type = header_value(&content_type(path));
    let cache_control = cache_control_for(site, &content_type);
    let (file, meta, encoding) = precompressed(site, &req.cond, path)
        .map_or((file, meta, None), |(f, m, e)| (f, m, Some(e)));
    let representation = Representation::new(&content_type, &cache_control, &meta, encoding);
    let (mut response, start, len) = match representation.answer(&req.cond) {
        Answer::Send(response, start, len) => (response, start, len),
        Answer::Done(response) => return response,
    };
    if req.cond.head || len == 0 {
        return response;
    }
    let body = if len <= SMALL_FILE {
        let mut buf = vec![0; len as usize];
        match file.read_exact_at(&mut buf, start) {
            Ok(()) => RouterBody::full(Bytes::from(buf)),
            Err(err) => {
                debug!(path = %path.display(), error = %err, "reading static file failed");
                return error_response(ErrorCode::NotFound, req.cond.json);
            }
        }
    } else {
        let mut file = file;
        if let Err(err) = file.seek(SeekFrom::Start(start)) {
            debug!(path = %path.display(), error = %err, "seeking static file failed");
            return error_response(ErrorCode::NotFound, req.cond.json);
        }
        RouterBody::file(tokio::fs::File::from_std(file), len)
    };
    *response.body_mut() = body;
    response
}

fn cache_control_for(site: &StaticSite, content_type: &HeaderValue) -> HeaderValue {
    if content_type.as_bytes().starts_with(b"text/html") {
        HeaderValue::from_static("no-cache")
    } else {
        site.inner.asset_cache_control.clone()
    }
}

/// What [`Representation::answer`] decided.
enum Answer {
    /// Send this response with `len` bytes of the file from `start` as its body.
    Send(Response<RouterBody>, u64, u64),
    /// Send this response as it is (304, 416).
    Done(Response<RouterBody>),
}

/// One form of a file (as stored, or a precompressed sibling): the headers of a full answer
/// and what conditional and range requests are compared with.
struct Representation {
    /// `200` headers, `Content-Length` and `Accept-Ranges` included.
    headers: HeaderMap,
    etag: HeaderValue,
    modified: Option<SystemTime>,
    size: u64,
}

impl Representation {
    fn new(
        content_type: &HeaderValue,
        cache_control: &HeaderValue,
        meta: &Metadata,
        encoding: Option<&'static str>,
    ) -> Self {
        let etag = header_value(&etag(meta));
        let modified = meta.modified().ok();
        let mut headers = HeaderMap::with_capacity(12);
        headers.insert(CONTENT_TYPE, content_type.clone());
        headers.insert(ETAG, etag.clone());
        if let Some(modified) = modified {
            headers.insert(
                LAST_MODIFIED,
                header_value(&httpdate::fmt_http_date(modified)),
            );
        }
        headers.insert(CACHE_CONTROL, cache_control.clone());
        headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
        headers.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        if let Some(encoding) = encoding {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static(encoding));
        }
        headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(meta.len()));
        Self {
            headers,
            etag,
            modified,
            size: meta.len(),
        }
    }

    /// The answer's status and headers with the byte range to send, or a complete answer
    /// without body (304, 416).
    fn answer(&self, cond: &Conditions) -> Answer {
        // Our tags are ASCII.
        let etag = self.etag.to_str().unwrap_or_default();
        let mut response = Response::new(RouterBody::empty());
        if not_modified(cond, etag, self.modified) {
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            let mut headers = self.headers.clone();
            for name in [CONTENT_TYPE, CONTENT_LENGTH, ACCEPT_RANGES] {
                headers.remove(name);
            }
            *response.headers_mut() = headers;
            return Answer::Done(response);
        }
        let size = self.size;
        match requested_range(cond, etag, self.modified, size) {
            RangeRequest::Full => {
                *response.headers_mut() = self.headers.clone();
                Answer::Send(response, 0, size)
            }
            RangeRequest::Single { start, end } => {
                *response.status_mut() = StatusCode::PARTIAL_CONTENT;
                let mut headers = self.headers.clone();
                let range = format!("bytes {start}-{end}/{size}");
                headers.insert(CONTENT_RANGE, header_value(&range));
                let len = end - start + 1;
                headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
                *response.headers_mut() = headers;
                Answer::Send(response, start, len)
            }
            RangeRequest::Unsatisfiable => {
                let mut response = error_response(ErrorCode::RangeNotSatisfiable, cond.json);
                response
                    .headers_mut()
                    .insert(CONTENT_RANGE, header_value(&format!("bytes */{size}")));
                Answer::Done(response)
            }
        }
    }
}

/// A file held in memory, with its precompressed siblings.
struct CachedFile {
    identity: (Representation, Bytes),
    br: Option<(Representation, Bytes)>,
    gzip: Option<(Representation, Bytes)>,
}

impl CachedFile {
    fn respond(&self, cond: &Conditions) -> Response<RouterBody> {
        // The same preference as `precompressed`: brotli, then gzip, then the file itself.
        let (representation, bytes) = match (&self.br, &self.gzip) {
            (Some(br), _) if cond.accepts_br => br,
            (_, Some(gzip)) if cond.accepts_gzip => gzip,
            _ => &self.identity,
        };
        let (mut response, start, len) = match representation.answer(cond) {
            Answer::Send(response, start, len) => (response, start, len),
            Answer::Done(response) => return response,
        };
        if !cond.head && len > 0 {
            // `answer` keeps ranges within the file; both fit in memory, so in `usize`.
            let (start, end) = (start as usize, (start + len) as usize);
            *response.body_mut() = RouterBody::full(bytes.slice(start..end));
        }
        response
    }

    fn bytes(&self) -> u64 {
        [Some(&self.identity), self.br.as_ref(), self.gzip.as_ref()]
            .into_iter()
            .flatten()
            .map(|(_, bytes)| bytes.len() as u64)
            .sum()
    }
}

/// Memory that several sites' caches share, so that many static deployments together stay
/// within one bound. Each site also has its own limit ([`StaticSite::with_cache_limit`]).
#[derive(Debug)]
pub struct CacheBudget {
    limit: std::sync::atomic::AtomicU64,
    used: std::sync::atomic::AtomicU64,
}

impl CacheBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.into(),
            used: 0.into(),
        })
    }

    /// The process-wide budget every site uses unless told otherwise (default 256 MiB).
    pub fn global() -> &'static Arc<Self> {
        static GLOBAL: std::sync::OnceLock<Arc<CacheBudget>> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| Self::new(DEFAULT_TOTAL_CACHE_LIMIT))
    }

    /// Changes the limit; what is already cached stays (nothing is evicted).
    pub fn set_limit(&self, bytes: u64) {
        self.limit
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes the caches charged to this budget hold.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit.
    fn reserve(&self, bytes: u64) -> bool {
        let limit = self.limit.load(std::sync::atomic::Ordering::Relaxed);
        self.used
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |used| used.checked_add(bytes).filter(|&total| total <= limit),
            )
            .is_ok()
    }

    fn release(&self, bytes: u64) {
        self.used
            .fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A site's small files in memory, by raw request path. Filled on first request, never
/// evicted (the tree does not change); once the site's limit or the shared budget is spent,
/// further files are read from disk per request as without a cache. Its bytes go back to the
/// budget when the site is dropped (its route replaced).
struct FileCache {
    state: RwLock<CacheState>,
    budget: Arc<CacheBudget>,
}

impl Default for FileCache {
    fn default() -> Self {
        Self::with_budget(Arc::clone(CacheBudget::global()))
    }
}

impl Drop for FileCache {
    fn drop(&mut self) {
        let bytes = self
            .state
            .get_mut()
            .map_or_else(|poisoned| poisoned.into_inner().bytes, |state| state.bytes);
        self.budget.release(bytes);
    }
}

#[derive(Default)]
struct CacheState {
    /// Raw request path → file. Several paths may name one file (`/`, `/index.html`).
    by_path: HashMap<Box<str>, Arc<CachedFile>>,
    /// Path relative to the root → file, so aliases share one copy.
    by_file: HashMap<PathBuf, Arc<CachedFile>>,
    bytes: u64,
}

impl FileCache {
    fn with_budget(budget: Arc<CacheBudget>) -> Self {
        Self {
            state: RwLock::default(),
            budget,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, CacheState> {
        // Every write leaves the maps consistent; a panic cannot interrupt one half-way.
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, CacheState> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The answer for `path` when it is cached.
    fn answer(&self, path: &str, cond: &Conditions) -> Option<Response<RouterBody>> {
        self.read()
            .by_path
            .get(path)
            .map(|entry| entry.respond(cond))
    }
}

impl std::fmt::Debug for FileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.read();
        f.debug_struct("FileCache")
            .field("paths", &state.by_path.len())
            .field("files", &state.by_file.len())
            .field("bytes", &state.bytes)
            .finish()
    }
}

/// The cache entry of `key` (a raw request path resolving to `relative`), made now if the file
/// and its precompressed siblings fit; `None` sends the caller to the uncached path.
fn cache_fill(
    site: &StaticSite,
    key: &str,
    relative: &Path,
    file: &File,
    meta: &Metadata,
) -> Option<Arc<CachedFile>> {
    let limit = site.inner.cache_limit;
    if limit == 0 || meta.len() > CACHE_MAX_FILE {
        return None;
    }
    let cache = &site.inner.cache;
    let relative = relative.strip_prefix(".").unwrap_or(relative);
    let alias_cost = key.len() as u64 + CACHE_ENTRY_OVERHEAD;
    let known = {
        let state = cache.read();
        if state.bytes + meta.len() + alias_cost > limit {
            return None;
        }
        state.by_file.get(relative).cloned()
    };
    let (entry, cost) = match known {
        Some(entry) => (entry, alias_cost),
        None => {
            let entry = Arc::new(load_cached(site, relative, file, meta)?);
            let cost = entry.bytes() + alias_cost;
            (entry, cost)
        }
    };
    let mut state = cache.write();
    if state.bytes + cost > limit || state.by_path.contains_key(key) || !cache.budget.reserve(cost)
    {
        // Another request filled it, or a budget ran out: serve what was read.
        return Some(entry);
    }
    state.bytes += cost;
    state
        .by_file
        .entry(relative.to_owned())
        .or_insert_with(|| Arc::clone(&entry));
    state.by_path.insert(key.into(), Arc::clone(&entry));
    Some(entry)
}

/// Reads `file` and its `.br`/`.gz` siblings into memory; `None` when one of them is too big
/// or cannot be read (the uncached path then answers).
fn load_cached(
    site: &StaticSite,
    relative: &Path,
    file: &File,
    meta: &Metadata,
) -> Option<CachedFile> {
    let read_all = |file: &File, len: u64| -> Option<Bytes> {
        let mut buf = vec![0; usize::try_from(len).ok()?];
        file.read_exact_at(&mut buf, 0).ok()?;
        Some(Bytes::from(buf))
    };
    let content_type = header_value(&content_type(relative));
    let cache_control = cache_control_for(site, &content_type);
    let identity = (
        Representation::new(&content_type, &cache_control, meta, None),
        read_all(file, meta.len())?,
    );
    let name = relative.file_name()?.to_str()?;
    let sibling =
        |extension: &str, encoding: &'static str| -> Option<Option<(Representation, Bytes)>> {
            match open_within(
                site,
                &relative.with_file_name(format!("{name}.{extension}")),
            ) {
                Some(Opened::File(_, file, meta)) if meta.len() <= CACHE_MAX_FILE => Some(Some((
                    Representation::new(&content_type, &cache_control, &meta, Some(encoding)),
                    read_all(&file, meta.len())?,
                ))),
                // Too big to keep: the whole file stays uncached.
                Some(Opened::File(..)) => None,
                _ => Some(None),
            }
        };
    Some(CachedFile {
        identity,
        br: sibling("br", "br")?,
        gzip: sibling("gz", "gzip")?,
    })
}

/// The `.br` or `.gz` sibling of `path`, when the client accepts that encoding and the
/// sibling exists inside the root.
fn precompressed(
    site: &StaticSite,
    req: &Conditions,
    path: &Path,
) -> Option<(File, Metadata, &'static str)> {
    let name = path.file_name()?.to_str()?;
    let candidates = [
        (req.accepts_br, "br", "br"),
        (req.accepts_gzip, "gz", "gzip"),
    ];
    for (accepted, extension, encoding) in candidates {
        if !accepted {
            continue;
        }
        if let Some(Opened::File(_, file, meta)) =
            open_within(site, &path.with_file_name(format!("{name}.{extension}")))
        {
            return Some((file, meta, encoding));
        }
    }
    None
}

/// See the module docs for why these fields identify one immutable byte sequence.
fn etag(meta: &Metadata) -> String {
    let mut hasher = DefaultHasher::new();
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
        .hash(&mut hasher);
    format!("\"{:016x}\"", hasher.finish())
}

/// RFC 9110 §13.2.2: `If-None-Match` (weak comparison) decides when present; otherwise
/// `If-Modified-Since`, at one-second resolution.
fn not_modified(req: &Conditions, etag: &str, modified: Option<SystemTime>) -> bool {
    if let Some(tags) = req.if_none_match {
        return tags
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag);
    }
    match (req.if_modified_since, modified) {
        (Some(since), Some(modified)) => unix_secs(modified) <= unix_secs(since),
        _ => false,
    }
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    Full,
    /// Inclusive byte positions.
    Single {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

fn requested_range(
    req: &Conditions,
    etag: &str,
    modified: Option<SystemTime>,
    size: u64,
) -> RangeRequest {
    let Some(range) = req.range else {
        return RangeRequest::Full;
    };
    if let Some(if_range) = req.if_range {
        let current = if if_range.starts_with('"') {
            if_range == etag
        } else {
            let date = httpdate::parse_http_date(if_range).ok();
            date.is_some() && modified.map(unix_secs) == date.map(unix_secs)
        };
        if !current {
            return RangeRequest::Full;
        }
    }
    parse_range(range, size)
}

/// Parses a `Range` header against a file of `size` bytes. Anything but one well-formed byte
/// range is answered with the full file (multiple ranges included), as RFC 9110 allows.
fn parse_range(header: &str, size: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, true) => RangeRequest::Full,
        (true, false) => match parse(last) {
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if size == 0 => RangeRequest::Unsatisfiable,
            Some(suffix) => RangeRequest::Single {
                start: size.saturating_sub(suffix),
                end: size - 1,
            },
            None => RangeRequest::Full,
        },
        (false, open_ended) => {
            let Some(start) = parse(first) else {
                return RangeRequest::Full;
            };
            let end = if open_ended {
                u64::MAX
            } else {
                match parse(last) {
                    Some(end) if end >= start => end,
                    _ => return RangeRequest::Full,
                }
            };
            if start >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Single {
                    start,
                    end: end.min(size - 1),
                }
            }
        }
    }
}

fn content_type(path: &Path) -> String {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let essence = mime.essence_str();
    let textual = mime.type_() == mime_guess::mime::TEXT
        || matches!(
            essence,
            "application/javascript" | "application/json" | "image/svg+xml"
        );
    if textual && mime.get_param(mime_guess::mime::CHARSET).is_none() {
        format!("{essence}; charset=utf-8")
    } else {
        mime.to_string()
    }
}

/// `(br, gzip)`: which precompressed encodings `Accept-Encoding` allows (q > 0, directly or
/// through `*`).
fn accepted_encodings(headers: &HeaderMap) -> (bool, bool) {
    let (mut br, mut gzip, mut any) = (None, None, None);
    for value in headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for item in value.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let accepted = q > 0.0;
            if name.eq_ignore_ascii_case("br") {
                br = Some(accepted);
            } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                gzip = Some(accepted);
            } else if name == "*" {
                any = Some(accepted);
            }
        }
    }
    let any = any.unwrap_or(false);
    (br.unwrap_or(any), gzip.unwrap_or(any))
}

enum PathError {
    /// `..`, `.`, an encoded `/`, NUL or invalid UTF-8: 400.
    Invalid,
    /// A dotfile: answered as missing.
    Hidden,
}

fn decode_path(path: &str) -> Result<Vec<String>, PathError> {
    let mut segments = Vec::new();
    let mut hidden = false;
    for raw in path.split('/').filter(|s| !s.is_empty()) {
        let decoded = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| PathError::Invalid)?;
        if decoded == "." || decoded == ".." || decoded.contains(['/', '\\', '\0']) {
            return Err(PathError::Invalid);
        }
        hidden |= is_hidden(&decoded);
        segments.push(decoded.into_owned());
    }
    if hidden {
        return Err(PathError::Hidden);
    }
    Ok(segments)
}

fn is_hidden(segment: &str) -> bool {
    segment.starts_with('.') && segment != ".well-known"
}

fn header_value(value: &str) -> HeaderValue {
    // Every caller formats ASCII without control characters (numbers, dates, mime types, our
    // own tags); an impossible failure degrades to an empty value rather than a panic.
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_ranges() {
        use RangeRequest::*;
        for (header, size, want) in [
            ("bytes=0-9", 100, Single { start: 0, end: 9 }),
            ("bytes=90-", 100, Single { start: 90, end: 99 }),
            ("bytes=90-200", 100, Single { start: 90, end: 99 }),
            ("bytes=-10", 100, Single { start: 90, end: 99 }),
            ("bytes=-200", 100, Single { start: 0, end: 99 }),
            ("bytes=100-", 100, Unsatisfiable),
            ("bytes=-0", 100, Unsatisfiable),
            ("bytes=0-0", 0, Unsatisfiable),
            ("bytes=5-1", 100, Full),
            ("bytes=0-1,5-6", 100, Full),
            ("bytes=x-1", 100, Full),
            ("items=0-1", 100, Full),
            ("bytes=-", 100, Full),
        ] {
            assert_eq!(parse_range(header, size), want, "{header}");
        }
    }

    #[test]
    fn decodes_paths_and_refuses_traversal() {
        assert!(matches!(decode_path("/a/b%20c/"), Ok(s) if s == ["a", "b c"]));
        assert!(matches!(decode_path("//a//b"), Ok(s) if s == ["a", "b"]));
        for bad in [
            "/../etc",
            "/a/%2e%2e/b",
            "/a/%2E%2E",
            "/a%2fb",
            "/./a",
            "/a%00",
            "/%ff",
            "/a%5c..%5cb",
        ] {
            assert!(matches!(decode_path(bad), Err(PathError::Invalid)), "{bad}");
        }
        assert!(matches!(decode_path("/.env"), Err(PathError::Hidden)));
        assert!(matches!(
            decode_path("/.git/config"),
            Err(PathError::Hidden)
        ));
        assert!(decode_path("/.well-known/x").is_ok());
    }

    #[test]
    fn reads_accept_encoding() {
        let check = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
            accepted_encodings(&headers)
        };
        assert_eq!(check("gzip, deflate, br"), (true, true));
        assert_eq!(check("gzip"), (false, true));
        assert_eq!(check("br;q=0, gzip;q=0.5"), (false, true));
        assert_eq!(check("*"), (true, true));
        assert_eq!(check("*, br;q=0"), (false, true));
        assert_eq!(check("identity"), (false, false));
        assert_eq!(accepted_encodings(&HeaderMap::new()), (false, false));
    }

    #[test]
    fn adds_charset_to_text() {
        assert_eq!(
            content_type(Path::new("a.html")),
            "text/html; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("a.js")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("a.png")), "image/png");
        assert_eq!(
            content_type(Path::new("a.unknownext")),
            "application/octet-stream"
        );
    }
}

#[cfg(test)]
mod resolution_tests {
    use super::*;

    /// Both resolution strategies (openat2 and the canonicalising fallback) agree on what is
    /// inside the root.
    #[test]
    fn both_resolvers_confine_paths_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("site");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.txt"), "a").unwrap();
        std::fs::write(dir.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink("../a.txt", root.join("sub/link.txt")).unwrap();
        std::os::unix::fs::symlink("../secret", root.join("out")).unwrap();
        let site = StaticSite::new(&root).unwrap();

        for fallback in [false, true] {
            NO_OPENAT2.store(fallback, Ordering::Relaxed);
            let opened = |p: &str| open_within(&site, Path::new(p));
            assert!(
                matches!(opened("a.txt"), Some(Opened::File(..))),
                "fallback={fallback}"
            );
            assert!(
                matches!(opened("sub/link.txt"), Some(Opened::File(..))),
                "fallback={fallback}"
            );
            assert!(
                matches!(opened(""), Some(Opened::Dir(..))),
                "fallback={fallback}"
            );
            assert!(
                matches!(opened("sub"), Some(Opened::Dir(..))),
                "fallback={fallback}"
            );
            assert!(opened("out").is_none(), "fallback={fallback}");
            assert!(opened("../secret").is_none(), "fallback={fallback}");
            assert!(opened("missing").is_none(), "fallback={fallback}");
        }
        NO_OPENAT2.store(false, Ordering::Relaxed);
    }
}
