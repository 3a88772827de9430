//! What clients are told: every way the layer (and the usage read) refuses a request, driven
//! against a store that fails with errors carrying a distinctive internal message, and against a
//! Redis that went away. No response may carry a store's error text or internal validation
//! text; the cause goes to the logs. And a `Rejection` is an axum response.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use support::fresh;
use tokio::sync::Notify;
use tower::{Layer, Service, ServiceExt};
use tower_reserve::{
    Actual, Budget, BudgetOf, BudgetStatus, Claim, Error, Extracted, Hold, HoldId, MemoryStore,
    Refund, Rejection, RequestBody, Reservation, ReserveLayer, Reserved, Settled, Settlement,
    Store, Unique, extract, usage,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a failing store puts in its errors, so that a leak is found wherever it lands.
const SECRET: &str = "zz-internal-7f3a";

/// Text that must never reach a client: the store's words, internal validation, hold ids.
fn assert_tells_nothing(what: &str, status: StatusCode, body: &str) {
    let lower = body.to_lowercase();
    for word in [
        SECRET,
        "redis",
        "broken pipe",
        "connection",
        "refused",
        "os error",
        "claim 0",
        "claim 1",
        "hold ",
        "extractor",
        "reservelayer",
        "route pattern",
    ] {
        assert!(
            !lower.contains(word),
            "{what}: {status} carries {word:?}: {body}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A store that fails on demand

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Reserve (and check) fail as a dropped connection does.
    ReserveIo,
    /// Reserve fails with an answer the client does not understand.
    ReserveProtocol,
    /// Commits fail.
    Commit,
    /// Budget reads fail.
    Budget,
}

#[derive(Clone)]
struct Faulty {
    inner: MemoryStore,
    fault: Arc<Mutex<Fault>>,
}

impl Faulty {
    fn new() -> Self {
        Self {
            inner: MemoryStore::new(),
            fault: Arc::new(Mutex::new(Fault::None)),
        }
    }

    fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    fn is(&self, fault: Fault) -> bool {
        *self.fault.lock().unwrap() == fault
    }
}

fn io_error() -> Error {
    let io = std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        format!("{SECRET}: broken pipe"),
    );
    Error::from(redis::RedisError::from(io))
}

fn protocol_error() -> Error {
    Error::from(redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        format!("{SECRET}: claim 0 of hold x"),
    )))
}

impl Store for Faulty {
    async fn reserve(&self, r: &Reservation) -> Result<Reserved, Error> {
        if self.is(Fault::ReserveIo) {
            return Err(io_error());
        }
        if self.is(Fault::ReserveProtocol) {
            return Err(protocol_error());
        }
        self.inner.reserve(r).await
    }
    async fn check(&self, r: &Reservation) -> Result<Reserved, Error> {
        if self.is(Fault::ReserveIo) {
            return Err(io_error());
        }
        self.inner.check(r).await
    }
    async fn settle(&self, id: &HoldId, s: &Settlement) -> Result<Settled, Error> {
        if s.is_commit() && self.is(Fault::Commit) {
            // Released underneath, so nothing stays held.
            let _ = self.inner.release(id).await;
            return Err(io_error());
        }
        self.inner.settle(id, s).await
    }
    async fn refund(&self, r: &Refund) -> Result<Settled, Error> {
        self.inner.refund(r).await
    }
    async fn extend(&self, id: &HoldId, lease: Duration) -> Result<u64, Error> {
        self.inner.extend(id, lease).await
    }
    async fn budget(&self, b: &Budget) -> Result<BudgetStatus, Error> {
        if self.is(Fault::Budget) {
            return Err(io_error());
        }
        self.inner.budget(b).await
    }
    async fn set_spent(&self, b: &Budget, spent: u64) -> Result<(), Error> {
        self.inner.set_spent(b, spent).await
    }
    async fn owner(&self, v: &Unique) -> Result<Option<String>, Error> {
        self.inner.owner(v).await
    }
    async fn remove(&self, v: &Unique) -> Result<bool, Error> {
        self.inner.remove(v).await
    }
}

// ---------------------------------------------------------------------------------------------
// The service under test

