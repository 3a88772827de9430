//! The response future: the route's, or the inner service's own.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::PolicyBody;
use super::service::ReadBody;
use crate::{RequestBody, ResponseBody, ResponseFuture};

pin_project! {
    /// The response future of [`PolicyService`](super::PolicyService).
    pub struct PolicyFuture<S>
    where
        S: Service<Request<PolicyBody>>,
    {
        #[pin]
        kind: Kind<S>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S>
    where
        S: Service<Request<PolicyBody>>,
    {
        // A route matched: its layer reserves, calls the inner service, settles.
        Reserved { #[pin] future: ResponseFuture<ReadBody<S>, RequestBody> },
        // No route matched: the inner service's own answer.
        Passed { #[pin] future: S::Future },
    }
}

impl<S> PolicyFuture<S>
where
    S: Service<Request<PolicyBody>>,
{
    pub(crate) fn reserved(future: ResponseFuture<ReadBody<S>, RequestBody>) -> Self {
        Self {
            kind: Kind::Reserved { future },
        }
    }

    pub(crate) fn passed(future: S::Future) -> Self {
        Self {
            kind: Kind::Passed { future },
        }
    }
}

impl<S, ResBody> Future for PolicyFuture<S>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Reserved { future } => future.poll(cx),
            KindProj::Passed { future } => future
                .poll(cx)
                .map(|result| result.map(|r| r.map(ResponseBody::inner))),
        }
    }
}
