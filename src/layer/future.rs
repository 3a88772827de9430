//! The response future: handler → settle, as a state machine.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::BoxFuture;
use super::Rejection;
use super::idempotency::{BoxBody, Capture, Captured};
use super::layer::{Disconnect, Options, OwnBody};
use super::service::Prepared;
use super::settle::{ACTUAL_HEADER, Actual, Cause, Hold, Settle, SettleGuard};
use crate::Settlement;
use crate::error::BoxError;

pin_project! {
    /// The response future of [`Reserve`](super::Reserve).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, B>,
        service: Option<S>,
        // What to answer once the hold is settled.
        after: Option<After<S::Response, S::Error>>,
        options: Arc<Options>,
        // The request's span (`Span::none()` unless debug logging is on for this crate), entered
        // at every poll, so that reserving, the handler and settling are logged inside it.
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        // Body read, checks, claims, reserve.
        Preparing { prepare: BoxFuture<Prepared<B>> },
        // The handler runs; if this future is dropped first, `Running` releases the hold or
        // finishes the handler in a task of its own.
        Calling {
            running: Running<F>,
            #[pin]
            deadline: Option<Sleep>,
        },
        // A keyed request's response is read, to be kept with its hold's settlement.
        Capturing {
            capture: Capture,
            hold: Hold,
            settlement: Option<Settlement>,
            cause: Cause,
        },
        // Commit or release; if this future is dropped first, it finishes in a task of its own.
        Settling { settle: Settle },
        Done,
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn new(
        prepare: BoxFuture<Prepared<B>>,
        service: S,
        options: Arc<Options>,
        span: tracing::Span,
    ) -> Self {
        Self {
            span,
            state: State::Preparing { prepare },
            service: Some(service),
            after: None,
            options,
        }
    }
}

/// What the response future answers once the hold is settled.
enum After<R, E> {
    /// The handler's own answer (unless a commit fails).
    Handler(Result<R, E>),
    /// The handler outlived its lease: it was cancelled.
    LeaseRanOut,
    /// The handler's answer could not be kept (its actual amounts did not fit the hold).
    Refused(Rejection),
    /// The handler's answer, read to be kept for its idempotency key.
    Captured(Captured),
}

/// [`ACTUAL_HEADER`] as a header name, parsed once rather than at every response.
static ACTUAL: http::HeaderName = http::HeaderName::from_static(ACTUAL_HEADER);

/// How the layer ends a hold whose handler answered `result`: the settlement to make, or a
/// rejection (the response reported actual amounts that do not fit the hold; then the hold is
/// released). Reports are taken out of the response whatever the outcome: they never leave.
fn decide<B, E>(
    hold: &Hold,
    result: &mut Result<Response<B>, E>,
    options: &Options,
) -> Result<(Settlement, Cause), Rejection> {
    let Ok(response) = result else {
        return Ok((hold.settlement(false), Cause::HandlerError));
    };
    let reported = response.extensions_mut().remove::<Actual>();
    let header = response.headers_mut().remove(&ACTUAL);
    if !(options.commit_if)(response.status()) {
        let settlement = hold.settlement(false);
        if options.remaining_headers {
            super::remaining::insert(response.headers_mut(), hold, &settlement);
        }
        return Ok((settlement, Cause::ErrorResponse));
    }
    let report = match (reported, header) {
        (Some(actual), _) => Some(actual),
        (None, Some(value)) => {
            Some(Actual::parse_header(&value).ok_or_else(Rejection::invalid_actual_header)?)
        }
        (None, None) => None,
    };
    let amounts = match report {
        Some(report) => hold
            .resolve(&report)
            .map_err(|err| Rejection::invalid_actual(&err))?,
        None => Vec::new(),
    };
    let settlement = hold.settlement_with(true, &amounts);
    if options.remaining_headers {
        super::remaining::insert(response.headers_mut(), hold, &settlement);
    }
    Ok((settlement, Cause::Success))
}

/// The handler's future and the hold it runs under.
///
/// Dropped before the handler answered (the client went away, an outer timeout), it acts as
/// [`Disconnect`] says: it releases the hold, or it hands the handler to a task of its own whose
/// outcome then settles the hold as it would have in place. A deferred hold is left alone.
pub(crate) struct Running<F> {
    /// Taken out only when the handler is handed to a task of its own, on drop.
    future: Option<Pin<Box<F>>>,
    guard: SettleGuard,
    /// When the handler's time started (the store's answer) and the lease end it started with:
    /// its time runs out at the lease less the margin, moved along when the lease is extended.
    started: Option<(Instant, u64)>,
    options: Arc<Options>,
    /// Finishes the handler in a task of its own; set where the handler's types allow it.
    detach: Detach<F>,
}

