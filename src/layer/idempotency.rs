//! Idempotency keys: a retried request gets the first one's response again, from the store, in
//! every process that shares it; see [`Idempotency`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use super::Rejection;
use crate::error::BoxError;

/// The longest key accepted, in characters.
pub const MAX_KEY_LEN: usize = 255;

/// The response header that marks a replayed response.
pub const REPLAYED_HEADER: &str = "idempotency-replayed";

type Scope = Arc<dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync>;

/// How a [`ReserveLayer`](super::ReserveLayer) treats idempotency keys.
///
/// The IETF draft *The Idempotency-Key HTTP Header Field* (draft-ietf-httpapi-idempotency-key-
/// header), requirement by requirement:
///
/// | the draft | here |
/// | --- | --- |
/// | the key is a Structured Field String | read as one (`"..."`, with `\"` and `\\` escapes), or bare as many clients send it (visible ASCII); 1 to 255 characters; anything else is `400` |
/// | a resource that requires a key answers `400` when it is missing | [`Idempotency::required`] (off by default) |
/// | a key reused with another request payload is refused with `422` | the request body is the payload: a key with another body is `422` (`IdempotencyKeyReused`) |
/// | a retry while the first request is still being processed is refused with `409` | `409` (`InFlight`) with `Retry-After` |
/// | a retry of a request that completed gets its result again | the first response (status, headers, body) is kept with the hold's record in the store and answered again, marked `Idempotency-Replayed: true`; nothing is reserved, spent or run again |
/// | errors as problem details (RFC 9457), each with its own type | every refusal above is `application/problem+json` with a `type` of its own ([`RejectionKind`](super::RejectionKind)) |
/// | keys expire; the resource publishes for how long | kept for [`Idempotency::keep_for`] (24 hours by default); publish it in your API's documentation |
/// | a fingerprint of the request may bind the key | the key is bound to the method, the path, the scope ([`Idempotency::scope`]) and a digest of the body |
/// | keys must not let one client see another's result | the key is looked up within its scope, with no configuration: method and path, the caller's credentials (`Authorization`, `Proxy-Authorization`, `Cookie`), the request's claims' targets (whose budgets, which values: two callers whose claims differ never share a key), and the caller's identity when [`Idempotency::scope`] names it (say, from an authentication layer's request extension) |
///
/// What is kept: the response's status, its headers but those of one connection or one response
/// (`Connection`, `Keep-Alive`, `Transfer-Encoding`, `Upgrade`, `TE`, `Trailer`, `Proxy-*`,
/// `Content-Length`, `Date`, the `RateLimit` fields) and those that hand out credentials
/// (`Set-Cookie`, `Authentication-Info`, `Proxy-Authentication-Info`, and any that
/// [`Idempotency::never_replay`] names), and its body up to [`Idempotency::max_body`]. A
/// response too large to keep (its body, or its headers and body together past
/// [`MAX_MEMO`](crate::MAX_MEMO)) reaches its client whole and is kept without its body (or
/// headers): a retry is then answered `409` (`IdempotentResponseUnavailable`), with the first
/// response's status. Trailers are not kept.
///
/// What is replayed: a request whose handler answered. A handler that failed with a client
/// error (a `4xx`, or any other status that did not commit but a `5xx`) is replayed too, so that
/// the client learns it failed, unless [`Idempotency::replay_failures`] is off: then its key may
/// be used again. A server error (`5xx`: a panic caught by tower-http's `CatchPanic`, an
/// upstream that failed) is the server's, not the request's: it is never kept, and a retry runs
/// again. A request that never got an answer of its handler (the handler returned an error,
/// panicked, outlived its lease, or its client went away and it was cancelled) leaves nothing to
/// replay either: its key may be used again. Keys apply to requests the layer reserves for
/// (requests with claims).
///
/// The status decides the hold, the body does not: a response whose status commits and whose
/// body then fails (a stream that broke) is committed, since its work was done, as it is for a
/// request without a key, whose body streams after the commit; it is kept without a response
/// (a retry is told `409`, `IdempotentResponseUnavailable`), and its client gets a `500`. The
/// same holds whether the client waits for it or has gone away.
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http::Request;
/// use tower_reserve::{Extracted, Idempotency, MemoryStore, ReserveLayer};
///
/// let layer = ReserveLayer::new(MemoryStore::new(), |req: Request<Bytes>| async move {
///     Extracted::Ok((req, Vec::new()))
/// })
/// .idempotency(
///     Idempotency::new()
///         .required(true)
///         .keep_for(Duration::from_secs(48 * 3600))
///         // One client's keys never meet another's.
///         .scope(|parts| {
///             parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_owned)
///         }),
/// );
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct Idempotency {
    pub(crate) header: HeaderName,
    pub(crate) required: bool,
    pub(crate) keep_for: Duration,
    pub(crate) max_body: usize,
    pub(crate) replay_failures: bool,
    pub(crate) scope: Option<Scope>,
    pub(crate) never_replay: Vec<HeaderName>,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("header", &self.header)
            .field("required", &self.required)
            .field("keep_for", &self.keep_for)
            .field("max_body", &self.max_body)
            .field("replay_failures", &self.replay_failures)
            .finish_non_exhaustive()
    }
}

