//! The reserve gateway: a reverse proxy that reserves by a policy file before it forwards a
//! request to an upstream HTTP service written in any language, and commits or releases by the
//! upstream's answer.
//!
//! ```text
//! GATEWAY_UPSTREAM=http://127.0.0.1:8000 GATEWAY_POLICY=examples/gateway/shop.toml \
//!   cargo run --release -p gateway
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
//! | `RUST_LOG` | log filter (logs go to standard error; colour only when it is a terminal): a level, and `target=level` pairs (`warn,tower_reserve=debug`) | `info` |
//! | `GATEWAY_HEADER_TIMEOUT` | how long a connection may take to send a request's head (from its start, or from the previous answer: also the idle timeout of a connection with no request in flight), the longest pause inside a request's body, and the longest a client may leave its answer unread | `10s` |
//! | `GATEWAY_UPSTREAM_TIMEOUT` | how long the upstream may take to answer (its head), and the longest pause inside its body | `30s` |
//! | `GATEWAY_DIGEST_KEY` | a secret (16 bytes or more) that keys the digests of the policy's unique values, so that whoever reads Redis or the logs cannot test a guessed e-mail address against them; recommended (changing it frees every value claimed under the old one) | unset: unkeyed SHA-256 |
//! | `GATEWAY_MAX_CONNECTIONS` | client connections served at once; more wait in the listen queue until one ends | a quarter of the open-file limit, 16 to 4096 |
//!
//! Durations are written `"500ms"`, `"2s"`, `"1m"`, `"1h"`.
//!
//! The first line on standard output names the store; Redis keys carry the prefix `gateway`. A
//! Redis that cannot be reached at start, a policy file that cannot be read or does not validate,
//! an upstream URL that is not `http://`, or a setting that does not parse, stops the gateway
//! with a message and status 1. Once it accepts connections it prints
//! `listening on http://<addr>`.
//!
//! # Endpoints
//!
//! - `GET /healthz`: `200` `{"status":"ok"}` while the process serves (liveness).
//! - `GET /readyz`: `200` `{"status":"ready"}` when the store answers within 2 s, `503`
//!   problem+json otherwise (readiness: take the gateway out of rotation, do not restart it).
//! - `GET /metrics`: the Prometheus text format, from the gateway itself: the layer's
//!   `tower_reserve_*` counters and the store latency histogram, labelled by route pattern.
//! - Everything else goes to the upstream: method, normalized path and query, headers and body;
//!   the response comes back as it streams.
//!
//! A request that matches a policy route is reserved first:
//!
//! | what happens | the client sees |
//! | --- | --- |
//! | the claims are held; the upstream answers a status the route commits (`2xx` by default) | the upstream's answer; the hold committed |
//! | ... and sets `reserve-actual: N` (one integer per budget of the route) | the same, without that header; only `N` is spent, the rest given back |
//! | the upstream answers any other status | its answer; the hold released |
//! | the upstream cannot be reached | `502` problem+json; the hold released |
//! | the upstream takes longer than the route's lease | nothing: the gateway renews the hold (every third of the lease) while it waits, so a lease bounds only the holds of a gateway that died |
//! | the client goes away while the upstream works | the upstream's answer still settles the hold (a route's `on_disconnect = "release"` does not apply here: dropping a proxied request does not stop the upstream) |
//! | the upstream does not answer within `GATEWAY_UPSTREAM_TIMEOUT` | `504` problem+json; the hold **committed**: the upstream may still carry the request out and cannot be called back, so what it may do stays reserved (a customer may lose budget to a purchase that failed, never gain it) |
//! | over budget | `403` problem+json with `requested` and `remaining`; the upstream is not called |
//! | a unique value taken | `409` problem+json; the upstream is not called |
//! | claims that cannot be read | `400` (malformed), `415` (not JSON), `422` (unknown id, wrong shape), `413` (body above the route's limit); nothing held, the upstream not called |
//! | the store unavailable | `503` problem+json with `Retry-After` (or through unreserved, for a `fail_open` route of budgets only) |
//! | a `shadow` route | the upstream's answer, always; nothing held; what would have been refused is logged and counted |
//!
//! A request that matches no route is forwarded as it came, once admitted (below): its body
//! streams through, never read or limited.
//!
//! # What the gateway does with ...
//!
//! What a policy matches is what the upstream serves: a request is checked and rewritten once,
//! before anything reads it, and the same head goes to the policy and to the upstream. Envoy's
//! and nginx's defaults are beside each row; the gateway is stricter where a default would let a
//! request reach the upstream in a form the policy did not see.
//!
//! | ... | the gateway | Envoy (default) | nginx (default) |
//! | --- | --- | --- | --- |
//! | **paths** | | | |
//! | `%61`, `%7E` (unreserved characters encoded) | decoded (RFC 3986 §6.2.2.2), then matched and forwarded decoded | kept (`normalize_path: false`) | decoded for matching; forwarded as sent with `proxy_pass` without a URI part |
//! | `%c3%a9` (other escapes) | kept, hex digits upper-cased | kept | as above |
//! | `.` and `..` segments, encoded or not | resolved, never above the root: no request leaves the upstream's path prefix | kept | resolved for matching |
//! | `//` | merged into one `/` | kept (`merge_slashes: false`) | merged (`merge_slashes on`) for matching |
//! | `%2F`, `%5C` (encoded slash, backslash) | `400`: servers disagree on whether they separate segments | kept (`path_with_escaped_slashes_action: KEEP_UNCHANGED`) | kept |
//! | `;` (path parameters) | `400`: some servers (Tomcat, Jetty) strip `;...` from a segment | kept | kept |
//! | a raw `\`, an encoded control character | `400` | kept | kept |
//! | a route's path with other letter case in its fixed segments, or a trailing `/` | taken as the route (`/Customers/ann/purchases/` is `/customers/ann/purchases`), since upstreams such as Express match so | kept | kept |
//! | **headers** | | | |
//! | `Host` twice (even with one value); HTTP/1.1 without `Host` | `400` (RFC 9112 §3.2) | not documented | `400` |
//! | `Content-Length` twice with different values, or a list | `400` (two equal ones are read as one, as RFC 9112 §6.3 allows) | not documented | `400` |
//! | `Idempotency-Key` twice; a header or query parameter the route's claims read, twice | `400`: the claims would read one value, the upstream might use another | forwarded | forwarded |
//! | `Connection` and the headers it names, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade` | removed both ways, *before* the policy reads the request; a `Connection` that is not a list of header names is `400` | removed | not forwarded, except by configuration |
//! | `Transfer-Encoding` other than `chunked` | `501` (RFC 9112 §6.1) | `501` | `501` |
//! | `Expect: 100-continue` with a declared length above the route's body limit | `413` at once, no `100 Continue` (otherwise `100` from the gateway as it reads the body; `Expect` is not forwarded) | `100` from Envoy itself | `413` at once (`client_max_body_size`, 1 MiB) |
//! | `Forwarded`, `X-Forwarded-Host`, `X-Forwarded-Proto`, `X-Forwarded-Port`, `X-Real-IP` from the client | removed; `X-Forwarded-Host` (the client's `Host`, or the request target's authority), `X-Forwarded-Proto: http` and `X-Real-IP` (the client's address) set by the gateway | forwarded (`X-Forwarded-Proto` set) | forwarded unless configured |
//! | `X-Forwarded-For` | the client's address appended: only the last entry is the gateway's word | appended with `use_remote_address: true` | as configured (`$proxy_add_x_forwarded_for`) |
//! | `Host` to the upstream | the upstream's own | the client's | `$proxy_host` |
//! | a request head above 32 KiB, or more than 100 headers | `431` from the HTTP parser | `431` above 60 KiB (`max_request_headers_kb`) | `400`/`414` above 4 × 8 KiB (`large_client_header_buffers`) |
//! | **timeouts and limits** | | | |
//! | a connection that does not send a whole head in time, from its start or after an answer | closed after `GATEWAY_HEADER_TIMEOUT` (10 s) | none (`request_headers_timeout: 0`); idle connections closed after 1 h | `408` after 60 s (`client_header_timeout`); idle after 75 s (`keepalive_timeout`) |
//! | a connection with no request in flight (HTTP/2 between streams too) | closed after `GATEWAY_HEADER_TIMEOUT` | closed after 1 h (`idle_timeout`) | closed after 75 s (`keepalive_timeout`; HTTP/2: `keepalive_timeout` as well) |
//! | a client that stops reading its answer | disconnected once its socket has taken nothing for `GATEWAY_HEADER_TIMEOUT` | reset after 5 min without progress (`stream_idle_timeout`) | closed after 60 s (`send_timeout`) |
//! | a body that pauses | `408` after `GATEWAY_HEADER_TIMEOUT` without a byte | reset after 5 min (`stream_idle_timeout`) | `408` after 60 s (`client_body_timeout`) |
//! | an upstream that does not answer | `504` after `GATEWAY_UPSTREAM_TIMEOUT` (30 s; the same bound between two pieces of its body) | `504` after 15 s (route `timeout`) | `504` after 60 s (`proxy_read_timeout`) |
//! | connecting to the upstream | at most `GATEWAY_UPSTREAM_TIMEOUT`, then `502` | 5 s (`connect_timeout`) | 60 s (`proxy_connect_timeout`) |
//! | connections at once | `GATEWAY_MAX_CONNECTIONS`; more wait to be accepted | unbounded (overload manager off) | 512 per worker (`worker_connections`) |
//! | **statuses** | | | |
//! | `CONNECT` | `501`: the gateway is not a tunnel | refused unless upgrade is configured | not proxied |
//! | `TRACE` | `405`: it would echo the client's cookies | forwarded | `405` |
//! | a client body that breaks off (malformed chunked, reset) | `400`, never the upstream's `502` | `400` | `400` |
//! | the upstream unreachable | `502` | `503` | `502` |
//!
//! Every refusal the gateway writes is `application/problem+json`; the HTTP parser's own `400`
//! and `431` (a head that cannot be parsed at all) have no body.
//!
//! # Reload
//!
//! `SIGHUP` reads the policy file again. A file that validates replaces the policy from the next
//! request on (`policy: reloaded ...` on standard output); one that does not is refused with its
//! error on standard error (`policy: reload refused ...`), and the policy in force stays.
//! `SIGTERM` or Ctrl-C stops accepting and lets requests in flight finish (10 s at most).

