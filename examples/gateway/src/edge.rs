//! What the gateway does to a request before its policy sees it: one spelling of the path, one
//! value of each header the claims read, and no header that belongs to the connection or that
//! the client may not set. What the policy reads is what the upstream gets.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode, Uri, Version};
use tower_reserve::Rejection;
use tower_reserve::policy::{Policy, Source};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ---------------------------------------------------------------------------------------------
// The path

/// The one spelling of a request path that the policy matches and the upstream gets (RFC 3986
/// §6.2.2, as Envoy's `normalize_path` and `merge_slashes`):
///
/// - a percent-encoded unreserved character (`%61`, `%2E`) is decoded, any other escape is
///   written with capital hex digits (`%c3` becomes `%C3`);
/// - `.` and `..` segments are resolved, never above the root (`/../a` is `/a`), so no request
///   leaves the upstream's path prefix;
/// - runs of `/` are merged into one (`//a///b` is `/a/b`).
///
/// Refused with `400`: an encoded slash or backslash (`%2F`, `%5C`), which servers disagree on
/// (one decodes it into a separator, another keeps it in the segment); a `;`, which some servers
/// (Tomcat, Jetty) strip with what follows from a segment (`/ann;x/` is `/ann/` there); a
/// backslash, which some servers read as `/`; an encoded control character (`%00`...`%1F`,
/// `%7F`); a malformed escape; a path that does not start with `/`.
pub fn normalize_path(raw: &str) -> Result<String, Rejection> {
    if !raw.starts_with('/') {
        return Err(bad_path(raw, "a path starts with '/'"));
    }
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
                    return Err(bad_path(raw, "a '%' is not followed by two hex digits"));
                };
                let byte = (hi * 16 + lo) as u8;
                match byte {
                    b'/' | b'\\' => {
                        return Err(bad_path(
                            raw,
                            "an encoded slash or backslash (%2F, %5C) is refused: servers disagree on whether it separates segments",
                        ));
                    }
                    0..=0x1f | 0x7f => {
                        return Err(bad_path(raw, "an encoded control character is refused"));
                    }
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                        decoded.push(b as char);
                    }
                    b => decoded.push_str(&format!("%{b:02X}")),
                }
                i += 3;
            }
            b';' => {
                return Err(bad_path(
                    raw,
                    "a ';' is refused: some servers strip what follows it from a segment",
                ));
            }
            b'\\' => {
                return Err(bad_path(
                    raw,
                    "a backslash is refused: some servers read it as '/'",
                ));
            }
            _ => {
                // `Uri` admits only ASCII here; a run of other bytes is kept as it came.
                let next = raw[i..]
                    .find(['%', ';', '\\'])
                    .map_or(raw.len(), |at| i + at);
                decoded.push_str(&raw[i..next]);
                i = next;
            }
        }
    }
    // Dot segments, then empty ones (RFC 3986 §5.2.4, `merge_slashes`).
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for segment in decoded.split('/').skip(1) {
        trailing = false;
        match segment {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                out.pop();
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for segment in &out {
        path.push('/');
        path.push_str(segment);
    }
    if trailing || out.is_empty() {
        path.push('/');
    }
    Ok(path)
}

fn bad_path(raw: &str, why: &str) -> Rejection {
    Rejection::bad_request(format!("the path {raw:?} is refused: {why}"))
}

/// The path as a route of `policy` spells it, when it matches a route only once its literal
/// segments are compared without regard to case or a trailing slash is dropped: upstreams that
/// match so (Express, ASP.NET by default) would otherwise serve a reserved route unreserved.
/// `None` when the path matches a route as it is, or none at all.
pub fn route_spelling(policy: &Policy, method: &Method, path: &str) -> Option<String> {
    if policy.route_for(method, path).is_some() {
        return None;
    }
    let trimmed = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let segments: Vec<&str> = trimmed.split('/').collect();
    for route in policy.routes().iter().filter(|r| r.method() == method) {
        let pattern: Vec<&str> = route.path().split('/').collect();
        if pattern.len() != segments.len() {
            continue;
        }
        let same = pattern.iter().zip(&segments).all(|(p, s)| {
            is_param(p) && !s.is_empty() || !is_param(p) && p.eq_ignore_ascii_case(s)
        });
        if same {
            let spelled: Vec<&str> = pattern
                .iter()
                .zip(&segments)
                .map(|(p, s)| if is_param(p) { *s } else { *p })
                .collect();
            return Some(spelled.join("/"));
        }
    }
    None
}

fn is_param(segment: &str) -> bool {
    segment.starts_with('{') && segment.ends_with('}')
}

// ---------------------------------------------------------------------------------------------
// The head

/// Whether the client's body failed, and how, as the proxy and the gateway learn it afterwards:
/// a body that breaks off is the client's fault (`400`, or `408` when it stalled), not the
/// upstream's.
#[derive(Clone, Default)]
pub struct ClientBody(Arc<Mutex<Option<BodyFault>>>);

/// How a client's body failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFault {
    /// Nothing arrived for the body timeout.
    Stalled,
    /// The framing was wrong or the connection broke off.
    Broken,
}

