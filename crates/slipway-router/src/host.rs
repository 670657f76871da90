//! Extracting the routing key from a request: the host name, normalised.

use std::borrow::Cow;

use hyper::header::HOST;
use hyper::{Request, Version};

/// Longest DNS name, without the trailing dot.
const MAX_HOST_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// The host a request is addressed to, as it appears in the routing table: lower-case, without
/// port and without a trailing dot. `None` when the request has no usable host (missing,
/// repeated or malformed), which the caller answers with 400.
///
/// The authority of the request target wins over `Host` (HTTP/2 `:authority`, or an
/// absolute-form HTTP/1 target, as RFC 9112 §3.2.2 asks).
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<Cow<'_, str>> {
    if let Some(authority) = req.uri().authority() {
        return normalise(authority.as_str().as_bytes());
    }
    let mut values = req.headers().get_all(HOST).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    if req.version() == Version::HTTP_2 && value.is_empty() {
        return None;
    }
    normalise(value.as_bytes())
}

/// Normalises a `host[:port]` authority; see [`request_host`].
pub(crate) fn normalise(raw: &[u8]) -> Option<Cow<'_, str>> {
    let (host, port) = if raw.first() == Some(&b'[') {
        let close = raw.iter().position(|&b| b == b']')?;
        let literal = &raw[1..close];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return None;
        }
        (&raw[..=close], strip_colon(&raw[close + 1..])?)
    } else {
        match raw.iter().rposition(|&b| b == b':') {
            Some(colon) => (&raw[..colon], Some(&raw[colon + 1..])),
            None => (raw, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
            return None;
        }
    }
    if host.first() == Some(&b'[') {
        return Some(Cow::Owned(
            String::from_utf8_lossy(host).to_ascii_lowercase(),
        ));
    }
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() || host.len() > MAX_HOST_LEN {
        return None;
    }
    for label in host.split(|&b| b == b'.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN {
            return None;
        }
        // Underscores are not valid in host names but common in internal names; accept them so
        // the routing table, not the parser, decides.
        if !label
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
    }
    // Only ASCII survived the checks above, so this cannot fail.
    let host = std::str::from_utf8(host).ok()?;
    // Borrowed in the common case: no allocation on the request path.
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

/// After an IPv6 literal: nothing, or `:port`.
fn strip_colon(rest: &[u8]) -> Option<Option<&[u8]>> {
    match rest {
        [] => Some(None),
        [b':', port @ ..] => Some(Some(port)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn normalises_case_port_and_trailing_dot() {
        for (raw, want) in [
            ("App.Example.COM", Some("app.example.com")),
            ("app.example.com:8080", Some("app.example.com")),
            ("app.example.com.", Some("app.example.com")),
            ("app.example.com.:80", Some("app.example.com")),
            ("localhost", Some("localhost")),
            ("127.0.0.1:3000", Some("127.0.0.1")),
            ("[::1]:3000", Some("[::1]")),
            ("[::1]", Some("[::1]")),
            ("", None),
            (":80", None),
            ("a..b", None),
            ("a b", None),
            ("a/b", None),
            ("host:", None),
            ("host:80x", None),
            ("host:123456", None),
            ("[::1", None),
            ("[::1]x", None),
            ("[zz]", None),
            ("a:b:c", None),
            ("é.example", None),
        ] {
            assert_eq!(normalise(raw.as_bytes()).as_deref(), want, "{raw:?}");
        }
        let long_label = "a".repeat(64);
        assert_eq!(normalise(long_label.as_bytes()), None);
    }
}