mod edge;
#[path = "../../common/server.rs"]
mod server;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tower::{Service, ServiceExt};
use tower_http::timeout::TimeoutBody;
use tower_reserve::policy::{Policy, PolicyBody, PolicyLayer, PolicyService};
use tower_reserve::{
    ACTUAL_HEADER, DigestKey, Disconnect, Hold, MemoryStore, RedisStore, Rejection, ResponseBody,
    Store, Unique,
};

use crate::edge::{BodyFault, ClientBody};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
/// What the upstream answers, or the gateway's own `502` and `504`.
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
/// What the client gets: the policy layer's answer, or the gateway's own.
type GatewayBody = Either<ResponseBody<ProxyBody>, Full<Bytes>>;

/// A route's lease when it sets none: the layer's default.
const DEFAULT_LEASE: Duration = Duration::from_secs(30);

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
        let prefix = edge::normalize_path(uri.path())
            .map_err(|e| format!("GATEWAY_UPSTREAM={url:?}: {}", e.detail()))?;
        Ok(Self {
            scheme: scheme.clone(),
            authority: authority.clone(),
            prefix: prefix.trim_end_matches('/').to_owned(),
        })
    }

    /// The upstream URI of a request for `uri`, whose path is normalized (`edge::admit`): no
    /// dot segment is left to climb out of the prefix.
    fn uri_for(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{path_and_query}", self.prefix))
            .build()
    }
}

