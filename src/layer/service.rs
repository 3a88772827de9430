//! The service: request → claims → store, then the handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower_service::Service;

use super::Rejection;
use super::body::RequestBody;
use super::extract::ExtractClaims;
use super::future::{ResponseBody, ResponseFuture};
use super::idempotency;
use super::layer::{Options, OwnBody, Shared};
use super::metrics::{self, Op, Outcome, RouteMetrics, Settling};
use super::settle::{Cause, Hold, SettleStore};
use crate::error::BoxError;
use crate::{Claim, Denial, Error, ErrorKind, HoldId, Reservation, Reserved, Settlement, Store};

/// The service [`ReserveLayer`](super::ReserveLayer) wraps around an inner service.
pub struct Reserve<S, St, E> {
    inner: S,
    shared: Arc<Shared<St, E>>,
}

impl<S: Clone, St, E> Clone for Reserve<S, St, E> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug, St, E> std::fmt::Debug for Reserve<S, St, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reserve")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St, E> Reserve<S, St, E> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<St, E>>) -> Self {
        Self { inner, shared }
    }
}

impl<S, St, E, ReqBody, ResBody> Service<Request<ReqBody>> for Reserve<S, St, E>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    St: Store,
    E: ExtractClaims,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, RequestBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The inner service was driven to readiness: take that one, leave a clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let options = shared.options.clone();
        // `level_enabled!` reads one atomic: with debug logging off, the request pays nothing more.
        let span = if tracing::level_enabled!(tracing::Level::DEBUG) {
            tracing::debug_span!(
                "reserve",
                method = %request.method(),
                path = request.uri().path(),
                route = tracing::field::Empty,
                hold = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let (parts, body) = request.into_parts();
        let prepare = prepare(shared, parts, body, !span.is_disabled());
        ResponseFuture::new(Box::pin(prepare), inner, options, span)
    }
}

/// What the layer decided before the handler runs.
pub(crate) enum Prepared<B> {
    /// Refused: this response goes back, the handler never runs.
    Reject(Response<OwnBody>),
    /// No claims (or failing open, or shadow mode): the handler runs with nothing held.
    Pass(Request<B>),
    /// Everything held: the handler runs under this hold, its time counted from the instant the
    /// store answered.
    Held(Request<B>, Hold, Instant),
}

/// request → claims → store: the steps before the handler, each a function below.
///
/// `timed`: whether the request is traced, so its timings are worth taking.
///
/// This future is boxed, once per request. Each request it keeps across a wait makes it larger
/// by one (a request's head is over 200 bytes), and past about 1 KiB the allocator leaves its
/// fast path. So the request comes in apart, its head waiting in the arguments while the body
/// is read, and each step's request is handed to the next inside a block, whose end frees its
/// place.
async fn prepare<St, E, B>(
    shared: Arc<Shared<St, E>>,
    parts: http::request::Parts,
    body: B,
    timed: bool,
) -> Prepared<RequestBody>
where
    St: Store,
    E: ExtractClaims,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let options = &shared.options;
    let reject = |rejection: Rejection| Prepared::Reject(options.reject(rejection));
    let key = match idempotency_key(&parts, options) {
        Ok(key) => key,
        Err(rejection) => return reject(rejection),
    };
    let declared = declared_length(&parts.headers);
    let body = match read_body(body, declared, options.body_limit).await {
        Ok(body) => body,
        Err(rejection) => return reject(rejection),
    };
    let (request, route, reservation, named) = {
        let extracted = {
            let mut request = Request::from_parts(parts, body);
            for check in &shared.validators {
                request = match check(request).await {
                    Ok(request) => request,
                    Err(rejection) => return reject(rejection),
                };
            }
            shared.extract.extract(request)
        }
        .await;
        let (request, claims) = match extracted {
            Ok(extracted) => extracted,
            Err(rejection) => return reject(rejection),
        };
        let route = shared.routes.of(&request);
        if timed {
            tracing::Span::current().record("route", route.route());
        }
        if claims.is_empty() {
            return Prepared::Pass(request.map(RequestBody::new));
        }
        let (reservation, named) = match build(&request, claims, key, options) {
            Ok(built) => built,
            Err(rejection) => {
                route.reservation(Outcome::Invalid);
                return reject(rejection);
            }
        };
        (request.map(RequestBody::new), route, reservation, named)
    };

    // Tokio's clock, which a test can move: the instant the store answered also starts the
    // handler's time under the lease (one reading of the clock for both).
    let started = Instant::now();
    let (answer, reservation) = match crate::store::embedded(&shared.store) {
        Some(memory) => (
            memory.reserve_sync(&reservation, !options.shadow),
            reservation,
        ),
        None => InFlight::new(&shared, reservation, route.clone()).await,
    };
    let answered = Instant::now();
    let took = answered - started;
    let op = if options.shadow {
        Op::Check
    } else {
        Op::Reserve
    };
    let failed = answer.as_ref().is_err_and(metrics::is_store_fault);
    route.store_call(op, took, !failed);
    if timed {
        tracing::debug!(elapsed_us = took.as_micros() as u64, ?op, "store answered");
    }
    if options.shadow {
        return shadow(answer, &reservation, &route, request);
    }
    answer_of(
        &shared,
        answer,
        reservation,
        named,
        route,
        request,
        answered,
    )
}