/// Hands a handler, its hold and when it started to a task of its own ([`finish_detached`]).
type Detach<F> = fn(Pin<Box<F>>, Hold, Arc<Options>, (Instant, u64));

impl<F> Running<F> {
    /// When the handler's time is up, if it runs under a hold.
    fn deadline(&self) -> Option<Instant> {
        let (started, first_end_ms) = self.started?;
        let hold = self.guard.hold()?;
        Some(deadline(started, first_end_ms, &self.options, hold))
    }
}

/// The lease less the margin, moved along by as much as the store moved the lease's end.
fn deadline(started: Instant, first_end_ms: u64, options: &Options, hold: &Hold) -> Instant {
    let moved = hold.expires_at_ms().saturating_sub(first_end_ms);
    started + options.handler_time() + Duration::from_millis(moved)
}

impl<F> Drop for Running<F> {
    fn drop(&mut self) {
        let (Some(hold), Some(started)) = (self.guard.hold(), self.started) else {
            return;
        };
        if hold.is_deferred() || self.options.on_disconnect == Disconnect::Release {
            // The guard releases (unless deferred) when it drops with this.
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            tracing::warn!(hold = %hold.id(), "no tokio runtime to finish the handler on; releasing");
            return;
        }
        let (Some(future), Some(hold)) = (self.future.take(), self.guard.disarm()) else {
            return;
        };
        tracing::debug!(hold = %hold.id(), "request dropped while its handler runs; finishing the handler");
        (self.detach)(future, hold, self.options.clone(), started);
    }
}