/// Forwards requests to the upstream: the service the policy layer wraps.
#[derive(Clone)]
struct Proxy {
    client: Client<HttpConnector, PolicyBody>,
    upstream: Arc<Upstream>,
    /// How long the upstream has to answer (its head), and then between two pieces of its body.
    timeout: Duration,
}

/// The lease of the route a request took, so that the proxy renews the hold by as much.
#[derive(Clone, Copy)]
struct RouteLease(Duration);

impl Service<Request<PolicyBody>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<PolicyBody>) -> Self::Future {
        let proxy = self.clone();
        Box::pin(async move { Ok(proxy.forward(request).await) })
    }
}

impl Proxy {
    /// Sends the request on and waits for the answer at most the upstream timeout, renewing the
    /// request's hold (if it has one) all the while: a hold ends by its lease only when the
    /// gateway is no longer there to renew it.
    async fn forward(&self, request: Request<PolicyBody>) -> Response<ProxyBody> {
        let (mut parts, body) = request.into_parts();
        let hold = parts.extensions.get::<Hold>().cloned();
        let lease = parts
            .extensions
            .get::<RouteLease>()
            .map_or(DEFAULT_LEASE, |l| l.0);
        let client_body = parts.extensions.get::<ClientBody>().cloned();
        parts.uri = match self.upstream.uri_for(&parts.uri) {
            Ok(uri) => uri,
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    format!("the request's path cannot be forwarded: {e}"),
                );
            }
        };
        parts.version = http::Version::HTTP_11;
        // The client's goes on as `X-Forwarded-Host` (`edge::admit`); the client library sets
        // the upstream's own.
        parts.headers.remove(header::HOST);
        let call = self.client.request(Request::from_parts(parts, body));
        let answered = tokio::select! {
            answered = tokio::time::timeout(self.timeout, call) => answered,
            never = renew(hold.clone(), lease) => match never {},
        };
        match answered {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                // The client's connection has a version of its own (an upstream may answer
                // HTTP/1.0).
                parts.version = http::Version::default();
                if let Err(e) = edge::strip_hop_by_hop(&mut parts.headers) {
                    tracing::warn!(error = %e, "the upstream's Connection header was malformed");
                    parts.headers.remove(header::CONNECTION);
                }
                let body = TimeoutBody::new(self.timeout, body);
                Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
            }
            Ok(Err(e)) => {
                if let Some(fault) = client_body.and_then(|b| b.fault()) {
                    return ClientBody::rejection(fault)
                        .into_problem_response()
                        .map(|body| body.map_err(|never| match never {}).boxed_unsync());
                }
                tracing::warn!(error = %e, error_source = ?std::error::Error::source(&e), "the upstream could not be reached");
                problem(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                    "the upstream could not be reached".to_owned(),
                )
            }
            Err(_) => self.gave_up(hold).await,
        }
    }

    /// The `504` for an upstream that did not answer in time. It may still carry the request
    /// out, and nothing can call it back: what the request reserved is committed (the budget
    /// spent, the values owned), so that the upstream never does more than was reserved.
    async fn gave_up(&self, hold: Option<Hold>) -> Response<ProxyBody> {
        let waited = humanize(self.timeout);
        let detail = match hold {
            None => format!(
                "the upstream did not answer within {waited}; it may still carry the request out"
            ),
            Some(hold) => {
                // The layer would release it on a 504: the gateway settles it itself.
                let hold = hold.defer();
                match hold.commit().await {
                    Ok(_) => format!(
                        "the upstream did not answer within {waited}; it may still carry the request out, so what the request reserved is kept as used"
                    ),
                    Err(e) => {
                        tracing::error!(hold = %hold.id(), error = %e, "could not keep the hold of a request the upstream did not answer");
                        format!(
                            "the upstream did not answer within {waited}; it may still carry the request out, and what the request reserved could not be kept"
                        )
                    }
                }
            }
        };
        tracing::warn!(timeout = ?self.timeout, "the upstream did not answer in time");
        problem(StatusCode::GATEWAY_TIMEOUT, "Gateway timeout", detail)
    }
}

