//! Serving HTTP on the open internet, for the shop and the gateway: hyper's connection builder
//! with every socket timed and every buffer bounded, which `axum::serve` does not do; and the
//! settings and logging both read from the environment.
//!
//! - A request head must arrive within the head timeout, from the connection's start or the end
//!   of the previous answer (hyper's `header_read_timeout`, which is also HTTP/1's keep-alive
//!   idle timeout); a head is at most 32 KiB and 100 headers (`431` above).
//! - A connection with no request in flight (an HTTP/2 connection between streams, too) is
//!   closed after the head timeout.
//! - A client that stops reading its answer (the socket accepts nothing more) for the head
//!   timeout is disconnected, so a slow reader cannot hold a connection for ever.
//! - At most `max_connections` are served at once; further ones wait in the listen queue, using
//!   no descriptor, until one ends.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Sleep;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most bytes of a request's head (request line and headers): nginx reads heads into 8 KiB
/// buffers, up to four of them.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// The most header lines of a request.
pub const MAX_HEADERS: usize = 100;

/// How long the server waits for a client, and how many it serves.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// For a request's head, for an idle connection, for a client that does not read.
    pub head_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// How long requests in flight may finish after a stop signal.
    pub grace: Duration,
}

/// Serves `handle` on `listener` until `stop` resolves, then lets the requests in flight finish
/// (at most `limits.grace`). `handle` gets each request and the client's address.
pub async fn serve<H, Fut, B>(
    listener: tokio::net::TcpListener,
    limits: Limits,
    handle: H,
    stop: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    server
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    server
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(100)
        .keep_alive_interval(limits.head_timeout)
        .keep_alive_timeout(limits.head_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut stop = std::pin::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = &mut stop => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: let connections end before accepting again.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::default();
        let per_request = {
            let (handle, activity) = (handle.clone(), activity.clone());
            hyper::service::service_fn(move |request| {
                let active = activity.start();
                let answer = handle(request, peer);
                async move {
                    let response = answer.await?;
                    Ok::<_, Infallible>(response.map(|body| Tracked {
                        body,
                        _active: active,
                    }))
                }
            })
        };
        let io = TokioIo::new(WriteDeadline::new(stream, limits.head_timeout));
        let connection = server.serve_connection(io, per_request);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            loop {
                let changed = activity.changed();
                let mut changed = std::pin::pin!(changed);
                // Registered before the count is read, so that no change is missed.
                changed.as_mut().enable();
                let idle = activity.open() == 0;
                tokio::select! {
                    ended = connection.as_mut() => {
                        if let Err(e) = ended {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        return;
                    }
                    _ = changed => {}
                    _ = tokio::time::sleep(limits.head_timeout), if idle => return,
                }
            }
        });
    }
    if tokio::time::timeout(limits.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?limits.grace, "requests still in flight; stopping anyway");
    }
}

/// A connection's requests in flight, from the call to the end of the answer's body.
#[derive(Clone, Default)]
struct Activity(Arc<ActivityInner>);

#[derive(Default)]
struct ActivityInner {
    open: AtomicUsize,
    changed: Notify,
}

impl Activity {
    fn start(&self) -> Active {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
        Active(self.clone())
    }

    fn open(&self) -> usize {
        self.0.open.load(Ordering::Acquire)
    }

    fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.changed.notified()
    }
}

/// One request in flight; it ends when dropped with its answer's body.
struct Active(Activity);

impl Drop for Active {
    fn drop(&mut self) {
        (self.0).0.open.fetch_sub(1, Ordering::AcqRel);
        (self.0).0.changed.notify_waiters();
    }
}

pin_project_lite::pin_project! {
    /// An answer's body that keeps its request counted as in flight until it is dropped.
    struct Tracked<B> {
        #[pin]
        body: B,
        _active: Active,
    }
}

impl<B: http_body::Body> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A socket whose writes fail once the peer has accepted nothing for `timeout`: a client that
/// stops reading its answer is disconnected (nginx's `send_timeout`).
struct WriteDeadline {
    stream: TcpStream,
    timeout: Duration,
    /// Armed while a write waits for the peer.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl WriteDeadline {
    fn new(stream: TcpStream, timeout: Duration) -> Self {
        Self {
            stream,
            timeout,
            stalled: None,
        }
    }

    /// Passes a write's outcome on, timing the peer while it accepts nothing.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match write(Pin::new(&mut self.stream), cx) {
            Poll::Pending => {
                let timeout = self.timeout;
                let stalled = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match stalled.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
            done => {
                self.stalled = None;
                done
            }
        }
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.timed(cx, |stream, cx| stream.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.timed(cx, |stream, cx| stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.timed(cx, |stream, cx| stream.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A duration as the programs' settings write it: `"500ms"`, `"2s"`, `"1m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as \"500ms\", \"2s\" or \"1m\""))?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "{text:?} has no unit: write \"500ms\", \"2s\", \"1m\" or \"1h\""
            ));
        }
    };
    if duration.is_zero() {
        return Err(format!(
            "{text:?}: a timeout of zero would refuse everything"
        ));
    }
    Ok(duration)
}

/// Logs to standard error, in colour only for a person at a terminal (never into a log file),
/// filtered by `RUST_LOG`: a default level and `target=level` pairs (`warn`,
/// `warn,tower_reserve=debug`); `info` when it is unset or cannot be read.
pub fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry()
        .with(output)
        .with(filter)
        .init();
}

/// Connections served at once by default: `1 / share` of the process's soft limit on open
/// files (1024 where it cannot be read), since each connection takes descriptors and the store
/// and the logs need some too; 16 to 4096.
pub fn default_max_connections(share: usize) -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        })
        .unwrap_or(1024);
    (soft / share).clamp(16, 4096)
}

/// The Prometheus recorder of the shop and the gateway: histograms (the layer's
/// `tower_reserve_store_seconds`) with fixed buckets, from 10 µs (an embedded store's call) to
/// 2.5 s (a store call's whole time limit).
///
/// The exporter's default is a summary, which keeps a quantile sketch per time window and folds
/// every sample into it at upkeep; under load that was most of what keeping the metrics cost
/// the shop (`BENCHMARKS.md`, the breakdown of a purchase). Buckets cost a comparison or two per
/// sample, and unlike quantiles they add up across instances.
pub fn prometheus() -> metrics_exporter_prometheus::PrometheusBuilder {
    const SECONDS: [f64; 17] = [
        0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
        0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&SECONDS)
        .expect("the buckets are not empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