/// How much of an oversized body is read and thrown away before the `413` goes out, and for how
/// long. A client still sending when the answer comes would otherwise have its connection reset
/// under it and lose the answer (nginx's lingering close solves the same); past either bound the
/// answer goes at once.
const DRAIN_BYTES: u64 = 1 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads the body, only up to the limit, whatever `Content-Length` (`declared`) claims.
async fn read_body<B>(body: B, declared: Option<u64>, limit: usize) -> Result<Bytes, Rejection>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    if let Some(len) = declared.filter(|len| *len > limit as u64) {
        if len <= DRAIN_BYTES {
            // Boxed: a rare path, which would otherwise make every request's future larger.
            Box::pin(discard(body)).await;
        }
        return Err(Rejection::body_too_large(limit));
    }
    if body.is_end_stream() {
        // Nothing to read (a `GET`, a `Content-Length: 0`): nothing to collect.
        return Ok(Bytes::new());
    }
    match collect(body.as_mut(), limit).await {
        Ok(bytes) => Ok(bytes),
        Err(Unread::TooLarge) => {
            Box::pin(discard(body)).await;
            Err(Rejection::body_too_large(limit))
        }
        Err(Unread::Failed(err)) => {
            tracing::debug!(error = %err, "the request body could not be read");
            Err(Rejection::bad_request("the body could not be read"))
        }
    }
}

/// Why a body was not read whole.
enum Unread {
    TooLarge,
    Failed(BoxError),
}