/// Renews a hold's lease every third of it, forever (the caller stops it); without a hold it
/// waits forever.
async fn renew(hold: Option<Hold>, lease: Duration) -> Infallible {
    let Some(hold) = hold else {
        return std::future::pending().await;
    };
    let every = (lease / 3).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = hold.extend(lease).await {
            tracing::warn!(hold = %hold.id(), error = %e, "could not renew the hold while the upstream works");
        }
    }
}

/// `500ms`, `2s`, `1m`, as the settings are written.
fn humanize(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn problem(status: StatusCode, title: &'static str, detail: String) -> Response<ProxyBody> {
    Rejection::new(status, title, detail)
        .into_problem_response()
        .map(|body| body.map_err(|never| match never {}).boxed_unsync())
}

// ---------------------------------------------------------------------------------------------
// The gateway's own endpoints, then the policy

/// What every connection's requests share.
struct Shared<St: Store> {
    layer: PolicyLayer<St>,
    service: PolicyService<Proxy, St>,
    store: St,
    metrics: PrometheusHandle,
    body_timeout: Duration,
}

/// Admits the request (`edge::admit`); answers `/healthz`, `/readyz` and `/metrics` itself;
/// everything else goes through the policy to the upstream.
async fn handle<St: Store>(
    request: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared<St>>,
) -> Result<Response<GatewayBody>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let policy = shared.layer.policy();
    if let Err(rejection) = edge::admit(&mut parts, &policy, peer) {
        return Ok(rejection.into_problem_response().map(Either::Right));
    }
    if parts.method == Method::GET {
        match parts.uri.path() {
            "/healthz" => return Ok(json(StatusCode::OK, r#"{"status":"ok"}"#)),
            "/readyz" => return Ok(ready(&shared.store).await),
            "/metrics" => {
                let text = shared.metrics.render();
                return Ok(own(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    text.into(),
                ));
            }
            _ => {}
        }
    }
    let lease = policy
        .route_for(&parts.method, parts.uri.path())
        .and_then(|route| route.lease_setting())
        .unwrap_or(DEFAULT_LEASE);
    parts.extensions.insert(RouteLease(lease));
    // The body's failures are the client's: recorded, so that they are not told as the
    // upstream's.
    let client_body = ClientBody::default();
    parts.extensions.insert(client_body.clone());
    let body = client_body.watch(TimeoutBody::new(shared.body_timeout, body));
    let mut response = shared
        .service
        .clone()
        .oneshot(Request::from_parts(parts, body))
        .await?;
    // The layer reads a route's body itself and answers 400 when it breaks off: a stalled one
    // is told as what it is.
    if response.status() == StatusCode::BAD_REQUEST
        && client_body.fault() == Some(BodyFault::Stalled)
    {
        return Ok(ClientBody::rejection(BodyFault::Stalled)
            .into_problem_response()
            .map(Either::Right));
    }
    // The layer reads and removes it on reserved routes; elsewhere it means nothing.
    response.headers_mut().remove(ACTUAL_HEADER);
    Ok(response.map(Either::Left))
}

/// `200` when the store answers within 2 s, `503` otherwise: a readiness probe, while `/healthz`
/// says only that the process serves.
async fn ready<St: Store>(store: &St) -> Response<GatewayBody> {
    let probe_value = Unique::new("gateway", "readiness-probe");
    let probe = store.owner(&probe_value);
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(_)) => json(StatusCode::OK, r#"{"status":"ready"}"#),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the store is unavailable");
            unready("the store is unavailable")
        }
        Err(_) => unready("the store did not answer within 2s"),
    }
}

