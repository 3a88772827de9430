//! The request body the inner service receives.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

/// The body of a request that went through [`ReserveLayer`](super::ReserveLayer): the layer read
/// the original body (within its limit) to work out the claims, and hands it on byte for byte.
///
/// Any request body goes into the layer (hyper's `Incoming`, axum's `Body`, ...); the inner
/// service takes `Request<RequestBody>`. axum's routers and handlers take it as it is.
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::BodyExt;
/// use tower_reserve::RequestBody;
///
/// async fn handler(req: Request<RequestBody>) -> Response<String> {
///     let body: Bytes = req.into_body().collect().await.unwrap().to_bytes();
///     Response::new(format!("{} bytes", body.len()))
/// }
/// ```
#[derive(Debug, Clone, Default)]
pub struct RequestBody {
    inner: Full<Bytes>,
    len: usize,
}

impl RequestBody {
    pub(crate) fn new(bytes: Bytes) -> Self {
        Self {
            len: bytes.len(),
            inner: Full::new(bytes),
        }
    }

    /// How many bytes the body holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl From<Bytes> for RequestBody {
    fn from(bytes: Bytes) -> Self {
        Self::new(bytes)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
