//! The layer and its configuration.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower_layer::Layer;

use super::BoxFuture;
use super::Rejection;
use super::extract::ExtractClaims;
use super::idempotency::{BoxBody, Idempotency};
use super::metrics::RouteTable;
use super::service::Reserve;
use super::settle::SettleStore;
use crate::Store;

#[cfg(not(feature = "axum"))]
use crate::error::BoxError;

/// A check of the user's own that runs before anything is reserved: a schema check, a read-model
/// look-up. A request it refuses reserves nothing. Any closure
/// `Fn(Request<Bytes>) -> impl Future<Output = Result<Request<Bytes>, Rejection>>` is one, so
/// both synchronous (wrap the answer in `std::future::ready`) and asynchronous checks fit.
pub trait Validate: Send + Sync + 'static {
    /// The future that answers the check.
    type Future: Future<Output = Result<Request<Bytes>, Rejection>> + Send + 'static;

    /// Checks `request`, handing it back when it passes.
    fn validate(&self, request: Request<Bytes>) -> Self::Future;
}

impl<F, Fut> Validate for F
where
    F: Fn(Request<Bytes>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Request<Bytes>, Rejection>> + Send + 'static,
{
    type Future = Fut;

    fn validate(&self, request: Request<Bytes>) -> Fut {
        self(request)
    }
}

pub(crate) type Validator =
    Arc<dyn Fn(Request<Bytes>) -> BoxFuture<Result<Request<Bytes>, Rejection>> + Send + Sync>;

/// Renders a [`Rejection`] as the response the client sees.
pub(crate) type ErrorHandler = Arc<dyn Fn(Rejection) -> Response<OwnBody> + Send + Sync>;

/// The body of a response the layer answers on its own: a problem document (or a replayed
/// response) as it is, or the body an [`error_handler`](ReserveLayer::error_handler) made, boxed.
pub(crate) enum OwnBody {
    Full(Full<Bytes>),
    Boxed(BoxBody),
}

/// The default error handler: the problem document, unboxed.
fn problem_response(rejection: Rejection) -> Response<OwnBody> {
    rejection.into_problem_response().map(OwnBody::Full)
}

/// The layer's knobs, shared by every request.
#[derive(Clone)]
pub(crate) struct Options {
    pub(crate) lease: Duration,
    pub(crate) margin: Option<Duration>,
    pub(crate) body_limit: usize,
    pub(crate) commit_if: Arc<dyn Fn(StatusCode) -> bool + Send + Sync>,
    pub(crate) error_handler: ErrorHandler,
    pub(crate) commit_in_background: bool,
    pub(crate) fail_open: bool,
    pub(crate) retry_after_secs: u64,
    pub(crate) idempotency: Option<Arc<Idempotency>>,
    pub(crate) on_disconnect: Disconnect,
    pub(crate) shadow: bool,
    pub(crate) remaining_headers: bool,
    pub(crate) too_many_requests: bool,
    pub(crate) denial_level: tracing::Level,
}

/// What happens to a handler whose request goes away while it runs: the client hung up, or a
/// timeout outside this layer gave up on the response.
///
/// A handler dropped half-way may already have done its side effect (written the order, charged
/// the card) with only its answer lost. Releasing its hold then gives back capacity that was
/// really used, and the budget undercounts; finishing it lets the handler's own outcome settle
/// the hold, so the budget counts exactly what happened. That is why [`Disconnect::Finish`] is
/// the default: it keeps spend budgets exact, and a client cannot get work for free by hanging
/// up just before its answer. Its cost is that work goes on for a client that left (bounded by
/// the lease, as always), and that a client that was told it failed (a `504` from a timeout
/// outside this layer, which drops the request just as a client that left does) may still be
/// charged: on metered routes, give clients an [`Idempotency`](super::Idempotency) key so that
/// the retry gets the result instead of paying twice, or put the timeout inside this layer,
/// where it cancels the handler and the hold is released. [`Disconnect::Release`] suits
/// handlers that are cancellation-safe (nothing happens until their last step) and routes whose
/// contract says a request the client abandoned must leave nothing behind.
///
/// ```
/// use bytes::Bytes;
/// use http::Request;
/// use tower_reserve::{Disconnect, Extracted, MemoryStore, ReserveLayer};
///
/// let layer = ReserveLayer::new(MemoryStore::new(), |req: Request<Bytes>| async move {
///     Extracted::Ok((req, Vec::new()))
/// })
/// .on_disconnect(Disconnect::Release);
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Disconnect {
    /// The handler runs to its end in a task of its own, and its outcome commits or releases
    /// the hold as it would have with the client still there (a panic or the lease running out
    /// releases it).
    #[default]
    Finish,
    /// The handler is cancelled where it stands (its future is dropped) and the hold released.
    Release,
}

impl Options {
    /// How long the handler may run: the lease less a margin for the commit's round trip.
    pub(crate) fn handler_time(&self) -> Duration {
        let margin = self
            .margin
            .unwrap_or_else(|| (self.lease / 10).min(Duration::from_secs(1)));
        self.lease.saturating_sub(margin)
    }

    pub(crate) fn reject(&self, rejection: Rejection) -> Response<OwnBody> {
        (self.error_handler)(rejection)
    }
}

/// What every request of one layer shares.
pub(crate) struct Shared<St, E> {
    pub(crate) store: St,
    pub(crate) settle_store: Arc<dyn SettleStore>,
    pub(crate) extract: Arc<E>,
    pub(crate) validators: Vec<Validator>,
    pub(crate) options: Arc<Options>,
    /// The metrics of the routes this service has seen.
    pub(crate) routes: RouteTable,
}

/// The tower [`Layer`]: reserves a request's claims before the inner service runs, then commits
/// or releases by its outcome. See the [crate docs](crate) for the flow and the semantics.
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http::Request;
/// use tower_reserve::{Budget, Claim, Extracted, MemoryStore, ReserveLayer, extract};
///
/// let layer = ReserveLayer::new(MemoryStore::new(), |req: Request<Bytes>| async move {
///     let customer = extract::header(&req, "x-customer")?.to_owned();
///     let amount: u64 = extract::json_pointer(&req, "/amount")?;
///     Extracted::Ok((req, vec![Claim::spend(Budget::new(customer, 50_000), amount)]))
/// })
/// .lease(Duration::from_secs(10))
/// .body_limit(16 * 1024);
/// # let _ = layer;
/// ```
///
/// # Metrics
///
/// The layer records through the [`metrics`](https://docs.rs/metrics) facade; install any
/// recorder (`metrics-exporter-prometheus`, say) to export them, or none to pay nothing for them.
/// Every metric is labelled by `route`: the pattern of axum's `MatchedPath` or of a [`Routes`]
/// table (`unmatched` otherwise), never a customer, a key or a value.
///
/// | metric | kind, unit | labels |
/// | --- | --- | --- |
/// | `tower_reserve_reservations_total` | counter, requests | `outcome`: `granted`, `denied`, `in_flight`, `conflict`, `replayed` (an idempotent retry answered from the store), `settled` (a retry of an ended request with nothing to replay), `invalid`, `unavailable` |
/// | `tower_reserve_denials_total` | counter, requests | `reason`: `over_budget`, `taken`, `not_owner`; `mode`: `enforce`, `shadow` |
/// | `tower_reserve_settlements_total` | counter, holds | `result`: `committed`, `released`, `expired`, `failed`; `cause`: `success`, `error_response`, `handler_error`, `panic`, `dropped`, `lease`, `invalid_actual` |
/// | `tower_reserve_store_errors_total` | counter, store calls | `op`: `reserve`, `check`, `commit`, `release`; only the store's failures (unreachable, an answer not understood), never its answers about a request (a replay, a reused key), which clients cause at will |
/// | `tower_reserve_store_seconds` | histogram, seconds | `op` |
///
/// Install the recorder before the first request: the layer keeps the handle the first recorder
/// it records into registers for each key, and records through it from then on. Under any other
/// recorder it registers the key at every call, as the `metrics` macros do: nothing is lost,
/// only that saving. With metrics-exporter-prometheus, give the histogram buckets
/// (`set_buckets`): its default, a summary, folds every sample into a quantile sketch, which cost
/// the example shop more than the rest of its metrics together.
///
/// # Logs
///
/// Through [`tracing`](https://docs.rs/tracing). With `DEBUG` on for this crate, each request
/// runs in a `reserve` span with its `method`, `path`, `route` (the pattern, as the metrics
/// label it) and `hold` id, and its steps (reserved, denied, settled, with timings) are events
/// in it. Above `DEBUG` no span is made, so that a request pays nothing for it; the events the
/// layer logs at `INFO` and above (a shadow-mode denial, a store unavailable, a lease run out,
/// a failed settlement, and denials with [`ReserveLayer::log_denials`]) carry the `route`
/// themselves.
///
/// [`Routes`]: super::Routes
pub struct ReserveLayer<St, E> {
    store: St,
    extract: Arc<E>,
    validators: Vec<Validator>,
    options: Options,
}

impl<St: Clone, E> Clone for ReserveLayer<St, E> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            extract: self.extract.clone(),
            validators: self.validators.clone(),
            options: self.options.clone(),
        }
    }
}