impl ClientBody {
    /// Records a failure (the first one counts).
    pub fn fail(&self, fault: BodyFault) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(fault);
    }

    /// The failure, if the body failed.
    pub fn fault(&self) -> Option<BodyFault> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `body`, its failures recorded here.
    pub fn watch<B>(&self, body: B) -> Watched<B> {
        Watched {
            body,
            record: self.clone(),
        }
    }

    /// The answer to a request whose body failed so.
    pub fn rejection(fault: BodyFault) -> Rejection {
        match fault {
            BodyFault::Stalled => Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                "Request timeout",
                "the request's body stopped arriving",
            ),
            BodyFault::Broken => Rejection::bad_request("the request's body could not be read"),
        }
    }
}

pin_project_lite::pin_project! {
    /// A client's body whose failures are recorded in a [`ClientBody`].
    pub struct Watched<B> {
        #[pin]
        body: B,
        record: ClientBody,
    }
}

impl<B> http_body::Body for Watched<B>
where
    B: http_body::Body<Error = BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, BoxError>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            this.record
                .fail(if e.is::<tower_http::timeout::TimeoutError>() {
                    BodyFault::Stalled
                } else {
                    BodyFault::Broken
                });
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The hop-by-hop headers every message loses at the gateway (RFC 9110 §7.6.1), besides those
/// its `Connection` header names and every `Proxy-*`.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the headers that belong to one connection, not to the message: `Connection` and
/// every header it names, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`,
/// `Upgrade`. A `Connection` value that is not a list of header names is refused: skipping it
/// would forward headers that were meant to stop here.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> Result<(), String> {
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let text = value
            .to_str()
            .map_err(|_| "the Connection header is not visible ASCII".to_owned())?;
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let name = HeaderName::from_bytes(token.as_bytes())
                .map_err(|_| format!("the Connection header names {token:?}, not a header"))?;
            named.push(name);
        }
    }
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
    Ok(())
}

/// Headers that say who the client is or how it reached the gateway: only the gateway sets them.
const CLIENT_MAY_NOT_SET: [&str; 5] = [
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "x-forwarded-port",
];

/// Headers that must come once whatever the route: a second `Host` or `Content-Length` is read
/// one way here and another way by someone else, a second `Idempotency-Key` names two requests.
const ONCE: [&str; 3] = ["host", "content-length", "idempotency-key"];

/// The checks and rewrites of a request's head, in order, before anything reads it. On success
/// the head is what the policy reads and what the upstream gets (the proxy adds only the
/// upstream's `Host` and its path prefix).
pub fn admit(parts: &mut Parts, policy: &Policy, peer: SocketAddr) -> Result<(), Rejection> {
    if parts.method == Method::CONNECT {
        return Err(Rejection::new(
            StatusCode::NOT_IMPLEMENTED,
            "Not implemented",
            "the gateway does not tunnel: CONNECT is not served",
        ));
    }
    if parts.method == Method::TRACE {
        return Err(Rejection::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "TRACE is not served: it would echo the client's credentials",
        ));
    }
    for name in ONCE {
        if parts.headers.get_all(name).iter().count() > 1 {
            return Err(Rejection::bad_request(format!(
                "the {name} header is sent more than once"
            )));
        }
    }
    if parts
        .headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes().contains(&b','))
    {
        return Err(Rejection::bad_request(
            "the content-length header holds a list",
        ));
    }
    let host = match (parts.uri.authority(), parts.headers.get(header::HOST)) {
        // The request target's authority overrides Host (RFC 9112 §3.2.2); HTTP/2 has no Host.
        (Some(authority), _) => Some(HeaderValue::from_str(authority.as_str()).map_err(|_| {
            Rejection::bad_request("the request target's authority is not a header value")
        })?),
        (None, Some(host)) => Some(host.clone()),
        (None, None) if parts.version == Version::HTTP_11 => {
            return Err(Rejection::bad_request(
                "an HTTP/1.1 request without a Host header",
            ));
        }
        (None, None) => None,
    };
    transfer_codings(&parts.headers)?;
    strip_hop_by_hop(&mut parts.headers).map_err(Rejection::bad_request)?;
    forwarding(&mut parts.headers, host, peer);

    let mut path = normalize_path(parts.uri.path())?;
    if let Some(spelled) = route_spelling(policy, &parts.method, &path) {
        path = spelled;
    }
    let target = match parts.uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    parts.uri = Uri::builder()
        .path_and_query(target)
        .build()
        .map_err(|e| Rejection::bad_request(format!("the request target is refused: {e}")))?;

    if let Some(route) = policy.route_for(&parts.method, parts.uri.path()) {
        read_once(parts, route.sources())?;
        expect_continue(
            parts,
            route.body_limit_setting().unwrap_or(DEFAULT_BODY_LIMIT),
        )?;
    } else {
        expect_continue(parts, usize::MAX)?;
    }
    // The gateway answers the expectation itself (hyper sends `100 Continue` when the body is
    // first read); the upstream gets the body, not the question.
    parts.headers.remove(header::EXPECT);
    Ok(())
}

