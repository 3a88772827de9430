//! The service: the route a request takes, or straight to the inner service.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::PolicyBody;
use super::future::PolicyFuture;
use super::layer::Shared;
use crate::error::BoxError;
use crate::{RequestBody, ResponseBody, Store};

/// The service a [`PolicyLayer`](super::PolicyLayer) wraps around an inner service.
pub struct PolicyService<S, St> {
    inner: S,
    shared: Arc<Shared<St>>,
}

impl<S, St> PolicyService<S, St> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<St>>) -> Self {
        Self { inner, shared }
    }
}

impl<S: Clone, St> Clone for PolicyService<S, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug, St> std::fmt::Debug for PolicyService<S, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for PolicyService<S, St>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    St: Store,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = PolicyFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The inner service was driven to readiness: take that one, leave a clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let compiled = self.shared.current();
        match compiled.find(&request) {
            Some(route) => {
                route.matcher.mark(&mut request);
                // The route's service only asks its inner service (this ready one) for
                // readiness: it is ready to call as it is.
                let mut reserve = route.layer.layer(ReadBody(inner));
                PolicyFuture::reserved(reserve.call(request))
            }
            None => {
                let mut inner = inner;
                PolicyFuture::passed(inner.call(request.map(PolicyBody::new)))
            }
        }
    }
}

/// The inner service as a route's [`ReserveLayer`](crate::ReserveLayer) sees it: it takes the
/// body the layer read.
#[derive(Clone)]
pub(crate) struct ReadBody<S>(S);

impl<S> Service<Request<RequestBody>> for ReadBody<S>
where
    S: Service<Request<PolicyBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        self.0.call(request.map(PolicyBody::from))
    }
}