impl Default for Idempotency {
    fn default() -> Self {
        Self::new()
    }
}

impl Idempotency {
    /// The `Idempotency-Key` header, optional, keys kept 24 hours with responses of up to 64 KiB,
    /// failures replayed, keys scoped by method and path.
    pub fn new() -> Self {
        Self {
            header: HeaderName::from_static("idempotency-key"),
            required: false,
            keep_for: Duration::from_secs(24 * 3600),
            max_body: 64 * 1024,
            replay_failures: true,
            scope: None,
            never_replay: Vec::new(),
        }
    }

    /// Reads the key from this header instead.
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// Whether a request without a key is refused with `400` (default: no, it is served
    /// without one).
    pub fn required(mut self, yes: bool) -> Self {
        self.required = yes;
        self
    }

    /// How long a key and its response are kept (default 24 hours, at most
    /// [`MAX_RETAIN`](crate::MAX_RETAIN)); independent of the store's retention of plain
    /// settled records.
    pub fn keep_for(mut self, keep_for: Duration) -> Self {
        self.keep_for = keep_for;
        self
    }

    /// The largest response body kept for replay, in bytes (default 64 KiB).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes.min(crate::MAX_MEMO - 4 * 1024);
        self
    }

    /// Whether a request whose handler answered a failure (a status that does not commit) is
    /// replayed to retries (default: yes, the client learns it failed). Off, its key may be used
    /// again: a retry runs the handler again.
    pub fn replay_failures(mut self, yes: bool) -> Self {
        self.replay_failures = yes;
        self
    }

    /// A response header that is never kept for a replay (beside `Set-Cookie`,
    /// `Authentication-Info` and the others listed above): one that hands the caller a
    /// credential or a secret, say, that a retry must not receive again.
    pub fn never_replay(mut self, name: HeaderName) -> Self {
        self.never_replay.push(name);
        self
    }

    /// What identifies the caller, e.g. the principal an authentication layer put in the
    /// request's extensions, or an API key header: keys are looked up within it (and within
    /// method and path, always), so that two callers who pick the same key never see each
    /// other's responses. `None` for a request with no caller named.
    pub fn scope(
        mut self,
        scope: impl Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.scope = Some(Arc::new(scope));
        self
    }

    /// The key of a request: `Ok(None)` when it has none (and none is required).
    pub(crate) fn key_of(&self, headers: &HeaderMap) -> Result<Option<String>, Rejection> {
        let Some(value) = headers.get(&self.header) else {
            return if self.required {
                Err(Rejection::idempotency_key_missing())
            } else {
                Ok(None)
            };
        };
        parse_key(value.as_bytes())
            .map(Some)
            .ok_or_else(Rejection::idempotency_key_invalid)
    }

    /// What the key is looked up within: method, path and the caller's scope.
    pub(crate) fn scope_of(&self, parts: &http::request::Parts) -> String {
        self.scope
            .as_ref()
            .and_then(|scope| scope(parts))
            .unwrap_or_default()
    }
}

