//! The reserve gateway: a reverse proxy that reserves by a policy file before it forwards a
//! request to an upstream HTTP service written in any language, and commits or releases by the
//! upstream's answer.
//!
//! ```text
//! GATEWAY_UPSTREAM=http://127.0.0.1:8000 GATEWAY_POLICY=examples/gateway/shop.toml \
//!   cargo run --release --example gateway
//! ```
//!
//! # Environment
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `GATEWAY_ADDR` | address to listen on | `127.0.0.1:3100` |
//! | `GATEWAY_UPSTREAM` | the upstream's base URL, `http://host:port` (a path is a prefix) | required |
//! | `GATEWAY_POLICY` | the policy file (TOML; the format is in the `policy` module docs) | required |
//! | `REDIS_URL` | one Redis node | unset: the embedded in-memory store |
//! | `REDIS_CLUSTER_URLS` | comma-separated Redis Cluster seed nodes | unset |
//! | `RUST_LOG` | log filter (logs go to standard error) | `info` |
//!
//! The first line on standard output names the store; Redis keys carry the prefix `gateway`. A
//! Redis that cannot be reached at start, a policy file that cannot be read or does not validate,
//! or an upstream URL that is not `http://`, stops the gateway with a message and status 1. Once
//! it accepts connections it prints `listening on http://<addr>`.
//!
//! # Endpoints
//!
//! - `GET /healthz`: `200` `{"status":"ok"}`, from the gateway itself.
//! - `GET /metrics`: the Prometheus text format, from the gateway itself: the layer's
//!   `tower_reserve_*` counters and the store latency histogram, labelled by route pattern.
//! - Everything else goes to the upstream: method, path and query, headers and body; the
//!   response comes back as it streams. Hop-by-hop headers (`Connection` and the headers it
//!   names, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`) are
//!   removed both ways; `Host` becomes the upstream's, the client's goes on as
//!   `X-Forwarded-Host`, and its address is appended to `X-Forwarded-For`.
//!
//! A request that matches a policy route is reserved first:
//!
//! | what happens | the client sees |
//! | --- | --- |
//! | the claims are held; the upstream answers a status the route commits (`2xx` by default) | the upstream's answer; the hold committed |
//! | ... and sets `reserve-actual: N` (one integer per budget of the route) | the same, without that header; only `N` is spent, the rest given back |
//! | the upstream answers any other status | its answer; the hold released |
//! | the upstream cannot be reached | `502` problem+json; the hold released |
//! | the upstream outlives the route's lease | `503` problem+json; the hold released |
//! | over budget | `403` problem+json with `requested` and `remaining`; the upstream is not called |
//! | a unique value taken | `409` problem+json; the upstream is not called |
//! | claims that cannot be read | `400` (malformed), `415` (not JSON), `422` (unknown id, wrong shape), `413` (body above the route's limit); nothing held, the upstream not called |
//! | the store unavailable | `503` problem+json with `Retry-After` (or through unreserved, for a `fail_open` route of budgets only) |
//! | a `shadow` route | the upstream's answer, always; nothing held; what would have been refused is logged and counted |
//!
//! A request that matches no route is forwarded untouched: its body streams through, never read
//! or limited.
//!
//! # Reload
//!
//! `SIGHUP` reads the policy file again. A file that validates replaces the policy from the next
//! request on (`policy: reloaded ...` on standard output); one that does not is refused with its
//! error on standard error (`policy: reload refused ...`), and the policy in force stays.
//! `SIGTERM` or Ctrl-C stops accepting and lets requests in flight finish (10 s at most).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower::{Service, ServiceExt};
use tower_reserve::policy::{Policy, PolicyBody, PolicyLayer, PolicyService};
use tower_reserve::{ACTUAL_HEADER, MemoryStore, RedisStore, Rejection, ResponseBody, Store};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
/// What the upstream answers, or the gateway's own `502`.
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
/// What the client gets: the policy layer's answer, or the gateway's own endpoints'.
type GatewayBody = Either<ResponseBody<ProxyBody>, Full<Bytes>>;

// ---------------------------------------------------------------------------------------------
// The upstream

/// Where requests go: a scheme, an authority and a path prefix.
#[derive(Clone, Debug)]
struct Upstream {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    prefix: String,
}

