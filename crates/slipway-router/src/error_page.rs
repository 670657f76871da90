//! The router's own responses: one small page per cause, in HTML or JSON.
//!
//! Every such response carries `X-Slipway-Error: <code>` so clients, tests and logs can tell a
//! router-made error from one the app produced. Messages are fixed texts (or texts the engine
//! chose for an [`crate::Unavailable`] route): nothing from an I/O error, a socket or a host path
//! ever reaches a visitor.

use bytes::Bytes;
use hyper::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{HeaderMap, Response, StatusCode};

use crate::body::RouterBody;

/// Name of the header naming the cause of a router-made error.
pub const ERROR_HEADER: &str = "x-slipway-error";

/// Why the router answered instead of the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: `Host` is missing, repeated or not a host name.
    BadHost,
    /// 404: no route for this host.
    UnknownHost,
    /// 410: the deployment behind this host was stopped.
    Stopped,
    /// 503: the run behind this host failed to build or start.
    DeployFailed,
    /// 503 with `Retry-After`: the run is still being built or started.
    NotReady,
    /// 502: the app refused the connection or could not be reached.
    UpstreamUnreachable,
    /// 502: the app reset the connection or sent an invalid response.
    UpstreamError,
    /// 504: connecting to the app or waiting for its response headers took too long.
    UpstreamTimeout,
    /// 413: the request body is larger than the configured limit.
    BodyTooLarge,
    /// 404: a static site has no file at this path.
    NotFound,
    /// 405: a static site only answers GET and HEAD.
    MethodNotAllowed,
    /// 400: the path is not valid (`..`, a NUL byte, invalid percent-encoding).
    BadPath,
    /// 416: the `Range` cannot be satisfied.
    RangeNotSatisfiable,
}

impl ErrorCode {
    /// The value of `X-Slipway-Error` and of the JSON `code` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadHost => "bad_host",
            Self::UnknownHost => "unknown_host",
            Self::Stopped => "stopped",
            Self::DeployFailed => "deploy_failed",
            Self::NotReady => "not_ready",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamError => "upstream_error",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::BodyTooLarge => "body_too_large",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BadPath => "bad_path",
            Self::RangeNotSatisfiable => "range_not_satisfiable",
        }
    }

    /// The HTTP status the router answers with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadHost | Self::BadPath => StatusCode::BAD_REQUEST,
            Self::UnknownHost | Self::NotFound => StatusCode::NOT_FOUND,
            Self::Stopped => StatusCode::GONE,
            // A failed deploy is the service being unavailable, not the app answering badly
            // (which is what 502 means here); 503 also tells crawlers the state is temporary.
            Self::DeployFailed | Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnreachable | Self::UpstreamError => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
        }
    }

    fn default_title(self) -> &'static str {
        match self {
            Self::BadHost => "Bad request",
            Self::UnknownHost => "No app at this address",
            Self::Stopped => "App stopped",
            Self::DeployFailed => "Deployment failed",
            Self::NotReady => "App starting",
            Self::UpstreamUnreachable => "App not reachable",
            Self::UpstreamError => "Bad response from app",
            Self::UpstreamTimeout => "App timed out",
            Self::BodyTooLarge => "Request too large",
            Self::NotFound => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::BadPath => "Bad path",
            Self::RangeNotSatisfiable => "Range not satisfiable",
        }
    }

    fn default_message(self) -> &'static str {
        match self {
            Self::BadHost => "The request's Host header is missing or malformed.",
            Self::UnknownHost => "Nothing is deployed at this host name. Check the address.",
            Self::Stopped => "This deployment was stopped and no longer serves traffic.",
            Self::DeployFailed => {
                "This deployment failed to build or start. Its owner can read the build log."
            }
            Self::NotReady => {
                "This deployment is still being built or started. Try again in a few seconds."
            }
            Self::UpstreamUnreachable => "The app is not accepting connections.",
            Self::UpstreamError => "The app closed the connection or sent an invalid response.",
            Self::UpstreamTimeout => "The app did not answer in time.",
            Self::BodyTooLarge => "The request body is larger than this server accepts.",
            Self::NotFound => "There is nothing at this path.",
            Self::MethodNotAllowed => "Only GET and HEAD are allowed here.",
            Self::BadPath => "The request path is not valid.",
            Self::RangeNotSatisfiable => "The requested range lies outside the file.",
        }
    }
}

/// Seconds a client is asked to wait while a deployment is starting.
const NOT_READY_RETRY_AFTER_SECS: &str = "5";

/// Whether the client asked for JSON rather than a page.
pub(crate) fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("application/json")))
}

/// The router's response for `code`, with the default title and message.
pub(crate) fn error_response(code: ErrorCode, json: bool) -> Response<RouterBody> {
    error_response_with(code, json, None, None)
}

/// The router's response for `code`; `title` and `message` replace the defaults (they come from
/// the engine through [`crate::Unavailable`] and are escaped here).
pub(crate) fn error_response_with(
    code: ErrorCode,
    json: bool,
    title: Option<&str>,
    message: Option<&str>,
) -> Response<RouterBody> {
    let title = title.unwrap_or(code.default_title());
    let message = message.unwrap_or(code.default_message());
    let status = code.status();
    let (content_type, body) = if json {
        let body = serde_json::json!({ "code": code.as_str(), "message": message, "title": title });
        ("application/json", body.to_string())
    } else {
        (
            "text/html; charset=utf-8",
            html_page(status, code, title, message),
        )
    };
    let mut response = Response::new(RouterBody::full(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(ERROR_HEADER, HeaderValue::from_static(code.as_str()));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if code == ErrorCode::NotReady {
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static(NOT_READY_RETRY_AFTER_SECS),
        );
    }
    response
}

fn html_page(status: StatusCode, code: ErrorCode, title: &str, message: &str) -> String {
    let title = escape_html(title);
    let message = escape_html(message);
    let status = status.as_u16();
    let code = code.as_str();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>{status} {title}</title>\
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36rem;margin:15vh auto;padding:0 1rem;color:#222}}\
h1{{font-size:1.4rem;margin:0 0 .5rem}}p{{margin:0 0 1rem}}code{{color:#777;font-size:.85rem}}</style>\
</head><body><h1>{title}</h1><p>{message}</p><p><code>{status} · {code} · slipway</code></p></body></html>\n"
    )
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_engine_supplied_text() {
        let page = html_page(
            StatusCode::GONE,
            ErrorCode::Stopped,
            "<b>x</b>",
            "a & \"b\"",
        );
        assert!(page.contains("&lt;b&gt;x&lt;/b&gt;"));
        assert!(page.contains("a &amp; &quot;b&quot;"));
        assert!(!page.contains("<b>"));
    }
}
