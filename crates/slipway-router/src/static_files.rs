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

use std::fs::{File, Metadata};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
}

impl PartialEq for SiteInner {
    fn eq(&self, other: &Self) -> bool {
        self.root == other.root
            && self.spa_fallback == other.spa_fallback
            && self.asset_cache_control == other.asset_cache_control
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
        });
        f(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }
}

/// What the blocking part needs from the request.
struct FileRequest {
    segments: Vec<String>,
    trailing_slash: bool,
    query: Option<String>,
    head: bool,
    json: bool,
    if_none_match: Option<String>,
    if_modified_since: Option<SystemTime>,
    range: Option<String>,
    if_range: Option<String>,
    accepts_br: bool,
    accepts_gzip: bool,
    accepts_html: bool,
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
    let segments = match decode_path(path) {
        Ok(segments) => segments,
        Err(PathError::Invalid) => return error_response(ErrorCode::BadPath, json),
        Err(PathError::Hidden) => return error_response(ErrorCode::NotFound, json),
    };
    let headers = req.headers();
    let (accepts_br, accepts_gzip) = accepted_encodings(headers);
    let request = FileRequest {
        segments,
        trailing_slash: path.ends_with('/'),
        query: req.uri().query().map(str::to_owned),
        head,
        json,
        if_none_match: header_string(headers, &IF_NONE_MATCH),
        if_modified_since: header_string(headers, &IF_MODIFIED_SINCE)
            .and_then(|v| httpdate::parse_http_date(&v).ok()),
        range: header_string(headers, &RANGE),
        if_range: header_string(headers, &IF_RANGE),
        accepts_br,
        accepts_gzip,
        accepts_html: headers
            .get_all(ACCEPT)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.contains("text/html"))),
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
            serve_file(site, req, &path, file, meta)
        }
        Some(Opened::Dir(dir)) => {
            if !req.trailing_slash {
                return redirect_to_dir(req);
            }
            match open_within(site, &dir.join("index.html")) {
                Some(Opened::File(path, file, meta)) => serve_file(site, req, &path, file, meta),
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
            return serve_file(site, req, &path, file, meta);
        }
    }
    error_response(ErrorCode::NotFound, req.json)
}

fn redirect_to_dir(req: &FileRequest) -> Response<RouterBody> {
    // Rebuilt from the decoded segments, never from the raw path: a raw `//host` would make the
    // Location an off-site, protocol-relative URL.
    let mut location = String::from("/");
    for segment in &req.segments {
        location.extend(utf8_percent_encode(segment, PATH_SEGMENT));
        location.push('/');
    }
    if let Some(query) = &req.query {
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

fn serve_file(
    site: &StaticSite,
    req: &FileRequest,
    path: &Path,
    file: File,
    meta: Metadata,
) -> Response<RouterBody> {
    let content_type = content_type(path);
    let is_html = content_type.starts_with("text/html");
    let (file, meta, encoding) =
        precompressed(site, req, path).map_or((file, meta, None), |(f, m, e)| (f, m, Some(e)));

    let etag = etag(&meta);
    let modified = meta.modified().ok();
    let mut response = Response::new(RouterBody::empty());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, header_value(&content_type));
    headers.insert(ETAG, header_value(&etag));
    if let Some(modified) = modified {
        headers.insert(
            LAST_MODIFIED,
            header_value(&httpdate::fmt_http_date(modified)),
        );
    }
    headers.insert(
        CACHE_CONTROL,
        if is_html {
            HeaderValue::from_static("no-cache")
        } else {
            site.inner.asset_cache_control.clone()
        },
    );
    headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if let Some(encoding) = encoding {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static(encoding));
    }

    if not_modified(req, &etag, modified) {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response.headers_mut().remove(CONTENT_TYPE);
        return response;
    }

    let size = meta.len();
    let (start, len) = match requested_range(req, &etag, modified, size) {
        RangeRequest::Full => (0, size),
        RangeRequest::Single { start, end } => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let value = format!("bytes {start}-{end}/{size}");
            response
                .headers_mut()
                .insert(CONTENT_RANGE, header_value(&value));
            (start, end - start + 1)
        }
        RangeRequest::Unsatisfiable => {
            let mut response = error_response(ErrorCode::RangeNotSatisfiable, req.json);
            response
                .headers_mut()
                .insert(CONTENT_RANGE, header_value(&format!("bytes */{size}")));
            return response;
        }
    };
    response
        .headers_mut()
        .insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    if req.head || len == 0 {
        return response;
    }
    let body = if len <= SMALL_FILE {
        let mut buf = vec![0; len as usize];
        match file.read_exact_at(&mut buf, start) {
            Ok(()) => RouterBody::full(Bytes::from(buf)),
            Err(err) => {
                debug!(path = %path.display(), error = %err, "reading static file failed");
                return error_response(ErrorCode::NotFound, req.json);
            }
        }
    } else {
        let mut file = file;
        if let Err(err) = file.seek(SeekFrom::Start(start)) {
            debug!(path = %path.display(), error = %err, "seeking static file failed");
            return error_response(ErrorCode::NotFound, req.json);
        }
        RouterBody::file(tokio::fs::File::from_std(file), len)
    };
    *response.body_mut() = body;
    response
}

/// The `.br` or `.gz` sibling of `path`, when the client accepts that encoding and the
/// sibling exists inside the root.
fn precompressed(
    site: &StaticSite,
    req: &FileRequest,
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
fn not_modified(req: &FileRequest, etag: &str, modified: Option<SystemTime>) -> bool {
    if let Some(tags) = &req.if_none_match {
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
    req: &FileRequest,
    etag: &str,
    modified: Option<SystemTime>,
    size: u64,
) -> RangeRequest {
    let Some(range) = &req.range else {
        return RangeRequest::Full;
    };
    if let Some(if_range) = &req.if_range {
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
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let accepted = q > 0.0;
            match name.as_str() {
                "br" => br = Some(accepted),
                "gzip" | "x-gzip" => gzip = Some(accepted),
                "*" => any = Some(accepted),
                _ => {}
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

fn header_string(headers: &HeaderMap, name: &hyper::header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
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