impl Upstream {
    fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .trim()
            .parse()
            .map_err(|e| format!("GATEWAY_UPSTREAM={url:?} is not a URL: {e}"))?;
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(format!(
                "GATEWAY_UPSTREAM={url:?} needs a scheme and a host, such as http://127.0.0.1:8000"
            ));
        };
        if scheme != &http::uri::Scheme::HTTP {
            return Err(format!(
                "GATEWAY_UPSTREAM={url:?}: only http:// upstreams are supported"
            ));
        }
        Ok(Self {
            scheme: scheme.clone(),
            authority: authority.clone(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The upstream URI of a request for `uri`.
    fn uri_for(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{path_and_query}", self.prefix))
            .build()
    }
}

/// Removes the headers that belong to one connection, not to the message (RFC 9110, 7.6.1):
/// `Connection` and every header it names, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`,
/// `Transfer-Encoding`, `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// Forwards requests to the upstream: the service the policy layer wraps.
#[derive(Clone)]
struct Proxy {
    client: Client<HttpConnector, PolicyBody>,
    upstream: Arc<Upstream>,
}

/// The client's address, put in the request's extensions per connection.
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

impl Service<Request<PolicyBody>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<PolicyBody>) -> Self::Future {
        let (client, upstream) = (self.client.clone(), self.upstream.clone());
        Box::pin(async move { Ok(forward(&client, &upstream, request).await) })
    }
}

async fn forward(
    client: &Client<HttpConnector, PolicyBody>,
    upstream: &Upstream,
    request: Request<PolicyBody>,
) -> Response<ProxyBody> {
    let (mut parts, body) = request.into_parts();
    parts.uri = match upstream.uri_for(&parts.uri) {
        Ok(uri) => uri,
        Err(e) => return bad_gateway(format!("the request's path cannot be forwarded: {e}")),
    };
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if let Some(host) = parts.headers.remove(header::HOST) {
        parts
            .headers
            .insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    if let Some(Peer(peer)) = parts.extensions.get::<Peer>().copied() {
        let forwarded_for = HeaderName::from_static("x-forwarded-for");
        let value = match parts
            .headers
            .get(&forwarded_for)
            .and_then(|v| v.to_str().ok())
        {
            Some(earlier) => format!("{earlier}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            parts.headers.insert(forwarded_for, value);
        }
    }
    match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            // The client's connection has a version of its own (an upstream may answer HTTP/1.0).
            parts.version = http::Version::default();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
        }
        Err(e) => {
            tracing::warn!(error = %e, error_source = ?std::error::Error::source(&e), "the upstream could not be reached");
            bad_gateway("the upstream could not be reached".to_owned())
        }
    }
}

fn bad_gateway(detail: String) -> Response<ProxyBody> {
    Rejection::new(StatusCode::BAD_GATEWAY, "Bad gateway", detail)
        .into_response()
        .map(|body| body.map_err(|never| match never {}).boxed_unsync())
}

// ---------------------------------------------------------------------------------------------
// The gateway's own endpoints, then the policy

/// Answers `/healthz` and `/metrics` itself; everything else through the policy to the upstream.
async fn handle<St: Store>(
    mut request: Request<Incoming>,
    peer: SocketAddr,
    service: PolicyService<Proxy, St>,
    metrics: PrometheusHandle,
) -> Result<Response<GatewayBody>, Infallible> {
    if request.method() == Method::GET {
        match request.uri().path() {
            "/healthz" => {
                return Ok(own(
                    StatusCode::OK,
                    "application/json",
                    r#"{"status":"ok"}"#.into(),
                ));
            }
            "/metrics" => {
                let text = metrics.render();
                return Ok(own(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    text.into(),
                ));
            }
            _ => {}
        }
    }
    request.extensions_mut().insert(Peer(peer));
    let mut response = service.oneshot(request).await?;
    // The layer reads and removes it on reserved routes; elsewhere it means nothing.
    response.headers_mut().remove(ACTUAL_HEADER);
    Ok(response.map(Either::Left))
}