fn unready(detail: &'static str) -> Response<GatewayBody> {
    Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "Not ready", detail)
        .into_problem_response()
        .map(Either::Right)
}

fn json(status: StatusCode, body: &'static str) -> Response<GatewayBody> {
    own(
        status,
        "application/json",
        Bytes::from_static(body.as_bytes()),
    )
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
    /// Keys the digests of the policy's unique values.
    digest_key: Option<DigestKey>,
    limits: Limits,
}

/// The policy at `path`, its unique values' digests keyed by `key` when there is one.
fn load(
    path: &Path,
    key: Option<&DigestKey>,
) -> Result<Policy, tower_reserve::policy::PolicyError> {
    let policy = Policy::load(path)?;
    Ok(match key {
        Some(key) => policy.digest_key(key.clone()),
        None => policy,
    })
}

/// How long the gateway waits on whom, and how many connections it serves.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// For a request's head (from the connection's start, or the end of the previous answer),
    /// and between two pieces of a body.
    header_timeout: Duration,
    /// For the upstream's head, and between two pieces of its body.
    upstream_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    max_connections: usize,
}

fn required(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| fail(&format!("set {name} (see the example's documentation)")))
}

fn duration(name: &str, default: Duration) -> Duration {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => {
            server::parse_duration(&text).unwrap_or_else(|e| fail(&format!("{name}: {e}")))
        }
        _ => default,
    }
}