/// Claims by the `x-claims` header: a spend of `x-amount` on the budget `x-key` (limit 100), an
/// amount of zero, two claims on one budget, a value to own or give up, an amount read from a
/// JSON body, a path parameter no route pattern names.
fn claims(req: Request<Bytes>) -> std::future::Ready<Extracted> {
    std::future::ready(claims_of(req))
}

fn claims_of(req: Request<Bytes>) -> Extracted {
    let kind = extract::header(&req, "x-claims")?.to_owned();
    let budget =
        || -> Result<Budget, Rejection> { Ok(Budget::new(extract::header(&req, "x-key")?, 100)) };
    let claims = match kind.as_str() {
        "none" => Vec::new(),
        "spend" => {
            let amount: u64 = extract::header(&req, "x-amount")?.parse().unwrap();
            vec![Claim::spend(budget()?, amount)]
        }
        "zero" => vec![Claim::spend(budget()?, 0)],
        "twice" => vec![Claim::spend(budget()?, 1), Claim::spend(budget()?, 2)],
        "braces" => vec![Claim::spend(Budget::new("a{b}", 100), 1)],
        "own" | "give-up" => {
            let value = Unique::new("names", extract::header(&req, "x-value")?);
            let owner = extract::header(&req, "x-owner")?;
            if kind == "own" {
                vec![Claim::own(value, owner)]
            } else {
                vec![Claim::release_on_commit(value, owner)]
            }
        }
        "json" => vec![Claim::spend(
            budget()?,
            extract::json_pointer(&req, "/cents")?,
        )],
        "path" => vec![Claim::spend(
            Budget::new(extract::path_param(&req, "customer")?, 100),
            1,
        )],
        other => panic!("unknown claims {other}"),
    };
    Ok((req, claims))
}

/// The inner service, steered by `x-mode`.
async fn handle(
    release: Arc<Notify>,
    req: Request<RequestBody>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let mode = req
        .headers()
        .get("x-mode")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("ok")
        .to_owned();
    let hold = req.extensions().get::<Hold>().cloned();
    let mut response = Response::new(Full::new(Bytes::from_static(b"done")));
    match mode.as_str() {
        "ok" => {}
        "hang" => tokio::time::sleep(Duration::from_secs(2)).await,
        "sleep" => tokio::time::sleep(Duration::from_millis(400)).await,
        "wait" => release.notified().await,
        "actual-over" => {
            let held = hold.expect("a hold").budgets().next().unwrap().1;
            response.extensions_mut().insert(Actual::amount(held + 1));
        }
        "actual-garbage" => {
            response
                .headers_mut()
                .insert(tower_reserve::ACTUAL_HEADER, "lots".parse().unwrap());
        }
        other => panic!("unknown mode {other}"),
    }
    Ok(response)
}

struct Answer {
    status: StatusCode,
    body: String,
}

async fn call<S, ReqB, B>(what: &str, svc: S, req: Request<ReqB>) -> Answer
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let response = svc.oneshot(req).await.expect("a response");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_tells_nothing(what, status, &body);
    Answer { status, body }
}

fn request(claims: &str) -> http::request::Builder {
    Request::post("/items").header("x-claims", claims)
}

fn empty(builder: http::request::Builder) -> Request<Full<Bytes>> {
    builder.body(Full::new(Bytes::new())).unwrap()
}

/// A body that fails half-way, with the store's kind of words in its error.
struct FailingBody(bool);