fn own(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<GatewayBody> {
    let mut response = Response::new(Either::Right(Full::new(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

// ---------------------------------------------------------------------------------------------
// Start-up, reload, shutdown

fn fail(message: &str) -> ! {
    eprintln!("gateway: {message}");
    std::process::exit(1);
}

/// The URL with any password or user name masked, for logs.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

struct Config {
    addr: String,
    upstream: Upstream,
    policy_path: PathBuf,
    policy: Policy,
}

fn required(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| fail(&format!("set {name} (see the example's documentation)")))
}

fn config() -> Config {
    let addr = std::env::var("GATEWAY_ADDR").unwrap_or_else(|_| "127.0.0.1:3100".to_owned());
    let upstream = Upstream::parse(&required("GATEWAY_UPSTREAM")).unwrap_or_else(|e| fail(&e));
    let policy_path = PathBuf::from(required("GATEWAY_POLICY"));
    let policy = Policy::load(&policy_path).unwrap_or_else(|e| {
        fail(&format!(
            "the policy {} is refused: {e}",
            policy_path.display()
        ))
    });
    Config {
        addr,
        upstream,
        policy_path,
        policy,
    }
}

/// Reads the policy again on every `SIGHUP`; a file that does not validate leaves the policy in
/// force.
async fn reload_on_hangup<St: Store>(layer: PolicyLayer<St>, path: PathBuf) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; the policy will not be reloaded");
            return;
        };
        while hangups.recv().await.is_some() {
            reload(&layer, &path);
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (layer, path);
    }
}

fn reload<St: Store>(layer: &PolicyLayer<St>, path: &Path) {
    match Policy::load(path).and_then(|policy| {
        layer.reload(&policy)?;
        Ok(policy)
    }) {
        Ok(policy) => println!(
            "policy: reloaded {} routes from {}",
            policy.routes().len(),
            path.display()
        ),
        Err(err) => {
            tracing::error!(%err, path = %path.display(), "policy reload refused; the policy in force stays");
            eprintln!(
                "policy: reload refused, the policy in force stays: {}: {err}",
                path.display()
            );
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

async fn serve<St: Store>(store: St, cfg: Config, metrics: PrometheusHandle) {
    let layer = PolicyLayer::new(store, &cfg.policy)
        .unwrap_or_else(|e| fail(&format!("the policy is refused: {e}")));
    println!(
        "policy: {} routes from {}, upstream {}://{}{}",
        cfg.policy.routes().len(),
        cfg.policy_path.display(),
        cfg.upstream.scheme,
        cfg.upstream.authority,
        cfg.upstream.prefix
    );
    tokio::spawn(reload_on_hangup(layer.clone(), cfg.policy_path.clone()));
    {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                metrics.run_upkeep();
            }
        });
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let service = tower::Layer::layer(
        &layer,
        Proxy {
            client,
            upstream: Arc::new(cfg.upstream.clone()),
        },
    );

    let listener = tokio::net::TcpListener::bind(&cfg.addr)
        .await
        .unwrap_or_else(|e| fail(&format!("cannot listen on {}: {e}", cfg.addr)));
    let local = listener
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("cannot read the listening address: {e}")));
    println!("listening on http://{local}");

    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let (service, metrics) = (service.clone(), metrics.clone());
        let per_request = hyper::service::service_fn(move |request| {
            handle(request, peer, service.clone(), metrics.clone())
        });
        let connection = server.serve_connection(TokioIo::new(stream), per_request);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    println!("shutting down: finishing the requests in flight");
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("gateway: requests still in flight after 10 s; stopping anyway");
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cfg = config();
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .unwrap_or_else(|e| fail(&format!("cannot install the metrics recorder: {e}")));

    let redis_url = std::env::var("REDIS_URL")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let cluster = std::env::var("REDIS_CLUSTER_URLS")
        .ok()
        .filter(|v| !v.trim().is_empty());
    match (redis_url, cluster) {
        (Some(_), Some(_)) => {
            fail("set REDIS_URL (one node) or REDIS_CLUSTER_URLS (a Cluster), not both")
        }
        (None, Some(urls)) => {
            let seeds: Vec<String> = urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect();
            let shown: Vec<String> = seeds.iter().map(|u| redact(u)).collect();
            println!("store: Redis Cluster via {}", shown.join(","));
            let store = RedisStore::builder()
                .prefix("gateway")
                .connect_cluster(&seeds)
                .await
                .unwrap_or_else(|e| {
                    fail(&format!(
                        "cannot reach the Redis Cluster at {}: {e}",
                        shown.join(",")
                    ))
                });
            serve(store, cfg, metrics).await;
        }
        (Some(url), None) => {
            let shown = redact(&url);
            println!("store: Redis at {shown}");
            let store = RedisStore::builder()
                .prefix("gateway")
                .connect(&url)
                .await
                .unwrap_or_else(|e| fail(&format!("cannot reach Redis at {shown}: {e}")));
            serve(store, cfg, metrics).await;
        }
        (None, None) => {
            println!("store: embedded in-memory store, for this process only");
            serve(MemoryStore::new(), cfg, metrics).await;
        }
    }
}
