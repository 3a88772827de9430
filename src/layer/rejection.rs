//! Rejections: how the layer answers a request it will not pass on, as RFC 9457 problems.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::{Map, Value};

use crate::{DenialReason, Error};

/// Why the layer refused a request, with everything needed to explain it.
///
/// Every problem the layer writes has the `type` `about:blank` (RFC 9457 4.2.1): the crate has
/// no published page for a type URI to resolve to, and a URI that does not resolve helps no
/// one. A client tells the layer's problems apart by `status` and `title`, which are stable:
///
/// | kind | status | title |
/// | --- | --- | --- |
/// | [`OverBudget`](Self::OverBudget) | `403` (`429` when asked, for a windowed budget) | `Over budget` |
/// | [`Taken`](Self::Taken) | `409` | `Already taken` |
/// | [`NotOwner`](Self::NotOwner) | `409` | `Not the owner` |
/// | [`BadRequest`](Self::BadRequest) | `400`, `415`, `422` | the status's phrase: `Bad request`, ... |
/// | [`BodyTooLarge`](Self::BodyTooLarge) | `413` | `Payload too large` |
/// | [`Unavailable`](Self::Unavailable) | `503` | `Reservation store unavailable` |
/// | [`LeaseRanOut`](Self::LeaseRanOut) | `503` | `Handler ran out of time` |
/// | [`InFlight`](Self::InFlight) | `409` | `Request in flight` |
/// | [`IdempotencyKeyMissing`](Self::IdempotencyKeyMissing) | `400` | `Idempotency-Key is missing` |
/// | [`IdempotencyKeyInvalid`](Self::IdempotencyKeyInvalid) | `400` | `Idempotency-Key is not valid` |
/// | [`IdempotencyKeyReused`](Self::IdempotencyKeyReused) | `422` | `Idempotency-Key is already used` |
/// | [`IdempotentResponseUnavailable`](Self::IdempotentResponseUnavailable) | `409` | `Response not available` |
/// | [`CommitFailed`](Self::CommitFailed) | `500` | `Commit failed` |
/// | [`InvalidActual`](Self::InvalidActual) | `500` | `Invalid actual amount` |
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectionKind {
    /// A budget would be exceeded (`403`, the RFC 9457 "out of credit" case; `429` with
    /// `Retry-After` over a windowed budget, with
    /// [`ReserveLayer::too_many_requests`](crate::ReserveLayer::too_many_requests)).
    OverBudget {
        /// The budget's key.
        key: String,
        /// The amount asked for.
        requested: u64,
        /// What is left in the budget.
        remaining: u64,
        /// When the budget's window ends, in Unix milliseconds by the store's clock; `None`
        /// for a lifetime budget.
        resets_at_ms: Option<u64>,
    },
    /// A unique value is owned or held by someone else (`409`).
    Taken {
        /// The value's namespace.
        namespace: String,
    },
    /// A release-on-commit names a value its owner does not own (`409`).
    NotOwner {
        /// The value's namespace.
        namespace: String,
    },
    /// The claims could not be worked out from the request (`400`, `415` or `422`).
    BadRequest,
    /// The body is larger than the layer reads (`413`).
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The store could not be reached or timed out (`503` with `Retry-After`).
    Unavailable,
    /// The handler outlived its hold's lease and was cancelled (`503`).
    LeaseRanOut,
    /// A request with the same idempotency key is still being handled (`409`, with
    /// `Retry-After`).
    InFlight,
    /// A route that requires an idempotency key got none (`400`).
    IdempotencyKeyMissing,
    /// The idempotency key is not 1 to 255 visible ASCII characters, bare or as a Structured
    /// Field string (`400`).
    IdempotencyKeyInvalid,
    /// The idempotency key was used before with another request (`422`).
    IdempotencyKeyReused,
    /// The request with this idempotency key has ended, but its response cannot be replayed (it
    /// was too large to keep) (`409`).
    IdempotentResponseUnavailable,
    /// The handler succeeded but its hold could not be committed (`500`).
    CommitFailed,
    /// The handler's response reported actual amounts that do not fit its hold (above what was
    /// held, a budget it does not spend from, a malformed actual-amount header): the hold was
    /// released (`500`; a gateway may well answer `502`).
    InvalidActual,
    /// A check of the user's own refused the request.
    Custom,
}

/// A refused request, rendered as `application/problem+json` (RFC 9457) by default.
///
/// Build your own in a validator or claim extractor; reshape all of them with
/// [`ReserveLayer::error_handler`](crate::ReserveLayer::error_handler).
///
/// ```
/// use http::StatusCode;
/// use tower_reserve::Rejection;
///
/// let r = Rejection::new(StatusCode::UNPROCESSABLE_ENTITY, "Unknown product", "product 0 does not exist")
///     .with("product_id", 0);
/// let response = r.into_problem_response();
/// assert_eq!(response.status(), 422);
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection(Box<Problem>);