/// A key as the draft defines it (a Structured Field String) or bare (visible ASCII).
fn parse_key(value: &[u8]) -> Option<String> {
    let key = match value.first()? {
        b'"' => {
            let mut key = String::new();
            let mut rest = value[1..].iter();
            loop {
                match *rest.next()? {
                    b'"' => break,
                    b'\\' => match *rest.next()? {
                        c @ (b'"' | b'\\') => key.push(c as char),
                        _ => return None,
                    },
                    c @ 0x20..=0x7e => key.push(c as char),
                    _ => return None,
                }
            }
            if rest.next().is_some() {
                return None;
            }
            key
        }
        _ => {
            if !value.iter().all(|c| (0x21..=0x7e).contains(c)) {
                return None;
            }
            String::from_utf8(value.to_vec()).ok()?
        }
    };
    (!key.is_empty() && key.len() <= MAX_KEY_LEN).then_some(key)
}

/// Headers that belong to one connection or one response, never replayed.
fn kept(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "content-length"
            | "date"
            | "set-cookie"
            | "authentication-info"
            | "proxy-authentication-info"
            | "ratelimit"
            | "ratelimit-policy"
            | REPLAYED_HEADER
    )
}

/// A response as kept in the store: `[1, status, [[name, value], ...], body or nil]` in
/// MessagePack; a body of `None` means it was too large to keep. Headers in `omit` are left out.
pub(crate) fn encode(
    status: StatusCode,
    headers: &HeaderMap,
    body: Option<&[u8]>,
    omit: &[HeaderName],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + body.map_or(0, <[u8]>::len));
    let write = "writing to a Vec";
    rmp::encode::write_array_len(&mut out, 4).expect(write);
    rmp::encode::write_uint(&mut out, 1).expect(write);
    rmp::encode::write_uint(&mut out, u64::from(status.as_u16())).expect(write);
    let headers: Vec<_> = headers
        .iter()
        .filter(|(n, _)| kept(n) && !omit.contains(n))
        .collect();
    rmp::encode::write_array_len(&mut out, headers.len() as u32).expect(write);
    for (name, value) in headers {
        rmp::encode::write_array_len(&mut out, 2).expect(write);
        rmp::encode::write_str(&mut out, name.as_str()).expect(write);
        rmp::encode::write_bin(&mut out, value.as_bytes()).expect(write);
    }
    match body {
        Some(body) => rmp::encode::write_bin(&mut out, body).expect(write),
        None => rmp::encode::write_nil(&mut out).expect(write),
    }
    out
}

/// The response a retry gets: the kept one, marked as a replay; or, for a response kept
/// without its body (or a memo this crate did not write), a refusal that says so.
pub(crate) fn replay(memo: &[u8]) -> Result<Response<Full<Bytes>>, Rejection> {
    use rmpv::ValueRef;
    let mut rest = memo;
    let Ok(ValueRef::Array(items)) = rmpv::decode::read_value_ref(&mut rest) else {
        return Err(Rejection::idempotent_response_unavailable(None));
    };
    let status = items
        .get(1)
        .and_then(|v| v.as_u64())
        .and_then(|s| StatusCode::from_u16(u16::try_from(s).ok()?).ok());
    let (Some(ValueRef::Integer(version)), Some(status)) = (items.first(), status) else {
        return Err(Rejection::idempotent_response_unavailable(None));
    };
    if version.as_u64() != Some(1) {
        return Err(Rejection::idempotent_response_unavailable(None));
    }
    let body = match items.get(3) {
        Some(ValueRef::Binary(b)) => Bytes::copy_from_slice(b),
        _ => return Err(Rejection::idempotent_response_unavailable(Some(status))),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if let Some(ValueRef::Array(headers)) = items.get(2) {
        for pair in headers {
            let ValueRef::Array(pair) = pair else {
                continue;
            };
            if let (Some(ValueRef::String(name)), Some(ValueRef::Binary(value))) =
                (pair.first(), pair.get(1))
                && let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(value),
                )
            {
                response.headers_mut().append(name, value);
            }
        }
    }
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response.headers_mut().remove(header::CONTENT_LENGTH);
    Ok(response)
}

