//! The compiled `gateway` example as a child process, and an upstream for it written without
//! this crate: a plain hyper service that counts and records what reaches it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use reqwest::Client;

use super::example::Example;

/// The shop's policy, as shipped.
pub fn shop_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/gateway/shop.toml")
}

/// One running gateway; killed when dropped.
pub struct Gateway {
    app: Example,
    pub base: String,
    /// The first line it printed on standard output: it names the store.
    pub first_line: String,
}

impl Gateway {
    /// Starts the gateway on a free port in front of `upstream` with the policy at `policy`, with
    /// these extra variables, and waits (bounded) until `/healthz` answers.
    pub async fn start(upstream: &str, policy: &Path, env: &[(&str, &str)]) -> Gateway {
        let log = ("RUST_LOG", "warn,tower_reserve=info");
        let mut command = Example::command(
            "gateway",
            "GATEWAY_ADDR",
            &[("GATEWAY_UPSTREAM", upstream), log],
        );
        command
            .env("GATEWAY_POLICY", policy)
            .stderr(Stdio::piped())
            .envs(env.iter().copied());
        let app = Example::spawn("gateway", command, Duration::from_secs(30));
        app.wait_healthy().await;
        Gateway {
            base: app.base.clone(),
            first_line: app.before.first().cloned().unwrap_or_default(),
            app,
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.app.url(path)
    }

    /// Sends `SIGHUP`.
    pub fn hang_up(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.app.pid().to_string()])
            .status()
            .expect("run kill -HUP");
        assert!(status.success(), "kill -HUP failed");
    }

    /// Waits (bounded, 10 s) for a line that contains `text`, and answers it.
    pub fn wait_for_line(&self, text: &str) -> String {
        self.app.wait_for_line(text)
    }

    /// The metrics page.
    pub async fn metrics(&self, client: &Client) -> String {
        let r = client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("scrape /metrics");
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.expect("a metrics page")
    }
}

/// The value of the sample of `name` whose labels include every one of `labels`
/// (`outcome="granted"`), 0 when there is none.
pub fn sample(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An HTTP client with a bounded timeout.
pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(64)
        .build()
        .expect("a reqwest client")
}

// ---------------------------------------------------------------------------------------------
// The upstream

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A plain hyper HTTP/1 service on a free loopback port, standing for a service in any
/// language. It answers every request with JSON saying what it received (`201` for `POST`,
/// `200` otherwise), and records it. Request headers steer it:
///
/// - `x-upstream-status: N`: answer status `N` instead;
/// - `x-upstream-actual: N`: add the response header `reserve-actual: N`;
/// - `x-upstream-hop: 1`: add hop-by-hop response headers (`Connection: x-hop-res`,
///   `X-Hop-Res`, `Keep-Alive`, `Proxy-Authenticate`, `Upgrade`, `Trailer`) beside `X-Kept`;
/// - `x-upstream-sleep: MS`: do the work (record it as [done](Upstream::done)) after `MS`
///   milliseconds, then answer. The work is done whether or not anyone still waits for the
///   answer, as a service that cannot be called back would.
///
/// `GET /big` answers 1 MiB of a known pattern, in 64 KiB chunks; `GET /huge` answers
/// [`HUGE`] bytes, made as they are read.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    done: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        let addr = listener.local_addr().expect("the upstream's address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let done: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let recorded = seen.clone();
        let finished = done.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (recorded, finished) = (recorded.clone(), finished.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    answer(req, recorded.clone(), finished.clone())
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            seen,
            done,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What reached the upstream so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }

    /// The requests whose work is done (at once, or after `x-upstream-sleep`).
    pub fn done(&self) -> Vec<Seen> {
        self.done.lock().expect("done lock").clone()
    }

    /// How many requests for `path` reached the upstream.
    pub fn count(&self, path: &str) -> usize {
        self.seen
            .lock()
            .expect("seen lock")
            .iter()
            .filter(|s| s.path == path)
            .count()
    }

    /// Requests per path.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for s in self.seen.lock().expect("seen lock").iter() {
            *out.entry(s.path.clone()).or_default() += 1;
        }
        out
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Byte `i` of the `/big` response.
pub fn big_byte(i: usize) -> u8 {
    (i % 251) as u8
}

pub const BIG: usize = 1 << 20;

/// The size of `GET /huge`: more than any socket buffers hold.
pub const HUGE: usize = 256 << 20;

type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    done: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<UpstreamBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let this = Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    seen.lock().expect("seen lock").push(this.clone());
    let sleep = parts
        .headers
        .get("x-upstream-sleep")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A task of its own: the work goes on when the caller hangs up.
    let work = tokio::spawn(async move {
        if let Some(ms) = sleep {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        done.lock().expect("done lock").push(this);
    });
    let _ = work.await;
    if parts.method == hyper::Method::GET && path == "/big" {
        let chunks: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> = (0..BIG / 65_536)
            .map(|c| {
                let chunk: Vec<u8> = (c * 65_536..(c + 1) * 65_536).map(big_byte).collect();
                Ok(hyper::body::Frame::data(Bytes::from(chunk)))
            })
            .collect();
        let stream = futures_util::stream::iter(chunks);
        let body = http_body_util::StreamBody::new(stream);
        return Ok(Response::new(BodyExt::boxed(body)));
    }
    if parts.method == hyper::Method::GET && path == "/huge" {
        let chunk = Bytes::from(vec![b'h'; 65_536]);
        let stream = futures_util::stream::iter(
            (0..HUGE / 65_536).map(move |_| Ok(hyper::body::Frame::data(chunk.clone()))),
        );
        let body = http_body_util::StreamBody::new(stream);
        return Ok(Response::new(BodyExt::boxed(body)));
    }
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let status = header("x-upstream-status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(if parts.method == hyper::Method::POST {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        });
    let json = serde_json::json!({ "path": path, "received": body.len() });
    let mut response = Response::new(BodyExt::boxed(Full::new(Bytes::from(json.to_string()))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("content-type", "application/json".parse().unwrap());
    if let Some(actual) = header("x-upstream-actual") {
        headers.insert("reserve-actual", actual.parse().unwrap());
    }
    if header("x-upstream-hop").is_some() {
        headers.insert("connection", "x-hop-res".parse().unwrap());
        headers.insert("x-hop-res", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("proxy-authenticate", "Basic".parse().unwrap());
        headers.insert("upgrade", "websocket".parse().unwrap());
        headers.insert("trailer", "x-t".parse().unwrap());
        headers.insert("x-kept", "yes".parse().unwrap());
    }
    Ok(response)
}