/// Runs a handler whose request went away to its end in a task of its own, under its lease,
/// then settles the hold by its outcome, as the response future would have in place.
fn finish_detached<F, ResBody, E>(
    future: Pin<Box<F>>,
    hold: Hold,
    options: Arc<Options>,
    (started, first_end_ms): (Instant, u64),
) where
    F: Future<Output = Result<Response<ResBody>, E>> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    use tracing::Instrument;
    let task = async move {
        // Released if the handler panics in this task.
        let mut guard = SettleGuard::new(hold.clone());
        // The handler's outcome is turned into the settlement as soon as it is there (a keyed
        // request's response read first, to keep it for retries: nobody else will get it).
        let (decided_hold, decided_options) = (hold.clone(), options.clone());
        let mut decision = Box::pin(async move {
            // The handler's error (its type need not be `Send`) goes before anything is awaited.
            let (decided, response) = {
                let mut outcome = future.await;
                let decided = decide(&decided_hold, &mut outcome, &decided_options);
                (decided, outcome.ok())
            };
            let Ok((settlement, cause)) = decided else {
                return (decided_hold.settlement(false), Cause::InvalidActual);
            };
            match (&decided_options.idempotency, response) {
                (Some(idempotency), Some(response)) if decided_hold.is_named() => {
                    let (parts, body) = response.into_parts();
                    let body = body.map_err(Into::into).boxed_unsync();
                    let mut capture = Capture::new(parts, body, idempotency.max_body);
                    let captured = std::future::poll_fn(|cx| capture.poll_capture(cx)).await;
                    (idempotency.keep(settlement, &captured), cause)
                }
                _ => (settlement, cause),
            }
        });
        let (settlement, cause) = loop {
            let at = deadline(started, first_end_ms, &options, &hold);
            tokio::select! {
                settlement = &mut decision => break settlement,
                _ = tokio::time::sleep_until(at) => {
                    if hold.is_deferred() {
                        break (&mut decision).await;
                    }
                    // The lease may have been extended meanwhile: look again.
                    if deadline(started, first_end_ms, &options, &hold) <= Instant::now() {
                        break (hold.settlement(false), Cause::Lease);
                    }
                }
            }
        };
        // A handler past its time is cancelled here, before its hold is released.
        drop(decision);
        guard.disarm();
        if hold.is_deferred() {
            return;
        }
        let _ = Settle::new(&hold, settlement, cause, false).await;
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = (!this.span.is_disabled()).then(|| this.span.enter());
        loop {
            match this.state.as_mut().project() {
                StateProj::Preparing { prepare } => {
                    let prepared = ready!(prepare.as_mut().poll(cx));
                    let (request, hold, started) = match prepared {
                        Prepared::Reject(response) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(response.map(ResponseBody::own)));
                        }
                        Prepared::Pass(request) => (request, None, None),
                        Prepared::Held(request, hold, answered) => {
                            if !this.span.is_disabled() {
                                this.span.record("hold", hold.id().as_str());
                            }
                            let started = (answered, hold.expires_at_ms());
                            (request, Some(hold), Some(started))
                        }
                    };
                    // Armed before the inner service is called: a panic inside `call` itself
                    // unwinds through the guard, which releases the hold.
                    let guard = hold.map_or_else(SettleGuard::none, SettleGuard::new);
                    let mut service = this.service.take().expect("called once");
                    let future = Box::pin(service.call(request));
                    let running = Running {
                        future: Some(future),
                        guard,
                        started,
                        options: this.options.clone(),
                        detach: finish_detached::<S::Future, ResBody, S::Error>,
                    };
                    this.state.set(State::Calling {
                        running,
                        deadline: None,
                    });
                }
                StateProj::Calling {
                    running,
                    deadline: mut sleep,
                } => {
                    let future = running.future.as_mut().expect("taken only on drop");
                    if let Poll::Ready(mut result) = future.as_mut().poll(cx) {
                        let Some(hold) = running.guard.disarm() else {
                            this.state.set(State::Done);
                            return Poll::Ready(result.map(|r| r.map(ResponseBody::inner)));
                        };
                        if hold.is_deferred() {
                            tracing::debug!(hold = %hold.id(), "settlement deferred by the handler");
                            this.state.set(State::Done);
                            return Poll::Ready(result.map(|r| r.map(ResponseBody::inner)));
                        }
                        let timed = !this.span.is_disabled();
                        let decided = decide(&hold, &mut result, this.options);
                        if let (Ok((settlement, cause)), Some(idempotency), true, Ok(_)) = (
                            &decided,
                            &this.options.idempotency,
                            hold.is_named(),
                            &result,
                        ) {
                            // A keyed request: its response is read first, then kept with the
                            // settlement, so that a retry gets it again.
                            let Ok(response) = result else {
                                unreachable!("matched Ok")
                            };
                            let (parts, body) = response.into_parts();
                            let body = body.map_err(Into::into).boxed_unsync();
                            this.state.set(State::Capturing {
                                capture: Capture::new(parts, body, idempotency.max_body),
                                hold,
                                settlement: Some(settlement.clone()),
                                cause: *cause,
                            });
                            continue;
                        }
                        let (settle, after) = match decided {
                            Ok((settlement, cause)) => (
                                Settle::new(&hold, settlement, cause, timed),
                                After::Handler(result),
                            ),
                            Err(rejection) => {
                                tracing::warn!(hold = %hold.id(), %rejection, "releasing");
                                let settle =
                                    Settle::layer(&hold, false, Cause::InvalidActual, timed);
                                (settle, After::Refused(rejection))
                            }
                        };
                        if let After::Handler(result) = after {
                            if settle.commits() && this.options.commit_in_background {
                                settle.detach();
                                this.state.set(State::Done);
                                return Poll::Ready(result.map(|r| r.map(ResponseBody::inner)));
                            }
                            *this.after = Some(After::Handler(result));
                        } else {
                            *this.after = Some(after);
                        }
                        this.state.set(State::Settling { settle });
                        continue;
                    }
                    // The lease timer is armed only if the handler does not answer at once, and
                    // read again at every wake-up: the handler may have extended its lease.
                    let Some(at) = running.deadline() else {
                        return Poll::Pending;
                    };
                    if sleep.is_none() {
                        sleep.set(Some(tokio::time::sleep_until(at)));
                    }
                    let mut timer = sleep.as_pin_mut().expect("armed above");
                    if timer.deadline() != at {
                        timer.as_mut().reset(at);
                    }
                    if timer.poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if running.guard.hold().is_some_and(Hold::is_deferred) {
                        // The handler took settlement over: its time is its own now.
                        running.started = None;
                        return Poll::Pending;
                    }
                    let hold = running.guard.disarm().expect("a hold has a deadline");
                    tracing::warn!(hold = %hold.id(), route = hold.route(), "the handler outlived its lease; cancelling and releasing");
                    let settle =
                        Settle::layer(&hold, false, Cause::Lease, !this.span.is_disabled());
                    *this.after = Some(After::LeaseRanOut);
                    // Setting the state drops the handler's future: it is cancelled here.
                    this.state.set(State::Settling { settle });
                }
                StateProj::Capturing {
                    capture,
                    hold,
                    settlement,
                    cause,
                } => {
                    let captured = ready!(capture.poll_capture(cx));
                    let timed = !this.span.is_disabled();
                    let idempotency = this
                        .options
                        .idempotency
                        .as_ref()
                        .expect("capturing for an idempotency key");
                    // One rule, here and for a handler finished on its own: Idempotency::keep.
                    let settlement = settlement.take().expect("set with Capturing");
                    let settlement = idempotency.keep(settlement, &captured);
                    let settle = Settle::new(hold, settlement, *cause, timed);
                    let after = match captured {
                        Captured::Failed => After::Refused(Rejection::response_failed()),
                        captured => After::Captured(captured),
                    };
                    *this.after = Some(after);
                    this.state.set(State::Settling { settle });
                }
                StateProj::Settling { settle } => {
                    let settled = ready!(Pin::new(&mut *settle).poll(cx));
                    let commit = settle.commits();
                    this.state.set(State::Done);
                    let response = match this.after.take().expect("set with Settling") {
                        After::LeaseRanOut => this.options.reject(Rejection::lease_ran_out()),
                        After::Refused(rejection) => this.options.reject(rejection),
                        After::Handler(Err(err)) => return Poll::Ready(Err(err)),
                        After::Captured(captured) => match settled {
                            Err(err) if commit => {
                                this.options.reject(Rejection::commit_failed(&err))
                            }
                            _ => return Poll::Ready(Ok(captured.into_response())),
                        },
                        After::Handler(Ok(response)) => match settled {
                            Err(err) if commit => {
                                this.options.reject(Rejection::commit_failed(&err))
                            }
                            // A failed release was logged; the lease gives the hold back.
                            _ => return Poll::Ready(Ok(response.map(ResponseBody::inner))),
                        },
                    };
                    return Poll::Ready(Ok(response.map(ResponseBody::own)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

use self::body::BodyProj;
pub use self::body::ResponseBody;

// pin-project-lite does not carry docs onto enum fields; the variants say what each holds.
#[allow(missing_docs)]
mod body {
    use super::*;

    pin_project! {
        /// The response body of [`Reserve`](super::Reserve): the inner service's, or a problem
        /// document the layer wrote.
        #[project = BodyProj]
        pub enum ResponseBody<B> {
            /// The inner service's body.
            Inner { #[pin] body: B },
            /// A rejection's problem document, or a response replayed for an idempotency key.
            Problem { #[pin] body: Full<Bytes> },
            /// A response the layer read to keep it for an idempotency key: what was read, then
            /// the rest, if the body was larger than what is kept. Also a rejection's response
            /// as an error handler shaped it (no head, its body as the rest).
            Read { head: Option<Bytes>, rest: Option<BoxBody> },
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseBody::Inner { body } => f.debug_tuple("Inner").field(body).finish(),
            ResponseBody::Problem { body } => f.debug_tuple("Problem").field(body).finish(),
            ResponseBody::Read { head, rest } => f
                .debug_struct("Read")
                .field("head", head)
                .field("rest", &rest.is_some())
                .finish(),
        }
    }
}

/// An empty body, as tower-http's layers that answer on their own (`TimeoutLayer`) require of
/// the service's response body.
impl<B> Default for ResponseBody<B> {
    fn default() -> Self {
        ResponseBody::Problem {
            body: Full::default(),
        }
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        ResponseBody::Inner { body }
    }

    /// The body of a response the layer answered on its own (a rejection, a replay).
    pub(crate) fn own(body: OwnBody) -> Self {
        match body {
            OwnBody::Full(body) => ResponseBody::Problem { body },
            OwnBody::Boxed(rest) => ResponseBody::Read {
                head: None,
                rest: Some(rest),
            },
        }
    }

    pub(crate) fn read(head: Bytes, rest: Option<BoxBody>) -> Self {
        ResponseBody::Read {
            head: Some(head),
            rest,
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            BodyProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            BodyProj::Problem { body } => body.poll_frame(cx).map_err(|never| match never {}),
            BodyProj::Read { head, rest } => {
                if let Some(head) = head.take().filter(|h| !h.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                match rest {
                    Some(rest) => Pin::new(rest).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Inner { body } => body.is_end_stream(),
            ResponseBody::Problem { body } => body.is_end_stream(),
            ResponseBody::Read { head, rest } => {
                head.as_ref().is_none_or(Bytes::is_empty)
                    && rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Inner { body } => body.size_hint(),
            ResponseBody::Problem { body } => body.size_hint(),
            ResponseBody::Read { head, rest } => {
                let head = head.as_ref().map_or(0, |h| h.len() as u64);
                match rest {
                    None => SizeHint::with_exact(head),
                    Some(rest) => {
                        let r = rest.size_hint();
                        let mut hint = SizeHint::new();
                        hint.set_lower(r.lower() + head);
                        if let Some(upper) = r.upper() {
                            hint.set_upper(upper + head);
                        }
                        hint
                    }
                }
            }
        }
    }
}