/// A body the layer reads, boxed so that the response future keeps one type whatever the
/// handler's body.
pub(crate) type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A keyed request's response, read before its hold is settled, so that the settlement keeps it
/// for replay: the whole body up to the limit, or its first part and the rest still to stream.
pub(crate) struct Capture {
    parts: Option<http::response::Parts>,
    body: Option<BoxBody>,
    read: bytes::BytesMut,
    limit: usize,
}

/// What a [`Capture`] read.
pub(crate) enum Captured {
    /// The whole body, kept.
    Whole(http::response::Parts, Bytes),
    /// More than the limit: what was read, then the rest. Kept without its body.
    Partial(http::response::Parts, Bytes, BoxBody),
    /// The body failed while it was read.
    Failed,
}

impl Capture {
    pub(crate) fn new(parts: http::response::Parts, body: BoxBody, limit: usize) -> Self {
        Self {
            parts: Some(parts),
            body: Some(body),
            read: bytes::BytesMut::new(),
            limit,
        }
    }

    /// Reads on; ready once the body ended, outgrew the limit, or failed. Trailers are dropped.
    pub(crate) fn poll_capture(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Captured> {
        use http_body::Body;
        loop {
            let body = self
                .body
                .as_mut()
                .expect("Capture polled after it finished");
            match std::task::ready!(std::pin::Pin::new(&mut *body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    self.read.extend_from_slice(&data);
                    if self.read.len() > self.limit {
                        let parts = self.parts.take().expect("parts");
                        let rest = self.body.take().expect("body");
                        let head = std::mem::take(&mut self.read).freeze();
                        return std::task::Poll::Ready(Captured::Partial(parts, head, rest));
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "the response body failed while it was read");
                    return std::task::Poll::Ready(Captured::Failed);
                }
                None => {
                    let parts = self.parts.take().expect("parts");
                    let whole = std::mem::take(&mut self.read).freeze();
                    return std::task::Poll::Ready(Captured::Whole(parts, whole));
                }
            }
        }
    }
}

impl Captured {
    /// The response to answer with the bytes that were read.
    pub(crate) fn into_response<B>(self) -> Response<super::ResponseBody<B>> {
        match self {
            Captured::Whole(parts, body) => {
                Response::from_parts(parts, super::ResponseBody::read(body, None))
            }
            Captured::Partial(parts, head, rest) => {
                Response::from_parts(parts, super::ResponseBody::read(head, Some(rest)))
            }
            Captured::Failed => unreachable!("a failed capture answers a rejection"),
        }
    }

    /// What the store keeps: the response, with its body if it was read whole, within
    /// [`MAX_MEMO`](crate::MAX_MEMO) as a whole: without its body if they do not fit together,
    /// and without its headers too if they alone do not.
    pub(crate) fn memo(&self, omit: &[HeaderName]) -> Option<Vec<u8>> {
        let (parts, body) = match self {
            Captured::Whole(parts, body) => (parts, Some(&body[..])),
            Captured::Partial(parts, _, _) => (parts, None),
            Captured::Failed => return None,
        };
        let whole = encode(parts.status, &parts.headers, body, omit);
        if whole.len() <= crate::MAX_MEMO {
            return Some(whole);
        }
        let headers = encode(parts.status, &parts.headers, None, omit);
        if headers.len() <= crate::MAX_MEMO {
            return Some(headers);
        }
        Some(encode(parts.status, &HeaderMap::new(), None, omit))
    }