// Boxed so that `Result<T, Rejection>` stays small on the happy path.
#[derive(Debug, Clone, PartialEq)]
struct Problem {
    kind: RejectionKind,
    status: StatusCode,
    title: Cow<'static, str>,
    detail: Cow<'static, str>,
    type_uri: Cow<'static, str>,
    extra: Map<String, Value>,
    retry_after: Option<u64>,
}

impl Rejection {
    /// A rejection of the user's own.
    pub fn new(
        status: StatusCode,
        title: impl Into<Cow<'static, str>>,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self(Box::new(Problem {
            kind: RejectionKind::Custom,
            status,
            title: title.into(),
            detail: detail.into(),
            type_uri: Cow::Borrowed("about:blank"),
            extra: Map::new(),
            retry_after: None,
        }))
    }

    fn of(
        kind: RejectionKind,
        status: StatusCode,
        title: &'static str,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        let mut r = Self::new(status, title, detail);
        r.0.kind = kind;
        r
    }

    /// `400 Bad Request`: a claim could not be read from the request.
    pub fn bad_request(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::of(
            RejectionKind::BadRequest,
            StatusCode::BAD_REQUEST,
            "Bad request",
            detail.into(),
        )
    }

    /// `422 Unprocessable Content`: the request is well-formed but its claims are not valid.
    pub fn unprocessable(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::of(
            RejectionKind::BadRequest,
            StatusCode::UNPROCESSABLE_ENTITY,
            "Unprocessable content",
            detail.into(),
        )
    }

    /// `415 Unsupported Media Type`.
    pub fn unsupported_media_type(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::of(
            RejectionKind::BadRequest,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported media type",
            detail.into(),
        )
    }

    pub(crate) fn body_too_large(limit: usize) -> Self {
        Self::of(
            RejectionKind::BodyTooLarge { limit },
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload too large",
            format!("the body is larger than {limit} bytes"),
        )
    }

    /// `503 Service Unavailable` with `Retry-After: retry_after_secs`: the store could not be
    /// reached or did not answer in time. The cause goes to the logs, never to the client: for a
    /// handler that calls the store itself (a usage read, a refund) and meets
    /// [`Error::is_unavailable`](crate::Error::is_unavailable).
    pub fn unavailable(retry_after_secs: u64) -> Self {
        let mut r = Self::of(
            RejectionKind::Unavailable,
            StatusCode::SERVICE_UNAVAILABLE,
            "Reservation store unavailable",
            "the request could not be checked right now; try again shortly",
        );
        r.0.retry_after = Some(retry_after_secs);
        r
    }

    /// `409`: another request with this idempotency key is being handled.
    pub(crate) fn in_flight() -> Self {
        let mut r = Self::of(
            RejectionKind::InFlight,
            StatusCode::CONFLICT,
            "Request in flight",
            "a request with this idempotency key is still being processed",
        );
        r.0.retry_after = Some(1);
        r
    }

    pub(crate) fn lease_ran_out() -> Self {
        let mut r = Self::of(
            RejectionKind::LeaseRanOut,
            StatusCode::SERVICE_UNAVAILABLE,
            "Handler ran out of time",
            "the handler outlived its reservation's lease and was cancelled; nothing was kept",
        );
        r.0.retry_after = Some(1);
        r
    }

    /// `500`: the handler succeeded but its hold could not be committed. The store's error goes
    /// to the logs, never to the client.
    pub(crate) fn commit_failed(err: &Error) -> Self {
        tracing::warn!(error = %err, "the handler succeeded but its hold could not be committed");
        Self::of(
            RejectionKind::CommitFailed,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Commit failed",
            "the handler succeeded but its reservation could not be committed",
        )
    }

    /// `500`: the handler's response failed while the layer read it; nothing was kept.
    pub(crate) fn response_failed() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal server error",
            "the response could not be read to its end",
        )
    }

    pub(crate) fn idempotency_key_missing() -> Self {
        Self::of(
            RejectionKind::IdempotencyKeyMissing,
            StatusCode::BAD_REQUEST,
            "Idempotency-Key is missing",
            "this request needs an Idempotency-Key header",
        )
    }

    pub(crate) fn idempotency_key_invalid() -> Self {
        Self::of(
            RejectionKind::IdempotencyKeyInvalid,
            StatusCode::BAD_REQUEST,
            "Idempotency-Key is not valid",
            "an Idempotency-Key is 1 to 255 visible ASCII characters, bare or quoted",
        )
    }

    pub(crate) fn idempotency_key_reused() -> Self {
        Self::of(
            RejectionKind::IdempotencyKeyReused,
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency-Key is already used",
            "this idempotency key was used with another request",
        )
    }

    /// `409`: the request with this key has ended; its response (of `status`, if known) cannot
    /// be replayed.
    pub(crate) fn idempotent_response_unavailable(status: Option<StatusCode>) -> Self {
        let r = Self::of(
            RejectionKind::IdempotentResponseUnavailable,
            StatusCode::CONFLICT,
            "Response not available",
            "the request with this idempotency key has ended, but its response cannot be replayed",
        );
        match status {
            Some(status) => r.with("original_status", status.as_u16()),
            None => r,
        }
    }

    pub(crate) fn invalid_actual(err: &Error) -> Self {
        tracing::warn!(error = %err, "the handler reported actual amounts that do not fit its hold");
        Self::invalid_actual_header()
    }

    pub(crate) fn invalid_actual_header() -> Self {
        Self::of(
            RejectionKind::InvalidActual,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Invalid actual amount",
            "the handler reported an actual amount that does not fit what was reserved; nothing was kept",
        )
    }

    /// `422`: the claims worked out from the request cannot be reserved (an amount of zero or
    /// above [`MAX_AMOUNT`](crate::MAX_AMOUNT), an empty or over-long key, ...). Which claim and
    /// why is internal (the claims are the extractor's, not the client's), so it goes to the
    /// logs; the client gets one stable detail.
    pub(crate) fn invalid_claims(err: &Error) -> Self {
        tracing::debug!(error = %err, "the request's claims cannot be reserved");
        Self::unprocessable("the request asks for an amount or a value that cannot be reserved")
    }

    /// The refusal of a denied claim. `words`: how the client's request names a unique value
    /// ([`Unique::described_as`](crate::Unique::described_as)).
    pub(crate) fn denied(
        key: String,
        namespace: String,
        words: Option<&str>,
        reason: &DenialReason,
    ) -> Self {
        let words = words.unwrap_or("the value");
        match *reason {
            DenialReason::OverBudget {
                requested,
                remaining,
                resets_at_ms,
            } => Self::of(
                RejectionKind::OverBudget {
                    key,
                    requested,
                    remaining,
                    resets_at_ms,
                },
                StatusCode::FORBIDDEN,
                "Over budget",
                // The amounts are members of their own (`requested`, `remaining`).
                "the amount requested is more than the budget has left",
            ),
            DenialReason::Taken => Self::of(
                RejectionKind::Taken { namespace },
                StatusCode::CONFLICT,
                "Already taken",
                format!("{words} is already taken"),
            ),
            DenialReason::NotOwner => Self::of(
                RejectionKind::NotOwner { namespace },
                StatusCode::CONFLICT,
                "Not the owner",
                format!("{words} is not owned by the one giving it up"),
            ),
        }
    }

    /// Over a windowed budget, `429 Too Many Requests` with `Retry-After`: the seconds from
    /// `now_ms` until the window the refusal was counted in ends (at least 1). Any other
    /// rejection, and one over a lifetime budget (which never resets), stays as it is.
    pub(crate) fn retry_at_reset(mut self, now_ms: u64) -> Self {
        if let RejectionKind::OverBudget {
            resets_at_ms: Some(at),
            ..
        } = self.0.kind
        {
            self = self.with_status(StatusCode::TOO_MANY_REQUESTS);
            self.0.retry_after = Some(at.saturating_sub(now_ms).div_ceil(1000).max(1));
        }
        self
    }

    /// Adds an extension member to the problem body. The standard members (`type`, `title`,
    /// `status`, `detail`) have setters of their own; a name of theirs is ignored here.
    pub fn with(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        let name = name.into();
        if !matches!(name.as_str(), "type" | "title" | "status" | "detail") {
            self.0.extra.insert(name, value.into());
        }
        self
    }

    /// Sets the problem's `type` URI (default `about:blank`).
    pub fn with_type(mut self, uri: impl Into<String>) -> Self {
        self.0.type_uri = Cow::Owned(uri.into());
        self
    }

    /// Sets the `title`.
    pub fn with_title(mut self, title: impl Into<Cow<'static, str>>) -> Self {
        self.0.title = title.into();
        self
    }

    /// Sets the `detail`.
    pub fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.0.detail = detail.into();
        self
    }

    /// Sets the `status`. A problem of type `about:blank` whose title is its status's phrase
    /// (the [`extract`](crate::extract) helpers' `400`, say) takes the new status's phrase as its
    /// title, as RFC 9457 asks of `about:blank`; any other title stays.
    ///
    /// ```
    /// use http::{Request, StatusCode};
    /// use tower_reserve::extract;
    ///
    /// let req = Request::get("/usage").body(()).unwrap();
    /// // A missing header is `400`; an API key route answers `401`.
    /// let r = extract::header(&req, "x-api-key")
    ///     .map_err(|r| r.with_status(StatusCode::UNAUTHORIZED))
    ///     .unwrap_err();
    /// assert_eq!(r.status(), 401);
    /// assert_eq!(r.title(), "Unauthorized");
    /// assert_eq!(r.detail(), "the header x-api-key is missing");
    /// ```
    pub fn with_status(mut self, status: StatusCode) -> Self {
        if self.0.type_uri == "about:blank"
            && phrase(self.0.status).is_some_and(|p| self.0.title.eq_ignore_ascii_case(&p))
            && let Some(title) = phrase(status)
        {
            self.0.title = Cow::Owned(title);
        }
        self.0.status = status;
        self
    }

    /// Why the request was refused.
    pub fn kind(&self) -> &RejectionKind {
        &self.0.kind
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The `title`.
    pub fn title(&self) -> &str {
        &self.0.title
    }

    /// The `detail`.
    pub fn detail(&self) -> &str {
        &self.0.detail
    }

    /// The extra members of the problem body.
    pub fn extra(&self) -> &Map<String, Value> {
        &self.0.extra
    }

    /// Seconds for `Retry-After`, when the client may retry.
    pub fn retry_after(&self) -> Option<u64> {
        self.0.retry_after
    }

    /// The problem document as JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.document()).expect("a problem document serializes")
    }

    fn document(&self) -> Document<'_> {
        let (requested, remaining) = match self.0.kind {
            RejectionKind::OverBudget {
                requested,
                remaining,
                ..
            } => (Some(requested), Some(remaining)),
            _ => (None, None),
        };
        Document {
            type_uri: &self.0.type_uri,
            title: &self.0.title,
            status: self.0.status.as_u16(),
            detail: &self.0.detail,
            requested,
            remaining,
            extra: &self.0.extra,
        }
    }

    /// Renders the rejection as an `application/problem+json` response: what the layer answers
    /// unless an [`error_handler`](crate::ReserveLayer::error_handler) shapes it otherwise. (With
    /// the `axum` feature, axum's `IntoResponse::into_response` renders the same document as an
    /// axum response.)
    pub fn into_problem_response(self) -> Response<Full<Bytes>> {
        let body = serde_json::to_vec(&self.document()).expect("a problem document serializes");
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = self.0.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.0.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// With the `axum` feature, a rejection is an axum response: the same problem document as
/// [`Rejection::into_problem_response`], `Retry-After` included. So `Result<_, Rejection>` is a handler's
/// return type, and `?` works on [`extract`](crate::extract)'s helpers in a handler.
///
/// ```
/// use axum::extract::Request;
/// use axum::http::StatusCode;
/// use axum::response::{IntoResponse, Response};
/// use tower_reserve::{Rejection, extract};
///
/// async fn handler(req: Request) -> Result<Response, Rejection> {
///     // A missing header is `400`; this route says `401`.
///     let key = extract::header(&req, "x-api-key")
///         .map_err(|r| r.with_status(StatusCode::UNAUTHORIZED))?;
///     Ok((StatusCode::OK, format!("{} bytes of key", key.len())).into_response())
/// }
/// let _: axum::routing::MethodRouter = axum::routing::get(handler);
/// ```
#[cfg(feature = "axum")]
impl axum::response::IntoResponse for Rejection {
    fn into_response(self) -> axum::response::Response {
        self.into_problem_response().map(axum::body::Body::new)
    }
}

/// A status's phrase as this crate writes titles: in sentence case ("Bad request"), words in
/// capitals kept ("HTTP version not supported"); `422` by its RFC 9110 name.
fn phrase(status: StatusCode) -> Option<String> {
    let reason = match status {
        StatusCode::UNPROCESSABLE_ENTITY => "Unprocessable Content",
        _ => status.canonical_reason()?,
    };
    let mut out = String::with_capacity(reason.len());
    for (i, word) in reason.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
            if word.len() > 1 && word.bytes().all(|b| b.is_ascii_uppercase()) {
                out.push_str(word);
            } else {
                out.push_str(&word.to_ascii_lowercase());
            }
        } else {
            out.push_str(word);
        }
    }
    Some(out)
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.0.status.as_u16(),
            self.0.title,
            self.0.detail
        )
    }
}

impl std::error::Error for Rejection {}

/// RFC 9457's members, then the extension members, written straight to JSON.
#[derive(serde::Serialize)]
struct Document<'a> {
    #[serde(rename = "type")]
    type_uri: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    /// Over budget: the amount asked for and what is left (RFC 9457's "out of credit").
    #[serde(skip_serializing_if = "Option::is_none")]
    requested: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining: Option<u64>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}