impl Body for FailingBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.0 {
            return Poll::Ready(Some(Err(std::io::Error::other(format!(
                "{SECRET}: connection reset"
            )))));
        }
        self.0 = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{\"cents\":")))))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn every_rejection_tells_the_client_nothing_internal() {
    let (logs, _capturing) = support::capture_logs();

    let store = Faulty::new();
    let release = Arc::new(Notify::new());
    let inner = {
        let release = release.clone();
        tower::service_fn(move |req| handle(release.clone(), req))
    };
    let svc = ReserveLayer::new(store.clone(), claims)
        .body_limit(1024)
        .idempotency_header(HeaderName::from_static("idempotency-key"))
        .layer(inner.clone());
    let key = fresh("budget");
    let spend = |amount: u64| {
        request("spend")
            .header("x-key", key.as_str())
            .header("x-amount", amount.to_string())
    };

    // Bodies: too large, unreadable.
    let a = call(
        "body too large",
        svc.clone(),
        request("json")
            .header("content-length", "2048")
            .body(Full::new(Bytes::from(vec![b' '; 2048])))
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 413);
    let a = call(
        "unreadable body",
        svc.clone(),
        request("json").body(FailingBody(false)).unwrap(),
    )
    .await;
    assert_eq!(a.status, 400);

    // Claims the extractor cannot read: the client's own input is named, nothing else.
    let a = call(
        "no claims header",
        svc.clone(),
        empty(Request::post("/items")),
    )
    .await;
    assert_eq!(a.status, 400);
    let json = |body: &'static str, content_type: &str| {
        request("json")
            .header("x-key", key.as_str())
            .header("content-type", content_type)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let a = call("not JSON", svc.clone(), json("{}", "text/plain")).await;
    assert_eq!(a.status, 415);
    let a = call(
        "malformed JSON",
        svc.clone(),
        json("{\"cents\":", "application/json"),
    )
    .await;
    assert_eq!(a.status, 400);
    let a = call(
        "wrong type",
        svc.clone(),
        json("{\"cents\": \"many\"}", "application/json"),
    )
    .await;
    assert_eq!(a.status, 422);
    assert!(
        a.body.contains("expected u64"),
        "serde's words on the client's input: {}",
        a.body
    );
    let a = call("no route pattern", svc.clone(), empty(request("path"))).await;
    assert_eq!(a.status, 500);

    // Claims that cannot be reserved: one stable detail, whichever claim and why.
    let mut details = Vec::new();
    for (what, req) in [
        (
            "amount of zero",
            empty(request("zero").header("x-key", key.as_str())),
        ),
        (
            "two claims on one budget",
            empty(request("twice").header("x-key", key.as_str())),
        ),
        ("braces in a key", empty(request("braces"))),
        (
            "over-long key",
            empty(
                request("spend")
                    .header("x-key", "k".repeat(600))
                    .header("x-amount", "1"),
            ),
        ),
    ] {
        let a = call(what, svc.clone(), req).await;
        assert_eq!(a.status, 422, "{what}");
        details.push(serde_json::from_str::<serde_json::Value>(&a.body).unwrap()["detail"].clone());
    }
    assert!(details.windows(2).all(|w| w[0] == w[1]), "{details:?}");

    // Refusals by the store's answer.
    let a = call("over budget", svc.clone(), empty(spend(101))).await;
    assert_eq!(a.status, 403);
    let own = |owner: &str| {
        empty(
            request("own")
                .header("x-value", "ann")
                .header("x-owner", owner),
        )
    };
    assert_eq!(call("own", svc.clone(), own("a1")).await.status, 200);
    assert_eq!(call("taken", svc.clone(), own("a2")).await.status, 409);
    let give_up = empty(
        request("give-up")
            .header("x-value", "bob")
            .header("x-owner", "a1"),
    );
    assert_eq!(
        call("not the owner", svc.clone(), give_up).await.status,
        409
    );

    // Idempotency keys: replayed, in flight, reused with another payload.
    let keyed = |id: &str, body: &'static str, mode: &str| {
        spend(1)
            .header("idempotency-key", id)
            .header("x-mode", mode)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let id = fresh("idem");
    assert_eq!(
        call("first", svc.clone(), keyed(&id, "a", "ok"))
            .await
            .status,
        200
    );
    // Its retry is answered the first response again, from the store.
    let again = call("replayed", svc.clone(), keyed(&id, "a", "ok")).await;
    assert_eq!((again.status.as_u16(), again.body.as_str()), (200, "done"));
    let id = fresh("idem");
    let first = tokio::spawn(svc.clone().oneshot(keyed(&id, "a", "sleep")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        call("in flight", svc.clone(), keyed(&id, "a", "ok"))
            .await
            .status,
        409
    );
    assert_eq!(
        call("reused", svc.clone(), keyed(&id, "b", "ok"))
            .await
            .status,
        422
    );
    assert_eq!(first.await.unwrap().unwrap().status(), 200);

    // The store fails.
    store.set(Fault::ReserveIo);
    let a = call("store unreachable", svc.clone(), empty(spend(1))).await;
    assert_eq!(a.status, 503);
    store.set(Fault::ReserveProtocol);
    let a = call("store answers nonsense", svc.clone(), empty(spend(1))).await;
    assert_eq!(a.status, 503);
    store.set(Fault::Commit);
    let a = call("commit fails", svc.clone(), empty(spend(1))).await;
    assert_eq!(a.status, 500);
    store.set(Fault::None);

    // The handler reports actual amounts that do not fit.
    let a = call(
        "actual above the hold",
        svc.clone(),
        empty(spend(5).header("x-mode", "actual-over")),
    )
    .await;
    assert_eq!(a.status, 500);
    let a = call(
        "actual garbage",
        svc.clone(),
        empty(spend(5).header("x-mode", "actual-garbage")),
    )
    .await;
    assert_eq!(a.status, 500);

    // The handler outlives its lease.
    let short = ReserveLayer::new(store.clone(), claims)
        .lease(Duration::from_millis(300))
        .layer(inner.clone());
    let a = call(
        "lease ran out",
        short,
        empty(spend(1).header("x-mode", "hang")),
    )
    .await;
    assert_eq!(a.status, 503);

    // Shadow mode with the store down lets the request through.
    store.set(Fault::ReserveIo);
    let shadow = ReserveLayer::new(store.clone(), claims)
        .shadow(true)
        .layer(inner.clone());
    assert_eq!(call("shadow", shadow, empty(spend(1))).await.status, 200);
    store.set(Fault::None);

    // The usage read.
    let of_key =
        BudgetOf::new(|req: &Request<Bytes>| Ok(Budget::new(extract::header(req, "x-key")?, 100)));
    let read = |key: &str| empty(Request::get("/usage").header("x-key", key));
    let a = call("usage", usage(store.clone(), of_key.clone()), read(&key)).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        call(
            "usage without its header",
            usage(store.clone(), of_key.clone()),
            empty(Request::get("/usage"))
        )
        .await
        .status,
        400
    );
    assert_eq!(
        call(
            "usage of a bad key",
            usage(store.clone(), of_key.clone()),
            read("a{b}")
        )
        .await
        .status,
        422
    );
    store.set(Fault::Budget);
    let a = call(
        "usage, store down",
        usage(store.clone(), of_key),
        read(&key),
    )
    .await;
    assert_eq!(a.status, 503);
    store.set(Fault::None);

    // Nothing stayed held; what the client was not told went to the logs.
    let status = store.budget(&Budget::new(key.as_str(), 100)).await.unwrap();
    assert_eq!(status.held, 0, "{status:?}");
    let logs = logs.text();
    assert!(
        logs.contains(SECRET),
        "the store's errors are logged: {logs}"
    );
    assert!(
        logs.contains("claim 0"),
        "invalid claims are logged: {logs}"
    );
    drop(release);
}