    /// The status the handler answered, if it answered.
    fn status(&self) -> Option<StatusCode> {
        match self {
            Captured::Whole(parts, _) | Captured::Partial(parts, _, _) => Some(parts.status),
            Captured::Failed => None,
        }
    }
}

impl Idempotency {
    /// The settlement of a keyed request whose response was captured, in place or in a task of
    /// its own alike: a commit is kept for the key's lifetime, with its response if it could be
    /// read (its body failed: without, and the retry is told the response is unavailable); a
    /// client error is kept with its response unless failures may be retried; a server error,
    /// or a failure whose body failed, is forgotten (its key may be used again).
    pub(crate) fn keep(
        &self,
        settlement: crate::Settlement,
        captured: &Captured,
    ) -> crate::Settlement {
        let keep_for = self.keep_for.min(crate::MAX_RETAIN);
        if settlement.is_commit() {
            return match captured.memo(&self.never_replay) {
                Some(memo) => settlement.memo(memo).retain(keep_for),
                None => settlement.retain(keep_for),
            };
        }
        let server_error = captured.status().is_none_or(|s| s.is_server_error());
        match captured.memo(&self.never_replay) {
            Some(memo) if self.replay_failures && !server_error => {
                settlement.memo(memo).retain(keep_for)
            }
            _ => settlement.forget(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_as_clients_send_them() {
        assert_eq!(parse_key(b"\"abc-123\"").as_deref(), Some("abc-123"));
        assert_eq!(
            parse_key(br#""a \"quoted\" \\ key""#).as_deref(),
            Some(r#"a "quoted" \ key"#)
        );
        assert_eq!(
            parse_key(b"8e03978e-40d5-43e8-bc93-6894a57f9324").as_deref(),
            Some("8e03978e-40d5-43e8-bc93-6894a57f9324")
        );
        for bad in [
            &b""[..],
            b"\"\"",
            b"\"open",
            b"\"a\"b",
            b"has space",
            b"\"bad \\x\"",
            "ké".as_bytes(),
            b"\"tab\there\"",
        ] {
            assert_eq!(parse_key(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse_key("k".repeat(255).as_bytes()).is_some());
        assert!(parse_key("k".repeat(256).as_bytes()).is_none());
    }

    #[test]
    fn a_kept_response_is_replayed_as_it_was() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("location", HeaderValue::from_static("/orders/7"));
        headers.insert("set-cookie", HeaderValue::from_static("session=1"));
        headers.insert("date", HeaderValue::from_static("today"));
        headers.insert(
            "authentication-info",
            HeaderValue::from_static("nextnonce=\"abc\""),
        );
        let memo = encode(StatusCode::CREATED, &headers, Some(b"{\"id\":7}"), &[]);
        let response = replay(&memo).unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["location"], "/orders/7");
        assert_eq!(response.headers()[REPLAYED_HEADER], "true");
        assert!(!response.headers().contains_key("set-cookie"));
        assert!(!response.headers().contains_key("date"));
        assert!(!response.headers().contains_key("authentication-info"));
        let omitted = encode(
            StatusCode::CREATED,
            &headers,
            None,
            &[HeaderName::from_static("location")],
        );
        let omitted = replay(&omitted).unwrap_err();
        assert_eq!(omitted.status(), 409);
        let too_large = encode(StatusCode::CREATED, &headers, None, &[]);
        assert_eq!(replay(&too_large).unwrap_err().status(), 409);
        assert_eq!(replay(b"junk").unwrap_err().status(), 409);
    }
}