/// A route's body limit when it sets none: the layer's default.
const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

/// A client that waits for `100 Continue` before it sends a body hears at once that the body it
/// declared is too large (`413`), instead of sending it first; an expectation other than
/// `100-continue` is `417` (RFC 9110 §10.1.1).
fn expect_continue(parts: &Parts, limit: usize) -> Result<(), Rejection> {
    let Some(expect) = parts.headers.get(header::EXPECT) else {
        return Ok(());
    };
    if !expect.as_bytes().eq_ignore_ascii_case(b"100-continue") {
        return Err(Rejection::new(
            StatusCode::EXPECTATION_FAILED,
            "Expectation failed",
            "only the expectation 100-continue is understood",
        ));
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => Err(Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload too large",
            format!(
                "the body declared ({length} bytes) is above this route's limit of {limit} bytes"
            ),
        )),
        _ => Ok(()),
    }
}

/// Only `chunked` is decoded here: a body in any other coding would be forwarded as though it
/// were not coded (`501`, RFC 9112 §6.1).
fn transfer_codings(headers: &HeaderMap) -> Result<(), Rejection> {
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let text = value
            .to_str()
            .map_err(|_| Rejection::bad_request("the transfer-encoding header is not ASCII"))?;
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(Rejection::new(
                    StatusCode::NOT_IMPLEMENTED,
                    "Not implemented",
                    format!("the transfer coding {coding:?} is not supported, only chunked"),
                ));
            }
        }
    }
    Ok(())
}

/// The client's `Forwarded`, `X-Forwarded-Host`, `X-Forwarded-Proto`, `X-Forwarded-Port` and
/// `X-Real-IP` are dropped; the gateway's own are set from what it saw. `X-Forwarded-For` gets
/// the client's address appended (its last entry is the one the gateway vouches for).
fn forwarding(headers: &mut HeaderMap, host: Option<HeaderValue>, peer: SocketAddr) {
    for name in CLIENT_MAY_NOT_SET {
        headers.remove(name);
    }
    let ip = peer.ip().to_string();
    if let Some(host) = host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    if let Ok(value) = HeaderValue::from_str(&ip) {
        headers.insert(HeaderName::from_static("x-real-ip"), value);
    }
    let forwarded_for = HeaderName::from_static("x-forwarded-for");
    let earlier: Vec<&str> = headers
        .get_all(&forwarded_for)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let value = if earlier.is_empty() {
        ip
    } else {
        format!("{}, {ip}", earlier.join(", "))
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(forwarded_for, value);
    }
}

/// A header or query parameter that the route's claims read comes once: the claims would read
/// one of its values and the upstream might act on another.
fn read_once(parts: &Parts, sources: Vec<&Source>) -> Result<(), Rejection> {
    for source in sources {
        match source {
            Source::Header(name) if parts.headers.get_all(name).iter().count() > 1 => {
                return Err(Rejection::bad_request(format!(
                    "the {name} header, which this route reserves by, is sent more than once"
                )));
            }
            Source::Query(name) => {
                let query = parts.uri.query().unwrap_or("");
                let count = form_urlencoded::parse(query.as_bytes())
                    .filter(|(k, _)| k == name)
                    .count();
                if count > 1 {
                    return Err(Rejection::bad_request(format!(
                        "the query parameter {name:?}, which this route reserves by, is sent more than once"
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_have_one_spelling() {
        let ok = |raw: &str| normalize_path(raw).unwrap();
        assert_eq!(
            ok("/customers/%61nn/purchase%73"),
            "/customers/ann/purchases"
        );
        assert_eq!(
            ok("//customers///ann/purchases"),
            "/customers/ann/purchases"
        );
        assert_eq!(
            ok("/./customers/x/../ann/purchases"),
            "/customers/ann/purchases"
        );
        assert_eq!(ok("/../secret.txt"), "/secret.txt");
        assert_eq!(ok("/%2e%2e/secret.txt"), "/secret.txt");
        assert_eq!(ok("/a/%c3%a9"), "/a/%C3%A9");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("/.."), "/");
        for refused in [
            "/..%2fsecret.txt",
            "/a%5Cb",
            "/a;b",
            "/a%0a",
            "/a%zz",
            "/a%2",
            "*",
        ] {
            assert!(normalize_path(refused).is_err(), "{refused}");
        }
    }
}
