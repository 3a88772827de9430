//! The service: request → claims → store, then the handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower_service::Service;

use super::Rejection;
use super::extract::ExtractClaims;
use super::future::{ResponseBody, ResponseFuture};
use super::layer::Shared;
use super::settle::{Hold, SettleStore};
use crate::{Claim, Error, HoldId, Reservation, Reserved, Store};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    St: Store,
    E: ExtractClaims,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

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
                hold = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let prepare = prepare(shared, request, !span.is_disabled());
        ResponseFuture::new(Box::pin(prepare), inner, options, span)
    }
}

/// What the layer decided before the handler runs.
pub(crate) enum Prepared<B> {
    /// Refused: this response goes back, the handler never runs.
    Reject(Response<Full<Bytes>>),
    /// No claims (or failing open): the handler runs with nothing held.
    Pass(Request<B>),
    /// Everything held: the handler runs under this hold.
    Held(Request<B>, Hold),
}

/// `timed`: whether the request is traced, so its timings are worth taking.
async fn prepare<St, E, B>(
    shared: Arc<Shared<St, E>>,
    request: Request<B>,
    timed: bool,
) -> Prepared<B>
where
    St: Store,
    E: ExtractClaims,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let options = &shared.options;
    let reject = |rejection: Rejection| Prepared::Reject(options.reject(rejection));

    // The body is read only up to the limit, whatever Content-Length claims.
    let (parts, body) = request.into_parts();
    let limit = options.body_limit;
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return reject(Rejection::body_too_large(limit));
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return reject(Rejection::body_too_large(limit));
        }
        Err(err) => {
            return reject(Rejection::bad_request(format!(
                "could not read the body: {err}"
            )));
        }
    };
    let mut request = Request::from_parts(parts, bytes);

    for check in &shared.validators {
        request = match check(request).await {
            Ok(request) => request,
            Err(rejection) => return reject(rejection),
        };
    }
    let (request, claims) = match shared.extract.extract(request).await {
        Ok(extracted) => extracted,
        Err(rejection) => return reject(rejection),
    };
    let (parts, bytes) = request.into_parts();
    // With idempotency keys the body binds the hold (a cheap reference-counted copy).
    let payload = options.idempotency_header.is_some().then(|| bytes.clone());
    let mut request = Request::from_parts(parts, B::from(bytes));
    if claims.is_empty() {
        return Prepared::Pass(request);
    }

    let mut builder = Reservation::builder().lease(options.lease);
    if let Some(name) = &options.idempotency_header
        && let Some(key) = request.headers().get(name)
    {
        // The key names the hold; the body binds it, so that the key reused for another
        // request is told apart from a retry (IETF Idempotency-Key: 422).
        builder = builder
            .id(HoldId::derive([
                request.method().as_str().as_bytes(),
                request.uri().path().as_bytes(),
                key.as_bytes(),
            ]))
            .payload(payload.as_deref().unwrap_or_default());
    }
    let reservation = match builder.claims(claims).build() {
        Ok(reservation) => reservation,
        Err(err) => return reject(Rejection::invalid_claims(&err)),
    };

    let started = timed.then(std::time::Instant::now);
    let (answer, reservation) = InFlight::new(&shared, reservation).await;
    match answer {
        Ok(Reserved::Granted(grant)) if grant.replayed => reject(Rejection::new(
            http::StatusCode::CONFLICT,
            "Request in flight",
            "a request with this idempotency key is still being processed",
        )),
        Ok(Reserved::Granted(grant)) => {
            tracing::debug!(
                hold = %grant.id,
                claims = ?reservation.claims(),
                elapsed_us = started.map(|t| t.elapsed().as_micros() as u64),
                "reserved"
            );
            let hold = Hold::new(
                grant,
                reservation.into_claims(),
                shared.settle_store.clone(),
            );
            request.extensions_mut().insert(hold.clone());
            Prepared::Held(request, hold)
        }
        Ok(Reserved::Denied(denial)) => {
            let (key, namespace) = match reservation.claims().get(denial.claim) {
                Some(Claim::Spend { budget, .. }) => (budget.key().to_owned(), String::new()),
                Some(Claim::Own { value, .. } | Claim::ReleaseOnCommit { value, .. }) => {
                    (String::new(), value.namespace().to_owned())
                }
                _ => Default::default(),
            };
            tracing::debug!(
                hold = %reservation.id(),
                claims = ?reservation.claims(),
                claim = denial.claim,
                reason = ?denial.reason,
                "denied"
            );
            reject(Rejection::denied(key, namespace, &denial.reason))
        }
        Err(err) if err.is_unavailable() || err.kind() == crate::ErrorKind::Protocol => {
            let budgets_only = reservation
                .claims()
                .iter()
                .all(|c| matches!(c, Claim::Spend { .. }));
            if options.fail_open && budgets_only {
                tracing::warn!(hold = %reservation.id(), error = %err, "store unavailable; failing open");
                return Prepared::Pass(request);
            }
            tracing::warn!(hold = %reservation.id(), error = %err, "store unavailable; failing closed");
            reject(Rejection::unavailable(&err, options.retry_after_secs))
        }
        Err(err) if err.is_conflict() => reject(Rejection::unprocessable(
            "this idempotency key was used with another request",
        )),
        Err(err) => reject(Rejection::new(
            http::StatusCode::CONFLICT,
            "Already settled",
            format!("a request with this idempotency key has already ended: {err}"),
        )),
    }
}

type ReserveCall = Pin<Box<dyn Future<Output = (Result<Reserved, Error>, Reservation)> + Send>>;

/// A reserve call on its way to the store. If the request goes away before the store answers,
/// the call is finished in a task of its own and a fresh grant released at once, rather than left
/// to hold its claims until its lease ends.
struct InFlight {
    call: Option<ReserveCall>,
    settle_store: Arc<dyn SettleStore>,
}

impl InFlight {
    fn new<St: Store, E>(shared: &Shared<St, E>, reservation: Reservation) -> Self {
        let store = shared.store.clone();
        Self {
            call: Some(Box::pin(async move {
                (store.reserve(&reservation).await, reservation)
            })),
            settle_store: shared.settle_store.clone(),
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
        let settle_store = self.settle_store.clone();
        tokio::spawn(async move {
            // A replay answers another attempt's hold: that one is not ours to release.
            if let (Ok(Reserved::Granted(grant)), _) = call.await
                && !grant.replayed
            {
                tracing::debug!(hold = %grant.id, "request gone before its reserve answered; releasing");
                let _ = settle_store.release(grant.id).await;
            }
        });
    }
}
