//! The request body the service behind a [`PolicyLayer`](super::PolicyLayer) receives.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

use crate::RequestBody;
use crate::error::BoxError;

/// The body of a request that went through a [`PolicyLayer`](super::PolicyLayer): read (within
/// the route's limit) when a route reserved for it, and handed on byte for byte; streamed
/// through untouched, and never read or limited, when no route matched.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::BodyExt;
/// use tower_reserve::policy::PolicyBody;
///
/// # tokio_test_block_on(async {
/// let body = PolicyBody::new(http_body_util::Full::new(Bytes::from_static(b"hello")));
/// assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug)]
pub struct PolicyBody {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Read(RequestBody),
    Streamed(UnsyncBoxBody<Bytes, BoxError>),
}

impl PolicyBody {
    /// Any body, streamed as it comes.
    pub fn new<B>(body: B) -> Self
    where
        B: Body + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let body = body
            .map_frame(|frame| frame.map_data(|mut data| data.copy_to_bytes(data.remaining())))
            .map_err(Into::into);
        Self {
            inner: Inner::Streamed(UnsyncBoxBody::new(body)),
        }
    }

    /// Whether a route read this body to reserve for the request.
    pub fn was_read(&self) -> bool {
        matches!(self.inner, Inner::Read(_))
    }
}

impl From<RequestBody> for PolicyBody {
    fn from(body: RequestBody) -> Self {
        Self {
            inner: Inner::Read(body),
        }
    }
}

impl Body for PolicyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Inner::Read(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Inner::Streamed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Read(body) => body.is_end_stream(),
            Inner::Streamed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Read(body) => body.size_hint(),
            Inner::Streamed(body) => body.size_hint(),
        }
    }
}