impl<St, E> std::fmt::Debug for ReserveLayer<St, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReserveLayer")
            .field("lease", &self.options.lease)
            .field("body_limit", &self.options.body_limit)
            .finish_non_exhaustive()
    }
}

/// The default body limit: 64 KiB.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

impl<St: Store, E: ExtractClaims> ReserveLayer<St, E> {
    /// A layer that reserves on `store` the claims `extract` works out.
    ///
    /// Defaults: a 30 s lease, the handler bounded by the lease less a tenth (at most 1 s), a 64
    /// KiB body limit, `2xx` commits and anything else releases, the commit awaited before the
    /// response, a handler whose client went away finished ([`Disconnect::Finish`]), fail closed
    /// with `503` and `Retry-After: 1`, rejections as problem+json.
    pub fn new(store: St, extract: E) -> Self {
        Self {
            store,
            extract: Arc::new(extract),
            validators: Vec::new(),
            options: Options {
                lease: Duration::from_secs(30),
                margin: None,
                body_limit: DEFAULT_BODY_LIMIT,
                commit_if: Arc::new(|status: StatusCode| status.is_success()),
                error_handler: Arc::new(problem_response),
                commit_in_background: false,
                fail_open: false,
                retry_after_secs: 1,
                idempotency: None,
                on_disconnect: Disconnect::default(),
                shadow: false,
                remaining_headers: false,
                too_many_requests: false,
                denial_level: tracing::Level::DEBUG,
            },
        }
    }