fn config() -> Config {
    let addr = std::env::var("GATEWAY_ADDR").unwrap_or_else(|_| "127.0.0.1:3100".to_owned());
    let upstream = Upstream::parse(&required("GATEWAY_UPSTREAM")).unwrap_or_else(|e| fail(&e));
    let policy_path = PathBuf::from(required("GATEWAY_POLICY"));
    let digest_key = match std::env::var("GATEWAY_DIGEST_KEY") {
        Ok(secret) if !secret.is_empty() => Some(
            DigestKey::new(secret.as_bytes())
                .unwrap_or_else(|e| fail(&format!("GATEWAY_DIGEST_KEY: {e}"))),
        ),
        _ => None,
    };
    let policy = load(&policy_path, digest_key.as_ref()).unwrap_or_else(|e| {
        fail(&format!(
            "the policy {} is refused: {e}",
            policy_path.display()
        ))
    });
    let max_connections = match std::env::var("GATEWAY_MAX_CONNECTIONS") {
        Ok(text) if !text.trim().is_empty() => match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => fail(&format!(
                "GATEWAY_MAX_CONNECTIONS={text:?} is not a positive number"
            )),
        },
        // A quarter: each proxied connection takes two descriptors (the client's and the
        // upstream's), and the store and the logs take some.
        _ => server::default_max_connections(4),
    };
    Config {
        addr,
        upstream,
        policy_path,
        policy,
        digest_key,
        limits: Limits {
            header_timeout: duration("GATEWAY_HEADER_TIMEOUT", Duration::from_secs(10)),
            upstream_timeout: duration("GATEWAY_UPSTREAM_TIMEOUT", Duration::from_secs(30)),
            max_connections,
        },
    }
}

/// Reads the policy again on every `SIGHUP`; a file that does not validate leaves the policy in
/// force.
async fn reload_on_hangup<St: Store>(
    layer: PolicyLayer<St>,
    path: PathBuf,
    key: Option<DigestKey>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; the policy will not be reloaded");
            return;
        };
        while hangups.recv().await.is_some() {
            reload(&layer, &path, key.as_ref());
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (layer, path, key);
    }
}

fn reload<St: Store>(layer: &PolicyLayer<St>, path: &Path, key: Option<&DigestKey>) {
    match load(path, key).and_then(|policy| {
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
    println!("shutting down: finishing the requests in flight");
}

async fn serve<St: Store>(store: St, cfg: Config, metrics: PrometheusHandle) {
    let layer = PolicyLayer::new(store.clone(), &cfg.policy)
        .unwrap_or_else(|e| fail(&format!("the policy is refused: {e}")))
        // A proxied request cannot be called back by dropping it: when its client goes away,
        // the upstream's answer still settles the hold, whatever a route's `on_disconnect`.
        .configure(|_route, layer| layer.on_disconnect(Disconnect::Finish));
    println!(
        "policy: {} routes from {}, upstream {}://{}{}",
        cfg.policy.routes().len(),
        cfg.policy_path.display(),
        cfg.upstream.scheme,
        cfg.upstream.authority,
        cfg.upstream.prefix
    );
    tokio::spawn(reload_on_hangup(
        layer.clone(),
        cfg.policy_path.clone(),
        cfg.digest_key.clone(),
    ));
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
    connector.set_connect_timeout(Some(cfg.limits.upstream_timeout));
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector);
    let service = tower::Layer::layer(
        &layer,
        Proxy {
            client,
            upstream: Arc::new(cfg.upstream.clone()),
            timeout: cfg.limits.upstream_timeout,
        },
    );
    let shared = Arc::new(Shared {
        layer,
        service,
        store,
        metrics,
        body_timeout: cfg.limits.header_timeout,
    });

    let listener = tokio::net::TcpListener::bind(&cfg.addr)
        .await
        .unwrap_or_else(|e| fail(&format!("cannot listen on {}: {e}", cfg.addr)));
    let local = listener
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("cannot read the listening address: {e}")));
    println!("listening on http://{local}");

    let limits = server::Limits {
        head_timeout: cfg.limits.header_timeout,
        max_connections: cfg.limits.max_connections,
        grace: Duration::from_secs(10),
    };
    let handler = move |request, peer| handle(request, peer, shared.clone());
    server::serve(listener, limits, handler, shutdown_signal()).await;
    println!("shut down");
}

#[tokio::main]
async fn main() {
    server::init_logging();
    let cfg = config();
    let metrics = server::prometheus()
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
