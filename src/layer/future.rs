//! The response future: handler → settle, as a state machine.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::Rejection;
use super::layer::Options;
use super::service::Prepared;
use super::settle::{Hold, Settle, SettleGuard};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pin_project! {
    /// The response future of [`Reserve`](super::Reserve).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, B>,
        service: Option<S>,
        outcome: Option<Result<S::Response, S::Error>>,
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
        // The handler runs; the guard releases the hold if this future is dropped.
        Calling {
            #[pin]
            future: F,
            guard: SettleGuard,
            #[pin]
            deadline: Option<Sleep>,
            deadline_base: Option<(Instant, u64)>,
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
            outcome: None,
            options,
        }
    }
}

/// When the handler's time is up: the lease less the margin, moved along when the lease is
/// extended (by how much the store moved the lease's end).
fn deadline(base: (Instant, u64), options: &Options, hold: &Hold) -> Instant {
    let (started, first_end_ms) = base;
    let moved = hold.expires_at_ms().saturating_sub(first_end_ms);
    started + options.handler_time() + Duration::from_millis(moved)
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = (!this.span.is_disabled()).then(|| this.span.enter());
        loop {
            match this.state.as_mut().project() {
                StateProj::Preparing { prepare } => {
                    let prepared = ready!(prepare.as_mut().poll(cx));
                    let (request, hold) = match prepared {
                        Prepared::Reject(response) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(response.map(ResponseBody::problem)));
                        }
                        Prepared::Pass(request) => (request, None),
                        Prepared::Held(request, hold) => {
                            this.span.record("hold", hold.id().as_str());
                            (request, Some(hold))
                        }
                    };
                    let mut service = this.service.take().expect("called once");
                    let future = service.call(request);
                    // The lease timer is armed only if the handler does not answer at once.
                    let (deadline_base, guard) = match hold {
                        Some(hold) => (
                            Some((Instant::now(), hold.expires_at_ms())),
                            SettleGuard::new(hold),
                        ),
                        None => (None, SettleGuard::none()),
                    };
                    this.state.set(State::Calling {
                        future,
                        guard,
                        deadline: None,
                        deadline_base,
                    });
                }
                StateProj::Calling {
                    future,
                    guard,
                    deadline: mut sleep,
                    deadline_base,
                } => {
                    if let Poll::Ready(result) = future.poll(cx) {
                        let Some(hold) = guard.disarm() else {
                            this.state.set(State::Done);
                            return Poll::Ready(result.map(|r| r.map(ResponseBody::inner)));
                        };
                        if hold.is_deferred() {
                            tracing::debug!(hold = %hold.id(), "settlement deferred by the handler");
                            this.state.set(State::Done);
                            return Poll::Ready(result.map(|r| r.map(ResponseBody::inner)));
                        }
                        let commit =
                            matches!(&result, Ok(r) if (this.options.commit_if)(r.status()));
                        let settle = Settle::new(&hold, commit, !this.span.is_disabled());
                        if commit && this.options.commit_in_background {
                            settle.detach();
                            this.state.set(State::Done);
                            return Poll::Ready(result.map(|r| r.map(ResponseBody::inner)));
                        }
                        *this.outcome = Some(result);
                        this.state.set(State::Settling { settle });
                        continue;
                    }
                    let Some(base) = *deadline_base else {
                        return Poll::Pending;
                    };
                    // Read again at every wake-up: the handler may have extended its lease.
                    let at = deadline(base, this.options, guard.hold().expect("a hold"));
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
                    let hold = guard.disarm().expect("checked above");
                    tracing::warn!(hold = %hold.id(), "the handler outlived its lease; cancelling and releasing");
                    let settle = Settle::new(&hold, false, !this.span.is_disabled());
                    *this.outcome = None;
                    // Setting the state drops the handler's future: it is cancelled here.
                    this.state.set(State::Settling { settle });
                }
                StateProj::Settling { settle } => {
                    let settled = ready!(Pin::new(&mut *settle).poll(cx));
                    let commit = settle.commits();
                    this.state.set(State::Done);
                    let response = match this.outcome.take() {
                        None => this.options.reject(Rejection::lease_ran_out()),
                        Some(Err(err)) => return Poll::Ready(Err(err)),
                        Some(Ok(response)) => match settled {
                            Err(err) if commit => {
                                this.options.reject(Rejection::commit_failed(&err))
                            }
                            // A failed release was logged; the lease gives the hold back.
                            _ => return Poll::Ready(Ok(response.map(ResponseBody::inner))),
                        },
                    };
                    return Poll::Ready(Ok(response.map(ResponseBody::problem)));
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
            /// A rejection's problem document.
            Problem { #[pin] body: Full<Bytes> },
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseBody::Inner { body } => f.debug_tuple("Inner").field(body).finish(),
            ResponseBody::Problem { body } => f.debug_tuple("Problem").field(body).finish(),
        }
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        ResponseBody::Inner { body }
    }

    pub(crate) fn problem(body: Full<Bytes>) -> Self {
        ResponseBody::Problem { body }
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Inner { body } => body.is_end_stream(),
            ResponseBody::Problem { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Inner { body } => body.size_hint(),
            ResponseBody::Problem { body } => body.size_hint(),
        }
    }
}