    /// The lease of every hold (default 30 s).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.options.lease = lease;
        self
    }

    /// How much earlier than the lease's end the handler is cancelled (default a tenth of the
    /// lease, at most 1 s), leaving time to commit.
    pub fn lease_margin(mut self, margin: Duration) -> Self {
        self.options.margin = Some(margin);
        self
    }

    /// The most body bytes read to work out claims (default 64 KiB); a larger body gets `413`.
    /// Before it answers, the layer reads and drops what the client is still sending, up to
    /// 1 MiB in all and for at most 1 s, so that the client sees the `413` rather than a reset
    /// connection; a body declared larger than that is answered at once.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.options.body_limit = bytes;
        self
    }

    /// Which responses commit; the others release (default: `2xx` commits).
    pub fn commit_if(mut self, f: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        self.options.commit_if = Arc::new(f);
        self
    }

    /// Shapes every rejection into the response the client sees (default: problem+json, as
    /// [`Rejection::into_problem_response`] renders it). A failed commit reaches it too, as
    /// [`RejectionKind::CommitFailed`](super::RejectionKind).
    ///
    /// With the `axum` feature, `f` answers anything axum's `IntoResponse` takes: a
    /// `(StatusCode, Json(..))` tuple, an axum `Response`, the [`Rejection`] itself. Without it,
    /// an `http::Response` whose body yields [`Bytes`].
    ///
    /// ```
    /// use axum::Json;
    /// use axum::http::StatusCode;
    /// use axum::response::IntoResponse;
    /// use bytes::Bytes;
    /// use http::Request;
    /// use serde_json::json;
    /// use tower_reserve::{Budget, Claim, Extracted, MemoryStore, Rejection, RejectionKind, ReserveLayer, extract};
    ///
    /// let layer = ReserveLayer::new(MemoryStore::new(), |req: Request<Bytes>| async move {
    ///     let team = extract::header(&req, "x-team")?.to_owned();
    ///     let tokens: u64 = extract::json_pointer(&req, "/max_tokens")?;
    ///     Extracted::Ok((req, vec![Claim::spend(Budget::new(team, 1_000_000), tokens)]))
    /// })
    /// .error_handler(|rejection: Rejection| match rejection.kind() {
    ///     // An API of the user's own shape, for the one refusal it cares about...
    ///     RejectionKind::OverBudget { remaining, .. } => (
    ///         StatusCode::PAYMENT_REQUIRED,
    ///         Json(json!({ "error": "out_of_tokens", "tokens_left": remaining })),
    ///     )
    ///         .into_response(),
    ///     // ...and the problem document for the rest.
    ///     _ => rejection.into_response(),
    /// });
    /// # let _ = layer;
    /// ```
    #[cfg(feature = "axum")]
    pub fn error_handler<R: axum::response::IntoResponse>(
        mut self,
        f: impl Fn(Rejection) -> R + Send + Sync + 'static,
    ) -> Self {
        self.options.error_handler = Arc::new(move |rejection| {
            f(rejection)
                .into_response()
                .map(|body| OwnBody::Boxed(body.map_err(Into::into).boxed_unsync()))
        });
        self
    }

    /// Shapes every rejection into the response the client sees (default: problem+json, as
    /// [`Rejection::into_problem_response`] renders it). A failed commit reaches it too, as
    /// [`RejectionKind::CommitFailed`](super::RejectionKind).
    ///
    /// With the `axum` feature, `f` may answer anything axum's `IntoResponse` takes.
    #[cfg(not(feature = "axum"))]
    pub fn error_handler<B>(
        mut self,
        f: impl Fn(Rejection) -> Response<B> + Send + Sync + 'static,
    ) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.options.error_handler = Arc::new(move |rejection| {
            f(rejection).map(|body| OwnBody::Boxed(body.map_err(Into::into).boxed_unsync()))
        });
        self
    }

    /// Commits in a background task and answers at once (default: the commit finishes before
    /// the response leaves). Faster, but a commit that fails (the lease ran out, the store went
    /// away) can no longer change the response: it is only logged.
    pub fn commit_in_background(mut self, yes: bool) -> Self {
        self.options.commit_in_background = yes;
        self
    }

    /// When the store is unavailable, lets requests whose claims are all budgets through
    /// unreserved (default: fail closed). Unique claims always fail closed.
    pub fn fail_open(mut self, yes: bool) -> Self {
        self.options.fail_open = yes;
        self
    }

    /// The `Retry-After` seconds of a `503` (default 1).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.options.retry_after_secs = secs;
        self
    }

    /// Idempotency keys, as [`Idempotency`] says: a retry of a request that ended gets its
    /// response again, from the store (`409` while the first is in flight, `422` for the key
    /// with another body).
    pub fn idempotency(mut self, idempotency: Idempotency) -> Self {
        self.options.idempotency = Some(Arc::new(idempotency));
        self
    }

    /// Idempotency keys from this header, with [`Idempotency`]'s other defaults (optional, kept
    /// 24 hours, scoped by method and path).
    pub fn idempotency_header(self, name: HeaderName) -> Self {
        self.idempotency(Idempotency::new().header(name))
    }

    /// What happens to the handler, and its hold, when its request goes away while it runs
    /// (default [`Disconnect::Finish`]; see there for the trade-off).
    pub fn on_disconnect(mut self, what: Disconnect) -> Self {
        self.options.on_disconnect = what;
        self
    }

    /// Shadow mode (default off): claims are worked out and checked against the store as a
    /// reservation would be, but nothing is held and every request goes through. What the layer
    /// would have refused is logged and counted (`tower_reserve_denials_total{mode="shadow"}`),
    /// so that limits can be watched on a live service before they are enforced. Bad requests
    /// (claims that cannot be read) are still refused: they are not a limit's business.
    pub fn shadow(mut self, yes: bool) -> Self {
        self.options.shadow = yes;
        self
    }

    /// Adds `RateLimit-Policy` and `RateLimit` response headers (after the IETF draft *RateLimit
    /// header fields for HTTP*) that tell the client what each budget it spent from has left
    /// (default off), and, on a refusal over budget, what the budget that refused it has left: each budget is a quota policy named after the route, with a digest of its
    /// key as the partition key (`pk`) and `qu="units"` (a budget does not count requests), so
    /// that a key such as an API key or a customer id never appears in a header. See
    /// [`Hold::remaining_of`](super::Hold::remaining_of) for the same in a handler.
    pub fn remaining_headers(mut self, yes: bool) -> Self {
        self.options.remaining_headers = yes;
        self
    }

    /// Refuses a request over a windowed budget ([`Window::Day`](crate::Window::Day), `Month`,
    /// fixed seconds) with `429 Too Many Requests` and `Retry-After`, the seconds until the
    /// window the refusal was counted in ends, instead of `403` (default off): what rate
    /// limiters answer, and what clients' retry logic knows, for a limit that comes back with
    /// time. A lifetime budget never resets, so a refusal over one stays `403`. The window's end
    /// is the store's (its clock decides the window); the seconds are counted from this
    /// process's clock.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http::Request;
    /// use tower_reserve::{Budget, Claim, Extracted, MemoryStore, ReserveLayer, Window, extract};
    ///
    /// // 1 000 calls an hour per API key: the 1 001st gets 429 and when to come back.
    /// let layer = ReserveLayer::new(MemoryStore::new(), |req: Request<Bytes>| async move {
    ///     let key = extract::header(&req, "x-api-key")?.to_owned();
    ///     let hourly = Budget::new(key, 1_000).per(Window::Every(Duration::from_secs(3600)));
    ///     Extracted::Ok((req, vec![Claim::spend(hourly, 1)]))
    /// })
    /// .too_many_requests(true)
    /// .remaining_headers(true);
    /// # let _ = layer;
    /// ```
    pub fn too_many_requests(mut self, yes: bool) -> Self {
        self.options.too_many_requests = yes;
        self
    }

    /// The level at which a refused reservation (over budget, a value taken) is logged (default
    /// `DEBUG`, in the request's span, with its claims). Above `DEBUG` (`INFO`, say) the event
    /// stands on its own: the route's pattern, the hold's id, which claim failed and why, never
    /// the claims themselves (a budget's key is often a customer's id).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::Request;
    /// use tower_reserve::{Budget, Claim, Extracted, MemoryStore, ReserveLayer, extract};
    ///
    /// let layer = ReserveLayer::new(MemoryStore::new(), |req: Request<Bytes>| async move {
    ///     let key = extract::header(&req, "x-api-key")?.to_owned();
    ///     Extracted::Ok((req, vec![Claim::spend(Budget::new(key, 1_000), 1)]))
    /// })
    /// .log_denials(tracing::Level::INFO);
    /// # let _ = layer;
    /// ```
    pub fn log_denials(mut self, level: tracing::Level) -> Self {
        self.options.denial_level = level;
        self
    }

    /// Adds a check that runs before claims are worked out; see [`Validate`].
    pub fn validate(mut self, check: impl Validate) -> Self {
        let check = Arc::new(check);
        self.validators
            .push(Arc::new(move |req| Box::pin(check.validate(req))));
        self
    }
}

impl<S, St: Store, E: ExtractClaims> Layer<S> for ReserveLayer<St, E> {
    type Service = Reserve<S, St, E>;

    fn layer(&self, inner: S) -> Self::Service {
        Reserve::new(
            inner,
            Arc::new(Shared {
                store: self.store.clone(),
                settle_store: Arc::new(self.store.clone()),
                extract: self.extract.clone(),
                validators: self.validators.clone(),
                options: Arc::new(self.options.clone()),
                routes: RouteTable::default(),
            }),
        )
    }
}