/// A real Redis that goes away: before a reserve, and between a reserve and its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_went_away_is_not_named() {
    let mut server = support::redis_server::RedisServer::start();
    let store = tower_reserve::RedisStore::builder()
        .timeout(Duration::from_millis(300))
        .connect(&server.url())
        .await
        .unwrap();
    let release = Arc::new(Notify::new());
    let inner = {
        let release = release.clone();
        tower::service_fn(move |req| handle(release.clone(), req))
    };
    let svc = ReserveLayer::new(store.clone(), claims).layer(inner);
    let key = fresh("budget");
    let spend = |mode: &str| {
        empty(
            request("spend")
                .header("x-key", key.as_str())
                .header("x-amount", "1")
                .header("x-mode", mode),
        )
    };
    let of_key =
        BudgetOf::new(|req: &Request<Bytes>| Ok(Budget::new(extract::header(req, "x-key")?, 100)));
    let read = || empty(Request::get("/usage").header("x-key", key.as_str()));
    assert_eq!(
        call("reachable", svc.clone(), spend("ok")).await.status,
        200
    );

    // Held, then Redis goes away before the commit.
    let waiting = tokio::spawn(svc.clone().oneshot(spend("wait")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.stop();
    release.notify_one();
    let response = waiting.await.unwrap().unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_tells_nothing(
        "commit on a Redis gone",
        status,
        &String::from_utf8_lossy(&body),
    );
    assert_eq!(status, 500);

    let a = call("reserve on a Redis gone", svc.clone(), spend("ok")).await;
    assert_eq!(a.status, 503);
    let a = call("usage on a Redis gone", usage(store, of_key), read()).await;
    assert_eq!(a.status, 503);
}

// ---------------------------------------------------------------------------------------------
// Rejection in axum handlers

async fn api_key_handler(
    req: axum::extract::Request,
) -> Result<axum::response::Response, Rejection> {
    use axum::response::IntoResponse;
    let key =
        extract::header(&req, "x-api-key").map_err(|r| r.with_status(StatusCode::UNAUTHORIZED))?;
    Ok((StatusCode::OK, format!("hello {key}")).into_response())
}

#[tokio::test]
async fn a_rejection_is_an_axum_handler_error() {
    let app: axum::Router = axum::Router::new().route("/", axum::routing::get(api_key_handler));
    let get = |key: Option<&str>| {
        let mut req = Request::get("/");
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        req.body(axum::body::Body::empty()).unwrap()
    };
    let response = app.clone().oneshot(get(Some("ann"))).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello ann");

    let response = app.oneshot(get(None)).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["status"], 401);
    assert_eq!(json["title"], "Unauthorized");
    assert_eq!(json["detail"], "the header x-api-key is missing");

    // The layer's own rejection of an unreachable store, caught on its way out: through axum it
    // is the same document with the same headers, `Retry-After` included.
    let store = Faulty::new();
    store.set(Fault::ReserveIo);
    let caught = Arc::new(Mutex::new(None));
    let slot = caught.clone();
    let svc = ReserveLayer::new(store, claims)
        .error_handler(move |r: Rejection| {
            *slot.lock().unwrap() = Some(r.clone());
            r.into_problem_response()
        })
        .layer(tower::service_fn(|_req: Request<RequestBody>| async {
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::new())))
        }));
    let req = empty(
        request("spend")
            .header("x-key", "k")
            .header("x-amount", "1"),
    );
    assert_eq!(call("unreachable", svc, req).await.status, 503);
    let rejection = caught.lock().unwrap().take().expect("the rejection");
    let plain = rejection.clone().into_problem_response();
    let via_axum = axum::response::IntoResponse::into_response(rejection);
    assert_eq!(plain.status(), via_axum.status());
    assert_eq!(plain.headers(), via_axum.headers());
    assert_eq!(via_axum.headers()["retry-after"], "1");
    let plain = plain.into_body().collect().await.unwrap().to_bytes();
    let via_axum = via_axum.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(plain, via_axum);
}