/// The body's data, up to `limit` bytes; trailers are dropped. A body that comes in one frame
/// (most, over HTTP/1.1 with `Content-Length`) is handed on as that frame's bytes: nothing is
/// allocated or copied, where `http_body_util`'s `collect` always allocates a list of frames.
async fn collect<B>(mut body: Pin<&mut B>, limit: usize) -> Result<Bytes, Unread>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| Unread::Failed(err.into()))?;
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        len = len.saturating_add(data.remaining());
        if len > limit {
            return Err(Unread::TooLarge);
        }
        let chunk = data.copy_to_bytes(data.remaining());
        match &mut joined {
            Some(joined) => joined.extend_from_slice(&chunk),
            None if first.is_empty() => first = chunk,
            None => {
                let mut both = BytesMut::with_capacity(len);
                both.extend_from_slice(&first);
                both.extend_from_slice(&chunk);
                joined = Some(both);
            }
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

/// The length `Content-Length` declares, if it is a number.
fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads what is left of a body and drops it, within [`DRAIN_BYTES`] and [`DRAIN_TIME`].
async fn discard<B: Body>(mut body: std::pin::Pin<&mut B>) {
    let drain = async {
        let mut left = DRAIN_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let len = frame.data_ref().map_or(0, |data| data.remaining() as u64);
            match left.checked_sub(len) {
                Some(rest) => left = rest,
                None => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

/// The idempotency key of a request, with what it is looked up within (method, path, the
/// caller's credentials and scope): read before the body, so that a bad key costs nothing more.
/// The claims join the scope once they are known ([`build`]).
fn idempotency_key(
    parts: &http::request::Parts,
    options: &Options,
) -> Result<Option<ScopedKey>, Rejection> {
    let Some(idempotency) = &options.idempotency else {
        return Ok(None);
    };
    let Some(key) = idempotency.key_of(&parts.headers)? else {
        return Ok(None);
    };
    let mut scoped = vec![
        parts.method.as_str().as_bytes().to_vec(),
        parts.uri.path().as_bytes().to_vec(),
        idempotency.scope_of(parts).into_bytes(),
    ];
    for name in CREDENTIALS {
        for value in parts.headers.get_all(name) {
            scoped.push(value.as_bytes().to_vec());
        }
        scoped.push(Vec::new());
    }
    scoped.push(key.into_bytes());
    Ok(Some(ScopedKey(scoped)))
}

/// The request headers that say who the caller is: two callers who differ in any never share an
/// idempotency key (only a digest of them is kept, in the hold's id).
const CREDENTIALS: [http::header::HeaderName; 3] = [
    http::header::AUTHORIZATION,
    http::header::PROXY_AUTHORIZATION,
    http::header::COOKIE,
];

/// An idempotency key with what it is looked up within, before the claims join it.
struct ScopedKey(Vec<Vec<u8>>);

impl ScopedKey {
    /// The hold's id: the key within its scope and the targets of the request's claims (whose
    /// budgets, which values), so that two callers whose claims differ never share a key, and a
    /// retry that works out other amounts or owners (a freshly minted id) still finds its hold.
    fn id(self, claims: &[Claim]) -> HoldId {
        let mut parts = self.0;
        for claim in claims {
            match claim {
                Claim::Spend { budget, .. } => {
                    parts.push(b"b".to_vec());
                    parts.push(budget.key().as_bytes().to_vec());
                    parts.push(budget.window().spec().as_bytes().to_vec());
                }
                Claim::Own { value, .. } | Claim::ReleaseOnCommit { value, .. } => {
                    parts.push(b"u".to_vec());
                    parts.push(value.namespace().as_bytes().to_vec());
                    parts.push(value.digest_hex().as_bytes().to_vec());
                }
            }
        }
        HoldId::derive(parts)
    }
}

/// The reservation of `claims`, and whether its id is the caller's (an idempotency key).
fn build(
    request: &Request<Bytes>,
    claims: Vec<Claim>,
    key: Option<ScopedKey>,
    options: &Options,
) -> Result<(Reservation, bool), Rejection> {
    let mut builder = Reservation::builder().lease(options.lease);
    let named = key.is_some();
    if let Some(key) = key {
        let id = key.id(&claims);
        // The key names the hold; the body identifies the request, so that the key reused for
        // another request is told apart from a retry (IETF Idempotency-Key: 422).
        builder = builder.id(id).payload(request.body());
    }
    match builder.claims(claims).build() {
        Ok(reservation) => Ok((reservation, named)),
        Err(err) => Err(Rejection::invalid_claims(&err)),
    }
}

/// Shadow mode: whatever the store would have answered, the request goes through unheld.
fn shadow<B>(
    answer: Result<Reserved, Error>,
    reservation: &Reservation,
    route: &RouteMetrics,
    request: Request<B>,
) -> Prepared<B> {
    match answer {
        Ok(Reserved::Denied(denial)) => {
            let reason = metrics::reason_label(&denial.reason);
            route.denial(&denial.reason, true);
            tracing::info!(
                route = route.route(),
                hold = %reservation.id(),
                claim = denial.claim,
                reason,
                "shadow mode: this request would have been refused"
            );
        }
        Ok(Reserved::Granted(_)) => route.reservation(Outcome::Granted),
        Err(err) => {
            tracing::warn!(route = route.route(), error = %err, "shadow mode: the store could not check this request");
        }
    }
    Prepared::Pass(request)
}

/// What the store's answer to a reservation means for the request.
fn answer_of<St, E, B>(
    shared: &Shared<St, E>,
    answer: Result<Reserved, Error>,
    reservation: Reservation,
    named: bool,
    route: Arc<RouteMetrics>,
    mut request: Request<B>,
    answered: Instant,
) -> Prepared<B> {
    let options = &shared.options;
    let reject = |rejection: Rejection| Prepared::Reject(options.reject(rejection));
    match answer {
        Ok(Reserved::Granted(grant)) if grant.replayed => {
            route.reservation(Outcome::InFlight);
            reject(Rejection::in_flight())
        }
        Ok(Reserved::Granted(grant)) => {
            route.reservation(Outcome::Granted);
            tracing::debug!(hold = %grant.id, claims = ?reservation.claims(), "reserved");
            let hold = Hold::new(
                grant,
                reservation.into_claims(),
                named,
                route,
                shared.settle_store.clone(),
            );
            request.extensions_mut().insert(hold.clone());
            Prepared::Held(request, hold, answered)
        }
        Ok(Reserved::Denied(denial)) => {
            route.reservation(Outcome::Denied);
            route.denial(&denial.reason, false);
            log_denial(options.denial_level, &reservation, &denial, route.route());
            Prepared::Reject(refuse(options, &reservation, &denial, route.route()))
        }
        Err(err) if err.is_unavailable() || err.kind() == ErrorKind::Protocol => {
            route.reservation(Outcome::Unavailable);
            let budgets_only = reservation
                .claims()
                .iter()
                .all(|c| matches!(c, Claim::Spend { .. }));
            if options.fail_open && budgets_only {
                tracing::warn!(route = route.route(), hold = %reservation.id(), error = %err, "store unavailable; failing open");
                return Prepared::Pass(request);
            }
            tracing::warn!(route = route.route(), hold = %reservation.id(), error = %err, "store unavailable; failing closed");
            reject(Rejection::unavailable(options.retry_after_secs))
        }
        Err(err) if err.kind() == ErrorKind::InFlight => {
            route.reservation(Outcome::InFlight);
            reject(Rejection::in_flight())
        }
        Err(err) if err.is_conflict() => {
            route.reservation(Outcome::Conflict);
            reject(Rejection::idempotency_key_reused())
        }
        Err(err) => {
            // A retry of a request that has ended: its response again, if it was kept.
            tracing::debug!(hold = %reservation.id(), error = %err, "retry of a request that has ended");
            match err.memo().map(idempotency::replay) {
                Some(Ok(response)) => {
                    route.reservation(Outcome::Replayed);
                    Prepared::Reject(response.map(OwnBody::Full))
                }
                Some(Err(rejection)) => {
                    route.reservation(Outcome::Settled);
                    reject(rejection)
                }
                None => {
                    route.reservation(Outcome::Settled);
                    reject(Rejection::idempotent_response_unavailable(None))
                }
            }
        }
    }
}

/// The response to a denied reservation: which claim failed and why, as the layer's options say
/// (`429` over a windowed budget, the budget's remaining fields).
fn refuse(
    options: &Options,
    reservation: &Reservation,
    denial: &Denial,
    route: &str,
) -> Response<OwnBody> {
    let claims = reservation.claims();
    let (key, namespace, words) = match claims.get(denial.claim) {
        Some(Claim::Spend { budget, .. }) => (budget.key().to_owned(), String::new(), None),
        Some(Claim::Own { value, .. } | Claim::ReleaseOnCommit { value, .. }) => (
            String::new(),
            value.namespace().to_owned(),
            value.description(),
        ),
        None => Default::default(),
    };
    let mut rejection = Rejection::denied(key, namespace, words, &denial.reason);
    if options.too_many_requests {
        rejection = rejection.retry_at_reset(crate::store::now_ms());
    }
    let mut response = options.reject(rejection);
    if options.remaining_headers
        && let Some(Claim::Spend { budget, .. }) = claims.get(denial.claim)
    {
        // The budget's place among the request's budgets names its policy, as on a success.
        let nth = claims[..=denial.claim]
            .iter()
            .filter(|c| matches!(c, Claim::Spend { .. }))
            .count();
        super::remaining::insert_denied(response.headers_mut(), route, nth, budget, &denial.reason);
    }
    response
}

/// Logs a denial at `level`: at `DEBUG` (or `TRACE`) with its claims, in the request's span;
/// above, on its own, with the route and without the claims.
fn log_denial(level: tracing::Level, reservation: &Reservation, denial: &Denial, route: &str) {
    use tracing::Level;
    let (hold, claim, reason) = (
        reservation.id(),
        denial.claim,
        metrics::reason_label(&denial.reason),
    );
    match level {
        Level::TRACE | Level::DEBUG => tracing::debug!(
            %hold,
            claims = ?reservation.claims(),
            claim,
            reason = ?denial.reason,
            "denied"
        ),
        Level::INFO => tracing::info!(route, %hold, claim, reason, "denied"),
        Level::WARN => tracing::warn!(route, %hold, claim, reason, "denied"),
        Level::ERROR => tracing::error!(route, %hold, claim, reason, "denied"),
    }
}

type ReserveCall = Pin<Box<dyn Future<Output = (Result<Reserved, Error>, Reservation)> + Send>>;

/// A reserve call on its way to the store (a check, in shadow mode). If the request goes away
/// before the store answers, the call is finished in a task of its own and a fresh grant
/// released at once, rather than left to hold its claims until its lease ends.
struct InFlight {
    call: Option<ReserveCall>,
    settle_store: Arc<dyn SettleStore>,
    route: Arc<RouteMetrics>,
}

impl InFlight {
    fn new<St: Store, E>(
        shared: &Shared<St, E>,
        reservation: Reservation,
        route: Arc<RouteMetrics>,
    ) -> Self {
        let store = shared.store.clone();
        let shadow = shared.options.shadow;
        Self {
            call: Some(Box::pin(async move {
                let answer = if shadow {
                    store.check(&reservation).await
                } else {
                    store.reserve(&reservation).await
                };
                (answer, reservation)
            })),
            settle_store: shared.settle_store.clone(),
            route,
        }
    }
}

impl Future for InFlight {
    type Output = (Result<Reserved, Error>, Reservation);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let call = self
            .call
            .as_mut()
            .expect("InFlight polled after completion");
        let answer = std::task::ready!(call.as_mut().poll(cx));
        self.call = None;
        Poll::Ready(answer)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (settle_store, route) = (self.settle_store.clone(), self.route.clone());
        tokio::spawn(async move {
            // A replay answers another attempt's hold (and a check holds nothing): not ours to
            // release.
            if let (Ok(Reserved::Granted(grant)), reservation) = call.await
                && !grant.replayed
                && reservation.id() == &grant.id
            {
                tracing::debug!(hold = %grant.id, "request gone before its reserve answered; releasing");
                let released = settle_store
                    .settle(grant.id, Settlement::release().forget())
                    .await;
                let result = if released.is_ok() {
                    Settling::Released
                } else {
                    Settling::Failed
                };
                route.settlement(result, Cause::Dropped);
            }
        });
    }
}

#[cfg(test)]
#[path = "../../tests/support/redis_server.rs"]
mod redis_server;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Budget, Extracted, MemoryStore, ReserveLayer};
    use std::convert::Infallible;
    use tower_layer::Layer;

    async fn one_claim(request: Request<Bytes>) -> Extracted {
        let claim = Claim::spend(Budget::new("customer:1", 1_000), 10);
        Extracted::Ok((request, vec![claim]))
    }

    /// The future [`prepare`] boxes for every request stays within what glibc's allocator serves
    /// from its per-thread cache (1,032 bytes): past that, every request's allocation and its
    /// free take the allocator's slow path. Its size follows from how many requests it keeps
    /// across a wait, which nothing else shows.
    #[test]
    fn the_boxed_prepare_future_stays_within_the_allocators_fast_path() {
        let reserve = ReserveLayer::new(MemoryStore::new(), one_claim).layer(());
        let (parts, body) = Request::new(http_body_util::Full::new(Bytes::new())).into_parts();
        let future = prepare(reserve.shared.clone(), parts, body, false);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1032, "{size} bytes");
    }

    /// The same for the two futures the layer boxes for a store that waits, `RedisStore`: its
    /// reserve call ([`InFlight`]) and its settle ([`SettleStore::settle`]). Each level of
    /// `async fn` between the store and the wire keeps its own copy of the operation, and a
    /// rare path awaited inline (a Cluster's routing, a full queue) keeps its room in every
    /// call's future, so this is what tells when one more grows them past the cache.
    #[tokio::test]
    async fn the_redis_stores_boxed_futures_stay_within_the_allocators_fast_path() {
        let redis = redis_server::RedisServer::start();
        let store = crate::RedisStore::connect(&redis.url()).await.unwrap();
        let reserve = ReserveLayer::new(store, one_claim).layer(());
        let reservation = Reservation::builder()
            .claim(Claim::spend(Budget::new("customer:1", 1_000), 10))
            .build()
            .unwrap();
        let route = reserve.shared.routes.of(&Request::new(()));
        let in_flight = InFlight::new(&reserve.shared, reservation, route);
        let call = in_flight.call.as_ref().expect("a call on its way");
        let size = std::mem::size_of_val(&**call);
        assert!(size <= 1032, "the reserve call: {size} bytes");
        let settle = reserve
            .shared
            .settle_store
            .settle(HoldId::random(), Settlement::commit());
        let size = std::mem::size_of_val(&*settle);
        assert!(size <= 1032, "the settle: {size} bytes");
    }

    /// A body in frames, trailers last, as a client streaming it sends it.
    fn framed(chunks: &[&'static str]) -> impl Body<Data = Bytes, Error = Infallible> {
        let mut frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = chunks
            .iter()
            .map(|chunk| Ok(http_body::Frame::data(Bytes::from_static(chunk.as_bytes()))))
            .collect();
        frames.push(Ok(http_body::Frame::trailers(http::HeaderMap::new())));
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_in_one_frame_is_handed_on_as_it_came() {
        let sent = Bytes::from_static(b"{\"amount\":10}");
        let body = http_body_util::Full::new(sent.clone());
        let read = read_body(body, None, 64).await.expect("within the limit");
        assert_eq!(read, sent);
        assert_eq!(read.as_ptr(), sent.as_ptr(), "not copied");
    }

    #[tokio::test]
    async fn a_body_in_many_frames_is_read_whole_and_its_trailers_dropped() {
        let read = read_body(framed(&["{\"amo", "", "unt\":", "10}"]), None, 64)
            .await
            .expect("within the limit");
        assert_eq!(read, Bytes::from_static(b"{\"amount\":10}"));
        let exact = read_body(framed(&["1234", "5678"]), None, 8).await;
        assert_eq!(exact.expect("exactly the limit"), "12345678");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_in_its_later_frames_is_refused() {
        let refused = read_body(framed(&["1234", "5678", "9"]), None, 8).await;
        let status = refused.expect_err("past the limit").status();
        assert_eq!(status, http::StatusCode::PAYLOAD_TOO_LARGE);
    }
}