/// An error handler answers what axum handlers answer: a `(StatusCode, Json(..))` tuple for the
/// refusal it shapes, the rejection itself (axum's `IntoResponse`, which the crate's own
/// rendering no longer shadows) for the rest; both reach the client through the layer.
#[tokio::test]
async fn an_error_handler_answers_axum_responses() {
    use axum::Json;
    use axum::response::IntoResponse;
    use tower_reserve::RejectionKind;

    let budget = Budget::new(fresh("team"), 100);
    let of_team = budget.clone();
    let layer = ReserveLayer::new(MemoryStore::new(), move |req: Request<Bytes>| {
        let budget = of_team.clone();
        async move {
            let tokens: u64 = extract::json_pointer(&req, "/max_tokens")?;
            Extracted::Ok((req, vec![Claim::spend(budget, tokens)]))
        }
    })
    .error_handler(|rejection: Rejection| match rejection.kind() {
        RejectionKind::OverBudget { remaining, .. } => (
            StatusCode::PAYMENT_REQUIRED,
            Json(serde_json::json!({ "error": "out_of_tokens", "tokens_left": remaining })),
        )
            .into_response(),
        _ => rejection.into_response(),
    });
    let app: axum::Router = axum::Router::new()
        .route("/complete", axum::routing::post(|| async { "done" }))
        .route_layer(layer);
    let post = |body: &'static str| {
        Request::post("/complete")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap()
    };

    let response = app
        .clone()
        .oneshot(post(r#"{"max_tokens": 60}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = app
        .clone()
        .oneshot(post(r#"{"max_tokens": 60}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({ "error": "out_of_tokens", "tokens_left": 40 })
    );

    // Anything else: the problem document, as axum renders a rejection.
    let response = app
        .oneshot(post(r#"{"max_tokens": "lots"}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["status"], 422);
}
